//! Ollama's API, against the real binary and a real llama-server, with the
//! official `ollama` clients (Python and JavaScript) and field by field
//! against the shapes in Ollama's docs/api.md (ollama/ollama at commit
//! 01e52d24bc00defcd9bcc6d995b11df0f08bc6f1).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;
use std::time::Duration;

use crate::common::*;

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
    assert_eq!(count("/api/chat"), 6, "{h}");
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
}
