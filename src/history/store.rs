//! The SQLite file: opening (with corrupt-file recovery), migrations,
//! writes, retention, reads and backups. Only the writer thread writes;
//! readers open their own connections (WAL lets them run beside it).
//!
//! The file holds every recorded prompt and answer, so it is private to
//! the daemon's user whatever the umask: the database is created 0600
//! before SQLite opens it (SQLite then gives `-wal` and `-shm` the main
//! file's mode, ignoring the umask), too-open files from an older run are
//! tightened at start, a directory this module creates is 0700, and a
//! backup is created 0600. The process umask is never changed: it is
//! process-wide, and other threads create files too.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

#[cfg(test)]
use super::ModelEventKind;
use super::{AuditRecord, ModelEvent, RequestRecord, Sample};

/// Migrations, embedded in the binary and applied in order; the database's
/// `user_version` is the number of the last one applied.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_drop_outcome_index",
        include_str!("../../migrations/0002_drop_outcome_index.sql"),
    ),
    (
        "0003_audit",
        include_str!("../../migrations/0003_audit.sql"),
    ),
    (
        "0004_queue_gpu",
        include_str!("../../migrations/0004_queue_gpu.sql"),
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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

impl StoreError {
    /// The disk under the database is full or failing: worth retrying once
    /// space is freed, unlike a bad file or a setup mistake.
    pub fn is_disk_failure(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. } | StoreError::Migration { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure)
            ),
            StoreError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EIO)
            ),
            StoreError::TooNew { .. } | StoreError::Invalid { .. } => false,
        }
    }
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

/// Opens (creating if needed) and migrates the database for writing. A
/// file that is not a database or fails `quick_check` is moved aside as
/// `<name>.corrupt-<unix time>` and a fresh one is created; the returned
/// string says so.
pub fn open_for_writing(path: &Path) -> Result<(Connection, Option<String>), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    // Before the first open, so a file moved aside below is private too.
    make_private(path)?;
    let mut note = None;
    let conn = match open_checked(path) {
        Ok(conn) => conn,
        // A full or failing disk, a lock, permissions: the file may be
        // sound, so it stays where it is.
        Err(OpenFailure::Sqlite(source)) => {
            return Err(StoreError::Sqlite {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(OpenFailure::Corrupt(why)) => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
            std::fs::rename(path, &aside).map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            for suffix in ["-wal", "-shm"] {
                let side = PathBuf::from(format!("{}{suffix}", path.display()));
                let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
            }
            note = Some(format!(
                "history database was unreadable ({why}); moved it to {} and started a fresh one",
                aside.display()
            ));
            // The fresh file is created 0600 here, not by SQLite.
            make_private(path)?;
            open_checked(path).map_err(|e| match e {
                OpenFailure::Sqlite(source) => StoreError::Sqlite {
                    path: path.to_path_buf(),
                    source,
                },
                OpenFailure::Corrupt(message) => StoreError::Invalid {
                    path: path.to_path_buf(),
                    message,
                },
            })?
        }
    };
    migrate(&conn, path)?;
    // The writer appends and deletes old rows: it touches the right edge of
    // each B-tree, not the 2 MiB SQLite keeps by default.
    conn.execute_batch("PRAGMA cache_size = -512;")
        .map_err(sqlite(path))?;
    Ok((conn, note))
}

/// Creates the database's directory 0700 when it is missing. An existing
/// one keeps the mode it was given (systemd's `StateDirectoryMode=0750`
/// lets the service's group in on purpose); when others may enter it, a
/// warning says so, since the files in it are private but their names and
/// sizes are not, and where others may write there they can replace them.
fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 {
                tracing::warn!(path = %dir.display(), mode = format!("{mode:04o}"),
                    "the history database's directory is writable by every user, who can replace or remove the database; make it 0700 (or 0750 for a group)");
            } else if mode & 0o007 != 0 {
                tracing::warn!(path = %dir.display(), mode = format!("{mode:04o}"),
                    "the history database's directory is open to every user: its files are 0600, but others see their names and sizes; make it 0700 (or 0750 for a group)");
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(io_error(dir))?;
            // The umask may have taken bits off, never added them; this
            // makes it exactly 0700 either way.
            std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(io_error(dir))
        }
        Err(e) => Err(io_error(dir)(e)),
    }
}

