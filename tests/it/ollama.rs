//! Ollama's API, against the real binary and a real llama-server, with the
//! official `ollama` clients (Python and JavaScript) and field by field
//! against the shapes in Ollama's docs/api.md (ollama/ollama at commit
//! 01e52d24bc00defcd9bcc6d995b11df0f08bc6f1).

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use hyper::{Method, StatusCode};

use serde_json::{json, Value};

/// A chat model, a copy that renders its template without Jinja (the tiny
/// model's Jinja path cannot build a JSON grammar; the plain one can), and
/// an embedding model, all on the tiny GGUF.
pub(crate) fn three_models() -> String {
    let m = tiny_model();
    format!(
        "[models.tiny]\nmodel = \"{m}\"\nargs = [\"-c\", \"512\", \"-t\", \"1\"]\naliases = [\"tiny-chat\"]\n\
         [models.plain]\nmodel = \"{m}\"\nargs = [\"-c\", \"512\", \"-t\", \"1\", \"--no-jinja\"]\n\
         [models.emb]\nmodel = \"{m}\"\nargs = [\"-c\", \"512\", \"-t\", \"1\", \"--embeddings\", \"--pooling\", \"mean\"]\n\
         [scheduler]\nmax_loaded = 3\n"
    )
}

/// Runs a script with the test venv's python (which has the pinned
/// `ollama` client); its stdout is one JSON object.
fn run_python(script: &str, host: &str) -> Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .env("OLLAMA_TEST_HOST", format!("http://{host}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

const PY_CLIENT: &str = r#"
import json, os, ollama
c = ollama.Client(host=os.environ["OLLAMA_TEST_HOST"])
out = {"version": ollama.__version__ if hasattr(ollama, "__version__") else None}
out["list"] = [m.model for m in c.list().models]
out["list_details"] = c.list().models[0].details.family
r = c.generate(model="tiny")
out["load"] = r.done_reason
out["ps"] = [(m.model, m.context_length, m.size_vram, m.expires_at is not None) for m in c.ps().models]
s = c.show("tiny:latest")
out["show"] = {"caps": s.capabilities, "family": s.details.family, "arch": s.modelinfo["general.architecture"],
               "template": bool(s.template)}
r = c.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4, "temperature": 0})
out["chat"] = {"content": r.message.content, "role": r.message.role, "done": r.done, "reason": r.done_reason,
               "eval_count": r.eval_count, "prompt_eval_count": r.prompt_eval_count,
               "eval_duration": r.eval_duration, "total_duration": r.total_duration}
parts = list(c.chat(model="tiny-chat:latest", messages=[{"role": "user", "content": "hi"}],
                    options={"num_predict": 6, "seed": 1}, stream=True))
out["chat_stream"] = {"parts": len(parts), "text": "".join(p.message.content for p in parts),
                      "last_done": parts[-1].done, "others_done": any(p.done for p in parts[:-1]),
                      "eval_count": parts[-1].eval_count}
