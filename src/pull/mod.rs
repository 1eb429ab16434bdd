//! `claracore pull`: a model from a Hugging Face hub (or a plain URL) into
//! a models folder, resumable and verified.
//!
//! The hub's HTTP API as huggingface_hub documents it: the tree listing
//! `{endpoint}/api/models/{repo}/tree/{revision}?recursive=true` names the
//! files with their LFS SHA-256 and size; `{endpoint}/{repo}/resolve/
//! {revision}/{path}` downloads, redirecting to a CDN. `HF_ENDPOINT`
//! (mirrors, air-gapped hubs) and the token are the caller's inputs.
//!
//! Layout in the folder, so that the folder scan serves what was pulled
//! (see [`crate::sources::folder`]): one file lands as `DIR/<file>`; a
//! model with a projector lands in `DIR/<name>/` with it; the parts of a
//! split model keep their names. Each model file gets a `.<file>.source`
//! sidecar saying what it was pulled from. Two pulls of one file, in one
//! process or two, share one download: the second waits on the first's
//! lock on the part file and then finds the file in place.

pub mod download;
pub mod http;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{StatusCode, Uri};
use serde::Serialize;

use crate::sources::folder::{self, PulledFrom};
use crate::sources::hf::{self, ChooseError, Chosen, PullRef, RefError, RemoteFile, TreeEntry};
use download::Target;
use http::HubClient;

/// The public hub, unless `HF_ENDPOINT` names another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision pulled unless one is named.
pub const DEFAULT_REVISION: &str = "main";
/// A tree listing larger than this, all pages together, is refused (the
/// largest GGUF repositories list a few hundred files in well under 1 MiB).
const MAX_LISTING: usize = 16 << 20;
/// Listing pages followed at most.
const MAX_PAGES: usize = 50;

/// Where a download stands, for the CLI's bar, the events stream and
/// Ollama's `/api/pull` lines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub file: String,
    pub completed: u64,
    pub total: u64,
    /// Bytes per second over this run.
    pub rate: f64,
    #[serde(with = "opt_secs")]
    pub eta: Option<Duration>,
    /// Something the person waiting should know (a dropped connection and
    /// the resume that follows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

mod opt_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error(transparent)]
    Choose(#[from] ChooseError),
    #[error("{0} not found on the hub (check the repository, file and revision)")]
    NotFound(String),
    #[error("{url}: the hub refused access ({status}); the repository may be gated or private: accept its terms on the hub and give a token (HF_TOKEN, or hf_token_file / the systemd credential hf_token)")]
    Denied { url: String, status: u16 },
    #[error("{url}: the hub answered {status}")]
    Http { url: String, status: u16 },
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Url(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(
        "{file}: SHA-256 mismatch: expected {expected}, got {got}; the partial file was deleted"
    )]
    HashMismatch {
        file: String,
        expected: String,
        got: String,
    },
    #[error("{}: not enough disk space ({}); the partial file is kept and the pull resumes once there is room", .dir.display(), space(*.need, *.free))]
    DiskFull { dir: PathBuf, need: u64, free: u64 },
    #[error("{}: is a symbolic link; refusing to write through it", .0.display())]
    Link(PathBuf),
    #[error("{}: {error}", .path.display())]
    Io { path: PathBuf, error: String },
    #[error("a URL pull needs --sha256 (the file's SHA-256, 64 hex digits)")]
    NeedsSha256,
    #[error("{0:?} is not a GGUF file: {1}")]
    NotGguf(String, String),
}

fn space(need: u64, free: u64) -> String {
    if need == 0 {
        "the disk filled up while writing".to_string()
    } else {
        format!("{} MiB needed, {} MiB free", need >> 20, free >> 20)
    }
}

impl PullError {
    /// A status that is not success, as an error.
    pub fn from_status(status: StatusCode, url: &str) -> PullError {
        match status {
            StatusCode::NOT_FOUND => PullError::NotFound(url.to_string()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PullError::Denied {
                url: url.to_string(),
                status: status.as_u16(),
            },
            s if http::retryable(s) => PullError::Network(format!("{url}: the hub answered {s}")),
            s => PullError::Http {
                url: url.to_string(),
                status: s.as_u16(),
            },
        }
    }

    /// Worth another try (a dropped connection, a 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(self, PullError::Network(_))
    }
}

/// What a pull needs besides the reference.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub endpoint: String,
    pub token: Option<String>,
    pub models_dir: PathBuf,
    pub revision: String,
    /// The expected SHA-256 of a URL pull.
    pub sha256: Option<String>,
}