/// Creates the database file 0600 if missing, and takes group and other
/// bits off it and off its `-wal`/`-shm` when an older run (or a copy)
/// left them open. Tightening is best effort: a file the daemon does not
/// own (say, restored by root) still opens as before, with a warning.
fn make_private(path: &Path) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_error(path))?;
    let mode = file
        .metadata()
        .map_err(io_error(path))?
        .permissions()
        .mode();
    tighten(path, mode, |p| file.set_permissions(p));
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::metadata(&side) {
            Ok(meta) => tighten(&side, meta.permissions().mode(), |p| {
                std::fs::set_permissions(&side, p)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&side)(e)),
        }
    }
    Ok(())
}

/// Takes group and other bits off a file whose `mode` has any, saying so.
fn tighten(path: &Path, mode: u32, set: impl FnOnce(Permissions) -> std::io::Result<()>) {
    if mode & 0o077 == 0 {
        return;
    }
    let (was, now) = (
        format!("{:04o}", mode & 0o7777),
        format!("{:04o}", mode & 0o700),
    );
    match set(Permissions::from_mode(mode & 0o700)) {
        Ok(()) => tracing::warn!(path = %path.display(), was, now,
            "history file was open to other users; took their access away"),
        Err(e) => tracing::warn!(path = %path.display(), mode = was, error = %e,
            "history file is open to other users and its mode cannot be changed; chmod 0600 it"),
    }
}

/// Why [`open_checked`] failed.
enum OpenFailure {
    /// The file is not a sound database; the text says what is wrong.
    Corrupt(String),
    /// Anything else: a full or failing disk, a lock, permissions.
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for OpenFailure {
    fn from(e: rusqlite::Error) -> OpenFailure {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                OpenFailure::Corrupt(e.to_string())
            }
            _ => OpenFailure::Sqlite(e),
        }
    }
}

/// Opens with the daemon's settings and checks the file is a sound
/// database.
fn open_checked(path: &Path) -> Result<Connection, OpenFailure> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(OpenFailure::Corrupt(format!("quick_check: {check}")));
    }
    // auto_vacuum can only be chosen while the file is empty.
    let fresh: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if fresh == 0 {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")?;
    }
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// Applies the migrations the file lacks, each in its own transaction.
pub fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    apply_migrations(conn, path, MIGRATIONS)
}

fn apply_migrations(
    conn: &Connection,
    path: &Path,
    migrations: &[(&'static str, &str)],
) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sqlite(path))?;
    let supported = migrations.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for (index, (name, sql)) in migrations.iter().enumerate().skip(version as usize) {
        let fail = |source| StoreError::Migration {
            path: path.to_path_buf(),
            name,
            source,
        };
        let tx = conn.unchecked_transaction().map_err(fail)?;
        tx.execute_batch(sql).map_err(fail)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(migration = name, path = %path.display(), "history migration applied");
    }
    Ok(())
}

/// Opens for reading only; the daemon's writer keeps the file migrated.
pub fn open_for_reading(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite(path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sqlite(path))?;
    Ok(conn)
}

