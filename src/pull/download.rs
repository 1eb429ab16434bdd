//! One file fetched into place: streamed to `<dest>.part`, resumed with a
//! `Range` request after a dropped connection or a restart, checked against
//! its SHA-256, then renamed into place.
//!
//! Invariants: the destination name only ever holds a complete, verified
//! file (the rename is the last step); the part file is opened without
//! following links, so a link planted there cannot redirect the write; a
//! destination that is a link is refused; the file is never held in memory
//! (one buffer of [`BUF`] bytes). A hash mismatch deletes the part file;
//! a full disk keeps it for a resume once there is room.

use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::header::CONTENT_RANGE;
use hyper::{StatusCode, Uri};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::http::HubClient;
use super::{Progress, PullError};

/// The write buffer (and the read buffer when hashing a part file).
const BUF: usize = 1 << 20;
/// Tries for one file before the error is final.
const ATTEMPTS: u32 = 6;
/// Room left free beyond the file itself.
const DISK_MARGIN: u64 = 64 << 20;
/// How often progress is reported while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A file to fetch.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Uri,
    pub dest: PathBuf,
    /// Expected size (from the listing); 0 when unknown.
    pub size: u64,
    /// Expected SHA-256, lower-case hex.
    pub sha256: String,
    /// The name progress reports.
    pub label: String,
}

/// `<dest>.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Fetches `t` into place. Returns the headers' commit id if the hub sent
/// one (`X-Repo-Commit`).
pub async fn fetch(
    client: &HubClient,
    t: &Target,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Option<String>, PullError> {
    refuse_link(&t.dest)?;
    let part = part_path(&t.dest);
    let mut file = open_part(&part)?;
    let (mut hasher, mut have) = hash_existing(&mut file, &part, t.size).await?;
    check_space(&t.dest, t.size.saturating_sub(have))?;
    let mut commit = None;
    let mut attempt = 0;
    let mut meter = Meter::new(have);
    loop {
        if t.size > 0 && have >= t.size {
            break;
        }
        match stream_once(
            client,
            t,
            &mut file,
            &mut hasher,
            &mut have,
            &mut meter,
            progress,
        )
        .await
        {
            Ok(Step::Done(c)) => {
                commit = commit.or(c);
                break;
            }
            Ok(Step::Restart) => {
                file.set_len(0).await.map_err(|e| io(&part, e))?;
                file.rewind().await.map_err(|e| io(&part, e))?;
                hasher = Sha256::new();
                have = 0;
            }
            Err(e) if e.is_transient() && attempt + 1 < ATTEMPTS => {
                attempt += 1;
                let wait = Duration::from_secs(1 << attempt.min(4));
                let note = format!("{e}; resuming from byte {have} in {wait:?}");
                tracing::warn!(file = %t.label, "{note}");
                let mut p = meter.report(&t.label, have, t.size);
                p.note = Some(note);
                progress(p);
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
    file.flush().await.map_err(|e| io(&part, e))?;
    file.sync_all().await.map_err(|e| io(&part, e))?;
    drop(file);
    finish(t, &part, hasher)?;
    progress(meter.report(&t.label, have, t.size.max(have)));
    Ok(commit)
}

/// What one request achieved.
enum Step {
    /// The body ran to its end.
    Done(Option<String>),
    /// The server ignored the range: start from byte 0.
    Restart,
}

async fn stream_once(
    client: &HubClient,
    t: &Target,
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    have: &mut u64,
    meter: &mut Meter,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Step, PullError> {
    let (resp, commit) = client.get(t.url.clone(), Some(*have)).await?;
    let status = resp.status();
    match status {
        StatusCode::PARTIAL_CONTENT => check_range(&resp, *have)?,
        StatusCode::OK if *have > 0 => return Ok(Step::Restart),
        StatusCode::OK => {}
        StatusCode::RANGE_NOT_SATISFIABLE if *have > 0 && *have == t.size => {
            return Ok(Step::Done(commit))
        }
        s => return Err(PullError::from_status(s, &t.url.to_string())),
    }
    let mut body = resp.into_body();
    let part = part_path(&t.dest);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PullError::Network(format!("{}: {e}", t.label)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if t.size > 0 && *have + data.len() as u64 > t.size {
            return Err(PullError::Network(format!(
                "{}: the server sent more than the listed {} bytes",
                t.label, t.size
            )));
        }
        file.write_all(&data).await.map_err(|e| io(&part, e))?;
        hasher.update(&data);
        *have += data.len() as u64;
        if meter.due() {
            progress(meter.report(&t.label, *have, t.size));
        }
    }
    if t.size > 0 && *have < t.size {
        return Err(PullError::Network(format!(
            "{}: connection ended at {} of {} bytes",
            t.label, have, t.size
        )));
    }
    Ok(Step::Done(commit))
}

/// A 206 must start where the part file ends.
fn check_range(resp: &hyper::Response<hyper::body::Incoming>, have: u64) -> Result<(), PullError> {
    let range = resp
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let start = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<u64>().ok());
    if start == Some(have) {
        Ok(())
    } else {
        Err(PullError::Network(format!(
            "asked for bytes from {have} and got Content-Range {range:?}"
        )))
    }
}

fn refuse_link(dest: &Path) -> Result<(), PullError> {
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_symlink() => Err(PullError::Link(dest.to_path_buf())),
        _ => Ok(()),
    }
}

fn open_part(part: &Path) -> Result<tokio::fs::File, PullError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => PullError::Link(part.to_path_buf()),
            _ => io(part, e),
        })?;
    Ok(tokio::fs::File::from_std(file))
}

