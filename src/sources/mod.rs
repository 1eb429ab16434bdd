//! Where models come from besides `[models.NAME]` tables: a models folder
//! (every GGUF in it, [`folder`]), an Ollama model store read in place
//! ([`ollama`]), and the Hugging Face references `claracore pull` takes
//! ([`hf`]).
//!
//! [`apply`] adds what a config's folders and store hold to its models, at
//! start and on every reload (a folder change triggers one).
//!
//! These are pure readers over the filesystem (and, for [`hf`], over a
//! listing already fetched): they say what is there and why anything was
//! left out, and never start, stop or download anything. The daemon turns
//! a [`Scan`] into models; a [`Skipped`] entry becomes one log line.

pub mod folder;
pub mod hf;
pub mod ollama;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::{found_model, Config, FoundModel};

/// Where a model came from (the config's type, so every model carries it).
pub use crate::config::ModelSource as Source;

/// A model found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The name requests use.
    pub name: String,
    /// The file llama-server opens (`-m`): the first part of a split model.
    pub model: PathBuf,
    /// Every file the model consists of (the parts of a split model, or
    /// the one file), for sizes and removal.
    pub files: Vec<PathBuf>,
    /// A multimodal projector (`--mmproj`).
    pub mmproj: Option<PathBuf>,
    /// llama-server arguments the source asks for (an Ollama `params`
    /// layer's context size and sampling defaults).
    pub args: Vec<String>,
    /// What the source says that llama-server cannot take, for `show`
    /// (an Ollama template or stop words, say).
    pub notes: Vec<String>,
    /// Sum of the files' sizes in bytes.
    pub size: u64,
    pub source: Source,
}

/// Something a scan left out, and why (one log line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub why: String,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub models: Vec<Discovered>,
    pub skipped: Vec<Skipped>,
}

impl Scan {
    fn skip(&mut self, path: &Path, why: impl Into<String>) {
        self.skipped.push(Skipped {
            path: path.to_path_buf(),
            why: why.into(),
        });
    }

    /// Adds `other`'s models whose names are not taken yet; a name taken
    /// twice keeps the first and skips the second, saying which won.
    pub fn merge(&mut self, other: Scan) {
        self.skipped.extend(other.skipped);
        for m in other.models {
            match self.models.iter().find(|have| have.name == m.name) {
                Some(have) => {
                    let why = format!(
                        "the name {:?} is already taken by {}",
                        m.name,
                        have.model.display()
                    );
                    self.skip(&m.model, why);
                }
                None => self.models.push(m),
            }
        }
    }
}

/// Adds the models of `config`'s models folders and Ollama store to its
/// `[models.NAME]` tables (a table's name or alias wins over a found model
/// of that name), sorted by name; returns what was left out, and why.
pub fn apply(config: &mut Config) -> Vec<Skipped> {
    if config.models_dirs.is_empty() && config.ollama_models.is_none() {
        return Vec::new();
    }
    let mut scan = folder::scan(&config.models_dirs);
    if let Some(store) = &config.ollama_models {
        scan.merge(ollama::scan(store));
    }
    let taken: HashSet<String> = config
        .models
        .iter()
        .flat_map(|m| std::iter::once(m.name.clone()).chain(m.aliases.iter().cloned()))
        .collect();
    for found in scan.models {
        if taken.contains(&found.name) {
            let why = format!("the name {:?} is taken by a [models] table", found.name);
            scan.skipped.push(Skipped {
                path: found.model,
                why,
            });
            continue;
        }
        for note in &found.notes {
            tracing::info!(model = %found.name, "{note}");
        }
        let found = FoundModel {
            name: found.name,
            model: found.model,
            mmproj: found.mmproj,
            args: found.args,
            source: found.source,
        };
        let model = found_model(
            found,
            &config.models_defaults,
            &config.llama_server,
            &config.scheduler,
        );
        config.models.push(model);
    }
    config.models.sort_by(|a, b| a.name.cmp(&b.name));
    for s in &scan.skipped {
        tracing::warn!(path = %s.path.display(), "not served: {}", s.why);
    }
    scan.skipped
}

/// Whether a file name ends in `.gguf`, in any case; `get` because the last
/// five bytes may cut a multi-byte character.
pub fn is_gguf_name(name: &str) -> bool {
    name.len() > 5
        && name
            .get(name.len() - 5..)
            .is_some_and(|ext| ext.eq_ignore_ascii_case(".gguf"))
}

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` starts like a GGUF file; the error says what it is
/// instead, so a stray or half-copied file is refused before it is served.
pub fn check_gguf_magic(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    match file.read_exact(&mut head) {
        Ok(()) if &head == GGUF_MAGIC => Ok(()),
        Ok(()) => Err(format!("not a GGUF file (starts with {head:02x?})")),
        Err(_) => Err("not a GGUF file (shorter than 4 bytes)".to_string()),
    }
}