/// Writes one batch in one transaction.
pub fn write_batch(
    conn: &mut Connection,
    requests: &[Arc<RequestRecord>],
    events: &[Arc<ModelEvent>],
    samples: &[Sample],
    audits: &[Arc<AuditRecord>],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (request_id, started_at_ms, finished_at_ms, client, key_name, endpoint, model,
                status, outcome, error, latency_ms, ttfb_ms, ttft_ms, prompt_tokens, completion_tokens,
                cached_tokens, prompt_ms, predicted_ms, prompt_per_second, predicted_per_second, streamed,
                request_content, response_content, content_truncated, queue_wait_ms, gpu,
                gpu_mem_before_bytes, gpu_mem_after_bytes, gpu_utilization)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)",
        )?;
        for r in requests {
            let gpu = r.gpu.as_ref();
            stmt.execute(params![
                r.request_id,
                r.started_at_ms,
                r.finished_at_ms,
                r.client,
                r.key_name,
                r.endpoint,
                r.model,
                r.status,
                r.outcome.as_str(),
                r.error,
                r.latency_ms,
                r.ttfb_ms,
                r.ttft_ms,
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.cached_tokens,
                r.usage.prompt_ms,
                r.usage.predicted_ms,
                r.usage.prompt_per_second,
                r.usage.predicted_per_second,
                r.streamed,
                r.request_content,
                r.response_content,
                r.content_truncated,
                r.queue_wait_ms,
                gpu.map(|g| g.index),
                gpu.and_then(|g| g.mem_before_bytes).map(sql_int),
                gpu.and_then(|g| g.mem_after_bytes).map(sql_int),
                gpu.and_then(|g| g.utilization),
            ])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO model_events (at_ms, model, event, reason, load_ms, exit_status, pid, rss_bytes,
                gpu, vram_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for e in events {
            stmt.execute(params![
                e.at_ms,
                e.model,
                e.event.as_str(),
                e.reason.as_ref().map(|r| r.text()),
                e.load_ms,
                e.exit_status,
                e.pid,
                e.rss_bytes,
                e.gpu,
                e.vram_bytes.map(sql_int),
            ])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO samples (at_ms, model, rss_bytes, cpu_seconds, inflight, vram_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for s in samples {
            stmt.execute(params![
                s.at_ms,
                s.model,
                s.rss_bytes,
                s.cpu_seconds,
                s.inflight,
                s.vram_bytes.map(sql_int),
            ])?;
        }
    }
    for a in audits {
        insert_audit(&tx, a)?;
    }
    tx.commit()
}

/// Writes one audit row (the writer's batches, and `claracore restore`,
/// which records itself in the database it puts in place).
pub fn insert_audit(conn: &Connection, a: &AuditRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, principal, action, target, result) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        a.at_ms,
        a.principal,
        a.action.as_str(),
        a.target,
        a.result
    ])?;
    Ok(())
}

/// One `audit` row as `/admin/audit` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub principal: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
}

/// Audit rows newest first, below `cursor` (an id) if given.
pub fn list_audit(
    conn: &Connection,
    limit: usize,
    cursor: Option<i64>,
) -> rusqlite::Result<Vec<AuditRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, principal, action, target, result FROM audit
         WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![cursor.unwrap_or(i64::MAX), limit as i64], |r| {
        Ok(AuditRow {
            id: r.get(0)?,
            at_ms: r.get(1)?,
            principal: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            result: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Deletes rows older than the cut-offs in small batches, so the writer
/// never holds the database for long. Returns the rows deleted.
pub fn apply_retention(
    conn: &Connection,
    requests_before: i64,
    events_before: i64,
    samples_before: i64,
) -> rusqlite::Result<usize> {
    const BATCH: usize = 2000;
    let mut total = 0;
    for (sql, before) in [
        ("DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE started_at_ms < ?1 LIMIT ?2)", requests_before),
        ("DELETE FROM model_events WHERE id IN (SELECT id FROM model_events WHERE at_ms < ?1 LIMIT ?2)", events_before),
        ("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < ?1 LIMIT ?2)", events_before),
        ("DELETE FROM samples WHERE (at_ms, model) IN (SELECT at_ms, model FROM samples WHERE at_ms < ?1 LIMIT ?2)", samples_before),
    ] {
        loop {
            let n = conn.execute(sql, params![before, BATCH])?;
            total += n;
            if n < BATCH {
                break;
            }
        }
    }
    Ok(total)
}

/// `PRAGMA optimize` plus reclaiming free pages a little at a time.
pub fn maintain(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA optimize; PRAGMA incremental_vacuum(2000);")
}

/// A consistent copy of the live database at `dest` (which must not
/// exist), taken with `VACUUM INTO` while writers continue. The file is
/// created here first, empty and 0600 (`VACUUM INTO` accepts an empty
/// file): SQLite would create it with the umask's mode, and it holds
/// every recorded prompt. Creating it exclusively also means a name
/// planted at `dest` is never written through.
pub fn backup(conn: &Connection, dest: &Path) -> Result<(), StoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(dest)
        .map_err(io_error(dest))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", params![dest.display().to_string()]) {
        let _ = std::fs::remove_file(dest);
        return Err(sqlite(dest)(e));
    }
    Ok(())
}

/// Checks a file is an intact history database this binary can use.
pub fn verify(path: &Path) -> Result<i64, StoreError> {
    let conn = open_for_reading(path)?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sqlite(path))?;
    if check != "ok" {
        return Err(StoreError::Invalid {
            path: path.to_path_buf(),
            message: format!("integrity_check: {check}"),
        });
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sqlite(path))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let has_requests: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'requests'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite(path))?;
    if has_requests.is_none() {
        return Err(StoreError::Invalid {
            path: path.to_path_buf(),
            message: "not a claracore history database (no requests table)".into(),
        });
    }
    Ok(version)
}

