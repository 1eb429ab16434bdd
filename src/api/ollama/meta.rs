//! Ollama's model lists and details: `/api/tags` (what is configured),
//! `/api/ps` (what runs) and `/api/show` (one model), built from the
//! config, the GGUF files' headers and the scheduler's state.
//!
//! Headers and digests are cached by file version ([`ModelFiles`]); the
//! first `/api/tags` after a model file appears hashes it once (seconds for
//! a multi-gigabyte file), on the blocking pool, every file in parallel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{convert, error, resolve_tagged, tagged, timestamp};
use crate::api::{body, json_response, ApiError, Ctx};
use crate::config::ModelConfig;
use crate::gguf::{Digests, Header, Headers};
use crate::proxy::BoxBody;
use crate::scheduler::ModelState;

/// The caches of model files' headers and digests, shared by all requests.
#[derive(Default)]
pub struct ModelFiles {
    headers: Headers,
    digests: Digests,
}

/// What `/api/tags` and `/api/show` tell about a model's file.
#[derive(Default, Clone)]
struct FileInfo {
    size: u64,
    modified: Option<SystemTime>,
    digest: String,
    header: Option<Arc<Header>>,
}

/// The GGUF a model serves: its `model` path, or the `-m`/`--model` of a
/// `cmd`.
fn model_file(m: &ModelConfig) -> Option<PathBuf> {
    if let Some(p) = &m.model_path {
        return Some(p.clone());
    }
    let mut it = m.argv.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--model=") {
            return Some(PathBuf::from(v));
        }
        if a == "-m" || a == "--model" {
            return it.next().map(PathBuf::from);
        }
    }
    None
}

/// A flag's value in a child's argv (`-c 4096`, `--ctx-size=4096`).
fn arg_value<'a>(argv: &'a [String], names: &[&str]) -> Option<&'a str> {
    let mut found = None;
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if let Some((k, v)) = a.split_once('=') {
            if names.contains(&k) {
                found = Some(v);
            }
        } else if names.contains(&a.as_str()) {
            found = it.next().map(String::as_str);
        }
    }
    // The last one wins, as in llama-server.
    found
}

fn has_flag(argv: &[String], names: &[&str]) -> bool {
    argv.iter().any(|a| names.contains(&a.as_str()))
}

/// Reads a file's size, time, header and digest (blocking).
fn read_file(files: &ModelFiles, path: &Path) -> FileInfo {
    let Ok(meta) = std::fs::metadata(path) else {
        return FileInfo::default();
    };
    let header = match files.headers.read(path) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "model file header unreadable");
            None
        }
    };
    let digest = files.digests.digest(path).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "model file digest failed");
        String::new()
    });
    FileInfo {
        size: meta.len(),
        modified: meta.modified().ok(),
        digest,
        header,
    }
}

async fn file_info(ctx: &Ctx<'_>, m: &ModelConfig) -> FileInfo {
    let Some(path) = model_file(m) else {
        return FileInfo::default();
    };
    let state = ctx.state.clone();
    tokio::task::spawn_blocking(move || read_file(&state.ollama.files, &path))
        .await
        .unwrap_or_default()
}

fn details(info: &FileInfo) -> Value {
    let h = info.header.as_deref();
    let family = h.and_then(Header::family).unwrap_or("");
    json!({
        "parent_model": "",
        "format": if h.is_some() { "gguf" } else { "" },
        "family": family,
        "families": if family.is_empty() { Value::Null } else { json!([family]) },
        "parameter_size": h.map(Header::parameter_size).unwrap_or_default(),
        "quantization_level": h.map(Header::quantization_level).unwrap_or(""),
    })
}

fn modified_at(info: &FileInfo) -> String {
    timestamp(info.modified.unwrap_or(SystemTime::UNIX_EPOCH))
}

