//! `claracore run MODEL [PROMPT]`: a chat with one model from the terminal,
//! like `ollama run`.
//!
//! Every turn is one `POST /v1/chat/completions` with `"stream": true` to
//! the daemon at `--host`, carrying the whole conversation; the answer's
//! tokens are printed (and flushed) as their SSE events arrive.
//!
//! - One-shot: a PROMPT argument, or stdin when it is not a terminal (both:
//!   the argument, a blank line, then stdin), prints one answer and exits.
//! - Interactive (no PROMPT, stdin a terminal): a `>>> ` prompt read with
//!   rustyline; `"""` lines open and close a multi-line message; `/bye`,
//!   `/clear`, `/?`. Ctrl-C while an answer streams drops the request (the
//!   daemon sees the client leave and cancels the generation) and returns
//!   to the prompt.
//!
//! Invariants: the conversation holds only finished exchanges (a user
//! message is added together with its complete answer, so a stopped or
//! failed turn leaves it as it was); in one-shot mode stdout carries the
//! answer alone (errors and `--verbose` figures go to stderr; the
//! interactive chat's notes too).

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Deserialize;

use super::client::{post_stream, ClientError, Host};
use super::Daemon;
use crate::wire::openai::{ChatMessage, ChatRequest, ErrorReply, Reply, Role, Timings, Usage};
use crate::wire::sse::{self, Lines};