/// What a pull placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pulled {
    /// The name the folder scan gives the model.
    pub name: String,
    pub files: Vec<PathBuf>,
    pub mmproj: Option<PathBuf>,
    pub bytes: u64,
    pub repo: String,
    pub revision: String,
}

/// Pulls `reference` into `opts.models_dir`.
pub async fn pull(
    reference: &str,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Pulled, PullError> {
    let endpoint: Uri = opts
        .endpoint
        .trim_end_matches('/')
        .parse()
        .map_err(|e| PullError::Url(format!("hub endpoint {:?}: {e}", opts.endpoint)))?;
    let client = HubClient::new(&endpoint, opts.token.clone())?;
    match hf::parse(reference)? {
        PullRef::Hub { repo, quant, file } => {
            let listing = list(&client, &endpoint, &repo, &opts.revision).await?;
            let chosen = hf::choose(&listing, quant.as_deref(), file.as_deref())?;
            pull_chosen(&client, &endpoint, &repo, chosen, opts, progress).await
        }
        PullRef::Url { url } => pull_url(&client, &url, opts, progress).await,
    }
}

/// The repository's tree listing, every page of it.
async fn list(
    client: &HubClient,
    endpoint: &Uri,
    repo: &str,
    revision: &str,
) -> Result<Vec<TreeEntry>, PullError> {
    let mut url = format!(
        "{endpoint}api/models/{repo}/tree/{}?recursive=true",
        enc(revision)
    );
    let mut entries = Vec::new();
    let mut budget = MAX_LISTING;
    for _ in 0..MAX_PAGES {
        let uri: Uri = url
            .parse()
            .map_err(|e| PullError::Url(format!("{url}: {e}")))?;
        let (resp, _) = client.get(uri, None).await?;
        if !resp.status().is_success() {
            return Err(match resp.status() {
                StatusCode::NOT_FOUND => {
                    PullError::NotFound(format!("repository {repo} at revision {revision}"))
                }
                s => PullError::from_status(s, &url),
            });
        }
        let next = next_link(resp.headers());
        let body = http_body_util::Limited::new(resp.into_body(), budget)
            .collect()
            .await
            .map_err(|e| PullError::Network(format!("{url}: {e}")))?
            .to_bytes();
        budget -= body.len();
        let page: Vec<TreeEntry> = serde_json::from_slice(&body)
            .map_err(|e| PullError::Network(format!("{url}: not a tree listing: {e}")))?;
        entries.extend(page);
        match next {
            Some(n) => url = n,
            None => return Ok(entries),
        }
    }
    Err(PullError::Network(format!(
        "{repo}: more than {MAX_PAGES} listing pages"
    )))
}

/// The `rel="next"` target of a `Link` header.
fn next_link(headers: &hyper::HeaderMap) -> Option<String> {
    let link = headers.get(hyper::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// Percent-encodes a path segment (a revision may hold `/`).
fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A path inside the repository, each segment encoded.
fn enc_path(path: &str) -> String {
    path.split('/').map(enc).collect::<Vec<_>>().join("/")
}

async fn pull_chosen(
    client: &HubClient,
    endpoint: &Uri,
    repo: &str,
    chosen: Chosen,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Pulled, PullError> {
    let first = chosen.files.first().ok_or(ChooseError::NoGguf)?.clone();
    let stem = first.local_name().trim_end_matches(".gguf").to_string();
    let name = folder::model_name(&stem);
    // With a projector, the pair lives in a subdirectory named after the
    // model, so the folder scan pairs them.
    let dir = match &chosen.mmproj {
        Some(_) => opts.models_dir.join(&name),
        None => opts.models_dir.clone(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| PullError::Io {
        path: dir.clone(),
        error: e.to_string(),
    })?;
    let mut commit = None;
    let mut files = Vec::new();
    let mut bytes = 0;
    for remote in chosen.files.iter().chain(chosen.mmproj.iter()) {
        let url = format!(
            "{endpoint}{repo}/resolve/{}/{}",
            enc(&opts.revision),
            enc_path(&remote.path)
        );
        let dest = dir.join(remote.local_name());
        let from = Origin {
            repo,
            revision: &opts.revision,
        };
        let c = fetch_one(client, &url, &dest, remote, &from, progress).await?;
        commit = commit.or(c);
        bytes += remote.size;
        files.push(dest);
    }
    let mmproj = chosen.mmproj.as_ref().and_then(|_| files.pop());
    let revision = commit.unwrap_or_else(|| opts.revision.clone());
    Ok(Pulled {
        name,
        files,
        mmproj,
        bytes,
        repo: repo.to_string(),
        revision,
    })
}

/// One file: skipped when already in place with the same hash, else
/// fetched under a lock that a concurrent pull of the same file waits on.
/// What a file is pulled from, for its sidecar.
struct Origin<'a> {
    repo: &'a str,
    revision: &'a str,
}

async fn fetch_one(
    client: &HubClient,
    url: &str,
    dest: &Path,
    remote: &RemoteFile,
    from: &Origin<'_>,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Option<String>, PullError> {
    let sha256 = remote.sha256.clone().ok_or_else(|| {
        PullError::NotGguf(
            remote.path.clone(),
            "the listing gives no LFS SHA-256".into(),
        )
    })?;
    let lock = lock_file(dest).await?;
    if already_there(dest, &sha256) {
        drop(lock);
        return Ok(None);
    }
    let target = Target {
        url: url
            .parse()
            .map_err(|e| PullError::Url(format!("{url}: {e}")))?,
        dest: dest.to_path_buf(),
        size: remote.size,
        sha256,
        label: remote.path.clone(),
    };
    let commit = download::fetch(client, &target, progress).await?;
    if let Err(why) = crate::sources::check_gguf_magic(dest) {
        let _ = std::fs::remove_file(dest);
        return Err(PullError::NotGguf(remote.path.clone(), why));
    }
    // Written under the lock, so a pull waiting on it finds the file done.
    let revision = commit.as_deref().unwrap_or(from.revision);
    let remote = RemoteFile {
        size: std::fs::metadata(dest)
            .map(|m| m.len())
            .unwrap_or(remote.size),
        ..remote.clone()
    };
    write_sidecar(dest, from.repo, revision, &remote)?;
    drop(lock);
    Ok(commit)
}

/// Whether `dest` is a file whose sidecar records `sha256`.
fn already_there(dest: &Path, sha256: &str) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return false;
    };
    meta.is_file()
        && std::fs::read(folder::sidecar(dest))
            .ok()
            .and_then(|b| serde_json::from_slice::<PulledFrom>(&b).ok())
            .is_some_and(|p| p.sha256.eq_ignore_ascii_case(sha256))
}

/// An exclusive lock on `.<file>.lock` beside the destination, waited for
/// off the runtime's threads.
async fn lock_file(dest: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, PullError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dest.with_file_name(format!(".{name}.lock"));
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| PullError::Io {
                path: path.clone(),
                error: e.to_string(),
            })?
    };
    let locked = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
    })
    .await
    .map_err(|e| PullError::Io {
        path: path.clone(),
        error: e.to_string(),
    })?;
    locked.map_err(|e| PullError::Io {
        path,
        error: e.to_string(),
    })
}

