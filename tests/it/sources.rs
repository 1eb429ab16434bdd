//! Models from a models folder (watched: served and withdrawn without a
//! reload) and from an Ollama store served in place, on the real
//! llama-server.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::*;

async fn model_ids(d: &Daemon) -> Vec<(String, String)> {
    let (status, body) = d.get("/v1/models").await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let id = m["id"].as_str().unwrap().to_string();
            let kind = m["source"]["kind"].as_str().unwrap_or("").to_string();
            (id, kind)
        })
        .collect()
}

/// Polls `/v1/models` until `f` holds, for at most `within`.
async fn wait_models(d: &Daemon, within: Duration, f: impl Fn(&[(String, String)]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let ids = model_ids(d).await;
        if f(&ids) {
            return;
        }
        assert!(Instant::now() < deadline, "models now: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_gguf_copied_into_the_folder_is_served_without_a_reload_and_withdrawn_once_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "models_dir = {:?}\n[models_defaults]\nargs = [\"-c\", \"512\", \"-t\", \"1\"]\n{}",
        dir.path(),
        tiny_model_table("configured", "")
    ));
    wait_models(&d, Duration::from_secs(5), |ids| {
        ids == [("configured".to_string(), "config".to_string())]
    })
    .await;
    // A file still being written is not served.
    std::fs::copy(tiny_model(), dir.path().join("Tiny-Copy.gguf.part")).unwrap();
    let started = Instant::now();
    std::fs::rename(
        dir.path().join("Tiny-Copy.gguf.part"),
        dir.path().join("Tiny-Copy.gguf"),
    )
    .unwrap();
    wait_models(&d, Duration::from_secs(2), |ids| {
        ids.iter()
            .any(|(id, kind)| id == "tiny-copy" && kind == "folder")
    })
    .await;
    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny-copy", 4, false))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let (_, tags) = d.get("/api/tags").await;
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tiny-copy:latest")
        .unwrap_or_else(|| panic!("{tags}"))
        .clone();
    // The kind, never the server's folder path.
    assert_eq!(entry["source"], json!({"kind": "folder"}), "{entry}");

    std::fs::remove_file(dir.path().join("Tiny-Copy.gguf")).unwrap();
    wait_models(&d, Duration::from_secs(2), |ids| {
        !ids.iter().any(|(id, _)| id == "tiny-copy")
    })
    .await;
    let log = d.log_text();
    assert!(log.contains(r#""by":"models-folder""#), "{log}");
}

/// Writes `bytes` as a blob of the store at `root`; its digest.
fn blob(root: &Path, bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(root.join("blobs").join(format!("sha256-{hex}")), bytes).unwrap();
    format!("sha256:{hex}")
}

fn manifest(root: &Path, rel: &str, layers: &[(&str, &str)]) {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(media, digest)| json!({"mediaType": media, "digest": digest, "size": 1}))
        .collect();
    let path = root.join("manifests").join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        path,
        json!({"schemaVersion": 2, "layers": layers}).to_string(),
    )
    .unwrap();
}

#[tokio::test]
async fn an_ollama_store_is_served_in_place_with_its_params() {
    let store = tempfile::tempdir().unwrap();
    let root = store.path();
    let model = blob(root, &std::fs::read(tiny_model()).unwrap());
    let params = blob(
        root,
        br#"{"num_ctx": 384, "temperature": 0.5, "stop": ["</s>"]}"#,
    );
    let template = blob(root, b"{{ .Prompt }}");
    let layers = [
        ("application/vnd.ollama.image.model", model.as_str()),
        ("application/vnd.ollama.image.params", params.as_str()),
        ("application/vnd.ollama.image.template", template.as_str()),
    ];
    manifest(root, "registry.ollama.ai/library/tiny/latest", &layers);
    manifest(root, "registry.ollama.ai/library/tiny/small", &layers[..1]);
    manifest(root, "registry.ollama.ai/someone/tuned/v1", &layers[..1]);
    let broken = root.join("manifests/registry.ollama.ai/library/broken/latest");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(&broken, b"{not json").unwrap();

    let d = Daemon::start(&format!(
        "ollama_models = {root:?}\n[models_defaults]\nargs = [\"-t\", \"1\"]\n"
    ));
    let ids = model_ids(&d).await;
    assert_eq!(
        ids,
        [
            ("someone/tuned:v1".to_string(), "ollama".to_string()),
            ("tiny:latest".to_string(), "ollama".to_string()),
            ("tiny:small".to_string(), "ollama".to_string()),
        ]
    );
    let log = d.log_text();
    assert!(log.contains("corrupt manifest"), "{log}");

    let (_, tags) = d.get("/api/tags").await;
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["someone/tuned:v1", "tiny:latest", "tiny:small"]);
    // No manifest path reaches a client.
    assert_eq!(tags["models"][0]["source"], json!({"kind": "ollama"}));

    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny:latest", 4, false))
        .await;
    assert_eq!(status, 200, "{body}");
    // num_ctx reached llama-server's argv; the blob is served in place.
    let child = children_of(d.pid())[0];
    let argv = std::fs::read(format!("/proc/{child}/cmdline")).unwrap();
    let argv: Vec<String> = argv
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let c = argv.iter().position(|a| a == "-c").unwrap();
    assert_eq!(argv[c + 1], "384", "{argv:?}");
    let m = argv.iter().position(|a| a == "-m").unwrap();
    assert!(argv[m + 1].contains("/blobs/sha256-"), "{argv:?}");
    assert!(
        argv.windows(2).any(|w| w[0] == "--temp" && w[1] == "0.5"),
        "{argv:?}"
    );
}
