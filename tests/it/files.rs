//! Files claracore and its demo write, against a hostile local user: the
//! history database, its WAL and SHM, backups and restores are private
//! whatever the umask, and the demo never writes through a planted
//! symlink (issue "Hostile input and overload", rows 10 and 11).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use hyper::{Method, StatusCode};
use serde_json::json;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// This process's (file system) uid: the owner of a directory it made.
fn my_uid(made: &Path) -> u32 {
    std::fs::metadata(made).unwrap().uid()
}

fn side(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// `argv` run with umask 000, the most permissive there is: anything left
/// to the umask comes out world-readable and world-writable. Through `sh`
/// so this process's umask (shared by every test thread) stays as it is.
fn under_umask_000(argv: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000; exec \"$@\"", "sh"]).args(argv);
    cmd
}

/// A daemon in `dir` binding `127.0.0.1:0` and `dir/claracore.sock`
/// itself (the harness's [`serve`] execs the binary directly; this needs
/// `sh` in between for the umask), with the fake upstream as model `f`
/// and prompts recorded in full. Returns it with its address and log.
fn start_under_umask_000(dir: &Path) -> (KillOnDrop, String, PathBuf) {
    let config = dir.join("config.toml");
    write_file(
        &config,
        &format!(
            "listen = [\"127.0.0.1:0\", \"unix:{}/claracore.sock\"]\nstate_dir = \"{}\"\n\
             [history]\ncontent = \"full\"\n{}",
            dir.display(),
            dir.join("state").display(),
            fake_model_table("f", &[], "")
        ),
    );
    let log = dir.join("daemon.log");
    let mut cmd = under_umask_000(&[BIN, "serve", "--config", &config.display().to_string()]);
    cmd.stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("CLARACORE_LOG", "info")
        .env("NO_COLOR", "1");
    // Whatever this process inherited is not for the daemon under test.
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap();
    // `exec`: the shell's pid is the daemon's.
    let addr = own_listener(&mut child, Some(&log));
    wait_live(&addr, &mut child, &log);
    (KillOnDrop(child), addr, log)
}

fn stop(daemon: &mut KillOnDrop, log: &Path) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "daemon did not stop:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// Row 10: history.db and its -wal/-shm were 0644 in a 0755 directory, and
// another user read every recorded prompt.
#[tokio::test(flavor = "multi_thread")]
async fn state_files_backups_and_restores_are_private_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, addr, log) = start_under_umask_000(dir.path());
    let mut body = chat("f", 1, false);
    body["messages"] = json!([{"role": "user", "content": "a secret prompt"}]);
    let (status, _) = request(
        &addr,
        Method::POST,
        "/v1/chat/completions",
        Some(body.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The history endpoint flushes the writer first: the row is on disk.
    let (status, rows) = request_unix(
        &dir.path().join("claracore.sock"),
        Method::GET,
        "/admin/history",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(rows["requests"][0]["request_content"]
        .as_str()
        .unwrap()
        .contains("a secret prompt"));

    let state = dir.path().join("state");
    let db = state.join("history.db");
    assert_eq!(mode(&state), 0o700, "the state directory the daemon made");
    for file in [db.clone(), side(&db, "-wal"), side(&db, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&dir.path().join("claracore.sock")), 0o660);

    // `claracore backup FILE`: the daemon's temporary copy (unlinked at
    // once; store's unit tests check its mode) and the CLI's file.
    let backup = dir.path().join("backup.db");
    let out = under_umask_000(&[BIN, "backup", &backup.display().to_string()])
        .env(
            "CLARACORE_HOST",
            format!("unix:{}", dir.path().join("claracore.sock").display()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&backup), 0o600);
    assert!(!backup.with_extension("partial").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".backup-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // `claracore restore`: the copy is private even from a file copied
    // around with an open mode.
    stop(&mut daemon, &log);
    std::fs::set_permissions(&backup, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("config.toml").display().to_string();
    let out = under_umask_000(&[
        BIN,
        "restore",
        &backup.display().to_string(),
        "--config",
        &config,
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&db), 0o600, "the restored database");
    assert_eq!(
        std::fs::metadata(&db).unwrap().uid(),
        my_uid(dir.path()),
        "owned like the database it replaced"
    );
}

// Row 10, for a state directory an older claracore left open.
#[test]
fn too_open_files_from_an_older_run_are_made_private_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = state.join("history.db");
    // An empty file is an empty database to SQLite.
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (daemon, _addr, log) = start_under_umask_000(dir.path());
    for file in [db.clone(), side(&db, "-wal"), side(&db, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(
        mode(&state),
        0o755,
        "a directory the daemon did not make keeps its mode"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("open to every user") && text.contains(&state.display().to_string()),
        "the log says the directory is open:\n{text}"
    );
    assert!(text.contains("took their access away"), "{text}");
    drop(daemon);
}

/// Runs `tests/tools/demo.sh` with `CLARACORE_DEMO_DIR=dir`. A refusal
/// comes before the slow setup; a demo that went on to build and serve
/// is killed (its whole process group) after 60 s and fails the test.
fn demo(dir: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/demo.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .env("CLARACORE_DEMO_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let out = child.wait_with_output().unwrap();
            panic!("demo.sh did not refuse {}: {out:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(out: &Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("refusing CLARACORE_DEMO_DIR") && stderr.contains(why),
        "says why ({why}): {stderr}"
    );
}

// Row 11: another user planted config.toml as a symlink in the demo's
// directory, and the demo, run as root, overwrote its target.
#[test]
fn the_demo_refuses_to_write_through_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("precious");
    std::fs::write(&target, "root-owned contents\n").unwrap();
    let demo_dir = tmp.path().join("demo");
    std::fs::create_dir(&demo_dir).unwrap();
    std::os::unix::fs::symlink(&target, demo_dir.join("config.toml")).unwrap();
    let out = demo(&demo_dir);
    assert_refused(&out, "config.toml is a symlink");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "root-owned contents\n"
    );
    assert!(std::fs::symlink_metadata(demo_dir.join("config.toml"))
        .unwrap()
        .file_type()
        .is_symlink());

    // The directory itself a symlink.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&demo_dir, &link).unwrap();
    assert_refused(&demo(&link), "it is a symlink");

    // A directory others can write to, sticky bit or not: they can plant
    // names in it before the demo writes.
    for open in [0o777, 0o1777, 0o775] {
        let shared = tmp.path().join(format!("shared-{open:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(open)).unwrap();
        assert_refused(&demo(&shared), "other users can write to it");
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    }

    // Another user's directory (only root can make one to test with).
    if my_uid(tmp.path()) == 0 {
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        assert_refused(&demo(&theirs), "it is owned by");
    }
}