/// How long a connect to the daemon may take. The answer itself has no
/// bound: its head may wait on a model load, which the daemon bounds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the body may take to end after `[DONE]`.
const END_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of an error body read (its JSON message is short).
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The longest SSE line kept while waiting for its end; a daemon (or
/// something posing as one) sending more without a newline is an error.
const LINE_LIMIT: usize = 16 * 1024 * 1024;

const HELP: &str = "\
Available commands:
  /clear          Forget the conversation so far
  /bye            Exit (also Ctrl-D on an empty line)
  /?, /help       This list

Use \"\"\" to begin and end a multi-line message.
Ctrl-C stops an answer; at the prompt it clears the line (twice exits).
";

const AFTER_HELP: &str = "\
In the interactive chat: /clear forgets the conversation, /? lists the
commands, /bye or Ctrl-D exits; \"\"\" begins and ends a multi-line message.
Ctrl-C stops an answer (the daemon cancels it); at the prompt it clears the
line, and a second one exits.";

/// `run`'s arguments.
#[derive(Debug, PartialEq, Eq, Args)]
#[command(after_help = AFTER_HELP)]
pub struct Run {
    #[command(flatten)]
    pub daemon: Daemon,
    /// The model's name or alias
    pub model: String,
    /// The message to send (words are joined with spaces); without it, stdin
    /// when it is not a terminal, else an interactive chat
    #[arg(value_name = "PROMPT")]
    pub prompt: Vec<String>,
    /// A system message that opens the conversation
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Sampling temperature, 0 to 100 (0: greedy) [default: the model's]
    #[arg(long, value_name = "T", value_parser = temperature)]
    pub temperature: Option<Temperature>,
    /// At most N tokens per answer [default: the model's]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: Option<u32>,
    /// The sampler's seed, for repeatable answers
    #[arg(long, value_name = "N")]
    pub seed: Option<u32>,
    /// After each answer, print its prompt and answer tokens and tokens/s
    /// (to stderr)
    #[arg(long)]
    pub verbose: bool,
}

/// A temperature: finite and in 0..=100, so equality is total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Temperature(pub f64);

// NaN is refused by the parser, the one value that breaks reflexivity.
impl Eq for Temperature {}

fn temperature(text: &str) -> Result<Temperature, String> {
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() && (0.0..=100.0).contains(&t) => Ok(Temperature(t)),
        _ => Err(format!("{text:?} is not a number from 0 to 100")),
    }
}

impl Run {
    /// The request for `messages` (the whole conversation).
    pub fn body<'a>(&'a self, messages: &'a [ChatMessage]) -> ChatRequest<'a> {
        ChatRequest {
            model: &self.model,
            messages,
            stream: true,
            temperature: self.temperature.map(|Temperature(t)| t),
            max_tokens: self.max_tokens,
            seed: self.seed,
        }
    }

    /// The conversation before its first turn.
    fn opening(&self) -> Vec<ChatMessage> {
        self.system
            .iter()
            .map(|s| ChatMessage::new(Role::System, s.as_str()))
            .collect()
    }
}

/// Runs the command: one-shot or interactive as the arguments and stdin say.
pub fn run(args: &Run) -> Result<(), String> {
    let host = args.daemon.target();
    let stdin = std::io::stdin();
    let piped = !stdin.is_terminal();
    if args.prompt.is_empty() && !piped {
        return interactive(args, &host);
    }
    let mut prompt = args.prompt.join(" ");
    if piped {
        let mut text = String::new();
        stdin
            .lock()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the prompt from stdin: {e}"))?;
        prompt = join_prompt(&prompt, &text);
    }
    if prompt.trim().is_empty() {
        return Err("no prompt: give one as an argument or on stdin".into());
    }
    let mut messages = args.opening();
    messages.push(ChatMessage::new(Role::User, prompt));
    let runtime = runtime()?;
    let mut out = std::io::stdout().lock();
    let answer = runtime
        .block_on(turn(&host, &args.body(&messages), &mut out))
        .map_err(|e| e.to_string())?;
    finish_line(&mut out, &answer.text).map_err(|e| TurnError::Write(e).to_string())?;
    if args.verbose {
        eprint!("{}", answer.figures());
    }
    Ok(())
}

/// The argument, a blank line, then stdin; either alone when the other is
/// empty.
pub fn join_prompt(argument: &str, stdin: &str) -> String {
    let stdin = stdin.trim_end_matches(['\n', '\r']);
    match (argument.is_empty(), stdin.trim().is_empty()) {
        (_, true) => argument.to_string(),
        (true, false) => stdin.to_string(),
        (false, false) => format!("{argument}\n\n{stdin}"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// Ends the answer's last line, unless it already ended itself.
fn finish_line(out: &mut impl Write, text: &str) -> std::io::Result<()> {
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// One finished answer.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub text: String,
    /// The last chunk's llama.cpp `timings`, if it had them.
    pub timings: Option<Timings>,
    /// The last chunk's OpenAI `usage`, if it had it.
    pub usage: Option<Usage>,
    /// From the request to the last event.
    pub elapsed: Duration,
}

impl Answer {
    /// `--verbose`'s lines: prompt and answer tokens with their rates, from
    /// llama.cpp's `timings`, else the `usage` counts over the wall time.
    pub fn figures(&self) -> String {
        let rate = |n: f64, per_s: Option<f64>| match per_s {
            Some(r) => format!("{n} tokens, {r:.2} tokens/s"),
            None => format!("{n} tokens"),
        };
        if let Some(t) = &self.timings {
            let (Some(pn), Some(n)) = (t.prompt_n, t.predicted_n) else {
                return "no token counts in the answer\n".into();
            };
            return format!(
                "prompt: {}\nanswer: {}\n",
                rate(pn as f64, t.prompt_per_second),
                rate(n as f64, t.predicted_per_second)
            );
        }
        if let Some(u) = &self.usage {
            let (Some(pn), Some(n)) = (u.prompt_tokens, u.completion_tokens) else {
                return "no token counts in the answer\n".into();
            };
            let (pn, n) = (pn as f64, n as f64);
            let secs = self.elapsed.as_secs_f64();
            let per_s = (secs > 0.0).then(|| n / secs);
            return format!("prompt: {pn} tokens\nanswer: {}\n", rate(n, per_s));
        }
        "no token counts in the answer\n".into()
    }
}

/// Why a turn produced no (complete) answer.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}; give a key with --key or CLARACORE_KEY")]
    Unauthorized(ClientError),
    #[error("the answer stopped: {0}")]
    Broken(String),
    #[error("writing the answer: {0}")]
    Write(std::io::Error),
}

impl TurnError {
    /// Whether trying again (another line at the prompt) cannot help: the
    /// model or the key is wrong.
    fn is_final(&self) -> bool {
        use hyper::StatusCode as S;
        match self {
            TurnError::Unauthorized(_) => true,
            TurnError::Client(ClientError::Status { status, .. }) => {
                matches!(*status, S::NOT_FOUND | S::FORBIDDEN | S::BAD_REQUEST)
            }
            TurnError::Write(_) => true,
            _ => false,
        }
    }
}

/// Sends one request and prints its answer's tokens to `out` as they
/// arrive.
pub async fn turn(
    host: &Host,
    body: &ChatRequest<'_>,
    out: &mut impl Write,
) -> Result<Answer, TurnError> {
    let began = Instant::now();
    // Plain strings and numbers always serialize.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let streaming = post_stream(host, "/v1/chat/completions", bytes, CONNECT_TIMEOUT).await?;
    let status = streaming.status();
    let mut body = streaming;
    if !status.is_success() {
        let mut bytes = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
            if bytes.len() > ERROR_BODY_LIMIT {
                break;
            }
        }
        let error = ClientError::Status {
            status,
            message: error_message(&bytes),
        };
        return Err(if status == hyper::StatusCode::UNAUTHORIZED {
            TurnError::Unauthorized(error)
        } else {
            TurnError::Client(error)
        });
    }
    let mut answer = Answer::default();
    let mut lines = Lines::with_limit(LINE_LIMIT);
    let broken = |m: String| TurnError::Broken(m);
    loop {
        let Some(frame) = body.frame().await else {
            return Err(broken("the daemon closed the stream before [DONE]".into()));
        };
        let frame = frame.map_err(|e| broken(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut split = lines.split(&data);
        while let Some(line) = split.next_line() {
            match event(line).map_err(broken)? {
                Event::Ignore => {}
                Event::Done => {
                    answer.elapsed = began.elapsed();
                    // Read on to the body's end: leaving before it would
                    // look to the daemon like a client that gave up, and
                    // the finished request would be recorded cancelled.
                    let rest = async { while let Some(Ok(_)) = body.frame().await {} };
                    let _ = tokio::time::timeout(END_TIMEOUT, rest).await;
                    return Ok(answer);
                }
                Event::Chunk {
                    content,
                    timings,
                    usage,
                } => {
                    if !content.is_empty() {
                        out.write_all(content.as_bytes())
                            .and_then(|()| out.flush())
                            .map_err(TurnError::Write)?;
                        answer.text.push_str(&content);
                    }
                    if timings.is_some() {
                        answer.timings = timings;
                    }
                    if usage.is_some() {
                        answer.usage = usage;
                    }
                }
            }
        }
        drop(split);
        if lines.take_overlong() {
            return Err(broken(format!(
                "an event line longer than {LINE_LIMIT} bytes"
            )));
        }
    }
}

/// The `error.message` of a daemon's JSON error, or the body's text.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let reply = ErrorReply::deserialize(&v).ok();
            match reply.as_ref().and_then(|r| r.error.as_ref()?.message()) {
                Some(m) => m.to_string(),
                None => v.to_string(),
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "no message".into()
            } else {
                text.chars().take(500).collect()
            }
        }
    }
}

/// What one SSE line means to the chat.
// Made and consumed at once on the stack, per line: boxing the figures
// would allocate for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A comment, a blank line, another field, or a chunk with nothing for us.
    Ignore,
    /// `data: [DONE]`: the answer is complete.
    Done,
    Chunk {
        content: String,
        timings: Option<Timings>,
        usage: Option<Usage>,
    },
}

