//! The official client libraries (openai, anthropic; pinned in
//! `tests/tools/setup-test-deps.sh`) against the real binary and the real
//! llama-server with the tiny model: each call gets a real answer under
//! the configured model name, and a history row with its endpoint, model
//! and token counts. Also bad input on the routes those clients use, each
//! answered in its route's error shape, with the daemon serving after.

use std::time::{Duration, Instant};

use crate::common::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// Every call the test makes, run by the venv's python; prints one JSON
/// object of what each call returned.
const SCRIPT: &str = r#"
import json, sys
import anthropic, openai

base = sys.argv[1]
msgs = [{"role": "user", "content": "hello"}]
out = {}
o = openai.OpenAI(base_url=base + "/v1", api_key="sk-unused", max_retries=0, timeout=120)

c = o.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
out["chat"] = {"model": c.model, "text": c.choices[0].message.content,
               "prompt": c.usage.prompt_tokens, "completion": c.usage.completion_tokens}

text, model, usage = "", None, None
for ch in o.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=4, stream=True,
                                    stream_options={"include_usage": True}):
    model = ch.model
    if ch.choices and ch.choices[0].delta.content:
        text += ch.choices[0].delta.content
    if ch.usage:
        usage = ch.usage
out["chat_stream"] = {"model": model, "text": text,
                      "prompt": usage.prompt_tokens, "completion": usage.completion_tokens}

r = o.responses.create(model="tiny", input="hello", max_output_tokens=4)
out["responses"] = {"model": r.model, "text": r.output_text,
                    "prompt": r.usage.input_tokens, "completion": r.usage.output_tokens}

text, done = "", None
for ev in o.responses.create(model="tiny", input="hello", max_output_tokens=4, stream=True):
    if ev.type == "response.output_text.delta":
        text += ev.delta
    elif ev.type == "response.completed":
        done = ev.response
out["responses_stream"] = {"model": done.model, "text": text,
                           "prompt": done.usage.input_tokens, "completion": done.usage.output_tokens}

out["models"] = [m.id for m in o.models.list()]
m = o.models.retrieve("tiny")
out["retrieve"] = {"id": m.id, "object": m.object}
out["retrieve_alias"] = o.models.retrieve("tiny-chat").id
try:
    o.models.retrieve("no-such-model")
    out["retrieve_unknown"] = "found"
except openai.NotFoundError as e:
    out["retrieve_unknown"] = {"status": e.status_code, "code": e.body.get("code")}

a = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=120)
m = a.messages.create(model="tiny", max_tokens=4, messages=msgs)
out["messages"] = {"model": m.model, "text": "".join(b.text for b in m.content if b.type == "text"),
                   "prompt": m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0),
                   "completion": m.usage.output_tokens}

with a.messages.stream(model="tiny", max_tokens=4, messages=msgs) as st:
    text = "".join(st.text_stream)
    m = st.get_final_message()
out["messages_stream"] = {"model": m.model, "text": text,
                          "prompt": m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0),
                          "completion": m.usage.output_tokens}

out["count_tokens"] = a.messages.count_tokens(model="tiny", messages=msgs).input_tokens
try:
    a.messages.create(model="no-such-model", max_tokens=4, messages=msgs)
    out["messages_unknown"] = "found"
except anthropic.NotFoundError as e:
    out["messages_unknown"] = {"status": e.status_code, "type": e.body["error"]["type"]}

print(json.dumps(out))
"#;

