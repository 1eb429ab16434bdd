//! The SQLite file that holds the history. Only the writer thread writes;
//! readers open their own connections (WAL lets them run beside it).
//!
//! The file holds every recorded prompt and answer, so it is private to
//! the daemon's user whatever the umask: the database is created 0600
//! before SQLite opens it (SQLite then gives `-wal` and `-shm` the main
//! file's mode, ignoring the umask), too-open files from an older run are
//! tightened at start, a directory this module creates is 0700, and a
//! backup is created 0600. The process umask is never changed: it is
//! process-wide, and other threads create files too.
//!
//! - [`open`]: opening (with corrupt-file recovery), migrations, and which
//!   failures are the disk's.
//! - [`write`]: the writer's batches, retention and maintenance.
//! - [`query`]: the read queries behind the admin API and start-up.
//! - [`backup`](mod@backup): the online copy and the check of a copy.

mod backup;
mod open;
mod query;
mod write;

use std::path::{Path, PathBuf};

pub use backup::{backup, verify};
pub use open::{migrate, open_for_reading, open_for_writing, SCHEMA_VERSION};
pub use query::{
    get_request, list_audit, list_requests, recent_load_times, recent_vram_peaks, stats, AuditRow,
    ModelStats, RequestQuery, RequestRow,
};
pub use write::{apply_retention, insert_audit, maintain, write_batch};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("history database {path} has schema version {found}, newer than this claracore's {supported}; refusing to touch it (upgrade claracore or restore an older backup)")]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("history database {path}: migration {name} failed, database left unchanged: {source}")]
    Migration {
        path: PathBuf,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("history database {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("history database {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Mode of the database, its `-wal`/`-shm` and backups.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a directory created for the database.
pub const DIR_MODE: u32 = 0o700;

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}