/// Reads one SSE line of a chat completion stream.
pub fn event(line: &[u8]) -> Result<Event, String> {
    let Some(data) = sse::data(line) else {
        return Ok(Event::Ignore);
    };
    if data == sse::DONE {
        return Ok(Event::Done);
    }
    // As text first: a daemon's stray invalid UTF-8 reads as U+FFFD.
    let data = String::from_utf8_lossy(data);
    let chunk: Reply<'_> =
        serde_json::from_str(&data).map_err(|e| format!("an event that is not JSON: {e}"))?;
    if let Some(error) = &chunk.error {
        return Err(error.describe());
    }
    let content = chunk
        .choices
        .first()
        .and_then(|c| c.delta.as_ref())
        .and_then(|d| d.content.as_deref())
        .unwrap_or("")
        .to_string();
    Ok(Event::Chunk {
        content,
        timings: chunk.timings,
        usage: chunk.usage,
    })
}

/// What one line typed at the prompt asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this message.
    Send(String),
    /// Inside a `"""` message: read another line.
    More,
    /// Nothing to do (a blank line).
    Nothing,
    Command(ChatCommand),
}

#[derive(Debug, PartialEq, Eq)]
pub enum ChatCommand {
    Bye,
    Clear,
    Help,
    Unknown(String),
}

/// The typed lines of the interactive chat, with the `"""` multi-line
/// state between them.
#[derive(Debug, Default)]
pub struct Input {
    /// The message so far while inside `"""`.
    open: Option<String>,
}

const QUOTES: &str = "\"\"\"";