def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The city
    """
    return "sunny"
r = c.chat(model="tiny", options={"num_predict": 3}, tools=[get_weather], messages=[
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
out["tools"] = {"done": r.done, "role": r.message.role, "eval_count": r.eval_count}
r = c.chat(model="plain", messages=[{"role": "user", "content": "json please"}], format="json",
           options={"num_predict": 8, "seed": 3})
out["format_json"] = r.message.content
r = c.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], think=True, options={"num_predict": 2})
out["think"] = r.eval_count
r = c.generate(model="tiny", prompt="hi", options={"num_predict": 3})
out["generate"] = {"response": r.response, "done": r.done, "eval_count": r.eval_count}
parts = list(c.generate(model="tiny", prompt="hi", options={"num_predict": 5, "seed": 2}, stream=True))
out["generate_stream"] = {"parts": len(parts), "last_done": parts[-1].done}
r = c.generate(model="tiny", prompt="<|im_start|>user\nhi<|im_end|>\n", raw=True, options={"num_predict": 3})
out["raw"] = {"response": r.response, "eval_count": r.eval_count, "prompt_eval_count": r.prompt_eval_count}
one = c.embed(model="emb", input="hello")
many = c.embed(model="emb", input=["hello", "world", "again"])
out["embed"] = {"one": [len(one.embeddings), len(one.embeddings[0])], "many": len(many.embeddings),
                "prompt_eval_count": many.prompt_eval_count}
out["embeddings_old"] = len(c.embeddings(model="emb", prompt="hello").embedding)
try:
    c.pull("tiny")
    out["pull"] = None
except ollama.ResponseError as e:
    out["pull"] = [e.status_code, e.error]
try:
    c.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    out["unknown"] = None
except ollama.ResponseError as e:
    out["unknown"] = [e.status_code, e.error]
r = c.chat(model="tiny", messages=[{"role": "user", "content": "bye"}], keep_alive=0, options={"num_predict": 2})
out["keep_alive_0"] = r.done
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_client_lists_chats_generates_embeds_and_unloads() {
    let d = Daemon::start(&three_models());
    let out = tokio::task::spawn_blocking({
        let addr = d.addr.clone();
        move || run_python(PY_CLIENT, &addr)
    })
    .await
    .unwrap();

    assert_eq!(
        out["list"],
        json!(["emb:latest", "plain:latest", "tiny:latest"])
    );
    assert_eq!(out["list_details"], "llama");
    assert_eq!(out["load"], "load");
    assert_eq!(out["ps"], json!([["tiny:latest", 512, 0, true]]));
    assert_eq!(out["show"]["family"], "llama");
    assert_eq!(out["show"]["arch"], "llama");
    assert_eq!(out["show"]["template"], true);
    assert_eq!(out["show"]["caps"], json!(["completion"]));

    let chat = &out["chat"];
    assert_eq!(chat["role"], "assistant");
    assert!(!chat["content"].as_str().unwrap().is_empty(), "{chat}");
    assert_eq!(chat["done"], true);
    assert_eq!(chat["reason"], "length");
    assert_eq!(chat["eval_count"], 4);
    assert!(chat["prompt_eval_count"].as_u64().unwrap() > 0);
    assert!(chat["eval_duration"].as_u64().unwrap() > 0);
    assert!(chat["total_duration"].as_u64() >= chat["eval_duration"].as_u64());

    let s = &out["chat_stream"];
    assert!(s["parts"].as_u64().unwrap() >= 3, "{s}");
    assert!(!s["text"].as_str().unwrap().is_empty());
    assert_eq!(s["last_done"], true);
    assert_eq!(s["others_done"], false);
    assert_eq!(s["eval_count"], 6);

    assert_eq!(out["tools"]["done"], true);
    assert_eq!(out["tools"]["eval_count"], 3);
    // The grammar made the model open a JSON object.
    assert!(
        out["format_json"]
            .as_str()
            .unwrap()
            .trim_start()
            .starts_with('{'),
        "{}",
        out["format_json"]
    );
    // The template took enable_thinking (the tiny model does not think).
    assert_eq!(out["think"], 2);
    assert_eq!(out["generate"]["done"], true);
    assert_eq!(out["generate"]["eval_count"], 3);
    assert!(out["generate_stream"]["parts"].as_u64().unwrap() >= 2);
    assert_eq!(out["generate_stream"]["last_done"], true);
    assert_eq!(out["raw"]["eval_count"], 3);
    assert!(out["raw"]["prompt_eval_count"].as_u64().unwrap() > 0);
    assert_eq!(out["embed"]["one"], json!([1, 64]));
    assert_eq!(out["embed"]["many"], 3);
    assert!(out["embed"]["prompt_eval_count"].as_u64().unwrap() >= 3);
    assert_eq!(out["embeddings_old"], 64);
    assert_eq!(out["pull"][0], 400);
    assert!(out["pull"][1]
        .as_str()
        .unwrap()
        .contains("declared in its config"));
    assert_eq!(out["unknown"][0], 404);
    assert!(out["unknown"][1].as_str().unwrap().contains("nope"));
    assert_eq!(out["keep_alive_0"], true);
    // keep_alive 0: unloaded once the answer was out.
    d.wait_state("tiny", "stopped", Duration::from_secs(10))
        .await;

    // Every inference call is a history row under its Ollama endpoint.
    let (_, h) = d.get("/admin/history?limit=100").await;
    let rows = h["requests"].as_array().unwrap();
    let count = |ep: &str| rows.iter().filter(|r| r["endpoint"] == ep).count();
    assert_eq!(count("/api/chat"), 7, "{h}");
    assert_eq!(count("/api/generate"), 4);
    assert_eq!(count("/api/embed"), 2);
    assert_eq!(count("/api/embeddings"), 1);
    let chat_row = rows
        .iter()
        .find(|r| r["endpoint"] == "/api/chat" && r["status"] == 200 && r["streamed"] == true)
        .unwrap();
    assert_eq!(chat_row["model"], "tiny");
    assert_eq!(chat_row["completion_tokens"], 6, "{chat_row}");
    let unknown = rows
        .iter()
        .find(|r| r["endpoint"] == "/api/chat" && r["status"] == 404)
        .unwrap();
    assert_eq!(unknown["outcome"], "rejected");
    // Metrics count them under their endpoint too.
    let (_, metrics) = d.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    for ep in [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    ] {
        assert!(
            metrics.contains(&format!("endpoint=\"{ep}\",outcome=\"ok\"")),
            "{ep} missing in\n{metrics}"
        );
    }
}

/// What a field of a documented answer must be.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    /// RFC 3339, as Go's time.Time marshals.
    Time,
    /// 64 lowercase hex digits.
    Digest,
    Int,
    Bool,
    Obj,
    Arr,
    /// An array of numbers.
    Floats,
    /// An array or null (`families`).
    ArrOrNull,
}

/// Checks `v` has every `(key, kind)` of a documented shape; returns what
/// is wrong.
fn shape(v: &Value, fields: &[(&str, Kind)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (key, kind) in fields {
        let Some(x) = v.get(key) else {
            wrong.push(format!("missing `{key}`"));
            continue;
        };
        let ok = match kind {
            Kind::Str => x.is_string(),
            Kind::Time => x
                .as_str()
                .is_some_and(|s| humantime::parse_rfc3339(s).is_ok()),
            Kind::Digest => x.as_str().is_some_and(|s| {
                s.len() == 64
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }),
            Kind::Int => x.is_u64(),
            Kind::Bool => x.is_boolean(),
            Kind::Obj => x.is_object(),
            Kind::Arr => x.is_array(),
            Kind::Floats => x
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_number)),
            Kind::ArrOrNull => x.is_array() || x.is_null(),
        };
        if !ok {
            wrong.push(format!("`{key}` is not {kind:?}: {x}"));
        }
    }
    wrong
}

use Kind::*;

/// docs/api.md "List Local Models" and "List Running Models": `details`.
const DETAILS: &[(&str, Kind)] = &[
    ("parent_model", Str),
    ("format", Str),
    ("family", Str),
    ("families", ArrOrNull),
    ("parameter_size", Str),
    ("quantization_level", Str),
];
/// The statistics a final answer carries ("Generate a completion").
const FINAL: &[(&str, Kind)] = &[
    ("model", Str),
    ("created_at", Time),
    ("done", Bool),
    ("done_reason", Str),
    ("total_duration", Int),
    ("load_duration", Int),
    ("prompt_eval_count", Int),
    ("prompt_eval_duration", Int),
    ("eval_count", Int),
    ("eval_duration", Int),
];

fn assert_shape(what: &str, v: &Value, fields: &[(&str, Kind)]) {
    let wrong = shape(v, fields);
    assert!(wrong.is_empty(), "{what}: {wrong:?} in {v}");
}

/// NDJSON lines of a streamed answer.
fn lines(s: &Streamed) -> Vec<Value> {
    s.text()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_has_the_fields_and_types_of_ollamas_api_document() {
    let d = Daemon::start(&three_models());
    let (status, v) = d.get_tcp("/api/version").await;
    assert_eq!(status, StatusCode::OK);
    assert_shape("version", &v, &[("version", Str)]);
    let root = request(&d.addr, Method::GET, "/", None).await;
    assert_eq!(root, (StatusCode::OK, json!("Ollama is running")));

    // Load a model: a generate with only the model.
    let (status, v) = d.post("/api/generate", &json!({"model": "tiny"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_shape(
        "load",
        &v,
        &[
            ("model", Str),
            ("created_at", Time),
            ("response", Str),
            ("done", Bool),
        ],
    );
    assert_eq!(
        (v["done"].clone(), v["response"].clone()),
        (json!(true), json!(""))
    );
    let (_, v) = d
        .post("/api/chat", &json!({"model": "tiny", "messages": []}))
        .await;
    assert_eq!(v["done_reason"], "load", "{v}");
    assert_eq!(v["message"], json!({"role": "assistant", "content": ""}));

    let (status, tags) = d.get_tcp("/api/tags").await;
    assert_eq!(status, StatusCode::OK);
    let models = tags["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    let size = std::fs::metadata(tiny_model()).unwrap().len();
    for m in models {
        assert_shape(
            "tags",
            m,
            &[
                ("name", Str),
                ("model", Str),
                ("modified_at", Time),
                ("size", Int),
                ("digest", Digest),
                ("details", Obj),
            ],
        );
        assert_shape("tags details", &m["details"], DETAILS);
        assert_eq!(m["size"], size);
        assert_eq!(m["details"]["format"], "gguf");
        assert_eq!(m["details"]["family"], "llama");
        assert_eq!(m["details"]["quantization_level"], "F32");
    }
    // The digest is the file's SHA-256.
    let sum = Command::new("sha256sum")
        .arg(tiny_model())
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(models[0]["digest"], sum.split_whitespace().next().unwrap());

    let (_, ps) = d.get_tcp("/api/ps").await;
    let running = ps["models"].as_array().unwrap();
    assert_eq!(running.len(), 1, "{ps}");
    assert_shape(
        "ps",
        &running[0],
        &[
            ("name", Str),
            ("model", Str),
            ("size", Int),
            ("digest", Digest),
            ("details", Obj),
            ("expires_at", Time),
            ("size_vram", Int),
            ("context_length", Int),
        ],
    );
    assert_eq!(running[0]["name"], "tiny:latest");
    assert_eq!(running[0]["context_length"], 512);
    // The default TTL is minutes away, not "never".
    let expires = humantime::parse_rfc3339(running[0]["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(30) && left < Duration::from_secs(86_400),
        "{left:?}"
    );

    let (status, show) = d.post("/api/show", &json!({"model": "tiny:latest"})).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert_shape(
        "show",
        &show,
        &[
            ("modelfile", Str),
            ("parameters", Str),
            ("template", Str),
            ("details", Obj),
            ("model_info", Obj),
            ("capabilities", Arr),
            ("modified_at", Time),
        ],
    );
    assert_shape("show details", &show["details"], DETAILS);
    assert_shape(
        "show model_info",
        &show["model_info"],
        &[
            ("general.architecture", Str),
            ("general.file_type", Int),
            ("general.parameter_count", Int),
            ("llama.context_length", Int),
            ("llama.embedding_length", Int),
            ("llama.block_count", Int),
        ],
    );
    // keep_alive: negative keeps it loaded "forever", a duration from now.
    for (keep, lo, hi) in [
        (json!(-1), 86_400 * 365 * 100, u64::MAX),
        (json!("5m"), 250, 301),
    ] {
        let (status, _) = d
            .post(
                "/api/generate",
                &json!({"model": "tiny", "keep_alive": keep}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (_, ps) = d.get_tcp("/api/ps").await;
        let at = humantime::parse_rfc3339(ps["models"][0]["expires_at"].as_str().unwrap()).unwrap();
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs();
        assert!(left >= lo && left <= hi, "keep_alive {keep}: {left} s left");
    }
    // A suffix goes to llama-server's /infill (the tiny model has no FIM
    // tokens, so it refuses; its reason comes back in Ollama's shape).
    let (status, v) = d
        .post(
            "/api/generate",
            &json!({"model": "tiny", "prompt": "def f(", "suffix": "return 1", "stream": false}),
        )
        .await;
    assert_eq!(status.as_u16(), 501, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Infill is not supported"),
        "{v}"
    );
    // Large arrays are left out as Ollama does without verbose.
    assert!(show["model_info"]["tokenizer.ggml.tokens"].is_null());
    assert!(show["template"].as_str().unwrap().contains("im_start"));

    let (status, v) = d
        .post(
            "/api/generate",
            &json!({"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 3}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_shape("generate", &v, FINAL);
    assert_shape("generate", &v, &[("response", Str)]);
    assert_eq!(v["eval_count"], 3);

    let (status, v) = d
        .post(
            "/api/chat",
            &json!({"model": "tiny", "stream": false, "options": {"num_predict": 3},
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_shape("chat", &v, FINAL);
    assert_shape(
        "chat message",
        &v["message"],
        &[("role", Str), ("content", Str)],
    );

    for (path, body, key) in [
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "hi", "options": {"num_predict": 4}}),
            "response",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "options": {"num_predict": 4}}),
            "message",
        ),
    ] {
        let s = stream(&d.addr, path, &body).await;
        assert_eq!(s.status, StatusCode::OK);
        let ls = lines(&s);
        let (last, parts) = ls.split_last().unwrap();
        assert!(!parts.is_empty(), "{path}: {ls:?}");
        for p in parts {
            assert_shape(
                path,
                p,
                &[
                    ("model", Str),
                    ("created_at", Time),
                    (key, Str),
                    ("done", Bool),
                ][..]
                    .iter()
                    .map(|&(k, kind)| (k, if k == "message" { Obj } else { kind }))
                    .collect::<Vec<_>>(),
            );
            assert_eq!(p["done"], false);
        }
        assert_shape(path, last, FINAL);
        assert_eq!(last["done"], true);
        assert_eq!(last["eval_count"], 4);
    }

    let (status, v) = d
        .post("/api/embed", &json!({"model": "emb", "input": ["a", "b"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_shape(
        "embed",
        &v,
        &[
            ("model", Str),
            ("embeddings", Arr),
            ("total_duration", Int),
            ("load_duration", Int),
            ("prompt_eval_count", Int),
        ],
    );
    for e in v["embeddings"].as_array().unwrap() {
        assert_eq!(e.as_array().unwrap().len(), 64);
        assert!(e.as_array().unwrap().iter().all(Value::is_number));
    }
    let (status, v) = d
        .post("/api/embeddings", &json!({"model": "emb", "prompt": "a"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_shape("embeddings", &v, &[("embedding", Floats)]);

    // Unload: done_reason "unload", and the model stops.
    let (_, v) = d
        .post("/api/generate", &json!({"model": "tiny", "keep_alive": 0}))
        .await;
    assert_eq!(v["done_reason"], "unload", "{v}");
    d.wait_state("tiny", "stopped", Duration::from_secs(10))
        .await;
    let (_, ps) = d.get_tcp("/api/ps").await;
    assert!(
        ps["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["name"] != "tiny:latest"),
        "{ps}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ndjson_lines_arrive_as_the_model_generates_them() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let (status, _) = d.post("/api/generate", &json!({"model": "tiny"})).await;
    assert_eq!(status, StatusCode::OK);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
        "options": {"num_predict": 300, "temperature": 0, "seed": 1}});
    let s = stream(&d.addr, "/api/chat", &body).await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.error.is_none(), "{:?}", s.error);
    let ls = lines(&s);
    assert_eq!(ls.last().unwrap()["done"], true);
    assert!(
        ls.len() > 250,
        "expected a line per token, got {}",
        ls.len()
    );
    // Every frame is whole lines (nothing cut mid-object), many separate
    // frames, the first long before the last: nothing buffered them.
    for (_, f) in &s.frames {
        assert!(f.ends_with(b"\n"), "{:?}", String::from_utf8_lossy(f));
    }
    assert!(s.frames.len() > 50, "only {} frames", s.frames.len());
    let first = s.frames[0].0;
    let last = s.frames.last().unwrap().0;
    assert!(
        first * 3 < last,
        "first line at {first:?}, last at {last:?}: the stream arrived in one burst"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_on_the_ollama_routes_is_a_clear_400_in_ollamas_shape() {
    // `vis` names a projector that does not exist: images are checked
    // before any child is started, so it never needs to run.
    let d = Daemon::start(&format!(
        "{}[models.vis]\nmodel = \"{}\"\nargs = [\"--mmproj\", \"/nonexistent/mmproj.gguf\"]\n",
        tiny_model_table("tiny", ""),
        tiny_model()
    ));
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "/api/chat",
            json!({"messages": user}),
            "missing field `model`",
        ),
        (
            "/api/chat",
            json!({"model": 7, "messages": user}),
            "invalid type",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": "hi"}),
            "invalid type",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "stream": "yes"}),
            "invalid type",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "options": {"temperature": "hot"}}),
            "options.temperature must be a number",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "options": {"top_k": 2.5}}),
            "options.top_k must be an integer",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "options": {"temprature": 1}}),
            "unknown option `temprature`",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "options": [1]}),
            "invalid type",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "keep_alive": "soon"}),
            "keep_alive",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": user, "format": "xml"}),
            "format must be",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            "/api/chat",
            json!({"model": "vis", "messages": [{"role": "user", "content": "x",
            "images": ["not base64!"]}]}),
            "messages[0].images[0] is not valid base64",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x",
            "images": ["iVBORw0KGgo="]}]}),
            "no vision projector",
        ),
        (
            "/api/generate",
            json!({"model": "vis", "prompt": "x", "images": ["%%%"]}),
            "not valid base64",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}),
            "template is not supported",
        ),
        ("/api/embed", json!({"model": "tiny"}), "input is required"),
        (
            "/api/embed",
            json!({"model": "tiny", "input": [1, 2]}),
            "input must be a string or a list",
        ),
        ("/api/show", json!({}), "model is required"),
    ];
    for (path, body, says) in &cases {
        let (status, v) = d.post(path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {v}");
        let e = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} {body}: {v}"));
        assert!(e.contains(says), "{path} {body}: {e}");
    }
    // Not JSON at all.
    let (status, v) = request(&d.addr, Method::POST, "/api/chat", Some("{nope".into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"].as_str().unwrap().contains("not valid JSON"),
        "{v}"
    );
    // Unknown routes and methods under /api answer in the same shape.
    let (status, v) = d.get_tcp("/api/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("no route"), "{v}");
    let (status, v) = d.get_tcp("/api/chat").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(v["error"].is_string(), "{v}");
    // Unknown model: Ollama's 404.
    let (status, v) = d
        .post(
            "/api/chat",
            &json!({"model": "nope:latest", "messages": user}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");

    // Nothing was started, every refused inference call has its row, and
    // the daemon still answers.
    assert_eq!(d.model("vis").await["starts"], 0);
    assert_eq!(d.model("tiny").await["starts"], 0);
    let (_, h) = d.get("/admin/history?limit=100").await;
    let rows = h["requests"].as_array().unwrap();
    let bad = rows
        .iter()
        .filter(|r| r["status"] == 400 && r["outcome"] == "rejected")
        .count();
    assert_eq!(bad, cases.iter().filter(|c| c.0 != "/api/show").count() + 1);
    let (status, v) = d
        .post(
            "/api/chat",
            &json!({"model": "tiny", "messages": user, "stream": false, "options": {"num_predict": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["eval_count"], 2);
}

const PY_TOOLS: &str = r#"
import json, os, ollama
c = ollama.Client(host=os.environ["OLLAMA_TEST_HOST"])
def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The city
    """
    return "sunny"
