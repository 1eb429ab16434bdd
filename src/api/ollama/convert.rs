//! Ollama request and response shapes, and their translation to and from
//! the child's OpenAI endpoints. Pure: no I/O, no clock (times come in as
//! arguments), so every mapping is unit-tested field by field.
//!
//! Requests are read into typed structs: a field of the wrong type is a 400
//! that names it (serde's message has the line and column). Unknown
//! top-level fields are ignored, as Ollama does; unknown `options` are
//! refused, since a misspelt sampling option would otherwise be silently
//! dropped.

use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::error::cut;
pub use crate::scheduler::KeepAlive;
use crate::wire::openai::{self, Arguments, Embeddings, ErrorReply, Reply};

/// `POST /api/chat`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub tools: Option<Vec<Value>>,
    pub format: Option<Value>,
    pub options: Option<Map<String, Value>>,
    pub stream: Option<bool>,
    pub keep_alive: Option<Value>,
    pub think: Option<Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub suffix: Option<String>,
    pub system: Option<String>,
    pub template: Option<String>,
    pub raw: Option<bool>,
    pub images: Option<Vec<String>>,
    pub format: Option<Value>,
    pub options: Option<Map<String, Value>>,
    pub stream: Option<bool>,
    pub keep_alive: Option<Value>,
    pub think: Option<Value>,
}

/// `POST /api/embed`.
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub model: String,
    pub input: Option<Value>,
    pub options: Option<Map<String, Value>>,
    pub keep_alive: Option<Value>,
    pub truncate: Option<bool>,
    pub dimensions: Option<u32>,
}

/// `POST /api/embeddings` (the older one).
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub options: Option<Map<String, Value>>,
    pub keep_alive: Option<Value>,
}

/// `POST /api/show`; older clients send `name`.
#[derive(Debug, Deserialize)]
pub struct ShowRequest {
    pub model: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub verbose: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    pub images: Option<Vec<String>>,
    pub tool_calls: Option<Vec<ToolCall>>,
    pub thinking: Option<String>,
    pub tool_name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCall {
    pub function: ToolFunction,
}

#[derive(Debug, Deserialize)]
pub struct ToolFunction {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

/// Parses a request body into `T`, or says what is wrong with it.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            format!("invalid request body: {e}")
        } else {
            format!("request body is not valid JSON: {e}")
        }
    })
}

/// Ollama's `keep_alive`: a number of seconds, or a duration string
/// (`"5m"`, `"1h30m"`, `"-1"`, `"0"`); negative means forever.
pub fn keep_alive(value: &Value) -> Result<KeepAlive, String> {
    let bad = || {
        format!(
            "keep_alive: expected a number of seconds or a duration such as \"5m\", got {}",
            cut(&value.to_string(), 40)
        )
    };
    let seconds = match value {
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        Value::String(s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<f64>() {
                n
            } else if let Some(rest) = s.strip_prefix('-') {
                humantime::parse_duration(rest).map_err(|_| bad())?;
                -1.0
            } else {
                humantime::parse_duration(s)
                    .map_err(|_| bad())?
                    .as_secs_f64()
            }
        }
        _ => return Err(bad()),
    };
    if !seconds.is_finite() {
        return Err(bad());
    }
    if seconds < 0.0 {
        return Ok(KeepAlive::Never);
    }
    // Beyond a century is "forever" for any operator.
    if seconds > 100.0 * 365.0 * 86_400.0 {
        return Ok(KeepAlive::Never);
    }
    Ok(KeepAlive::For(Duration::from_secs_f64(seconds)))
}