fn write_sidecar(
    dest: &Path,
    repo: &str,
    revision: &str,
    remote: &RemoteFile,
) -> Result<(), PullError> {
    let from = PulledFrom {
        repo: repo.to_string(),
        revision: revision.to_string(),
        file: remote.path.clone(),
        sha256: remote.sha256.clone().unwrap_or_default(),
    };
    let path = folder::sidecar(dest);
    let bytes = serde_json::to_vec_pretty(&from).unwrap_or_default();
    std::fs::write(&path, bytes).map_err(|e| PullError::Io {
        path,
        error: e.to_string(),
    })
}

async fn pull_url(
    client: &HubClient,
    url: &str,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Pulled, PullError> {
    let sha256 = opts
        .sha256
        .clone()
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(PullError::NeedsSha256)?;
    let uri: Uri = url
        .parse()
        .map_err(|e| PullError::Url(format!("{url}: {e}")))?;
    let file = uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    hf::safe_path(&file).map_err(PullError::Url)?;
    std::fs::create_dir_all(&opts.models_dir).map_err(|e| PullError::Io {
        path: opts.models_dir.clone(),
        error: e.to_string(),
    })?;
    let remote = RemoteFile {
        path: file.clone(),
        size: 0,
        sha256: Some(sha256.to_ascii_lowercase()),
    };
    let dest = opts.models_dir.join(&file);
    let from = Origin {
        repo: url,
        revision: "",
    };
    fetch_one(client, url, &dest, &remote, &from, progress).await?;
    let bytes = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    Ok(Pulled {
        name: folder::model_name(file.trim_end_matches(".gguf")),
        files: vec![dest],
        mmproj: None,
        bytes,
        repo: url.to_string(),
        revision: String::new(),
    })
}
