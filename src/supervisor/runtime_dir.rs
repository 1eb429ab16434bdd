//! Where children's unix sockets live: the daemon's private runtime
//! directory ([`RuntimeDir`]: made fresh and 0700, removed on drop, and
//! the ones a dead daemon left behind swept at the next start) and the
//! socket files in it (their names, mode and removal).
//!
//! Invariant: a socket path handed to a child always fits a unix socket
//! address, and only the daemon's user can reach a child through it.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The longest path a unix socket address holds: `sun_path` is 108 bytes,
/// the terminating NUL included.
const SUN_PATH_MAX: usize = 107;
/// A child's socket file: only the daemon's user may connect (the
/// directory is 0700 already; this holds if it is ever shared).
const SOCKET_MODE: u32 = 0o600;

/// `<dir>/<model>-<instance>.sock`, or `<dir>/<instance>.sock` when a long
/// model name would not fit a unix socket address (instances are unique
/// within a daemon, so either name is).
pub(super) fn socket_path(dir: &Path, model: &str, instance: u64) -> Result<PathBuf, String> {
    let named = dir.join(format!("{model}-{instance}.sock"));
    if named.as_os_str().len() <= SUN_PATH_MAX {
        return Ok(named);
    }
    let short = dir.join(format!("{instance}.sock"));
    if short.as_os_str().len() <= SUN_PATH_MAX {
        return Ok(short);
    }
    Err(format!(
        "the runtime directory {} is too long for a unix socket path ({SUN_PATH_MAX} bytes at most)",
        dir.display()
    ))
}

/// Removes a child's socket file (it does not do so itself).
pub(super) fn remove_socket(model: &str, path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(model, path = %path.display(), error = %e,
            "cannot remove the child's socket file"),
    }
}

/// Makes a ready child's socket file [`SOCKET_MODE`].
pub(super) fn restrict_socket(model: &str, path: &Path) {
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)) {
        tracing::warn!(model = %model, path = %path.display(), error = %e,
            "cannot restrict the child's socket file");
    }
}

/// The daemon's private directory for its children's unix sockets: a fresh
/// name, mode 0700, owned by the daemon's user, so no other local user can
/// reach a child. Removed, with anything left in it, on drop; one left
/// behind by a daemon that died is removed by the next start.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// `claracore.` plus this many hex digits names a runtime directory.
const RUNTIME_DIR_SUFFIX: usize = 10;
/// Names tried in one base before giving up on it.
const RUNTIME_DIR_ATTEMPTS: usize = 16;

impl RuntimeDir {
    /// Creates the directory in the first of `bases` where it can be made
    /// and where every child's socket path fits a unix socket address.
    pub fn create(bases: &[PathBuf]) -> Result<RuntimeDir, String> {
        let mut why = Vec::new();
        for base in bases {
            // The longest name a socket in it can get: `<instance>.sock`.
            let longest = base.as_os_str().len()
                + "/claracore.".len()
                + RUNTIME_DIR_SUFFIX
                + format!("/{}.sock", u64::MAX).len();
            if longest > SUN_PATH_MAX {
                why.push(format!(
                    "{}: too long for unix socket paths",
                    base.display()
                ));
                continue;
            }
            sweep_leftovers(base);
            match create_private_dir(base) {
                Ok(path) => {
                    // Marks whose it is, for the sweep of a later start.
                    if let Err(e) =
                        std::fs::write(path.join(OWNER_FILE), std::process::id().to_string())
                    {
                        tracing::debug!(error = %e, "cannot write the runtime directory's owner file");
                    }
                    return Ok(RuntimeDir { path });
                }
                Err(e) => why.push(format!("{}: {e}", base.display())),
            }
        }
        Err(format!(
            "cannot create a private runtime directory for the models' sockets ({})",
            why.join("; ")
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot remove the runtime directory");
        }
    }
}

/// The file in a runtime directory that names the pid of the daemon that
/// made it.
const OWNER_FILE: &str = "owner.pid";

/// Removes runtime directories in `base` that an earlier daemon left behind
/// (killed, or a forced exit): ours by name (`claracore.` + hex), by owner
/// (this user) and by kind (a directory, not a symlink), whose owner file
/// names a process that no longer exists. Anything else is left alone.
fn sweep_leftovers(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(suffix) = name.to_str().and_then(|n| n.strip_prefix("claracore.")) else {
            continue;
        };
        if suffix.len() != RUNTIME_DIR_SUFFIX || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        let Some(pid) = owner else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), pid,
                "removed a runtime directory an earlier daemon left behind"),
            Err(e) => tracing::debug!(path = %path.display(), error = %e,
                "cannot remove a left-behind runtime directory"),
        }
    }
}

/// `base/claracore.XXXXXXXXXX`, made with mode 0700 under a name nobody
/// else took (mkdir fails on an existing one, symlinks included).
fn create_private_dir(base: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    let mut last = None;
    for attempt in 0..RUNTIME_DIR_ATTEMPTS {
        // RandomState is seeded from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(attempt);
        h.write_u32(std::process::id());
        let suffix = format!("{:016x}", h.finish());
        let path = base.join(format!("claracore.{}", &suffix[..RUNTIME_DIR_SUFFIX]));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                // Exactly 0700 whatever the umask.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_a_unix_socket_address() {
        let dir = Path::new("/run/claracore/claracore.0123456789");
        assert_eq!(
            socket_path(dir, "tiny", 3).unwrap(),
            dir.join("tiny-3.sock")
        );
        let long = "m".repeat(100);
        assert_eq!(
            socket_path(dir, &long, 3).unwrap(),
            dir.join("3.sock"),
            "a long model name falls back to the instance alone"
        );
        let deep = PathBuf::from(format!("/{}", "d".repeat(110)));
        let e = socket_path(&deep, "tiny", 3).unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn the_runtime_dir_is_private_fresh_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let too_long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let a = RuntimeDir::create(&[too_long, base.path().to_path_buf()]).unwrap();
        let b = RuntimeDir::create(&[base.path().to_path_buf()]).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(a.path().parent(), Some(base.path()));
        let meta = std::fs::metadata(a.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        std::fs::write(a.path().join("left-1.sock"), "").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed with what was left in it");
        let e = RuntimeDir::create(&[base.path().join("missing")]).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn a_start_sweeps_runtime_dirs_whose_daemon_is_gone_and_nothing_else() {
        let base = tempfile::tempdir().unwrap();
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let dir = |name: &str, owner: Option<u32>| {
            let p = base.path().join(name);
            std::fs::create_dir(&p).unwrap();
            if let Some(pid) = owner {
                std::fs::write(p.join(OWNER_FILE), pid.to_string()).unwrap();
            }
            p
        };
        let gone = dir("claracore.0123456789", Some(dead));
        let alive = dir("claracore.abcdefabcd", Some(std::process::id()));
        let unmarked = dir("claracore.1111111111", None);
        let other = dir("claracore-not-ours", Some(dead));
        let target = dir("elsewhere", Some(dead));
        let link = base.path().join("claracore.2222222222");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let made = RuntimeDir::create(&[base.path().to_path_buf()]).unwrap();
        assert!(!gone.exists(), "its daemon is gone");
        for kept in [&alive, &unmarked, &other, &target, &link] {
            assert!(kept.exists(), "{} must stay", kept.display());
        }
        let owner = std::fs::read_to_string(made.path().join(OWNER_FILE)).unwrap();
        assert_eq!(owner, std::process::id().to_string());
    }
}
