//! A models folder served as it is: every `*.gguf` in it is a model.
//!
//! Naming, as an operator reads a directory listing:
//! - a file is a model named after its stem, lower-cased
//!   (`Qwen2.5-7B-Instruct-Q4_K_M.gguf` → `qwen2.5-7b-instruct-q4_k_m`);
//! - the parts of a split model (`…-00001-of-00003.gguf`) are one model,
//!   named without the part suffix, served once every part is there;
//! - a subdirectory holding one model (split or not) is a model named after
//!   the subdirectory, so a multimodal model and its projector can live
//!   together; deeper levels are not read;
//! - a `mmproj*.gguf` is no model: it goes with the one model in its
//!   directory as `--mmproj` (with several, the projector is ambiguous and
//!   skipped, with a hint to use a subdirectory).
//!
//! Left out, each with a [`Skipped`] reason: files still being written
//! (`*.part`, or anything that is not `*.gguf`, is never looked at), hidden
//! files, files that are not GGUF (checked by magic), symlinks that lead
//! nowhere or to something other than a file, and incomplete split models.
//!
//! A file `claracore pull` placed carries a sidecar `.<file>.source` with
//! what it was pulled from ([`PulledFrom`]); its model's source is then
//! [`Source::Pulled`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{check_gguf_magic, is_gguf_name, Discovered, Scan, Source};

/// What a pulled file was fetched from, kept beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PulledFrom {
    pub repo: String,
    pub revision: String,
    pub file: String,
    /// The verified SHA-256 of the file, lower-case hex.
    pub sha256: String,
}

/// The sidecar's path for a pulled file.
pub fn sidecar(file: &Path) -> PathBuf {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    file.with_file_name(format!(".{}.source", name.unwrap_or_default()))
}

/// The model name for a file stem: lower-cased, without a split suffix.
pub fn model_name(stem: &str) -> String {
    let base = split_part(stem).map_or(stem, |(base, _, _)| base);
    base.to_lowercase()
}

/// `(base, part, of)` for a stem ending in `-NNNNN-of-MMMMM`.
pub fn split_part(stem: &str) -> Option<(&str, u32, u32)> {
    let (head, of) = stem.rsplit_once("-of-")?;
    let (base, part) = head.rsplit_once('-')?;
    let five = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !five(part) || !five(of) {
        return None;
    }
    let (part, of) = (part.parse().ok()?, of.parse().ok()?);
    (part >= 1 && part <= of && !base.is_empty()).then_some((base, part, of))
}