/// A `requests` row as the API returns it.
#[derive(Debug, Serialize)]
pub struct RequestRow {
    pub id: i64,
    pub request_id: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub client: String,
    pub key_name: Option<String>,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: i64,
    pub outcome: String,
    pub error: Option<String>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub prompt_ms: Option<f64>,
    pub predicted_ms: Option<f64>,
    pub prompt_per_second: Option<f64>,
    pub predicted_per_second: Option<f64>,
    pub streamed: bool,
    pub request_content: Option<String>,
    pub response_content: Option<String>,
    pub content_truncated: bool,
    pub queue_wait_ms: Option<f64>,
    pub gpu: Option<u32>,
    pub gpu_mem_before_bytes: Option<i64>,
    pub gpu_mem_after_bytes: Option<i64>,
    pub gpu_utilization: Option<f64>,
}

const ROW_COLUMNS: &str = "id, request_id, started_at_ms, finished_at_ms, client, key_name, endpoint, model, status,
    outcome, error, latency_ms, ttfb_ms, ttft_ms, prompt_tokens, completion_tokens, cached_tokens, prompt_ms,
    predicted_ms, prompt_per_second, predicted_per_second, streamed, request_content, response_content,
    content_truncated, queue_wait_ms, gpu, gpu_mem_before_bytes, gpu_mem_after_bytes, gpu_utilization";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    Ok(RequestRow {
        id: r.get(0)?,
        request_id: r.get(1)?,
        started_at_ms: r.get(2)?,
        finished_at_ms: r.get(3)?,
        client: r.get(4)?,
        key_name: r.get(5)?,
        endpoint: r.get(6)?,
        model: r.get(7)?,
        status: r.get(8)?,
        outcome: r.get(9)?,
        error: r.get(10)?,
        latency_ms: r.get(11)?,
        ttfb_ms: r.get(12)?,
        ttft_ms: r.get(13)?,
        prompt_tokens: r.get(14)?,
        completion_tokens: r.get(15)?,
        cached_tokens: r.get(16)?,
        prompt_ms: r.get(17)?,
        predicted_ms: r.get(18)?,
        prompt_per_second: r.get(19)?,
        predicted_per_second: r.get(20)?,
        streamed: r.get(21)?,
        request_content: r.get(22)?,
        response_content: r.get(23)?,
        content_truncated: r.get(24)?,
        queue_wait_ms: r.get(25)?,
        gpu: r.get(26)?,
        gpu_mem_before_bytes: r.get(27)?,
        gpu_mem_after_bytes: r.get(28)?,
        gpu_utilization: r.get(29)?,
    })
}

/// A byte count as SQLite's INTEGER (i64), saturating.
fn sql_int(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Filters for [`list_requests`]; `cursor` is the last id of the previous
/// page (keyset pagination, newest first).
#[derive(Debug, Default)]
pub struct RequestQuery {
    pub model: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
    pub cursor: Option<i64>,
}

pub fn list_requests(conn: &Connection, q: &RequestQuery) -> rusqlite::Result<Vec<RequestRow>> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM requests
         WHERE (?1 IS NULL OR model = ?1) AND (?2 IS NULL OR outcome = ?2)
           AND (?3 IS NULL OR started_at_ms >= ?3) AND (?4 IS NULL OR started_at_ms < ?4)
           AND (?5 IS NULL OR id < ?5)
         ORDER BY id DESC LIMIT ?6"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            q.model,
            q.outcome,
            q.since_ms,
            q.until_ms,
            q.cursor,
            q.limit as i64
        ],
        row,
    )?;
    rows.collect()
}

pub fn get_request(conn: &Connection, id: i64) -> rusqlite::Result<Option<RequestRow>> {
    conn.query_row(
        &format!("SELECT {ROW_COLUMNS} FROM requests WHERE id = ?1"),
        [id],
        row,
    )
    .optional()
}

