//! Where models come from besides `[models.NAME]` tables: a models folder
//! (every GGUF in it, [`folder`]), an Ollama model store read in place
//! ([`ollama`]), and the Hugging Face references `claracore pull` takes
//! ([`hf`]).
//!
//! These are pure readers over the filesystem (and, for [`hf`], over a
//! listing already fetched): they say what is there and why anything was
//! left out, and never start, stop or download anything. The daemon turns
//! a [`Scan`] into models; a [`Skipped`] entry becomes one log line.

pub mod folder;
pub mod hf;
pub mod ollama;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where one model's definition came from, shown by `list`, `/v1/models`,
/// `/api/tags` and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A `[models.NAME]` table.
    Config,
    /// A GGUF file found in a models folder.
    Folder { dir: PathBuf },
    /// A file `claracore pull` placed in a models folder, with what it
    /// was pulled from.
    Pulled {
        dir: PathBuf,
        repo: String,
        revision: String,
        file: String,
    },
    /// A model in an Ollama store, served read-only in place.
    OllamaStore { manifest: PathBuf },
}

impl Source {
    /// One word for tables: `config`, `folder`, `pulled`, `ollama`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Folder { .. } => "folder",
            Source::Pulled { .. } => "pulled",
            Source::OllamaStore { .. } => "ollama",
        }
    }

    /// Whether `claracore rm` may delete the model's file: only files in a
    /// models folder are ours to remove.
    pub fn removable(&self) -> bool {
        matches!(self, Source::Folder { .. } | Source::Pulled { .. })
    }
}

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