msgs = [{"role": "user", "content": "weather in Paris?"}]
r = c.chat(model="f", messages=msgs, tools=[get_weather], think=True)
out = {"plain": {"calls": [[t.function.name, dict(t.function.arguments)] for t in r.message.tool_calls],
                 "thinking": r.message.thinking, "done_reason": r.done_reason}}
calls, thinking = [], ""
for p in c.chat(model="f", messages=msgs, tools=[get_weather], stream=True):
    calls += [[t.function.name, dict(t.function.arguments)] for t in (p.message.tool_calls or [])]
    thinking += p.message.thinking or ""
out["stream"] = {"calls": calls, "thinking": thinking}
print(json.dumps(out))
"#;

/// A model that calls tools (the fake upstream answers as a tool-capable
/// llama-server does; the tiny random model never calls one): the calls
/// and the thinking come back in Ollama's shape, plain and streamed, with
/// arguments as an object.
#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_and_thinking_come_back_in_ollamas_shape() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let out = tokio::task::spawn_blocking({
        let addr = d.addr.clone();
        move || run_python(PY_TOOLS, &addr)
    })
    .await
    .unwrap();
    let call = json!([["get_weather", {"city": "Paris"}]]);
    assert_eq!(out["plain"]["calls"], call, "{out}");
    assert_eq!(out["plain"]["thinking"], "the user wants weather");
    assert_eq!(out["plain"]["done_reason"], "stop");
    assert_eq!(out["stream"]["calls"], call, "{out}");
    assert_eq!(out["stream"]["thinking"], "the user wants weather");
}