/// How an option maps onto llama-server's request.
enum Kind {
    Number(&'static str),
    Integer(&'static str),
    Stop,
    MaxTokens,
    /// Decided when the child starts (context size, GPU layers, threads):
    /// a running child cannot change it, so it is reported, not applied.
    LoadTime,
    /// Accepted by Ollama, gone from llama.cpp's samplers.
    Obsolete,
}

fn option_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "temperature" => Kind::Number("temperature"),
        "top_p" => Kind::Number("top_p"),
        "min_p" => Kind::Number("min_p"),
        "typical_p" => Kind::Number("typical_p"),
        "repeat_penalty" => Kind::Number("repeat_penalty"),
        "presence_penalty" => Kind::Number("presence_penalty"),
        "frequency_penalty" => Kind::Number("frequency_penalty"),
        "mirostat_tau" => Kind::Number("mirostat_tau"),
        "mirostat_eta" => Kind::Number("mirostat_eta"),
        "top_k" => Kind::Integer("top_k"),
        "seed" => Kind::Integer("seed"),
        "repeat_last_n" => Kind::Integer("repeat_last_n"),
        "mirostat" => Kind::Integer("mirostat"),
        "num_keep" => Kind::Integer("n_keep"),
        "stop" => Kind::Stop,
        "num_predict" => Kind::MaxTokens,
        "num_ctx"
        | "num_batch"
        | "num_gpu"
        | "main_gpu"
        | "low_vram"
        | "numa"
        | "vocab_only"
        | "use_mmap"
        | "use_mlock"
        | "num_thread"
        | "logits_all"
        | "embedding_only"
        | "f16_kv"
        | "num_gqa"
        | "rope_frequency_base"
        | "rope_frequency_scale" => Kind::LoadTime,
        "tfs_z" | "penalize_newline" => Kind::Obsolete,
        _ => return None,
    })
}

/// Applies Ollama `options` to an OpenAI-shaped request body. Returns the
/// options that could not be applied to a running child (`num_ctx`, …).
pub fn apply_options(
    options: Option<&Map<String, Value>>,
    body: &mut Map<String, Value>,
) -> Result<Vec<String>, String> {
    let mut ignored = Vec::new();
    let Some(options) = options else {
        return Ok(ignored);
    };
    for (name, value) in options {
        let Some(kind) = option_kind(name) else {
            return Err(format!("unknown option `{}` in options", cut(name, 40)));
        };
        if value.is_null() {
            continue;
        }
        match kind {
            Kind::Number(to) => {
                let n = value
                    .as_f64()
                    .ok_or_else(|| format!("options.{name} must be a number"))?;
                body.insert(to.into(), json!(n));
            }
            Kind::Integer(to) => {
                body.insert(to.into(), json!(integer(name, value)?));
            }
            Kind::MaxTokens => {
                // -1: until the context is full; -2: fill the context.
                let n = integer(name, value)?;
                if n >= 0 {
                    body.insert("max_tokens".into(), json!(n));
                }
            }
            Kind::Stop => {
                let stops = match value {
                    Value::String(s) => vec![Value::String(s.clone())],
                    Value::Array(items) if items.iter().all(Value::is_string) => items.clone(),
                    _ => return Err(format!("options.{name} must be a list of strings")),
                };
                body.insert("stop".into(), Value::Array(stops));
            }
            Kind::LoadTime | Kind::Obsolete => ignored.push(name.clone()),
        }
    }
    Ok(ignored)
}

fn integer(name: &str, value: &Value) -> Result<i64, String> {
    if let Some(n) = value.as_i64() {
        return Ok(n);
    }
    match value.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(format!("options.{name} must be an integer")),
    }
}

/// `format`: `"json"`, a JSON schema, or empty.
pub fn apply_format(format: Option<&Value>, body: &mut Map<String, Value>) -> Result<(), String> {
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => {
            body.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(schema @ Value::Object(_)) => {
            body.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
        }
        Some(other) => {
            return Err(format!(
                "format must be \"json\" or a JSON schema object, got {}",
                cut(&other.to_string(), 40)
            ))
        }
    }
    Ok(())
}

/// `think`: true/false, or a level (`"low"`, `"medium"`, `"high"`).
pub fn apply_think(think: Option<&Value>, body: &mut Map<String, Value>) -> Result<(), String> {
    match think {
        None | Some(Value::Null) => {}
        Some(Value::Bool(on)) => {
            body.insert(
                "chat_template_kwargs".into(),
                json!({ "enable_thinking": on }),
            );
        }
        Some(Value::String(level)) if ["low", "medium", "high"].contains(&level.as_str()) => {
            body.insert(
                "chat_template_kwargs".into(),
                json!({ "enable_thinking": true }),
            );
            body.insert("reasoning_effort".into(), json!(level));
        }
        Some(other) => {
            return Err(format!(
                "think must be true, false, \"low\", \"medium\" or \"high\", got {}",
                cut(&other.to_string(), 40)
            ))
        }
    }
    Ok(())
}

