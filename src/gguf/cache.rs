//! The per-file caches behind the Ollama routes: [`Digests`] (a whole
//! file's SHA-256) and [`Headers`] (its parsed header), each computed once
//! per version of the file.
//!
//! Invariants: an entry is valid for one version of a file, identified by
//! its [`Stamp`] (device, inode, size, mtime, ctime); a file that changes
//! while it is read is read again (a few times), never cached half-old.
//! Both block (file I/O; hashing a multi-GiB file takes seconds): async
//! callers use `spawn_blocking`. The locks guard only the maps: they are
//! held to look up or insert, never while reading or hashing.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{GgufError, Header};

/// Which version of a file a cache entry was computed from. Any write
/// moves mtime and ctime; a replacement by rename changes the inode; ctime
/// cannot be set back by `touch` or `rsync -t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How many times a file that changes under the reader is read again.
const ATTEMPTS: usize = 3;

/// Values computed from a whole file, one per path, kept while the file's
/// [`Stamp`] stays the same. The lock guards only the map.
struct Cache<T> {
    entries: Mutex<HashMap<PathBuf, (Stamp, T)>>,
    computed: AtomicU64,
}

enum CacheError<E> {
    Stat(io::Error),
    Compute(E),
    Changed,
}

impl<T: Clone> Cache<T> {
    fn new() -> Self {
        Cache {
            entries: Mutex::new(HashMap::new()),
            computed: AtomicU64::new(0),
        }
    }

