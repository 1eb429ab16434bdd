//! An Ollama model store served in place, read-only, with no copy.
//!
//! The store's layout (Ollama's `OLLAMA_MODELS`, by default
//! `~/.ollama/models` or `/usr/share/ollama/.ollama/models`):
//! - `manifests/<registry>/<namespace>/<model>/<tag>`: a JSON manifest
//!   whose `layers` each have a `mediaType`, a `digest` (`sha256:<hex>`)
//!   and a `size`;
//! - `blobs/sha256-<hex>`: each layer's bytes.
//!
//! The layers used: `application/vnd.ollama.image.model` (the GGUF, `-m`),
//! `…projector` (`--mmproj`), `…params` (a JSON object: `num_ctx` → `-c`
//! and the sampling defaults llama-server has a flag for), `…template` and
//! `…system` (kept as notes for `show`: llama-server keeps the GGUF's own
//! chat template, since Ollama's are Go templates). Names appear as Ollama
//! shows them: `llama3.2:latest` for its own library, `user/model:tag` for
//! its registry's other namespaces, `host/namespace/model:tag` otherwise.
//!
//! A manifest that cannot be read, names a blob that is missing or not a
//! GGUF, or holds a digest that is not `sha256:` and 64 hex digits (so no
//! path can be smuggled in) skips that model with a reason; the others are
//! served.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{check_gguf_magic, Discovered, Scan, Source};

/// Ollama's own registry, whose `library` namespace names omit.
const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
/// A manifest larger than this is no manifest (real ones are < 2 KiB).
const MAX_MANIFEST: u64 = 1 << 20;
/// A params, template or system layer larger than this is not read.
const MAX_SMALL_LAYER: u64 = 1 << 20;

const MEDIA_MODEL: &str = "application/vnd.ollama.image.model";
const MEDIA_PROJECTOR: &str = "application/vnd.ollama.image.projector";
const MEDIA_PARAMS: &str = "application/vnd.ollama.image.params";
const MEDIA_TEMPLATE: &str = "application/vnd.ollama.image.template";
const MEDIA_SYSTEM: &str = "application/vnd.ollama.image.system";
const MEDIA_ADAPTER: &str = "application/vnd.ollama.image.adapter";

#[derive(Debug, Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
}

/// Ollama's `params` keys that map onto llama-server flags.
const PARAM_FLAGS: [(&str, &str); 15] = [
    ("num_ctx", "-c"),
    ("num_predict", "-n"),
    ("num_keep", "--keep"),
    ("temperature", "--temp"),
    ("top_k", "--top-k"),
    ("top_p", "--top-p"),
    ("min_p", "--min-p"),
    ("typical_p", "--typical"),
    ("repeat_last_n", "--repeat-last-n"),
    ("repeat_penalty", "--repeat-penalty"),
    ("presence_penalty", "--presence-penalty"),
    ("frequency_penalty", "--frequency-penalty"),
    ("mirostat", "--mirostat"),
    ("mirostat_tau", "--mirostat-ent"),
    ("mirostat_eta", "--mirostat-lr"),
];

/// Every model in the store at `root`.
pub fn scan(root: &Path) -> Scan {
    let mut scan = Scan::default();
    let manifests = root.join("manifests");
    let mut found = Vec::new();
    if let Err(e) = walk(&manifests, 0, &mut found) {
        scan.skip(
            &manifests,
            format!("cannot read the Ollama store's manifests: {e}"),
        );
        return scan;
    }
    found.sort();
    for path in found {
        let Some(name) = display_name(&manifests, &path) else {
            continue;
        };
        match read_model(root, &path, name) {
            Ok(model) => scan.models.push(model),
            Err(why) => scan.skip(&path, why),
        }
    }
    scan
}

/// Collects the files four levels down: registry/namespace/model/tag.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if depth < 3 && kind.is_dir() {
            // One unreadable namespace does not hide the others.
            let _ = walk(&path, depth + 1, out);
        } else if depth == 3 && kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// `model:tag`, `namespace/model:tag` or `registry/namespace/model:tag`.
