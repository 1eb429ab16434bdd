//! What `claracore pull REF` fetches: the reference forms, and the choice
//! of files from a Hugging Face Hub tree listing.
//!
//! References, the names Ollama and `llama-server -hf` take:
//! - `hf.co/USER/REPO:QUANT`: the GGUF (or the parts of a split one) whose
//!   name holds QUANT as a whole token (`Q4_K_M` is not `Q4_K`);
//! - `hf.co/USER/REPO`: Q4_K_M, as llama.cpp prefers, else the repository's
//!   only model;
//! - `hf.co/USER/REPO/PATH.gguf`: that file;
//! - `https://HOST/…/FILE.gguf`: a plain URL, which needs a SHA-256 to check.
//!
//! `huggingface.co/` is accepted for `hf.co/`, with or without `https://`.
//! A listing is the Hub's `/api/models/{repo}/tree/{revision}` answer; its
//! `lfs.oid` is the file's SHA-256, which the download is checked against.
//! A path that could leave the models folder (`..`, absolute, backslashes)
//! is refused if chosen, and never used for the local name.

use serde::Deserialize;

/// The quantisation chosen when a reference names none.
pub const DEFAULT_QUANT: &str = "Q4_K_M";

/// A parsed `pull` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullRef {
    Hub {
        /// `USER/REPO`.
        repo: String,
        quant: Option<String>,
        /// A file path inside the repository.
        file: Option<String>,
    },
    Url {
        url: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("{0:?} is not a model reference: use hf.co/USER/REPO[:QUANT], hf.co/USER/REPO/FILE.gguf or https://…/FILE.gguf")]
    Form(String),
    #[error(
        "{0:?} is not a valid repository name part (letters, digits, '-', '_', '.'; at most 96)"
    )]
    Name(String),
    #[error("{0:?}: the file must end in .gguf")]
    NotGguf(String),
}

/// Parses a reference.
pub fn parse(text: &str) -> Result<PullRef, RefError> {
    let text = text.trim();
    let bare = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text);
    let hub = bare
        .strip_prefix("hf.co/")
        .or_else(|| bare.strip_prefix("huggingface.co/"));
    let Some(rest) = hub else {
        if (text.starts_with("https://") || text.starts_with("http://")) && bare.contains('/') {
            if !super::is_gguf_name(text) {
                return Err(RefError::NotGguf(text.to_string()));
            }
            return Ok(PullRef::Url {
                url: text.to_string(),
            });
        }
        return Err(RefError::Form(text.to_string()));
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(user), Some(repo_q)) = (parts.next(), parts.next()) else {
        return Err(RefError::Form(text.to_string()));
    };
    let file = parts.next().filter(|f| !f.is_empty());
    let (repo_name, quant) = match (repo_q.split_once(':'), file) {
        (Some((r, q)), None) if !q.is_empty() => (r, Some(q.to_string())),
        (Some(_), _) => return Err(RefError::Form(text.to_string())),
        (None, _) => (repo_q, None),
    };
    check_name(user)?;
    check_name(repo_name)?;
    if let Some(f) = file {
        if !super::is_gguf_name(f) {
            return Err(RefError::NotGguf(f.to_string()));
        }
        safe_path(f).map_err(|_| RefError::Form(text.to_string()))?;
    }
    Ok(PullRef::Hub {
        repo: format!("{user}/{repo_name}"),
        quant,
        file: file.map(str::to_string),
    })
}

fn check_name(part: &str) -> Result<(), RefError> {
    let ok = !part.is_empty()
        && part.len() <= 96
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !part.contains("..")
        && !part.starts_with(['-', '.'])
        && !part.ends_with(['-', '.']);
    ok.then_some(())
        .ok_or_else(|| RefError::Name(part.to_string()))
}

/// A repository path that stays inside any folder it is joined to.
pub fn safe_path(path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(format!("unsafe file name in the listing: {path:?}"))
    } else {
        Ok(())
    }
}

/// One entry of the Hub's tree listing.
#[derive(Debug, Clone, Deserialize)]
pub struct TreeEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lfs {
    /// The file's SHA-256, lower-case hex.
    pub oid: String,
    pub size: u64,
}

/// A file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Its path in the repository.
    pub path: String,
    pub size: u64,
    /// From the listing's LFS pointer; `None` for a small non-LFS file.
    pub sha256: Option<String>,
}

impl RemoteFile {
    /// The name it gets in the models folder: the path's last component.
    pub fn local_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// What a pull fetches: the model's files (several parts for a split one)
/// and the projector, if the repository has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub files: Vec<RemoteFile>,
    pub mmproj: Option<RemoteFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("the repository has no GGUF file")]
    NoGguf,
    #[error("no file matches {quant:?}; the repository has: {}", .available.join(", "))]
    NoMatch {
        quant: String,
        available: Vec<String>,
    },
    #[error("{quant:?} matches several models: {}; name one as hf.co/USER/REPO/FILE.gguf", .matches.join(", "))]
    Several { quant: String, matches: Vec<String> },
    #[error("the repository has no file {0:?}")]
    NoFile(String),
    #[error("{0}")]
    Unsafe(String),
    #[error("{file}: split model incomplete in the listing (has {have} of {of} parts)")]
    Incomplete { file: String, have: usize, of: u32 },
}

