use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

/// Writes a blob into the store and returns its digest.
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
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(
            |(media, digest)| serde_json::json!({"mediaType": media, "digest": digest, "size": 10}),
        )
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:00", "size": 1},
        "layers": layers,
    });
    let path = root.join("manifests").join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec(&body).unwrap()).unwrap();
}

fn store() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let model = blob(dir.path(), b"GGUF\x03\x00\x00\x00weights");
    (dir, model)
}

#[test]
fn names_are_shown_as_ollama_shows_them() {
    let (dir, model) = store();
    let m = [(MEDIA_MODEL, model.as_str())];
    manifest(dir.path(), "registry.ollama.ai/library/llama3.2/latest", &m);
    manifest(dir.path(), "registry.ollama.ai/library/llama3.2/1b", &m);
    manifest(dir.path(), "registry.ollama.ai/someone/tuned/q4", &m);
    manifest(dir.path(), "hf.co/user/repo-GGUF/Q4_K_M", &m);
    let scan = scan(dir.path());
    let names: Vec<&str> = scan.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "hf.co/user/repo-GGUF:Q4_K_M",
            "llama3.2:1b",
            "llama3.2:latest",
            "someone/tuned:q4"
        ]
    );
    // Two tags of one blob share the file; nothing is copied.
    assert_eq!(scan.models[1].model, scan.models[2].model);
    assert!(scan.models[1].model.starts_with(dir.path().join("blobs")));
    assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
}

#[test]
fn params_projector_template_and_system_are_taken_or_noted() {
    let (dir, model) = store();
    let proj = blob(dir.path(), b"GGUFprojector");
    let params = blob(
        dir.path(),
        br#"{"num_ctx": 8192, "temperature": 0.6, "stop": ["<|eot|>"], "num_gpu": 99}"#,
    );
    let template = blob(dir.path(), b"{{ .Prompt }}");
    let system = blob(dir.path(), b"You are terse.");
    manifest(
        dir.path(),
        "registry.ollama.ai/library/vision/latest",
        &[
            (MEDIA_MODEL, &model),
            (MEDIA_PROJECTOR, &proj),
            (MEDIA_PARAMS, &params),
            (MEDIA_TEMPLATE, &template),
            (MEDIA_SYSTEM, &system),
        ],
    );
    let scan = scan(dir.path());
    let m = &scan.models[0];
    assert_eq!(m.name, "vision:latest");
    assert_eq!(m.args, ["-c", "8192", "--temp", "0.6"]);
    assert!(m.mmproj.as_ref().unwrap().ends_with(proj.replace(':', "-")));
    let notes = m.notes.join("\n");
    assert!(notes.contains("stop words"), "{notes}");
    assert!(
        notes.contains("num_gpu has no llama-server flag"),
        "{notes}"
    );
    assert!(notes.contains("template layer not used"), "{notes}");
    assert!(notes.contains("You are terse."), "{notes}");
    assert_eq!(m.source.kind(), "ollama");
    assert!(!m.source.removable());
}

#[test]
fn a_corrupt_manifest_skips_that_model_and_the_others_are_served() {
    let (dir, model) = store();
    manifest(
        dir.path(),
        "registry.ollama.ai/library/good/latest",
        &[(MEDIA_MODEL, &model)],
    );
    let bad = dir
        .path()
        .join("manifests/registry.ollama.ai/library/bad/latest");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, b"{\"layers\": [tru").unwrap();
    manifest(
        dir.path(),
        "registry.ollama.ai/library/gone/latest",
        &[(MEDIA_MODEL, &format!("sha256:{}", "ab".repeat(32)))],
    );
    manifest(
        dir.path(),
        "registry.ollama.ai/library/sneaky/latest",
        &[(MEDIA_MODEL, "sha256:../../../etc/passwd")],
    );
    let not_gguf = blob(dir.path(), b"<html>");
    manifest(
        dir.path(),
        "registry.ollama.ai/library/html/latest",
        &[(MEDIA_MODEL, &not_gguf)],
    );
    let scan = scan(dir.path());
    let names: Vec<&str> = scan.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["good:latest"]);
    let why = |model: &str| {
        scan.skipped
            .iter()
            .find(|s| s.path.to_string_lossy().contains(&format!("/{model}/")))
            .map(|s| s.why.clone())
            .unwrap()
    };
    assert!(why("bad").starts_with("corrupt manifest"), "{}", why("bad"));
    assert!(why("gone").contains("is missing"), "{}", why("gone"));
    assert!(
        why("sneaky").contains("not sha256:<64 hex digits>"),
        "{}",
        why("sneaky")
    );
    assert!(why("html").contains("not a GGUF file"), "{}", why("html"));
}

#[test]
fn a_params_value_of_the_wrong_type_is_refused() {
    let mut notes = Vec::new();
    let e = params_args(br#"{"num_ctx": "big"}"#, &mut notes).unwrap_err();
    assert_eq!(e, r#"params: num_ctx is "big", not a number"#);
}

#[test]
fn a_store_without_manifests_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let scan = scan(dir.path());
    assert!(scan.models.is_empty());
    assert!(scan.skipped[0]
        .why
        .starts_with("cannot read the Ollama store's manifests"));
}