pub fn display_name(manifests: &Path, manifest: &Path) -> Option<String> {
    let rel = manifest.strip_prefix(manifests).ok()?;
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_str().map(str::to_string))
        .collect::<Option<_>>()?;
    let [registry, namespace, model, tag] = parts.as_slice() else {
        return None;
    };
    Some(match (registry.as_str(), namespace.as_str()) {
        (DEFAULT_REGISTRY, DEFAULT_NAMESPACE) => format!("{model}:{tag}"),
        (DEFAULT_REGISTRY, _) => format!("{namespace}/{model}:{tag}"),
        _ => format!("{registry}/{namespace}/{model}:{tag}"),
    })
}

/// The blob's path for a digest, refusing anything but `sha256:` + 64 hex.
pub fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("layer digest {digest:?} is not sha256:<64 hex digits>"))?;
    Ok(root.join("blobs").join(format!("sha256-{hex}")))
}

fn read_manifest(path: &Path) -> Result<Manifest, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len > MAX_MANIFEST {
        return Err(format!("manifest is {len} bytes, not a manifest"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("corrupt manifest: {e}"))
}

fn read_model(root: &Path, path: &Path, name: String) -> Result<Discovered, String> {
    let manifest = read_manifest(path)?;
    let layer = |media: &str| manifest.layers.iter().find(|l| l.media_type == media);
    let model_layer = layer(MEDIA_MODEL).ok_or("the manifest has no model layer")?;
    let model = existing_blob(root, model_layer)?;
    check_gguf_magic(&model).map_err(|e| format!("model blob {}: {e}", model.display()))?;
    let mut size = model_layer.size;
    let mmproj = match layer(MEDIA_PROJECTOR) {
        Some(l) => {
            size += l.size;
            Some(existing_blob(root, l)?)
        }
        None => None,
    };
    let mut notes = Vec::new();
    if layer(MEDIA_ADAPTER).is_some() {
        return Err("LoRA adapter layers are not served".to_string());
    }
    let args = match layer(MEDIA_PARAMS) {
        Some(l) => params_args(&small_layer(root, l)?, &mut notes)?,
        None => Vec::new(),
    };
    if let Some(l) = layer(MEDIA_TEMPLATE) {
        let text = small_layer(root, l)?;
        notes.push(format!(
            "Ollama template layer not used ({} bytes): llama-server applies the GGUF's own chat template",
            text.len()
        ));
    }
    if let Some(l) = layer(MEDIA_SYSTEM) {
        let text = small_layer(root, l)?;
        notes.push(format!(
            "Ollama system prompt not applied: {:?}",
            String::from_utf8_lossy(&text)
        ));
    }
    Ok(Discovered {
        name,
        files: vec![model.clone()],
        model,
        mmproj,
        args,
        notes,
        size,
        source: Source::OllamaStore {
            manifest: path.to_path_buf(),
        },
    })
}

fn existing_blob(root: &Path, layer: &Layer) -> Result<PathBuf, String> {
    let path = blob_path(root, &layer.digest)?;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(format!("blob {} is not a file", path.display())),
        Err(e) => Err(format!("blob {} is missing: {e}", path.display())),
    }
}

fn small_layer(root: &Path, layer: &Layer) -> Result<Vec<u8>, String> {
    let path = existing_blob(root, layer)?;
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if len > MAX_SMALL_LAYER {
        return Err(format!("{} layer is {len} bytes", layer.media_type));
    }
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// llama-server flags for a `params` layer; what has no flag is noted.
pub fn params_args(bytes: &[u8], notes: &mut Vec<String>) -> Result<Vec<String>, String> {
    let params: serde_json::Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("corrupt params layer: {e}"))?;
    let mut args = Vec::new();
    for (key, value) in &params {
        match PARAM_FLAGS.iter().find(|(k, _)| k == key) {
            Some((_, flag)) => {
                let text = match value {
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => u8::from(*b).to_string(),
                    other => return Err(format!("params: {key} is {other}, not a number")),
                };
                args.push(flag.to_string());
                args.push(text);
            }
            None if key == "stop" => {
                notes.push(format!("Ollama stop words not applied by default: {value}"))
            }
            None => notes.push(format!(
                "Ollama parameter {key} has no llama-server flag: {value}"
            )),
        }
    }
    Ok(args)
}

#[cfg(test)]
#[path = "ollama_tests.rs"]
mod tests;
