//! `claracore run` against the real llama-server with the tiny model: the
//! one-shot mode (argument, stdin, both), errors the daemon answers, keys
//! over TCP, and the interactive chat driven through a real
//! pseudo-terminal (Python's `pty.spawn` makes the child a session leader
//! with the terminal as its controlling tty, so `\x03` is a real SIGINT).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const TOKEN: &str = "ccsk_run00000000000000000000000000000000000000000000000000000000000000";
const READER: &str = "ccsk_rdr00000000000000000000000000000000000000000000000000000000000000";

fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The tiny model with a context long enough for a long answer, and full
/// request bodies in the history (the tests read the messages sent).
fn config(extra: &str) -> String {
    format!(
        "[history]\ncontent = \"full\"\n{extra}\n[models.tiny]\nmodel = \"{}\"\nargs = [\"-c\", \"8192\", \"-t\", \"1\"]\n",
        tiny_model()
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON body the daemon recorded for a row.
fn sent(row: &Value) -> Value {
    serde_json::from_str(row["request_content"].as_str().unwrap()).unwrap()
}

/// Runs `claracore run ARGS` on the daemon's socket with `stdin` piped in.
fn run_with_stdin(d: &Daemon, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = d
        .cli_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shot_streams_an_answer_from_the_argument_or_stdin() {
    let d = Daemon::start(&config(""));
    let out = d.cli(&[
        "run",
        "tiny",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--seed",
        "7",
        "--system",
        "Be brief.",
        "--verbose",
        "say",
        "hi",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.trim().len() > 1 && stdout.ends_with('\n'),
        "{stdout:?}"
    );
    let rows = d.wait_rows(1, Duration::from_secs(5)).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["outcome"], "ok", "{row}");
    assert_eq!(row["endpoint"], "/v1/chat/completions");
    assert_eq!(row["streamed"], true);
    let body = sent(row);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "say hi"}])
    );
    assert_eq!(
        (&body["max_tokens"], &body["seed"], &body["temperature"]),
        (&json!(8), &json!(7), &json!(0.0))
    );
    // --verbose's figures (stderr) are the ones the daemon recorded.
    let n = row["completion_tokens"].as_i64().unwrap();
    assert!(
        stderr.contains(&format!("answer: {n} tokens, ")) && stderr.contains("tokens/s"),
        "{stderr}"
    );
    assert!(!stdout.contains("tokens/s"), "figures stay off stdout");

    // stdin alone is the prompt; with an argument it follows a blank line.
    let out = run_with_stdin(&d, &["run", "tiny", "--max-tokens", "4"], "from stdin\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
    let out = run_with_stdin(
        &d,
        &["run", "tiny", "--max-tokens", "4", "sum", "up:"],
        "from stdin\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = d.wait_rows(3, Duration::from_secs(5)).await;
    assert_eq!(
        sent(&rows[1])["messages"],
        json!([{"role": "user", "content": "from stdin"}])
    );
    assert_eq!(
        sent(&rows[0])["messages"],
        json!([{"role": "user", "content": "sum up:\n\nfrom stdin"}])
    );
    assert!(
        rows.iter()
            .all(|r| r["endpoint"] == "/v1/chat/completions" && r["outcome"] == "ok"),
        "{rows:?}"
    );

    // Nothing to send is an error before any request.
    let out = run_with_stdin(&d, &["run", "tiny"], "\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no prompt"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_model_fails_naming_the_valid_ones() {
    let d = Daemon::start(&config(""));
    let out = d.cli(&["run", "nope", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("404") && err.contains("'nope' not found") && err.contains("tiny"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());

    // The daemon is not there at all.
    let out = Command::new(BIN)
        .args(["run", "tiny", "hi", "--host", "unix:/nonexistent/c.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot reach claracore at unix:/nonexistent/c.sock"));
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_the_key_comes_from_key_or_claracore_key() {
    let d = Daemon::start(&config(&format!(
        "[auth.keys.runner]\nhash = \"{}\"\nscopes = [\"inference\"]\n\
         [auth.keys.reader]\nhash = \"{}\"\nscopes = [\"read\"]\n",
        hash(TOKEN),
        hash(READER)
    )));
    let host = format!("http://{}", d.addr);
    let tcp = |args: &[&str], key: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "tiny", "--max-tokens", "4", "--host", &host])
            .args(args)
            .env_remove("CLARACORE_KEY")
            .env_remove("CLARACORE_HOST");
        if let Some(key) = key {
            cmd.env("CLARACORE_KEY", key);
        }
        cmd.output().unwrap()
    };
    let out = tcp(&["hi"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("401") && err.contains("--key"), "{err}");
    let out = tcp(&["hi"], Some(READER));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    let out = tcp(&["--key", TOKEN, "hi"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
    let out = tcp(&["hi"], Some(TOKEN));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let rows = d.wait_rows(4, Duration::from_secs(5)).await;
    let ok: Vec<&Value> = rows.iter().filter(|r| r["outcome"] == "ok").collect();
    assert_eq!(ok.len(), 2, "{rows:?}");
    assert!(
        ok.iter()
            .all(|r| r["key_name"] == "runner" && r["endpoint"] == "/v1/chat/completions"),
        "{rows:?}"
    );
    // The key never reaches the output.
    assert!(!text(&out.stdout).contains(TOKEN) && !text(&out.stderr).contains(TOKEN));
}

/// `claracore run ARGS` on a pseudo-terminal; what it writes is collected
/// by a thread as it comes.
struct Pty {
    child: KillOnDrop,
    input: std::process::ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
    /// How far [`Pty::expect`] has read.
    seen: usize,
}

const PTY_SPAWN: &str =
    "import os, pty, sys\nsys.exit(os.waitstatus_to_exitcode(pty.spawn(sys.argv[1:])))";

impl Pty {
    fn spawn(d: &Daemon, args: &[&str]) -> Pty {
        let mut child = Command::new(python())
            .args(["-c", PTY_SPAWN, BIN, "run"])
            .args(args)
            .env("CLARACORE_HOST", format!("unix:{}", d.socket().display()))
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            child: KillOnDrop(child),
            input,
            output,
            seen: 0,
        }
    }

    /// Types `keys` (a terminal sends `\r` for Enter).
    fn send(&mut self, keys: &str) {
        self.input.write_all(keys.as_bytes()).unwrap();
        self.input.flush().unwrap();
    }

    /// Everything written since `from`.
    fn since(&self, from: usize) -> String {
        text(&self.output.lock().unwrap()[from..])
    }

    fn len(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    /// Waits until `needle` appears after what was already seen, and moves
    /// past it; returns what came before it.
    fn expect(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let after = self.since(self.seen);
            if let Some(i) = after.find(needle) {
                self.seen += after[..i + needle.len()].len();
                return after[..i].to_string();
            }
            if Instant::now() > deadline {
                panic!("{needle:?} not seen within {within:?}; after the last match:\n{after:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("run did not exit within {within:?}:\n{}", self.since(0));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn interactive_chat_keeps_the_conversation_and_takes_multi_line_messages() {
    let d = Daemon::start(&config(""));
    let mut pty = Pty::spawn(&d, &["tiny", "--max-tokens", "8", "--system", "Be brief."]);
    pty.expect(">>> ", T);
    pty.send("hello\r");
    let first = pty.expect(">>> ", T);

    pty.send("\"\"\"\r");
    pty.expect("... ", T);
    pty.send("line one\r");
    pty.expect("... ", T);
    pty.send("line two\"\"\"\r");
    pty.expect(">>> ", T);

    pty.send("/?\r");
    pty.expect("/clear", T);
    pty.expect(">>> ", T);
    pty.send("/nope\r");
    pty.expect("Unknown command '/nope'", T);
    pty.expect(">>> ", T);
    pty.send("/clear\r");
    pty.expect("Cleared", T);
    pty.expect(">>> ", T);
    pty.send("again\r");
    pty.expect(">>> ", T);
    pty.send("/bye\r");
    assert_eq!(pty.wait_exit(T), Some(0), "{}", pty.since(0));

    let rows = d.wait_rows(3, Duration::from_secs(5)).await;
    assert_eq!(rows.len(), 3, "the commands sent nothing");
    assert!(
        rows.iter()
            .all(|r| r["endpoint"] == "/v1/chat/completions" && r["outcome"] == "ok"),
        "{rows:?}"
    );
    let system = json!({"role": "system", "content": "Be brief."});
    let (third, second, first_row) = (sent(&rows[0]), sent(&rows[1]), sent(&rows[2]));
    assert_eq!(
        first_row["messages"],
        json!([system, {"role": "user", "content": "hello"}])
    );
    assert_eq!(first_row["stream"], true);
    // The second turn carries the first exchange, with the answer as it was
    // printed, and the three-quoted lines as one message.
    let m = second["messages"].as_array().unwrap();
    assert_eq!(m.len(), 4, "{second}");
    assert_eq!(m[2]["role"], "assistant");
    let answer = m[2]["content"].as_str().unwrap();
    assert!(!answer.trim().is_empty());
    // The terminal turns each \n into \r\n.
    assert!(
        first.contains(&answer.replace('\n', "\r\n")),
        "{answer:?} not in {first:?}"
    );
    assert_eq!(
        m[3],
        json!({"role": "user", "content": "line one\nline two"})
    );
    // /clear left only the system message.
    assert_eq!(
        third["messages"],
        json!([system, {"role": "user", "content": "again"}])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_a_streaming_answer_and_returns_to_the_prompt() {
    let d = Daemon::start(&config(""));
    let mut pty = Pty::spawn(&d, &["tiny", "--max-tokens", "8000"]);
    pty.expect(">>> ", T);
    pty.send("tell me everything\r");
    // Wait for the answer to be streaming: well past the echoed line.
    let from = pty.len();
    let deadline = Instant::now() + T;
    while pty.len() < from + 200 {
        assert!(Instant::now() < deadline, "no answer: {}", pty.since(from));
        std::thread::sleep(Duration::from_millis(10));
    }
    pty.send("\x03");
    pty.expect("(stopped", Duration::from_secs(5));
    pty.expect(">>> ", Duration::from_secs(5));
    // The daemon saw the client leave and cancelled the generation.
    let rows = d.wait_rows(1, Duration::from_secs(5)).await;
    assert_eq!(rows[0]["outcome"], "cancelled", "{}", rows[0]);
    assert_eq!(rows[0]["endpoint"], "/v1/chat/completions");
    let m = d.model("tiny").await;
    assert_eq!(m["state"], "ready", "the model stays loaded: {m}");

    // At the prompt Ctrl-C clears the line; a second one in a row exits.
    pty.send("half a line");
    pty.send("\x03");
    pty.expect("Ctrl-C again", T);
    pty.expect(">>> ", T);
    pty.send("\x03");
    assert_eq!(pty.wait_exit(T), Some(0), "{}", pty.since(0));
    // Nothing more was sent.
    assert_eq!(d.wait_rows(1, Duration::from_secs(1)).await.len(), 1);

    // Ctrl-D on an empty line exits too.
    let mut pty = Pty::spawn(&d, &["tiny"]);
    pty.expect(">>> ", T);
    pty.send("\x04");
    assert_eq!(pty.wait_exit(T), Some(0), "{}", pty.since(0));
}