impl Input {
    /// Whether a `"""` message is open (the prompt says `... `).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Drops an open `"""` message (Ctrl-C).
    pub fn abandon(&mut self) {
        self.open = None;
    }

    pub fn feed(&mut self, line: &str) -> Step {
        if let Some(mut text) = self.open.take() {
            return match line.trim_end().strip_suffix(QUOTES) {
                Some(last) => {
                    text.push_str(last);
                    message(text.trim_end_matches('\n'))
                }
                None => {
                    text.push_str(line);
                    text.push('\n');
                    self.open = Some(text);
                    Step::More
                }
            };
        }
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix(QUOTES) {
            if let Some(whole) = rest.strip_suffix(QUOTES) {
                return message(whole);
            }
            let mut text = rest.to_string();
            if !text.is_empty() {
                text.push('\n');
            }
            self.open = Some(text);
            return Step::More;
        }
        if let Some(command) = trimmed.strip_prefix('/') {
            let name = command.split_whitespace().next().unwrap_or("");
            return Step::Command(match name {
                "bye" => ChatCommand::Bye,
                "clear" => ChatCommand::Clear,
                "?" | "help" => ChatCommand::Help,
                _ => ChatCommand::Unknown(format!("/{name}")),
            });
        }
        message(line)
    }
}

fn message(text: &str) -> Step {
    if text.trim().is_empty() {
        Step::Nothing
    } else {
        Step::Send(text.to_string())
    }
}