/// One base64 image as an OpenAI image part (a data URL). A value that is
/// not base64 is refused here rather than by the child.
pub fn image_part(b64: &str, at: &str) -> Result<Value, String> {
    // Clients may send a data URL already.
    let raw = b64
        .split_once(";base64,")
        .filter(|(head, _)| head.starts_with("data:"))
        .map_or(b64, |(_, data)| data);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map_err(|e| format!("{at} is not valid base64: {e}"))?;
    if bytes.is_empty() {
        return Err(format!("{at} is empty"));
    }
    let mime = if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if bytes.starts_with(b"GIF8") {
        "image/gif"
    } else if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else if bytes.starts_with(b"BM") {
        "image/bmp"
    } else {
        "application/octet-stream"
    };
    Ok(json!({
        "type": "image_url",
        "image_url": {"url": format!("data:{mime};base64,{}", raw.trim())}
    }))
}

/// Ollama chat messages as OpenAI messages. Tool calls get ids (Ollama has
/// none) that the following tool results refer to by the tool's name.
pub fn messages(messages: &[Message], vision: bool) -> Result<Vec<Value>, String> {
    let mut out = Vec::with_capacity(messages.len());
    // (id, function name) of calls not yet answered by a tool message.
    let mut open_calls: Vec<(String, String)> = Vec::new();
    let mut next_call = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if !["system", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(format!(
                "messages[{i}].role must be system, user, assistant or tool, got \"{}\"",
                cut(&m.role, 20)
            ));
        }
        let text = m.content.clone().unwrap_or_default();
        let mut msg = Map::new();
        msg.insert("role".into(), json!(m.role));
        match m.images.as_deref() {
            Some(images) if !images.is_empty() => {
                if !vision {
                    return Err(format!(
                        "messages[{i}] has images, but this model has no vision projector (--mmproj)"
                    ));
                }
                let mut parts = vec![json!({"type": "text", "text": text})];
                for (j, img) in images.iter().enumerate() {
                    parts.push(image_part(img, &format!("messages[{i}].images[{j}]"))?);
                }
                msg.insert("content".into(), Value::Array(parts));
            }
            _ => {
                msg.insert("content".into(), json!(text));
            }
        }
        if let Some(thinking) = m.thinking.as_deref().filter(|t| !t.is_empty()) {
            msg.insert("reasoning_content".into(), json!(thinking));
        }
        if let Some(calls) = m.tool_calls.as_deref().filter(|c| !c.is_empty()) {
            let mut list = Vec::with_capacity(calls.len());
            for c in calls {
                let id = format!("call_{next_call}");
                next_call += 1;
                let arguments = match &c.function.arguments {
                    Value::Null => "{}".to_string(),
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                list.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": arguments},
                }));
                open_calls.push((id, c.function.name.clone()));
            }
            msg.insert("tool_calls".into(), Value::Array(list));
        }
        if m.role == "tool" {
            let pos = match m.tool_name.as_deref() {
                Some(name) => open_calls.iter().position(|(_, n)| n == name),
                None => (!open_calls.is_empty()).then_some(0),
            };
            if let Some(pos) = pos {
                let (id, _) = open_calls.remove(pos);
                msg.insert("tool_call_id".into(), json!(id));
            }
            if let Some(name) = &m.tool_name {
                msg.insert("name".into(), json!(name));
            }
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// The figures an Ollama answer ends with, from llama.cpp's `timings` (or
/// OpenAI `usage` when a child sends no timings).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    pub prompt_tokens: Option<u64>,
    pub prompt_ms: Option<f64>,
    pub eval_tokens: Option<u64>,
    pub eval_ms: Option<f64>,
}