/// Hashes what a part file already holds and leaves the cursor at its end;
/// a part longer than the file is started over.
async fn hash_existing(
    file: &mut tokio::fs::File,
    part: &Path,
    size: u64,
) -> Result<(Sha256, u64), PullError> {
    let len = file.metadata().await.map_err(|e| io(part, e))?.len();
    let mut hasher = Sha256::new();
    if size > 0 && len > size {
        file.set_len(0).await.map_err(|e| io(part, e))?;
        return Ok((hasher, 0));
    }
    let mut buf = vec![0u8; BUF];
    let mut read = 0u64;
    while read < len {
        let n = file.read(&mut buf).await.map_err(|e| io(part, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read > 0 {
        tracing::info!(part = %part.display(), bytes = read, "resuming a partial download");
    }
    Ok((hasher, read))
}

fn check_space(dest: &Path, need: u64) -> Result<(), PullError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let Ok(st) = nix::sys::statvfs::statvfs(dir) else {
        return Ok(());
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if free < need.saturating_add(DISK_MARGIN) {
        return Err(PullError::DiskFull {
            dir: dir.to_path_buf(),
            need,
            free,
        });
    }
    Ok(())
}

/// Checks the hash and renames the part into place.
fn finish(t: &Target, part: &Path, hasher: Sha256) -> Result<(), PullError> {
    let got = hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(&t.sha256) {
        let _ = std::fs::remove_file(part);
        return Err(PullError::HashMismatch {
            file: t.label.clone(),
            expected: t.sha256.to_ascii_lowercase(),
            got,
        });
    }
    refuse_link(&t.dest)?;
    std::fs::rename(part, &t.dest).map_err(|e| io(&t.dest, e))?;
    if let Some(dir) = t.dest.parent() {
        // The rename is durable once the directory is.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(path: &Path, e: std::io::Error) -> PullError {
    if e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC) {
        return PullError::DiskFull {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            need: 0,
            free: 0,
        };
    }
    PullError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    }
}

/// Rate and ETA over the bytes of this run (resumed bytes not counted).
struct Meter {
    started: Instant,
    from: u64,
    last: Instant,
}

impl Meter {
    fn new(from: u64) -> Meter {
        let now = Instant::now();
        Meter {
            started: now,
            from,
            last: now,
        }
    }

    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = now.duration_since(self.last) >= PROGRESS_EVERY;
        if due {
            self.last = now;
        }
        due
    }

    fn report(&self, label: &str, completed: u64, total: u64) -> Progress {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            completed.saturating_sub(self.from) as f64 / secs
        } else {
            0.0
        };
        let eta = (rate > 0.0 && total > completed)
            .then(|| Duration::from_secs_f64((total - completed) as f64 / rate));
        Progress {
            file: label.to_string(),
            completed,
            total,
            rate,
            eta,
            note: None,
        }
    }
}
