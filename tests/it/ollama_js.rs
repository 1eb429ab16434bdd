//! The official JavaScript clients from npm (`ollama` and `openai`, pinned
//! in `tests/tools/setup-test-deps.sh`) against the real binary and the
//! real llama-server with the tiny model: the same calls as the Python
//! clients in `ollama.rs` and `clients.rs`, each answered with real values
//! and recorded as a history row under its endpoint and model.
//!
//! Each script runs as CommonJS under `node -e` with `NODE_PATH` at the
//! cached `node_modules` (ESM `import` ignores `NODE_PATH`), and prints one
//! JSON object as its last line of stdout. A missing
//! `CLARACORE_TEST_NODE_MODULES` fails the test, as the other test
//! dependencies do (see `common.rs`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::ollama::three_models;

use serde_json::{json, Value};

/// A node script gets this long (the tiny model answers in well under a
/// second per call; a hung client must not hang the test run).
const NODE_DEADLINE: Duration = Duration::from_secs(300);

fn node_modules() -> String {
    std::env::var("CLARACORE_TEST_NODE_MODULES").unwrap_or_else(|_| {
        panic!(
            "CLARACORE_TEST_NODE_MODULES is not set: run the tests with tests/run.sh, or first \
             `eval \"$(tests/tools/setup-test-deps.sh)\"`, which installs node's pinned \
             ollama and openai clients"
        )
    })
}

/// Runs `script` with `node -e` (CommonJS, `NODE_PATH` at `modules`, the
/// pinned clients) and `CLIENT_TEST_HOST=http://ADDR`; the last line of its
/// stdout as JSON. Output goes to files in `dir`, so a chatty client cannot
/// fill a pipe, and the process is killed past [`NODE_DEADLINE`].
fn run_node(modules: &str, script: &str, addr: &str, dir: &Path) -> Value {
    assert!(
        Path::new(modules).join("ollama").is_dir() && Path::new(modules).join("openai").is_dir(),
        "{modules} lacks the ollama or openai package: rerun tests/tools/setup-test-deps.sh"
    );
    let (out_path, err_path) = (dir.join("node.stdout"), dir.join("node.stderr"));
    let child = Command::new("node")
        .arg("-e")
        .arg(script)
        .env("NODE_PATH", modules)
        .env("CLIENT_TEST_HOST", format!("http://{addr}"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}): tests/tools/setup-test-deps.sh installs it")
        });
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + NODE_DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "node still running after {NODE_DEADLINE:?}:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        status.success(),
        "node failed ({status}):\n{stderr}\n{stdout}"
    );
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    serde_json::from_str(last.unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: stdout {stdout:?}\nstderr {stderr}"))
}