impl Figures {
    /// Takes what a response object (or stream chunk) carries.
    pub fn take(&mut self, v: &Reply<'_>) {
        if let Some(t) = &v.timings {
            if let Some(p) = count(t.prompt_n) {
                self.prompt_tokens = Some(p + count(t.cache_n).unwrap_or(0));
            }
            self.prompt_ms = t.prompt_ms.or(self.prompt_ms);
            self.eval_tokens = count(t.predicted_n).or(self.eval_tokens);
            self.eval_ms = t.predicted_ms.or(self.eval_ms);
        }
        if let Some(u) = &v.usage {
            if self.prompt_tokens.is_none() {
                self.prompt_tokens = count(u.prompt_tokens);
            }
            if self.eval_tokens.is_none() {
                self.eval_tokens = count(u.completion_tokens);
            }
        }
    }
}

/// A token count, unless it is negative.
fn count(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok())
}

fn nanos(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1_000_000.0) as u64
    } else {
        0
    }
}

/// Request-side times the answer reports, measured by claracore.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// From the request's arrival until now.
    pub total: Duration,
    /// Spent waiting for the model to start (≈0 when it was ready).
    pub load: Duration,
}

/// The statistics fields of a final (`done: true`) object.
pub fn finish_fields(out: &mut Map<String, Value>, figures: &Figures, times: Times) {
    out.insert(
        "total_duration".into(),
        json!(times.total.as_nanos() as u64),
    );
    out.insert("load_duration".into(), json!(times.load.as_nanos() as u64));
    if let Some(n) = figures.prompt_tokens {
        out.insert("prompt_eval_count".into(), json!(n));
    }
    out.insert(
        "prompt_eval_duration".into(),
        json!(nanos(figures.prompt_ms.unwrap_or(0.0))),
    );
    if let Some(n) = figures.eval_tokens {
        out.insert("eval_count".into(), json!(n));
    }
    out.insert(
        "eval_duration".into(),
        json!(nanos(figures.eval_ms.unwrap_or(0.0))),
    );
}

/// OpenAI's `finish_reason` as Ollama's `done_reason`.
pub fn done_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "length",
        _ => "stop",
    }
}

/// OpenAI tool calls (arguments as a JSON string) as Ollama's (an object).
pub fn tool_calls(calls: &[openai::ToolCall<'_>]) -> Vec<Value> {
    calls
        .iter()
        .filter_map(|c| {
            let f = c.function.as_ref()?;
            let name = f.name.as_deref()?;
            let arguments = match &f.arguments {
                Some(Arguments::Text(s)) => arguments(s.as_ref()),
                Some(Arguments::Object(m)) => Value::Object(m.clone()),
                _ => json!({}),
            };
            Some(tool_call(name, arguments))
        })
        .collect()
}

/// A call's arguments, sent as JSON text, as the JSON itself (`{}` when
/// the text is not JSON).
pub fn arguments(text: &str) -> Value {
    serde_json::from_str::<Value>(text).unwrap_or_else(|_| json!({}))
}

/// One Ollama tool call.
pub fn tool_call(name: &str, arguments: Value) -> Value {
    json!({"function": {"name": name, "arguments": arguments}})
}

/// Which Ollama answer a child's OpenAI answer becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `/api/chat`: `message: {role, content, …}`.
    Chat,
    /// `/api/generate`: `response: "…"`.
    Generate,
}

/// The start of every answer object: model, time, and `done`.
pub fn head(model: &str, created_at: &str, done: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("model".into(), json!(model));
    m.insert("created_at".into(), json!(created_at));
    m.insert("done".into(), json!(done));
    m
}

/// A non-streamed child answer (chat.completion, text_completion or
/// llama.cpp's native `/infill` object) as one Ollama object.
pub fn complete_answer(
    shape: Shape,
    model: &str,
    created_at: &str,
    answer: &Reply<'_>,
    times: Times,
) -> Value {
    let message = answer.first_message();
    let thinking = message
        .and_then(|m| m.reasoning_content.as_deref())
        .filter(|t| !t.is_empty());
    let calls = message
        .and_then(|m| m.tool_calls.as_deref())
        .map(|c| tool_calls(c))
        .filter(|c| !c.is_empty());
    let mut out = head(model, created_at, true);
    body_fields(&mut out, shape, answer.openai_text(), thinking, calls);
    out.insert(
        "done_reason".into(),
        json!(done_reason(answer.finish_reason())),
    );
    let mut figures = Figures::default();
    figures.take(answer);
    finish_fields(&mut out, &figures, times);
    Value::Object(out)
}