/// The interactive chat on the terminal.
fn interactive(args: &Run, host: &Host) -> Result<(), String> {
    use rustyline::error::ReadlineError;

    let runtime = runtime()?;
    let mut editor =
        rustyline::DefaultEditor::new().map_err(|e| format!("opening the terminal: {e}"))?;
    let mut input = Input::default();
    let mut messages = args.opening();
    let mut interrupted = false;
    eprintln!("Chatting with {} (/? for help, /bye to exit)", args.model);
    loop {
        let prompt = if input.is_open() { "... " } else { ">>> " };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                if interrupted {
                    return Ok(());
                }
                interrupted = true;
                input.abandon();
                eprintln!("(Ctrl-C again, Ctrl-D or /bye to exit)");
                continue;
            }
            Err(ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(format!("reading the terminal: {e}")),
        };
        interrupted = false;
        if !line.trim().is_empty() {
            let _ = editor.add_history_entry(line.as_str());
        }
        let text = match input.feed(&line) {
            Step::Send(text) => text,
            Step::More | Step::Nothing => continue,
            Step::Command(ChatCommand::Bye) => return Ok(()),
            Step::Command(ChatCommand::Clear) => {
                messages = args.opening();
                eprintln!("Cleared the conversation.");
                continue;
            }
            Step::Command(ChatCommand::Help) => {
                eprint!("{HELP}");
                continue;
            }
            Step::Command(ChatCommand::Unknown(name)) => {
                eprintln!("Unknown command '{name}'. Type /? for help.");
                continue;
            }
        };
        let mut turn_messages = messages.clone();
        turn_messages.push(ChatMessage::new(Role::User, text));
        let body = args.body(&turn_messages);
        let mut out = std::io::stdout().lock();
        let result = runtime.block_on(async {
            tokio::select! {
                r = turn(host, &body, &mut out) => Some(r),
                // Dropping the turn closes the connection: the daemon
                // cancels the generation.
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        match result {
            Some(Ok(answer)) => {
                finish_line(&mut out, &answer.text)
                    .and_then(|()| writeln!(out))
                    .map_err(|e| TurnError::Write(e).to_string())?;
                if args.verbose {
                    eprint!("{}", answer.figures());
                }
                turn_messages.push(ChatMessage::new(Role::Assistant, answer.text));
                messages = turn_messages;
            }
            Some(Err(e)) => {
                let _ = out.write_all(b"\n").and_then(|()| out.flush());
                if e.is_final() {
                    return Err(e.to_string());
                }
                eprintln!("claracore: {e}");
            }
            None => {
                let _ = out.write_all(b"\n").and_then(|()| out.flush());
                eprintln!("(stopped; this exchange is not kept in the conversation)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_carry_content_figures_errors_and_the_end() {
        let event = |line: &str| super::event(line.as_bytes());
        assert_eq!(event("").unwrap(), Event::Ignore);
        assert_eq!(event(": keep-alive").unwrap(), Event::Ignore);
        assert_eq!(event("data: [DONE]").unwrap(), Event::Done);
        assert_eq!(event("data:[DONE]").unwrap(), Event::Done);
        let Event::Chunk { content, .. } =
            event(r#"data: {"choices":[{"delta":{"content":"hi"}}]}"#).unwrap()
        else {
            panic!("not a chunk");
        };
        assert_eq!(content, "hi");
        let Event::Chunk {
            content, timings, ..
        } = event(r#"data: {"choices":[{"delta":{}}],"timings":{"predicted_n":3}}"#).unwrap()
        else {
            panic!("not a chunk");
        };
        assert_eq!(
            (content.as_str(), timings),
            (
                "",
                Some(Timings {
                    predicted_n: Some(3),
                    ..Timings::default()
                })
            )
        );
        assert_eq!(
            event(r#"data: {"error":{"message":"context full"}}"#).unwrap_err(),
            "context full"
        );
        assert!(event("data: {nope").unwrap_err().contains("not JSON"));
        // No choices at all (a usage-only chunk) is not an error.
        assert!(matches!(
            event(r#"data: {"choices":[],"usage":{"completion_tokens":1}}"#).unwrap(),
            Event::Chunk { usage: Some(_), .. }
        ));
    }

    #[test]
    fn triple_quotes_make_one_message_of_many_lines() {
        let mut i = Input::default();
        assert_eq!(i.feed("\"\"\"first"), Step::More);
        assert!(i.is_open());
        assert_eq!(i.feed("/bye is text in here"), Step::More);
        assert_eq!(
            i.feed("last\"\"\""),
            Step::Send("first\n/bye is text in here\nlast".into())
        );
        assert!(!i.is_open());
        assert_eq!(i.feed("\"\"\""), Step::More);
        assert_eq!(i.feed("a"), Step::More);
        assert_eq!(i.feed("\"\"\""), Step::Send("a".into()));
        assert_eq!(
            i.feed("\"\"\"one line\"\"\""),
            Step::Send("one line".into())
        );
        assert_eq!(i.feed("\"\"\""), Step::More);
        assert_eq!(i.feed("\"\"\""), Step::Nothing);
        assert_eq!(i.feed("\"\"\"x"), Step::More);
        i.abandon();
        assert_eq!(i.feed("plain"), Step::Send("plain".into()));
    }

    #[test]
    fn slash_lines_are_commands() {
        let mut i = Input::default();
        assert_eq!(i.feed("/bye"), Step::Command(ChatCommand::Bye));
        assert_eq!(i.feed("  /clear "), Step::Command(ChatCommand::Clear));
        assert_eq!(i.feed("/?"), Step::Command(ChatCommand::Help));
        assert_eq!(i.feed("/help"), Step::Command(ChatCommand::Help));
        assert_eq!(
            i.feed("/load x"),
            Step::Command(ChatCommand::Unknown("/load".into()))
        );
        assert_eq!(i.feed("   "), Step::Nothing);
    }

    #[test]
    fn the_argument_and_stdin_join_with_a_blank_line() {
        assert_eq!(join_prompt("sum up", "text\n"), "sum up\n\ntext");
        assert_eq!(join_prompt("", "text\n"), "text");
        assert_eq!(join_prompt("sum up", "\n"), "sum up");
        assert_eq!(join_prompt("", ""), "");
    }

    #[test]
    fn figures_come_from_timings_else_usage() {
        let a = Answer {
            timings: serde_json::from_value(json!({"prompt_n": 29, "prompt_per_second": 100.0,
                                 "predicted_n": 8, "predicted_per_second": 50.5}))
            .unwrap(),
            ..Answer::default()
        };
        assert_eq!(
            a.figures(),
            "prompt: 29 tokens, 100.00 tokens/s\nanswer: 8 tokens, 50.50 tokens/s\n"
        );
        let a = Answer {
            usage: serde_json::from_value(json!({"prompt_tokens": 3, "completion_tokens": 10}))
                .unwrap(),
            elapsed: Duration::from_secs(2),
            ..Answer::default()
        };
        assert_eq!(
            a.figures(),
            "prompt: 3 tokens\nanswer: 10 tokens, 5.00 tokens/s\n"
        );
        assert!(Answer::default().figures().contains("no token counts"));
    }

    #[test]
    fn temperatures_are_finite_and_in_range() {
        assert_eq!(temperature("0.7"), Ok(Temperature(0.7)));
        for bad in ["NaN", "-1", "inf", "101", "warm"] {
            assert!(temperature(bad).is_err(), "{bad}");
        }
    }
}