    fn get<E>(
        &self,
        path: &Path,
        compute: impl Fn(&Path) -> Result<T, E>,
    ) -> Result<T, CacheError<E>> {
        for _ in 0..ATTEMPTS {
            let before = match std::fs::metadata(path) {
                Ok(meta) => Stamp::of(&meta),
                Err(e) => {
                    self.lock().remove(path);
                    return Err(CacheError::Stat(e));
                }
            };
            if let Some((stamp, value)) = self.lock().get(path) {
                if *stamp == before {
                    return Ok(value.clone());
                }
            }
            self.computed.fetch_add(1, Ordering::Relaxed);
            let value = compute(path).map_err(CacheError::Compute)?;
            let after = std::fs::metadata(path).map_err(CacheError::Stat)?;
            if Stamp::of(&after) == before {
                self.lock()
                    .insert(path.to_path_buf(), (before, value.clone()));
                return Ok(value);
            }
        }
        Err(CacheError::Changed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (Stamp, T)>> {
        // The map is consistent after every statement; a panic elsewhere
        // while it was locked leaves nothing half-done.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// SHA-256 digests of whole files, computed once per file version.
///
/// Blocking: hashing reads the whole file (seconds for a large model); call
/// it from `spawn_blocking`. `Send + Sync`; share it behind an `Arc`.
pub struct Digests {
    cache: Cache<String>,
}

impl Default for Digests {
    fn default() -> Self {
        Digests::new()
    }
}

impl Digests {
    pub fn new() -> Self {
        Digests {
            cache: Cache::new(),
        }
    }

    /// The file's SHA-256 as 64 lowercase hex digits, without a `sha256:`
    /// prefix (Ollama's `/api/tags` shows the bare hex); cached until the
    /// file's size, mtime, ctime or inode changes.
    pub fn digest(&self, path: &Path) -> io::Result<String> {
        self.cache.get(path, sha256_file).map_err(|e| match e {
            CacheError::Stat(e) | CacheError::Compute(e) => e,
            CacheError::Changed => io::Error::other(format!(
                "{}: the file kept changing while it was hashed",
                path.display()
            )),
        })
    }

    /// How many times a file has been hashed (each cache miss), for tests
    /// and metrics.
    pub fn hashed(&self) -> u64 {
        self.cache.computed.load(Ordering::Relaxed)
    }
}

fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Parsed headers, read once per file version (`/api/tags` asks for every
/// model's on every call).
///
/// Blocking (file I/O); call it from `spawn_blocking`. `Send + Sync`.
pub struct Headers {
    cache: Cache<Arc<Header>>,
}

impl Default for Headers {
    fn default() -> Self {
        Headers::new()
    }
}

impl Headers {
    pub fn new() -> Self {
        Headers {
            cache: Cache::new(),
        }
    }

    /// The header of the file at `path`, as [`read`] gives it.
    pub fn read(&self, path: &Path) -> Result<Arc<Header>, GgufError> {
        self.cache
            .get(path, |p| super::read(p).map(Arc::new))
            .map_err(|e| match e {
                CacheError::Compute(e) => e,
                CacheError::Stat(source) => GgufError::Open {
                    path: path.to_path_buf(),
                    source,
                },
                CacheError::Changed => GgufError::Changed {
                    path: path.to_path_buf(),
                },
            })
    }

    /// How many times a header has been read from disk (each cache miss).
    pub fn reads(&self) -> u64 {
        self.cache.computed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testing::{every_type, Builder};

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_caches_are_send_and_sync() {
        assert_send_sync::<Digests>();
        assert_send_sync::<Headers>();
        assert_send_sync::<Header>();
    }

    fn sha256sum(path: &Path) -> String {
        let out = std::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    }

    /// Sets the file's mtime, so a rewrite is seen even on a coarse clock.
    fn set_mtime(path: &Path, secs: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn digests_match_sha256sum_and_are_cached_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, vec![0xabu8; 3 << 20]).unwrap();
        let digests = Digests::new();

        let first = digests.digest(&path).unwrap();
        assert_eq!(first, sha256sum(&path));
        assert_eq!(first.len(), 64);
        assert_eq!(digests.hashed(), 1);
        assert_eq!(digests.digest(&path).unwrap(), first);
        assert_eq!(digests.hashed(), 1, "the second call must not hash again");

        // Same size, different bytes, mtime set apart.
        std::fs::write(&path, vec![0xcdu8; 3 << 20]).unwrap();
        set_mtime(&path, 1_000_000);
        let second = digests.digest(&path).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, sha256sum(&path));
        assert_eq!(digests.hashed(), 2);

        // Different size.
        std::fs::write(&path, b"short").unwrap();
        let third = digests.digest(&path).unwrap();
        assert_eq!(third, sha256sum(&path));
        assert_ne!(third, second);
        assert_eq!(digests.digest(&path).unwrap(), third);
        assert_eq!(digests.hashed(), 3);

        // Replaced by rename with the same size and mtime: a new inode.
        let other = dir.path().join("other");
        std::fs::write(&other, b"SHORT").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(digests.digest(&path).unwrap(), sha256sum(&path));
        assert_eq!(digests.hashed(), 4);

        // A missing file is an error, not a stale answer.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            digests.digest(&path).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn digests_from_many_threads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(
            &path,
            (0..1_000_000u32)
                .flat_map(u32::to_le_bytes)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let digests = Arc::new(Digests::new());
        let results: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| digests.digest(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = sha256sum(&path);
        assert!(results.iter().all(|r| *r == expected));
        let hashed = digests.hashed();
        assert!((1..=4).contains(&hashed), "{hashed}");
        digests.digest(&path).unwrap();
        assert_eq!(digests.hashed(), hashed);
    }

    #[test]
    fn headers_are_cached_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, every_type(3).bytes()).unwrap();
        let headers = Headers::new();
        let first = headers.read(&path).unwrap();
        assert_eq!(first.name(), Some("hand made"));
        let again = headers.read(&path).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(headers.reads(), 1);

        std::fs::write(
            &path,
            Builder::new(2).string("general.name", "rewritten").bytes(),
        )
        .unwrap();
        set_mtime(&path, 2_000_000);
        let changed = headers.read(&path).unwrap();
        assert_eq!(changed.name(), Some("rewritten"));
        assert_eq!(changed.version(), 2);
        assert_eq!(headers.reads(), 2);

        // A bad file is an error naming the path; it is not cached as good.
        std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
        let err = headers.read(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(
            headers.read(&dir.path().join("absent")),
            Err(GgufError::Open { .. })
        ));
    }
}