/// Per-model figures over a window, for `/admin/stats`.
#[derive(Debug, Serialize)]
pub struct ModelStats {
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generation_tokens_per_second: Option<f64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub loads: i64,
    pub load_p50_ms: Option<f64>,
}

pub fn stats(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<ModelStats>> {
    let mut out = Vec::new();
    let mut models = conn.prepare(
        "SELECT model FROM requests WHERE started_at_ms >= ?1 AND model IS NOT NULL
         UNION SELECT model FROM model_events WHERE at_ms >= ?1 ORDER BY 1",
    )?;
    let names: Vec<String> = models
        .query_map([since_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for model in names {
        // The prompt-rate numerator counts the tokens llama.cpp processed
        // (prompt minus cache), as llama.cpp itself reports them, over the
        // rows that carry timings.
        type Sums = (i64, i64, i64, i64, f64, f64, i64);
        let (requests, errors, prompt_tokens, completion_tokens, prompt_ms, predicted_ms, processed_prompt): Sums =
            conn.query_row(
                "SELECT count(*), coalesce(sum(outcome != 'ok'), 0), coalesce(sum(prompt_tokens), 0),
                        coalesce(sum(completion_tokens), 0), coalesce(sum(prompt_ms), 0), coalesce(sum(predicted_ms), 0),
                        coalesce(sum(CASE WHEN prompt_ms IS NOT NULL
                                          THEN prompt_tokens - coalesce(cached_tokens, 0) END), 0)
                 FROM requests WHERE model = ?1 AND started_at_ms >= ?2",
                params![model, since_ms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )?;
        let latencies = column(conn, "SELECT latency_ms FROM requests WHERE model = ?1 AND started_at_ms >= ?2 AND outcome = 'ok' ORDER BY 1", &model, since_ms)?;
        let ttfts = column(conn, "SELECT ttft_ms FROM requests WHERE model = ?1 AND started_at_ms >= ?2 AND ttft_ms IS NOT NULL ORDER BY 1", &model, since_ms)?;
        let loads = column(conn, "SELECT load_ms FROM model_events WHERE model = ?1 AND at_ms >= ?2 AND event = 'ready' ORDER BY 1", &model, since_ms)?;
        let rate = |tokens: i64, ms: f64| (ms > 0.0).then(|| tokens as f64 / (ms / 1000.0));
        out.push(ModelStats {
            model,
            requests,
            errors,
            latency_p50_ms: percentile(&latencies, 0.50),
            latency_p95_ms: percentile(&latencies, 0.95),
            ttft_p50_ms: percentile(&ttfts, 0.50),
            ttft_p95_ms: percentile(&ttfts, 0.95),
            prompt_tokens_per_second: rate(processed_prompt, prompt_ms),
            generation_tokens_per_second: rate(completion_tokens, predicted_ms),
            prompt_tokens,
            completion_tokens,
            loads: loads.len() as i64,
            load_p50_ms: percentile(&loads, 0.50),
        });
    }
    Ok(out)
}

/// Each model's last `per_model` successful load times in milliseconds,
/// oldest first, from its `ready` events.
pub fn recent_load_times(
    conn: &Connection,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<f64>)>> {
    newest_per_model(conn, "load_ms", "event = 'ready'", per_model)
}

/// The peak GPU memory of each model's last `per_model` runs (from its
/// stop and crash events), oldest first.
pub fn recent_vram_peaks(
    conn: &Connection,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<u64>)>> {
    let rows = newest_per_model::<i64>(conn, "vram_bytes", "vram_bytes > 0", per_model)?;
    Ok(rows
        .into_iter()
        .map(|(model, peaks)| {
            let peaks = peaks.into_iter().map(|b| u64::try_from(b).unwrap_or(0));
            (model, peaks.collect())
        })
        .collect())
}

/// The `column` of each model's newest `per_model` `model_events` rows
/// where it is set and `filter` holds, grouped by model (in name order),
/// oldest first. `column` and `filter` are this module's own SQL, never a
/// caller's input.
fn newest_per_model<T: rusqlite::types::FromSql>(
    conn: &Connection,
    column: &str,
    filter: &str,
    per_model: usize,
) -> rusqlite::Result<Vec<(String, Vec<T>)>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT model, {column} FROM (
             SELECT model, {column}, at_ms, id,
                    row_number() OVER (PARTITION BY model ORDER BY at_ms DESC, id DESC) AS newest
             FROM model_events WHERE {column} IS NOT NULL AND {filter})
         WHERE newest <= ?1 ORDER BY model, at_ms, id"
    ))?;
    let limit = i64::try_from(per_model).unwrap_or(i64::MAX);
    let rows = stmt.query_map([limit], |r| Ok((r.get::<_, String>(0)?, r.get::<_, T>(1)?)))?;
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    for row in rows {
        let (model, value) = row?;
        match out.last_mut() {
            Some((m, values)) if *m == model => values.push(value),
            _ => out.push((model, vec![value])),
        }
    }
    Ok(out)
}

fn column(conn: &Connection, sql: &str, model: &str, since_ms: i64) -> rusqlite::Result<Vec<f64>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let values = stmt.query_map(params![model, since_ms], |r| r.get::<_, f64>(0))?;
    values.collect()
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.95), Some(95.0));
        assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn recent_load_times_are_the_last_ready_events_per_model_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let event = |model: &str, kind, at_ms, load_ms| {
            let mut e = ModelEvent::new(model, kind, at_ms);
            e.load_ms = load_ms;
            Arc::new(e)
        };
        let mut events = Vec::new();
        for i in 0..8 {
            events.push(event(
                "a",
                ModelEventKind::Ready,
                1000 + i,
                Some(i as f64 * 10.0),
            ));
        }
        events.push(event("a", ModelEventKind::StartFailed, 5000, None));
        events.push(event("b", ModelEventKind::Ready, 10, Some(7.5)));
        events.push(event("b", ModelEventKind::Stopped, 20, None));
        events.push(event("c", ModelEventKind::StartRequested, 20, None));
        write_batch(&mut conn, &[], &events, &[], &[]).unwrap();
        let loads = recent_load_times(&conn, 3).unwrap();
        assert_eq!(
            loads,
            [
                ("a".to_string(), vec![50.0, 60.0, 70.0]),
                ("b".to_string(), vec![7.5])
            ]
        );
    }

    #[test]
    fn recent_vram_peaks_are_the_last_runs_per_model_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let event = |model: &str, kind, at_ms, vram: Option<u64>| {
            let mut e = ModelEvent::new(model, kind, at_ms);
            e.vram_bytes = vram;
            e.gpu = vram.map(|_| 1);
            Arc::new(e)
        };
        let mut events = Vec::new();
        for i in 0..4u64 {
            events.push(event(
                "a",
                ModelEventKind::Stopped,
                1000 + i as i64,
                Some(i << 30),
            ));
        }
        events.push(event("a", ModelEventKind::Crashed, 2000, Some(9 << 30)));
        events.push(event("a", ModelEventKind::Ready, 3000, None));
        events.push(event("b", ModelEventKind::Stopped, 10, None));
        write_batch(&mut conn, &[], &events, &[], &[]).unwrap();
        assert_eq!(
            recent_vram_peaks(&conn, 3).unwrap(),
            [("a".to_string(), vec![2 << 30, 3 << 30, 9 << 30])],
            "the newest three with a figure (a run of 0 bytes says nothing)"
        );
        let gpu: i64 = conn
            .query_row("SELECT gpu FROM model_events WHERE at_ms = 2000", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(gpu, 1);
    }

    #[test]
    fn migrates_an_empty_file_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let (conn, note) = open_for_writing(&path).unwrap();
        assert!(note.is_none());
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let e = open_for_writing(&path).unwrap_err();
        assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
        assert!(e.to_string().contains("newer than this claracore"));
    }

    #[test]
    fn an_old_file_is_migrated_and_a_failed_migration_leaves_it_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let conn = Connection::open(&path).unwrap();
        apply_migrations(&conn, &path, &MIGRATIONS[..1]).unwrap();
        let indexes = |conn: &Connection| -> Vec<String> {
            let mut st = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' ORDER BY 1")
                .unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert!(indexes(&conn).contains(&"requests_outcome_started".to_string()));
        drop(conn);

        let (conn, _) = open_for_writing(&path).unwrap();
        assert_eq!(
            indexes(&conn),
            ["requests_model_started", "requests_started"],
            "0002 applied to a version-1 file"
        );

        // A broken migration after every real one.
        let mut broken = MIGRATIONS.to_vec();
        broken.push((
            "9999_broken",
            "CREATE TABLE half_done (x); INSERT INTO no_such_table VALUES (1);",
        ));
        let e = apply_migrations(&conn, &path, &broken).unwrap_err();
        assert!(e.to_string().contains("9999_broken"), "{e}");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            version, SCHEMA_VERSION,
            "the failed migration is not recorded"
        );
        let half: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(half, 0, "its first statement was rolled back");
    }

    #[test]
    fn retention_deletes_only_old_rows_from_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let sample = |at_ms| Sample {
            at_ms,
            model: String::new(),
            rss_bytes: Some(1),
            cpu_seconds: None,
            inflight: None,
            vram_bytes: None,
        };
        let event = |at_ms| Arc::new(ModelEvent::new("m", ModelEventKind::Ready, at_ms));
        write_batch(
            &mut conn,
            &[],
            &[event(10), event(5000)],
            &[sample(10), sample(5000)],
            &[],
        )
        .unwrap();
        assert_eq!(apply_retention(&conn, 100, 100, 100).unwrap(), 2);
        let left: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM model_events) + (SELECT count(*) FROM samples)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 2);
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn side(path: &Path, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", path.display()))
    }

    // Whatever this process's umask (usually 022, which would give 0644
    // and 0755), the files are private; tests/it/files.rs checks the
    // daemon under umask 000.
    #[test]
    fn a_new_database_its_wal_and_shm_and_its_directory_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/h.db");
        let (mut conn, _) = open_for_writing(&path).unwrap();
        let event = Arc::new(ModelEvent::new("m", ModelEventKind::Ready, 1));
        write_batch(&mut conn, &[], &[event], &[], &[]).unwrap();
        assert_eq!(mode(&dir.path().join("state")), DIR_MODE);
        for p in [path.clone(), side(&path, "-wal"), side(&path, "-shm")] {
            assert_eq!(mode(&p), FILE_MODE, "{}", p.display());
        }
    }

    #[test]
    fn too_open_files_from_an_older_run_are_made_private_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        drop(open_for_writing(&path).unwrap());
        for p in [path.clone(), side(&path, "-wal"), side(&path, "-shm")] {
            if !p.exists() {
                std::fs::write(&p, b"").unwrap();
            }
            std::fs::set_permissions(&p, Permissions::from_mode(0o666)).unwrap();
        }
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
        let (_conn, note) = open_for_writing(&path).unwrap();
        assert!(note.is_none(), "{note:?}");
        for p in [path.clone(), side(&path, "-wal"), side(&path, "-shm")] {
            assert_eq!(mode(&p), FILE_MODE, "{}", p.display());
        }
        assert_eq!(
            mode(dir.path()),
            0o755,
            "a directory it did not create keeps its mode (with a warning)"
        );
    }

    #[test]
    fn a_backup_is_private_and_never_written_over_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, _) = open_for_writing(&dir.path().join("h.db")).unwrap();
        let dest = dir.path().join("copy.db");
        backup(&conn, &dest).unwrap();
        assert_eq!(mode(&dest), FILE_MODE);
        assert_eq!(verify(&dest).unwrap(), SCHEMA_VERSION);

        let planted = dir.path().join("planted.db");
        std::fs::write(&planted, b"keep me").unwrap();
        let e = backup(&conn, &planted).unwrap_err();
        assert!(e.to_string().contains("planted.db"), "{e}");
        assert_eq!(std::fs::read(&planted).unwrap(), b"keep me");
    }

    /// The fresh file after a corrupt one was SQLite's, made with the
    /// umask's mode (0644 under the usual 022): every recorded prompt
    /// readable by other users.
    #[test]
    fn the_fresh_database_after_a_corrupt_one_was_readable_by_other_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let (conn, note) = open_for_writing(&path).unwrap();
        assert!(note.is_some());
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        for p in [path.clone(), side(&path, "-wal"), side(&path, "-shm")] {
            assert_eq!(mode(&p), FILE_MODE, "{}", p.display());
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let (_conn, note) = open_for_writing(&path).unwrap();
        let note = note.unwrap();
        assert!(note.contains("moved it to"), "{note}");
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("h.db.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), vec![0x42u8; 8192]);
    }
}
