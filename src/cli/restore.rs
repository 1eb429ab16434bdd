//! `claracore restore`: the offline half of backup and restore, run with
//! the daemon stopped.

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
    std::fs::copy(file, &tmp).map_err(|e| format!("copying to {}: {e}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    let mut note = String::new();
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
        note = format!(" (the previous database is at {})", aside.display());
    }
    std::fs::rename(&tmp, db).map_err(|e| format!("renaming to {}: {e}", db.display()))?;
    Ok(format!(
        "restored {} as {} (schema version {version}){note}\n",
        file.display(),
        db.display()
    ))
}