/// Reads every folder in order; a name found twice keeps the first.
pub fn scan(dirs: &[PathBuf]) -> Scan {
    let mut all = Scan::default();
    for dir in dirs {
        all.merge(scan_one(dir));
    }
    all.models.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

fn scan_one(dir: &Path) -> Scan {
    let mut scan = Scan::default();
    let entries = match list(dir) {
        Ok(entries) => entries,
        Err(why) => {
            scan.skip(dir, why);
            return scan;
        }
    };
    let mut files = Vec::new();
    for (path, kind) in entries {
        match kind {
            Kind::File => files.push(path),
            Kind::Dir => scan.merge(scan_subdir(dir, &path)),
        }
    }
    let found = group(&files, &mut scan);
    attach(dir, found, None, &mut scan);
    scan
}

/// A subdirectory holding one model, named after the subdirectory.
fn scan_subdir(top: &Path, sub: &Path) -> Scan {
    let mut scan = Scan::default();
    let files: Vec<PathBuf> = match list(sub) {
        Ok(entries) => entries
            .into_iter()
            .filter(|(_, k)| *k == Kind::File)
            .map(|(p, _)| p)
            .collect(),
        Err(why) => {
            scan.skip(sub, why);
            return scan;
        }
    };
    let name = sub
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let found = group(&files, &mut scan);
    if found.models.len() > 1 {
        let why = format!(
            "a subdirectory is one model, and this one holds {}: put each model in its own",
            found.models.len()
        );
        scan.skip(sub, why);
        return scan;
    }
    attach(top, found, Some(name), &mut scan);
    scan
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    File,
    Dir,
}

/// The directory's visible entries that are GGUF files or directories,
/// sorted; symlinks are followed once.
fn list(dir: &Path) -> Result<Vec<(PathBuf, Kind)>, String> {
    let read = std::fs::read_dir(dir).map_err(|e| format!("cannot read the folder: {e}"))?;
    let mut out = Vec::new();
    for entry in read.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // Following a link: a dangling one or one to a device is no model.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => out.push((path, Kind::Dir)),
            Ok(m) if m.is_file() && is_gguf_name(&name) => out.push((path, Kind::File)),
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

fn is_mmproj(stem: &str) -> bool {
    stem.to_ascii_lowercase().starts_with("mmproj")
}

fn stem_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.get(..name.len().saturating_sub(5))
        .unwrap_or_default()
        .to_string()
}

/// One directory's files sorted into models (parts grouped) and projectors.
#[derive(Default)]
struct Found {
    /// name → files, the first part first.
    models: BTreeMap<String, Vec<PathBuf>>,
    mmproj: Vec<PathBuf>,
}

fn group(files: &[PathBuf], scan: &mut Scan) -> Found {
    let mut found = Found::default();
    let mut parts: BTreeMap<String, (u32, Vec<(u32, PathBuf)>)> = BTreeMap::new();
    for path in files {
        if let Err(why) = check_gguf_magic(path) {
            scan.skip(path, why);
            continue;
        }
        let stem = stem_of(path);
        if is_mmproj(&stem) {
            found.mmproj.push(path.clone());
        } else if let Some((base, part, of)) = split_part(&stem) {
            let entry = parts.entry(base.to_lowercase()).or_insert((of, Vec::new()));
            if entry.0 != of {
                scan.skip(
                    path,
                    format!(
                        "its part count {of} differs from another part's {}",
                        entry.0
                    ),
                );
                continue;
            }
            entry.1.push((part, path.clone()));
        } else {
            found.models.insert(model_name(&stem), vec![path.clone()]);
        }
    }
    for (name, (of, mut have)) in parts {
        have.sort();
        have.dedup_by_key(|(n, _)| *n);
        if have.len() as u32 != of {
            let numbers: Vec<String> = have.iter().map(|(n, _)| n.to_string()).collect();
            let why = format!(
                "split model incomplete: has part(s) {} of {of}",
                numbers.join(", ")
            );
            scan.skip(&have[0].1, why);
            continue;
        }
        found
            .models
            .insert(name, have.into_iter().map(|(_, p)| p).collect());
    }
    found
}

/// Turns a directory's models into [`Discovered`], pairing a projector
/// with the directory's one model.
fn attach(top: &Path, found: Found, rename: Option<String>, scan: &mut Scan) {
    let mmproj = match (found.mmproj.as_slice(), found.models.len()) {
        ([], _) => None,
        ([one], 1) => Some(one.clone()),
        ([one], _) => {
            let why = "a projector beside several models is ambiguous: put it in a subdirectory with its model";
            scan.skip(one, why);
            None
        }
        (many, _) => {
            for p in many {
                scan.skip(p, "several projectors in one directory: keep one per model");
            }
            None
        }
    };
    for (name, files) in found.models {
        let size = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let model = files[0].clone();
        let source = source_of(top, &model);
        scan.models.push(Discovered {
            name: rename.clone().unwrap_or(name),
            model,
            files,
            mmproj: mmproj.clone(),
            args: Vec::new(),
            notes: Vec::new(),
            size,
            source,
        });
    }
}

fn source_of(dir: &Path, model: &Path) -> Source {
    let pulled = std::fs::read(sidecar(model))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<PulledFrom>(&bytes).ok());
    match pulled {
        Some(p) => Source::Pulled {
            dir: dir.to_path_buf(),
            repo: p.repo,
            revision: p.revision,
            file: p.file,
        },
        None => Source::Folder {
            dir: dir.to_path_buf(),
        },
    }
}

#[cfg(test)]
#[path = "folder_tests.rs"]
mod tests;