/// `message` (chat) or `response` + `thinking` (generate).
pub fn body_fields(
    out: &mut Map<String, Value>,
    shape: Shape,
    text: &str,
    thinking: Option<&str>,
    calls: Option<Vec<Value>>,
) {
    match shape {
        Shape::Chat => {
            let mut m = Map::new();
            m.insert("role".into(), json!("assistant"));
            m.insert("content".into(), json!(text));
            if let Some(t) = thinking {
                m.insert("thinking".into(), json!(t));
            }
            if let Some(c) = calls {
                m.insert("tool_calls".into(), Value::Array(c));
            }
            out.insert("message".into(), Value::Object(m));
        }
        Shape::Generate => {
            out.insert("response".into(), json!(text));
            if let Some(t) = thinking {
                out.insert("thinking".into(), json!(t));
            }
        }
    }
}

/// An error body from a child (OpenAI `{"error": {"message"}}`, or a plain
/// string) as the one line Ollama clients read.
pub fn child_error(body: &[u8]) -> String {
    let reply = serde_json::from_slice::<ErrorReply<'_>>(body).ok();
    match reply.as_ref().and_then(|r| r.error.as_ref()?.text()) {
        Some(message) => message.to_string(),
        None => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "the model process returned an error".to_string()
            } else {
                cut(text, 300)
            }
        }
    }
}

/// Embedding vectors of an OpenAI embeddings answer, in input order.
pub fn embeddings(answer: &Embeddings) -> Option<Vec<Value>> {
    let mut rows: Vec<(u64, _)> = answer
        .data
        .as_ref()?
        .iter()
        .enumerate()
        .map(|(i, d)| (d.index.unwrap_or(i as u64), d.embedding.as_ref()))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter()
        .map(|(_, e)| {
            Some(Value::Array(
                e?.iter().cloned().map(Value::Number).collect(),
            ))
        })
        .collect()
}