/// The calls of `ollama.rs`'s Python script, through `ollama` 0.6.4's
/// `Ollama` class.
const JS_OLLAMA: &str = r#"
const { Ollama } = require("ollama");
// The version of the package `require` found, from its own package.json.
const pkgVersion = (name) => {
  const file = require.resolve(name), dir = "/node_modules/" + name;
  const root = file.slice(0, file.lastIndexOf(dir + "/") + dir.length);
  return JSON.parse(require("fs").readFileSync(root + "/package.json", "utf8")).version;
};
(async () => {
  const c = new Ollama({ host: process.env.CLIENT_TEST_HOST });
  const out = { version: pkgVersion("ollama") };
  const list = await c.list();
  out.list = list.models.map((m) => m.model);
  out.list_details = list.models[0].details.family;
  let r = await c.generate({ model: "tiny" });
  out.load = r.done_reason;
  out.ps = (await c.ps()).models.map((m) => [m.model, m.context_length, m.size_vram, m.expires_at != null]);
  const s = await c.show({ model: "tiny:latest" });
  out.show = { caps: s.capabilities, family: s.details.family, arch: s.model_info["general.architecture"],
               template: Boolean(s.template) };
  r = await c.chat({ model: "tiny", messages: [{ role: "user", content: "hi" }],
                     options: { num_predict: 4, temperature: 0 } });
  out.chat = { content: r.message.content, role: r.message.role, done: r.done, reason: r.done_reason,
               eval_count: r.eval_count, prompt_eval_count: r.prompt_eval_count,
               eval_duration: r.eval_duration, total_duration: r.total_duration };
  let parts = [];
  for await (const p of await c.chat({ model: "tiny-chat:latest", messages: [{ role: "user", content: "hi" }],
                                       options: { num_predict: 6, seed: 1 }, stream: true })) {
    parts.push(p);
  }
  out.chat_stream = { parts: parts.length, text: parts.map((p) => p.message.content).join(""),
                      last_done: parts[parts.length - 1].done,
                      others_done: parts.slice(0, -1).some((p) => p.done),
                      eval_count: parts[parts.length - 1].eval_count };
  const weather = { type: "function", function: { name: "get_weather",
    description: "Get the current weather for a city.",
    parameters: { type: "object", required: ["city"], properties: { city: { type: "string", description: "The city" } } } } };
  r = await c.chat({ model: "tiny", options: { num_predict: 3 }, tools: [weather], messages: [
    { role: "user", content: "weather in Paris?" },
    { role: "assistant", content: "", tool_calls: [{ function: { name: "get_weather", arguments: { city: "Paris" } } }] },
    { role: "tool", content: "sunny", tool_name: "get_weather" }] });
  out.tools = { done: r.done, role: r.message.role, eval_count: r.eval_count };
  r = await c.chat({ model: "plain", messages: [{ role: "user", content: "json please" }], format: "json",
                     options: { num_predict: 8, seed: 3 } });
  out.format_json = r.message.content;
  r = await c.generate({ model: "tiny", prompt: "hi", options: { num_predict: 3 } });
  out.generate = { response: r.response, done: r.done, eval_count: r.eval_count };
  parts = [];
  for await (const p of await c.generate({ model: "tiny", prompt: "hi", options: { num_predict: 5, seed: 2 },
                                           stream: true })) {
    parts.push(p);
  }
  out.generate_stream = { parts: parts.length, text: parts.map((p) => p.response).join(""),
                          last_done: parts[parts.length - 1].done };
  r = await c.generate({ model: "tiny", prompt: "<|im_start|>user\nhi<|im_end|>\n", raw: true,
                         options: { num_predict: 3 } });
  out.raw = { response: r.response, eval_count: r.eval_count, prompt_eval_count: r.prompt_eval_count };
  const one = await c.embed({ model: "emb", input: "hello" });
  const many = await c.embed({ model: "emb", input: ["hello", "world", "again"] });
  out.embed = { one: [one.embeddings.length, one.embeddings[0].length], many: many.embeddings.length,
                model: many.model, prompt_eval_count: many.prompt_eval_count };
  out.embeddings_old = (await c.embeddings({ model: "emb", prompt: "hello" })).embedding.length;
  const failure = async (call) => {
    try { await call(); return null; }
    // The package does not export ResponseError from its CommonJS entry.
    catch (e) { return [e.name === "ResponseError", e.status_code, e.error]; }
  };
  out.pull = await failure(() => c.pull({ model: "tiny" }));
  out.unknown = await failure(() => c.chat({ model: "nope", messages: [{ role: "user", content: "hi" }] }));
  r = await c.chat({ model: "tiny", messages: [{ role: "user", content: "bye" }], keep_alive: 0,
                     options: { num_predict: 2 } });
  out.keep_alive_0 = r.done;
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_js_ollama_client_lists_chats_generates_embeds_and_unloads() {
    let modules = node_modules();
    let d = Daemon::start(&three_models());
    let out = tokio::task::spawn_blocking({
        let addr = d.addr.clone();
        let dir = d.dir.path().to_path_buf();
        move || run_node(&modules, JS_OLLAMA, &addr, &dir)
    })
    .await
    .unwrap();

    assert_eq!(out["version"], "0.6.4", "the pinned client ran");
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
    assert!(chat["prompt_eval_count"].as_u64().unwrap() > 0, "{chat}");
    assert!(chat["eval_duration"].as_u64().unwrap() > 0, "{chat}");
    assert!(chat["total_duration"].as_u64() >= chat["eval_duration"].as_u64());

    let s = &out["chat_stream"];
    assert!(s["parts"].as_u64().unwrap() >= 3, "{s}");
    assert!(!s["text"].as_str().unwrap().is_empty(), "{s}");
    assert_eq!(s["last_done"], true);
    assert_eq!(s["others_done"], false);
    assert_eq!(s["eval_count"], 6);

    assert_eq!(out["tools"]["done"], true);
    assert_eq!(out["tools"]["role"], "assistant");
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
    assert!(!out["generate"]["response"].as_str().unwrap().is_empty());
    assert!(out["generate_stream"]["parts"].as_u64().unwrap() >= 2);
    assert!(!out["generate_stream"]["text"].as_str().unwrap().is_empty());
    assert_eq!(out["generate_stream"]["last_done"], true);
    assert_eq!(out["raw"]["eval_count"], 3);
    assert!(out["raw"]["prompt_eval_count"].as_u64().unwrap() > 0);
    assert_eq!(out["embed"]["one"], json!([1, 64]));
    assert_eq!(out["embed"]["many"], 3);
    assert_eq!(out["embed"]["model"], "emb");
    assert!(out["embed"]["prompt_eval_count"].as_u64().unwrap() >= 3);
    assert_eq!(out["embeddings_old"], 64);
    // The client turns Ollama's `{"error": …}` into its ResponseError.
    assert_eq!(out["pull"][0], true, "{}", out["pull"]);
    assert_eq!(out["pull"][1], 400);
    assert!(out["pull"][2]
        .as_str()
        .unwrap()
        .contains("declared in its config"));
    assert_eq!(out["unknown"][0], true, "{}", out["unknown"]);
    assert_eq!(out["unknown"][1], 404);
    assert!(out["unknown"][2].as_str().unwrap().contains("nope"));
    assert_eq!(out["keep_alive_0"], true);
    // keep_alive 0: unloaded once the answer was out.
    d.wait_state("tiny", "stopped", Duration::from_secs(10))
        .await;

    // Every inference call is a history row under its Ollama endpoint:
    // chat ×6 (with the 404), generate ×4, embed ×2, embeddings ×1.
    let rows = d.wait_rows(13, Duration::from_secs(10)).await;
    let count = |ep: &str| rows.iter().filter(|r| r["endpoint"] == ep).count();
    assert_eq!(count("/api/chat"), 6, "{rows:?}");
    assert_eq!(count("/api/generate"), 4, "{rows:?}");
    assert_eq!(count("/api/embed"), 2, "{rows:?}");
    assert_eq!(count("/api/embeddings"), 1, "{rows:?}");
    let chat_row = rows
        .iter()
        .find(|r| r["endpoint"] == "/api/chat" && r["status"] == 200 && r["streamed"] == true)
        .unwrap();
    assert_eq!(
        chat_row["model"], "tiny",
        "the alias is recorded as its model"
    );
    assert_eq!(chat_row["completion_tokens"], 6, "{chat_row}");
    let format_row = rows
        .iter()
        .find(|r| r["endpoint"] == "/api/chat" && r["model"] == "plain")
        .unwrap();
    assert_eq!(format_row["status"], 200, "{format_row}");
    assert!(
        format_row["prompt_tokens"].as_u64().unwrap() > 0,
        "{format_row}"
    );
    let embed_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["endpoint"] == "/api/embed")
        .collect();
    assert!(
        embed_rows.iter().all(|r| r["model"] == "emb"),
        "{embed_rows:?}"
    );
    assert!(
        embed_rows
            .iter()
            .any(|r| r["prompt_tokens"] == out["embed"]["prompt_eval_count"]),
        "the list's row counts what the client was told: {embed_rows:?}"
    );
    let unknown = rows
        .iter()
        .find(|r| r["endpoint"] == "/api/chat" && r["status"] == 404)
        .unwrap();
    assert_eq!(unknown["outcome"], "rejected");
}

/// `clients.rs`'s openai calls, through the `openai` 5.23.2 npm client.
const JS_OPENAI: &str = r#"
const OpenAI = require("openai");
// The version of the package `require` found, from its own package.json.
const pkgVersion = (name) => {
  const file = require.resolve(name), dir = "/node_modules/" + name;
  const root = file.slice(0, file.lastIndexOf(dir + "/") + dir.length);
  return JSON.parse(require("fs").readFileSync(root + "/package.json", "utf8")).version;
};
(async () => {
  const o = new OpenAI({ baseURL: process.env.CLIENT_TEST_HOST + "/v1", apiKey: "sk-unused",
                         maxRetries: 0, timeout: 120000 });
  const msgs = [{ role: "user", content: "hello" }];
  const out = { version: pkgVersion("openai") };
  const c = await o.chat.completions.create({ model: "tiny", messages: msgs, max_tokens: 4 });
  out.chat = { model: c.model, text: c.choices[0].message.content,
               prompt: c.usage.prompt_tokens, completion: c.usage.completion_tokens };
  let text = "", model = null, usage = null, chunks = 0;
  for await (const ch of await o.chat.completions.create({ model: "tiny-chat", messages: msgs, max_tokens: 4,
                                                            stream: true, stream_options: { include_usage: true } })) {
    chunks += 1;
    model = ch.model;
    if (ch.choices.length && ch.choices[0].delta.content) text += ch.choices[0].delta.content;
    if (ch.usage) usage = ch.usage;
  }
  out.chat_stream = { model, text, chunks, prompt: usage.prompt_tokens, completion: usage.completion_tokens };
  const r = await o.responses.create({ model: "tiny", input: "hello", max_output_tokens: 4 });
  out.responses = { model: r.model, text: r.output_text,
                    prompt: r.usage.input_tokens, completion: r.usage.output_tokens };
  text = "";
  let done = null;
  for await (const ev of await o.responses.create({ model: "tiny", input: "hello", max_output_tokens: 4,
                                                     stream: true })) {
    if (ev.type === "response.output_text.delta") text += ev.delta;
    else if (ev.type === "response.completed") done = ev.response;
  }
  out.responses_stream = { model: done.model, text,
                           prompt: done.usage.input_tokens, completion: done.usage.output_tokens };
  try {
    await o.chat.completions.create({ model: "no-such-model", messages: msgs, max_tokens: 4 });
    out.unknown = "found";
  } catch (e) {
    out.unknown = { not_found: e instanceof OpenAI.NotFoundError, status: e.status };
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_js_openai_client_chats_and_creates_responses() {
    let modules = node_modules();
    let d = Daemon::start(&tiny_model_table("tiny", "aliases = [\"tiny-chat\"]"));
    let out = tokio::task::spawn_blocking({
        let addr = d.addr.clone();
        let dir = d.dir.path().to_path_buf();
        move || run_node(&modules, JS_OPENAI, &addr, &dir)
    })
    .await
    .unwrap();

    assert_eq!(out["version"], "5.23.2", "the pinned client ran");
    for call in ["chat", "chat_stream", "responses", "responses_stream"] {
        let r = &out[call];
        assert_eq!(r["model"], "tiny", "{call}: {r}");
        assert!(
            r["text"].as_str().is_some_and(|t| !t.is_empty()),
            "{call}: {r}"
        );
        assert!(r["prompt"].as_u64().unwrap() > 0, "{call}: {r}");
        assert!(r["completion"].as_u64().unwrap() > 0, "{call}: {r}");
    }
    assert!(out["chat_stream"]["chunks"].as_u64().unwrap() >= 2, "{out}");
    assert_eq!(out["unknown"], json!({"not_found": true, "status": 404}));

    // One row per call, with what the client was told.
    let rows = d.wait_rows(5, Duration::from_secs(10)).await;
    for (call, endpoint, streamed) in [
        ("chat", "/v1/chat/completions", false),
        ("chat_stream", "/v1/chat/completions", true),
        ("responses", "/v1/responses", false),
        ("responses_stream", "/v1/responses", true),
    ] {
        let found: Vec<&Value> = rows
            .iter()
            .filter(|r| {
                r["endpoint"] == endpoint && r["streamed"] == streamed && r["status"] == 200
            })
            .collect();
        assert_eq!(found.len(), 1, "{call}: {rows:?}");
        let row = found[0];
        assert_eq!(row["model"], "tiny", "{call}: {row}");
        assert_eq!(row["prompt_tokens"], out[call]["prompt"], "{call}: {row}");
        assert_eq!(
            row["completion_tokens"], out[call]["completion"],
            "{call}: {row}"
        );
    }
    let unknown: Vec<&Value> = rows.iter().filter(|r| r["status"] == 404).collect();
    assert_eq!(unknown.len(), 1, "{rows:?}");
    assert_eq!(unknown[0]["endpoint"], "/v1/chat/completions");
}
