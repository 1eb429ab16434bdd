//! The online backup (`VACUUM INTO` a new private file) and the check that
//! a copy is an intact history database this binary can use.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{io_error, open_for_reading, sqlite, StoreError, FILE_MODE, SCHEMA_VERSION};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::store::open_for_writing;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
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
}