/// `GET /api/tags`: every configured model the caller may use.
pub async fn tags(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let models: Vec<&ModelConfig> = ctx
        .config
        .models
        .iter()
        .filter(|m| ctx.principal.may_use(&m.name))
        .collect();
    let infos = futures_join(ctx, &models).await;
    let list: Vec<Value> = models
        .iter()
        .zip(infos)
        .map(|(m, info)| {
            json!({
                "name": tagged(&m.name),
                "model": tagged(&m.name),
                "modified_at": modified_at(&info),
                "size": info.size,
                "digest": info.digest,
                "details": details(&info),
                "source": m.source,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "models": list }))
}

/// The file infos of `models`, read in parallel.
async fn futures_join(ctx: &Ctx<'_>, models: &[&ModelConfig]) -> Vec<FileInfo> {
    let tasks: Vec<_> = models
        .iter()
        .map(|m| {
            let state = ctx.state.clone();
            let path = model_file(m);
            tokio::task::spawn_blocking(move || {
                path.map(|p| read_file(&state.ollama.files, &p))
                    .unwrap_or_default()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

/// Far enough ahead to read as "never" (Ollama shows a year far away too).
fn never() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799) // 9999-12-31
}

/// The context a running child has: its `-c`, else the model's own.
fn context_length(m: &ModelConfig, header: Option<&Header>) -> Option<u64> {
    arg_value(&m.argv, &["-c", "--ctx-size"])
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .or_else(|| header.and_then(Header::context_length))
}

/// `GET /api/ps`: running models, with when they will unload.
pub async fn ps(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let status = ctx.state.scheduler.status().await;
    let now = SystemTime::now();
    let mut list = Vec::new();
    for s in status {
        if s.state != ModelState::Ready {
            continue;
        }
        let Some(m) = ctx.config.model(&s.name) else {
            continue;
        };
        if !ctx.principal.may_use(&m.name) {
            continue;
        }
        let info = file_info(ctx, m).await;
        let expires = match s.ttl_s {
            None => never(),
            Some(ttl) => {
                let left = if s.inflight > 0 {
                    ttl
                } else {
                    (ttl - s.idle_s.unwrap_or(0.0)).max(0.0)
                };
                now + Duration::from_secs_f64(left)
            }
        };
        // What the child holds in memory, host and GPU (Ollama's `size` is
        // the whole, `size_vram` the GPU's part); the file size until it
        // can be read.
        let vram = s.vram_bytes.unwrap_or(0);
        let size = s.rss_bytes.map_or(info.size, |rss| rss + vram);
        let mut entry = json!({
            "name": tagged(&m.name),
            "model": tagged(&m.name),
            "size": size,
            "digest": info.digest,
            "details": details(&info),
            "expires_at": timestamp(expires),
            "size_vram": vram,
        });
        if let Some(n) = context_length(m, info.header.as_deref()) {
            entry["context_length"] = json!(n);
        }
        list.push(entry);
    }
    json_response(StatusCode::OK, &json!({ "models": list }))
}

/// What a model can do, as Ollama's `capabilities` lists it.
fn capabilities(m: &ModelConfig, header: Option<&Header>) -> Vec<&'static str> {
    let mut caps = Vec::new();
    if has_flag(&m.argv, &["--embedding", "--embeddings"]) {
        caps.push("embedding");
        return caps;
    }
    caps.push("completion");
    let template = header.and_then(Header::chat_template).unwrap_or("");
    if template.contains("tools") {
        caps.push("tools");
    }
    if header.is_some_and(|h| h.get("tokenizer.ggml.fim_pre_token_id").is_some()) {
        caps.push("insert");
    }
    if has_flag(&m.argv, &["--mmproj", "-mm"]) || m.argv.iter().any(|a| a.starts_with("--mmproj="))
    {
        caps.push("vision");
    }
    if template.contains("enable_thinking") || template.contains("<think>") {
        caps.push("thinking");
    }
    caps
}

/// `POST /api/show`.
pub async fn show(ctx: &Ctx<'_>, req: Request<Incoming>) -> Response<BoxBody> {
    match show_model(ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error(e),
    }
}

async fn show_model(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<BoxBody>, ApiError> {
    let declared = crate::api::openai::declared_length(req.headers().get(header::CONTENT_LENGTH));
    let held = body::read(
        req.into_body(),
        declared,
        &ctx.config.http,
        &ctx.state.body_budget,
    )
    .await?;
    let r: convert::ShowRequest = convert::parse(&held.bytes).map_err(ApiError::BadRequest)?;
    let Some(requested) = r.model.or(r.name).filter(|n| !n.is_empty()) else {
        return Err(ApiError::BadRequest("model is required".into()));
    };
    let name = resolve_tagged(ctx, &requested)?;
    let Some(m) = ctx.config.model(&name) else {
        return Err(ApiError::BadRequest(format!("model {name} is gone")));
    };
    let info = file_info(ctx, m).await;
    let header = info.header.as_deref();
    let template = header.and_then(Header::chat_template).unwrap_or("");
    let mut parameters = Vec::new();
    if let Some(n) = context_length(m, header) {
        parameters.push(format!("{:<30} {n}", "num_ctx"));
    }
    let from = model_file(m).map_or_else(|| m.argv.join(" "), |p| p.display().to_string());
    let mut modelfile = format!(
        "# Modelfile generated by claracore for \"{}\"\n# claracore serves models from its config file; this is for reading only.\nFROM {from}\n",
        m.name
    );
    if !template.is_empty() {
        modelfile.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    }
    for p in &parameters {
        modelfile.push_str(&format!("PARAMETER {p}\n"));
    }
    let mut out = Map::new();
    out.insert("modelfile".into(), json!(modelfile));
    out.insert("parameters".into(), json!(parameters.join("\n")));
    out.insert("template".into(), json!(template));
    out.insert("details".into(), details(&info));
    out.insert(
        "model_info".into(),
        Value::Object(header.map(Header::model_info).unwrap_or_default()),
    );
    out.insert("capabilities".into(), json!(capabilities(m, header)));
    out.insert("modified_at".into(), json!(modified_at(&info)));
    if let Some(license) = header
        .and_then(|h| h.get("general.license"))
        .and_then(|v| v.as_str())
    {
        out.insert("license".into(), json!(license));
    }
    let _ = r.verbose;
    Ok(json_response(StatusCode::OK, &Value::Object(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flag_values_are_found_in_both_spellings_and_the_last_wins() {
        let a = argv(&["llama-server", "-c", "512", "--ctx-size=2048", "-t", "1"]);
        assert_eq!(arg_value(&a, &["-c", "--ctx-size"]), Some("2048"));
        assert_eq!(arg_value(&argv(&["x", "-c"]), &["-c"]), None);
        assert!(has_flag(&argv(&["x", "--embeddings"]), &["--embeddings"]));
    }
}
