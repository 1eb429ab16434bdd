//! Opening the database: its directory and file modes, the soundness check
//! that moves a corrupt file aside, the embedded migrations, and telling a
//! full or failing disk (worth retrying) from a bad file.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{io_error, sqlite, StoreError, DIR_MODE, FILE_MODE};

/// Migrations, embedded in the binary and applied in order; the database's
/// `user_version` is the number of the last one applied.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init",
        include_str!("../../../migrations/0001_init.sql"),
    ),
    (
        "0002_drop_outcome_index",
        include_str!("../../../migrations/0002_drop_outcome_index.sql"),
    ),
    (
        "0003_audit",
        include_str!("../../../migrations/0003_audit.sql"),
    ),
    (
        "0004_queue_gpu",
        include_str!("../../../migrations/0004_queue_gpu.sql"),
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::store::write_batch;
    use crate::history::{ModelEvent, ModelEventKind};
    use std::sync::Arc;

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