/// Runs `script` with the venv's python and `args`; its stdout as JSON.
fn run_python(script: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The history rows, once there are at least `n` (the writer batches).
async fn rows(d: &Daemon, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = d.get("/admin/history?limit=200").await;
        let rows = page["requests"].as_array().cloned().unwrap_or_default();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} rows after 10s: {page}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tiny_daemon() -> Daemon {
    Daemon::start(&tiny_model_table("tiny", "aliases = [\"tiny-chat\"]"))
}

#[tokio::test(flavor = "multi_thread")]
async fn official_clients_get_real_answers_and_every_call_is_recorded() {
    let d = tiny_daemon();
    let out = run_python(SCRIPT, &[&format!("http://{}", d.addr)]);
    for call in [
        "chat",
        "chat_stream",
        "responses",
        "responses_stream",
        "messages",
        "messages_stream",
    ] {
        let r = &out[call];
        assert_eq!(r["model"], "tiny", "{call}: {r}");
        assert!(
            r["text"].as_str().is_some_and(|t| !t.is_empty()),
            "{call}: {r}"
        );
        assert!(r["prompt"].as_i64().unwrap() > 0, "{call}: {r}");
        assert!(r["completion"].as_i64().unwrap() > 0, "{call}: {r}");
    }
    assert_eq!(out["models"], json!(["tiny"]));
    assert_eq!(out["retrieve"], json!({"id": "tiny", "object": "model"}));
    assert_eq!(out["retrieve_alias"], "tiny", "an alias finds its model");
    assert_eq!(
        out["retrieve_unknown"],
        json!({"status": 404, "code": "model_not_found"})
    );
    assert!(out["count_tokens"].as_i64().unwrap() > 0, "{out}");
    assert_eq!(
        out["messages_unknown"],
        json!({"status": 404, "type": "not_found_error"})
    );

    // One row per inference call (model lookups have none), with what the
    // client was told.
    let rows = rows(&d, 8).await;
    let of = |endpoint: &str, streamed: bool| -> Vec<&Value> {
        rows.iter()
            .filter(|r| {
                r["endpoint"] == endpoint && r["streamed"] == streamed && r["status"] == 200
            })
            .collect()
    };
    for (call, endpoint, streamed) in [
        ("chat", "/v1/chat/completions", false),
        ("chat_stream", "/v1/chat/completions", true),
        ("responses", "/v1/responses", false),
        ("responses_stream", "/v1/responses", true),
        ("messages", "/v1/messages", false),
        ("messages_stream", "/v1/messages", true),
    ] {
        let found = of(endpoint, streamed);
        assert_eq!(found.len(), 1, "{call}: {rows:?}");
        let row = found[0];
        assert_eq!(row["model"], "tiny", "{call}: {row}");
        assert_eq!(row["prompt_tokens"], out[call]["prompt"], "{call}: {row}");
        assert_eq!(
            row["completion_tokens"], out[call]["completion"],
            "{call}: {row}"
        );
        assert!(row["error"].is_null(), "{call}: {row}");
        assert!(row["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    }
    let counted = of("/v1/messages/count_tokens", false);
    assert_eq!(counted.len(), 1, "{rows:?}");
    assert_eq!(counted[0]["prompt_tokens"], out["count_tokens"]);
    let unknown: Vec<&Value> = rows.iter().filter(|r| r["status"] == 404).collect();
    assert_eq!(
        unknown.len(),
        1,
        "the unknown model's messages call: {rows:?}"
    );
    assert_eq!(unknown[0]["endpoint"], "/v1/messages");
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_name_the_configured_model_never_its_gguf_path() {
    let d = tiny_daemon();
    let path = tiny_model();
    let file = std::path::Path::new(&path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let msgs = json!([{"role": "user", "content": "hello"}]);
    for (route, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 2}),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "hello", "max_tokens": 2}),
        ),
        (
            "/v1/responses",
            json!({"model": "tiny", "input": "hello", "max_output_tokens": 2}),
        ),
        (
            "/v1/messages",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 2}),
        ),
    ] {
        let (status, answer) = d.post(route, &body).await;
        assert_eq!(status, StatusCode::OK, "{route}: {answer}");
        assert_eq!(answer["model"], "tiny", "{route}: {answer}");
        assert!(!answer.to_string().contains(&file), "{route}: {answer}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let s = stream(&d.addr, route, &streamed).await;
        assert_eq!(s.status, StatusCode::OK, "{route}");
        assert!(
            s.text().contains("\"model\":\"tiny\""),
            "{route}: {}",
            s.text()
        );
        assert!(!s.text().contains(&file), "{route}: {}", s.text());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_on_the_new_routes_is_a_clear_error_in_the_routes_shape() {
    let d = tiny_daemon();
    let anthropic = |v: &Value, kind: &str, says: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{v}");
    };
    let openai = |v: &Value, code: &str, says: &str| {
        assert_eq!(v["error"]["code"], code, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{v}");
    };
    for route in ["/v1/messages", "/v1/messages/count_tokens"] {
        let (s, v) = d.post(route, &json!({"messages": []})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{route}");
        anthropic(&v, "invalid_request_error", "no `model` field");
        let (s, v) = d.post(route, &json!({"model": 7, "messages": []})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{route}");
        anthropic(&v, "invalid_request_error", "must be a string");
        let (s, v) = d
            .post(route, &json!({"model": "nope", "messages": []}))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{route}");
        anthropic(&v, "not_found_error", "available models: tiny");
        let (s, v) = d.post(route, &json!(["tiny"])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{route}");
        anthropic(&v, "invalid_request_error", "JSON object");
    }
    for route in [
        "/v1/responses",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/infill",
    ] {
        let (s, v) = d.post(route, &json!({"input": "x"})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{route}");
        openai(&v, "invalid_request", "no `model` field");
        let (s, v) = d.post(route, &json!({"model": {"name": "tiny"}})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{route}");
        openai(&v, "invalid_request", "must be a string");
        let (s, v) = d.post(route, &json!({"model": "nope"})).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{route}");
        openai(&v, "model_not_found", "available models: tiny");
    }
    let tr = "/v1/audio/transcriptions";
    let (ct, body) = multipart(&[("language", "en")], b"RIFF\0\0\0\0WAVE");
    let (s, h, v) = send_raw(&d.addr, Method::POST, tr, &ct, body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    openai(&v, "invalid_request", "no `model` field");
    assert!(h.contains_key("x-request-id"));
    let (s, _, v) = send_raw(
        &d.addr,
        Method::POST,
        tr,
        "application/json",
        b"{\"model\":\"tiny\"}".to_vec(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    openai(&v, "invalid_request", "multipart/form-data");
    let (ct, body) = multipart(&[("model", "nope")], b"RIFF");
    let (s, _, v) = send_raw(&d.addr, Method::POST, tr, &ct, body).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    openai(&v, "model_not_found", "'nope'");
    let (s, v) = d.get_tcp("/v1/models/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    openai(&v, "model_not_found", "'nope'");

    // Well-formed requests reach llama-server, which answers for itself
    // (the tiny model has no audio and no infill tokens); each is a row
    // under the model.
    let (ct, body) = multipart(&[("model", "tiny-chat")], b"RIFF\0\0\0\0WAVE");
    let (s, h, v) = send_raw(&d.addr, Method::POST, tr, &ct, body).await;
    assert_ne!(v["error"]["code"], "model_not_found", "{s} {v}");
    assert!(h.contains_key("x-request-id"));
    let (s, v) = d
        .post(
            "/infill",
            &json!({"model": "tiny", "input_prefix": "def f(", "input_suffix": "):"}),
        )
        .await;
    assert!(
        v.to_string().contains("nfill"),
        "llama-server's own answer: {s} {v}"
    );

    // Still serving.
    assert_eq!(chat_status(&d.addr, "tiny").await, StatusCode::OK);
    let rows = rows(&d, 26).await;
    for endpoint in [tr, "/infill"] {
        assert!(
            rows.iter().any(|r| r["endpoint"] == endpoint
                && r["model"] == "tiny"
                && r["status"].as_i64() != Some(404)),
            "{endpoint}: {rows:?}"
        );
    }
    let refused = rows
        .iter()
        .filter(|r| r["endpoint"] == "/v1/messages" && r["status"] == 400)
        .count();
    assert_eq!(refused, 3, "every refused request has its row");
}