/// `input` of `/api/embed`: one string or a list of them.
pub fn embed_input(input: Option<&Value>) -> Result<Value, String> {
    match input {
        Some(Value::String(s)) => Ok(json!([s])),
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
            Ok(Value::Array(items.clone()))
        }
        Some(Value::Array(items)) if items.is_empty() => Err("input must not be empty".into()),
        None | Some(Value::Null) => Err("input is required: a string or a list of strings".into()),
        Some(_) => Err("input must be a string or a list of strings".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: Value) -> Result<(Map<String, Value>, Vec<String>), String> {
        let mut body = Map::new();
        let ignored = apply_options(v.as_object(), &mut body)?;
        Ok((body, ignored))
    }

    #[test]
    fn options_map_onto_llama_server_sampling_fields() {
        let (body, ignored) = opts(json!({
            "temperature": 0.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": 42,
            "num_predict": 16, "stop": ["\n", "user:"], "repeat_penalty": 1.1,
            "presence_penalty": 1.5, "frequency_penalty": 1.0, "typical_p": 0.7,
            "repeat_last_n": 33, "mirostat": 1, "mirostat_tau": 0.8, "mirostat_eta": 0.6,
            "num_keep": 5, "num_ctx": 1024, "num_gpu": 1, "tfs_z": 1.0
        }))
        .unwrap();
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["top_k"], 20);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["min_p"], 0.05);
        assert_eq!(body["seed"], 42);
        assert_eq!(body["max_tokens"], 16);
        assert_eq!(body["stop"], json!(["\n", "user:"]));
        assert_eq!(body["repeat_penalty"], 1.1);
        assert_eq!(body["presence_penalty"], 1.5);
        assert_eq!(body["frequency_penalty"], 1.0);
        assert_eq!(body["typical_p"], 0.7);
        assert_eq!(body["repeat_last_n"], 33);
        assert_eq!(body["mirostat"], 1);
        assert_eq!(body["n_keep"], 5);
        assert!(!body.contains_key("num_ctx"));
        assert_eq!(ignored, ["num_ctx", "num_gpu", "tfs_z"]);
    }

    #[test]
    fn bad_options_say_which_and_why() {
        for (v, says) in [
            (json!({"temprature": 1}), "unknown option `temprature`"),
            (
                json!({"temperature": "hot"}),
                "options.temperature must be a number",
            ),
            (json!({"top_k": 1.5}), "options.top_k must be an integer"),
            (json!({"seed": true}), "options.seed must be an integer"),
            (
                json!({"stop": [1]}),
                "options.stop must be a list of strings",
            ),
        ] {
            let e = opts(v.clone()).unwrap_err();
            assert!(e.contains(says), "{v}: {e}");
        }
        // Infinite generation and nulls leave the fields out.
        let (body, _) = opts(json!({"num_predict": -1, "temperature": null})).unwrap();
        assert!(body.is_empty());
        let (body, _) = opts(json!({"stop": "END", "seed": 7.0})).unwrap();
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["seed"], 7);
    }

    #[test]
    fn keep_alive_reads_seconds_durations_and_negatives() {
        let d = |s: u64| KeepAlive::For(Duration::from_secs(s));
        assert_eq!(keep_alive(&json!("5m")).unwrap(), d(300));
        assert_eq!(keep_alive(&json!("1h30m")).unwrap(), d(5400));
        assert_eq!(keep_alive(&json!(0)).unwrap(), d(0));
        assert_eq!(keep_alive(&json!("0")).unwrap(), d(0));
        assert_eq!(keep_alive(&json!(90)).unwrap(), d(90));
        assert_eq!(keep_alive(&json!(-1)).unwrap(), KeepAlive::Never);
        assert_eq!(keep_alive(&json!("-1")).unwrap(), KeepAlive::Never);
        assert_eq!(keep_alive(&json!("-5m")).unwrap(), KeepAlive::Never);
        assert_eq!(keep_alive(&json!(1e300)).unwrap(), KeepAlive::Never);
        for bad in [json!("soon"), json!(true), json!([1]), json!({})] {
            assert!(
                keep_alive(&bad).unwrap_err().contains("keep_alive"),
                "{bad}"
            );
        }
    }

    #[test]
    fn format_becomes_response_format() {
        let mut b = Map::new();
        apply_format(Some(&json!("json")), &mut b).unwrap();
        assert_eq!(b["response_format"], json!({"type": "json_object"}));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        apply_format(Some(&schema), &mut b).unwrap();
        assert_eq!(b["response_format"]["type"], "json_schema");
        assert_eq!(b["response_format"]["json_schema"]["schema"], schema);
        let mut empty = Map::new();
        apply_format(Some(&json!("")), &mut empty).unwrap();
        assert!(empty.is_empty());
        assert!(apply_format(Some(&json!("xml")), &mut empty).is_err());
        assert!(apply_format(Some(&json!(3)), &mut empty).is_err());
    }

    #[test]
    fn images_are_checked_and_typed() {
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\n....");
        let part = image_part(&png, "images[0]").unwrap();
        assert_eq!(
            part["image_url"]["url"],
            format!("data:image/png;base64,{png}")
        );
        let e = image_part("not base64!", "messages[0].images[0]").unwrap_err();
        assert!(
            e.contains("messages[0].images[0] is not valid base64"),
            "{e}"
        );
        assert!(image_part("", "x").is_err());
    }

    #[test]
    fn messages_carry_tool_calls_both_ways_and_images_need_a_projector() {
        let msgs: Vec<Message> = serde_json::from_value(json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"}
        ]))
        .unwrap();
        let out = messages(&msgs, false).unwrap();
        let call = &out[1]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(out[2]["tool_call_id"], call["id"]);

        let call_text = call.to_string();
        let typed: openai::ToolCall<'_> = serde_json::from_str(&call_text).unwrap();
        let back = tool_calls(std::slice::from_ref(&typed));
        assert_eq!(
            back,
            [json!({"function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]
        );

        let with_image: Vec<Message> = serde_json::from_value(
            json!([{"role": "user", "content": "what?", "images": ["iVBORw0KGgo="]}]),
        )
        .unwrap();
        assert!(messages(&with_image, false)
            .unwrap_err()
            .contains("no vision projector"));
        let parts = messages(&with_image, true).unwrap();
        assert_eq!(parts[0]["content"][1]["type"], "image_url");

        let bad_role: Vec<Message> =
            serde_json::from_value(json!([{"role": "robot", "content": "x"}])).unwrap();
        assert!(messages(&bad_role, false)
            .unwrap_err()
            .contains("messages[0].role"));
    }

    #[test]
    fn a_chat_completion_becomes_an_ollama_chat_answer() {
        let answer = json!({
            "choices": [{"finish_reason": "length", "index": 0,
                "message": {"role": "assistant", "content": " Extern dise"}}],
            "usage": {"completion_tokens": 3, "prompt_tokens": 29, "total_tokens": 32},
            "timings": {"cache_n": 28, "prompt_n": 1, "prompt_ms": 1.83,
                "predicted_n": 3, "predicted_ms": 2.28}
        });
        let times = Times {
            total: Duration::from_millis(12),
            load: Duration::from_millis(3),
        };
        let answer_text = answer.to_string();
        let answer: Reply<'_> = serde_json::from_str(&answer_text).unwrap();
        let out = complete_answer(Shape::Chat, "tiny:latest", "T", &answer, times);
        assert_eq!(out["model"], "tiny:latest");
        assert_eq!(out["created_at"], "T");
        assert_eq!(
            out["message"],
            json!({"role": "assistant", "content": " Extern dise"})
        );
        assert_eq!(out["done"], true);
        assert_eq!(out["done_reason"], "length");
        assert_eq!(out["total_duration"], 12_000_000);
        assert_eq!(out["load_duration"], 3_000_000);
        assert_eq!(out["prompt_eval_count"], 29);
        assert_eq!(out["prompt_eval_duration"], 1_830_000);
        assert_eq!(out["eval_count"], 3);
        assert_eq!(out["eval_duration"], 2_280_000);

        let text = json!({"choices": [{"text": "abc", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1}});
        let text_text = text.to_string();
        let text: Reply<'_> = serde_json::from_str(&text_text).unwrap();
        let out = complete_answer(Shape::Generate, "tiny", "T", &text, times);
        assert_eq!(out["response"], "abc");
        assert_eq!(out["done_reason"], "stop");
        assert_eq!(out["prompt_eval_count"], 2);
        assert_eq!(out["eval_count"], 1);
        assert!(out.get("message").is_none());
    }

    #[test]
    fn child_errors_read_as_one_line() {
        assert_eq!(
            child_error(br#"{"error":{"code":501,"message":"Infill is not supported"}}"#),
            "Infill is not supported"
        );
        assert_eq!(child_error(br#"{"error":"plain"}"#), "plain");
        assert_eq!(child_error(b"boom"), "boom");
        assert!(child_error(b"").contains("returned an error"));
    }

    #[test]
    fn embed_input_is_a_string_or_a_list_of_strings() {
        assert_eq!(embed_input(Some(&json!("a"))).unwrap(), json!(["a"]));
        assert_eq!(
            embed_input(Some(&json!(["a", "b"]))).unwrap(),
            json!(["a", "b"])
        );
        assert!(embed_input(None).is_err());
        assert!(embed_input(Some(&json!([]))).is_err());
        assert!(embed_input(Some(&json!([1]))).is_err());
        let answer = json!({"data": [
            {"index": 1, "embedding": [0.5]}, {"index": 0, "embedding": [0.25]}]});
        let answer: Embeddings = serde_json::from_value(answer).unwrap();
        assert_eq!(embeddings(&answer).unwrap(), [json!([0.25]), json!([0.5])]);
    }
}
