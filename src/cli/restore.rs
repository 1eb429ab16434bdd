//! `claracore restore`: the offline half of backup and restore, run with
//! the daemon stopped.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ListenAddr};

/// `claracore restore FILE`: with the daemon stopped, checks `file` and
/// makes it the history database; the current one is kept beside it.
pub fn restore(config: &Config, file: &Path) -> Result<String, String> {
    for addr in &config.listen {
        let live = match addr {
            ListenAddr::Tcp(a) => {
                std::net::TcpStream::connect_timeout(a, Duration::from_millis(300)).is_ok()
            }
            ListenAddr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
        };
        if live {
            return Err(format!(
                "claracore is answering on {addr}; stop it first (systemctl stop claracore)"
            ));
        }
    }
    let version = crate::history::store::verify(file).map_err(|e| e.to_string())?;
    let db = &config.history.path;
    let tmp = db.with_extension("restoring");
    let mut note = copy_private(file, &tmp, db)?;
    if let Err(e) = record_restore(&tmp, file) {
        note.push_str(&format!(" (not recorded in its audit trail: {e})"));
    }
    if db.exists() {
        let aside = db.with_extension(format!(
            "db.before-restore-{}",
            crate::history::now_ms() / 1000
        ));
        std::fs::rename(db, &aside).map_err(|e| format!("moving {} aside: {e}", db.display()))?;
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", db.display()));
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
        note.push_str(&format!(
            " (the previous database is at {})",
            aside.display()
        ));
    }
    std::fs::rename(&tmp, db).map_err(|e| format!("renaming to {}: {e}", db.display()))?;
    Ok(format!(
        "restored {} as {} (schema version {version}){note}\n",
        file.display(),
        db.display()
    ))
}

/// Puts the restore itself in the restored database's audit trail (after
/// bringing an older copy's schema up to date, as the daemon would).
fn record_restore(tmp: &Path, file: &Path) -> Result<(), String> {
    use crate::history::{store, AuditAction, AuditRecord};
    let conn = rusqlite::Connection::open(tmp).map_err(|e| e.to_string())?;
    store::migrate(&conn, tmp).map_err(|e| e.to_string())?;
    store::insert_audit(
        &conn,
        &AuditRecord {
            at_ms: crate::history::now_ms(),
            principal: format!("local:uid={}", nix::unistd::getuid()),
            action: AuditAction::Restore,
            target: Some(file.display().to_string()),
            result: "ok".into(),
        },
    )
    .map_err(|e| e.to_string())
}

/// Copies `file` to a new `tmp`, created 0600 whatever the umask
/// (`std::fs::copy` would give it the source's mode, and it holds every
/// recorded prompt), owned like the database `db` it replaces (or its directory): restore
/// runs as root, the daemon as its own user, which must still be able to
/// write the file. A stale `tmp` from an interrupted restore is removed
/// first (a symlink there is removed, not followed). Returns a note for
/// the output when the ownership could not be given.
fn copy_private(file: &Path, tmp: &Path, db: &Path) -> Result<String, String> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing the stale {}: {e}", tmp.display())),
    }
    let mut src =
        std::fs::File::open(file).map_err(|e| format!("opening {}: {e}", file.display()))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::history::store::FILE_MODE)
        .open(tmp)
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    if let Err(e) = std::io::copy(&mut src, &mut out).and_then(|_| out.sync_all()) {
        let _ = std::fs::remove_file(tmp);
        return Err(format!(
            "copying {} to {}: {e}",
            file.display(),
            tmp.display()
        ));
    }
    let mut note = String::new();
    // With no database yet, the state directory's owner (systemd's
    // StateDirectory= belongs to the service's user).
    let dir = db.parent().unwrap_or(Path::new("."));
    let owner = std::fs::metadata(db)
        .map(|m| (db, m))
        .or_else(|_| std::fs::metadata(dir).map(|m| (dir, m)));
    if let Ok((which, owner)) = owner {
        let (uid, gid) = (owner.uid(), owner.gid());
        if let Err(e) = std::os::unix::fs::fchown(&out, Some(uid), Some(gid)) {
            note = format!(
                " (it could not be given {uid}:{gid}, the owner of {}: {e}; chown it before starting claracore)",
                which.display()
            );
        }
    }
    Ok(note)
}