/// Picks the files for `quant` (or `file`) from a listing.
pub fn choose(
    entries: &[TreeEntry],
    quant: Option<&str>,
    file: Option<&str>,
) -> Result<Chosen, ChooseError> {
    let ggufs: Vec<&TreeEntry> = entries
        .iter()
        .filter(|e| e.kind == "file" && super::is_gguf_name(&e.path))
        .collect();
    let (projectors, models): (Vec<&TreeEntry>, Vec<&TreeEntry>) =
        ggufs.into_iter().partition(|e| is_mmproj(&e.path));
    if models.is_empty() {
        return Err(ChooseError::NoGguf);
    }
    let picked: Vec<&TreeEntry> = match file {
        Some(f) => pick_file(&models, f)?,
        None => pick_quant(&models, quant)?,
    };
    for e in &picked {
        safe_path(&e.path).map_err(ChooseError::Unsafe)?;
    }
    let mmproj = pick_projector(&projectors);
    if let Some(p) = &mmproj {
        safe_path(&p.path).map_err(ChooseError::Unsafe)?;
    }
    Ok(Chosen {
        files: picked.into_iter().map(remote).collect(),
        mmproj: mmproj.map(remote),
    })
}

fn remote(e: &TreeEntry) -> RemoteFile {
    RemoteFile {
        path: e.path.clone(),
        size: e.lfs.as_ref().map_or(e.size, |l| l.size),
        sha256: e.lfs.as_ref().map(|l| l.oid.to_ascii_lowercase()),
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn is_mmproj(path: &str) -> bool {
    basename(path).to_ascii_lowercase().starts_with("mmproj")
}

/// The stem without `.gguf` and without a split suffix.
fn group_key(path: &str) -> String {
    let stem = path.get(..path.len() - 5).unwrap_or(path);
    super::folder::split_part(stem)
        .map_or(stem, |(base, _, _)| base)
        .to_string()
}

fn pick_file<'a>(models: &[&'a TreeEntry], file: &str) -> Result<Vec<&'a TreeEntry>, ChooseError> {
    let one = models
        .iter()
        .find(|e| e.path == file)
        .ok_or_else(|| ChooseError::NoFile(file.to_string()))?;
    complete_group(models, one)
}

/// Every part of the group `one` belongs to, in order, checked complete.
fn complete_group<'a>(
    models: &[&'a TreeEntry],
    one: &'a TreeEntry,
) -> Result<Vec<&'a TreeEntry>, ChooseError> {
    let stem = one.path.get(..one.path.len() - 5).unwrap_or(&one.path);
    let Some((_, _, of)) = super::folder::split_part(stem) else {
        return Ok(vec![one]);
    };
    let key = group_key(&one.path);
    let mut parts: Vec<&TreeEntry> = models
        .iter()
        .copied()
        .filter(|e| group_key(&e.path) == key)
        .collect();
    parts.sort_by(|a, b| a.path.cmp(&b.path));
    if parts.len() != of as usize {
        return Err(ChooseError::Incomplete {
            file: one.path.clone(),
            have: parts.len(),
            of,
        });
    }
    Ok(parts)
}

fn pick_quant<'a>(
    models: &[&'a TreeEntry],
    quant: Option<&str>,
) -> Result<Vec<&'a TreeEntry>, ChooseError> {
    let want = quant.unwrap_or(DEFAULT_QUANT);
    let mut groups: Vec<String> = models
        .iter()
        .filter(|e| has_token(basename(&e.path), want))
        .map(|e| group_key(&e.path))
        .collect();
    groups.sort();
    groups.dedup();
    let names = || models.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
    match groups.as_slice() {
        [one] => {
            let first = models
                .iter()
                .find(|e| group_key(&e.path) == *one)
                .ok_or(ChooseError::NoGguf)?;
            complete_group(models, first)
        }
        [] if quant.is_none() => {
            let mut all: Vec<String> = models.iter().map(|e| group_key(&e.path)).collect();
            all.sort();
            all.dedup();
            match all.as_slice() {
                [_] => complete_group(models, models[0]),
                _ => Err(ChooseError::NoMatch {
                    quant: want.to_string(),
                    available: names(),
                }),
            }
        }
        [] => Err(ChooseError::NoMatch {
            quant: want.to_string(),
            available: names(),
        }),
        many => Err(ChooseError::Several {
            quant: want.to_string(),
            matches: many.to_vec(),
        }),
    }
}

/// Whether `name` holds `token` bounded by non-alphanumerics (and not
/// followed by `_`, so `Q4_K` does not match `Q4_K_M`), ignoring case.
pub fn has_token(name: &str, token: &str) -> bool {
    let (hay, needle) = (name.to_ascii_lowercase(), token.to_ascii_lowercase());
    if needle.is_empty() {
        return false;
    }
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(at) = hay.get(from..).and_then(|h| h.find(&needle)) {
        let start = from + at;
        let end = start + needle.len();
        let before_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let after_ok =
            end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

/// One projector: F16 first, then BF16, F32, else the first by name.
fn pick_projector<'a>(projectors: &[&'a TreeEntry]) -> Option<&'a TreeEntry> {
    ["F16", "BF16", "F32"]
        .iter()
        .find_map(|q| {
            projectors
                .iter()
                .copied()
                .find(|e| has_token(basename(&e.path), q))
        })
        .or_else(|| {
            projectors
                .iter()
                .copied()
                .min_by(|a, b| a.path.cmp(&b.path))
        })
}

#[cfg(test)]
#[path = "hf_tests.rs"]
mod tests;
