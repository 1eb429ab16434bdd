//! Children on unix sockets: a llama-server child (and a `cmd` with
//! `{socket}`) listens only on a socket in the daemon's private 0700
//! runtime directory, reachable by no other local user and by no TCP
//! client; the socket goes when the child does, the directory when the
//! daemon does. A `cmd` with only `{port}` keeps its loopback port.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use hyper::StatusCode;
use nix::sys::signal::Signal;

/// The inodes of the sockets among `pid`'s open fds.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect()
}

/// The inode column of a /proc/net table (`tcp`, `tcp6`: field 9;
/// `unix`: field 6), with the rest of each line.
fn table(pid: u32, name: &str, inode_field: usize) -> Vec<(String, Vec<String>)> {
    std::fs::read_to_string(format!("/proc/{pid}/net/{name}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            Some((fields.get(inode_field)?.clone(), fields))
        })
        .collect()
}

/// `pid`'s TCP sockets (IPv4 and IPv6, any state) as /proc lines.
fn tcp_sockets_of(pid: u32) -> Vec<Vec<String>> {
    let mine = socket_inodes(pid);
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|t| table(pid, t, 9))
        .filter(|(inode, _)| mine.contains(inode))
        .map(|(_, line)| line)
        .collect()
}

/// The paths of the unix sockets `pid` listens on (/proc/net/unix: `Num
/// RefCount Protocol Flags Type St Inode Path`; Flags 00010000 is
/// `__SO_ACCEPTCON`, a listening socket).
fn unix_listeners_of(pid: u32) -> Vec<PathBuf> {
    let mine = socket_inodes(pid);
    table(pid, "unix", 6)
        .into_iter()
        .filter(|(inode, line)| mine.contains(inode) && line[3] == "00010000")
        .filter_map(|(_, line)| line.get(7).map(PathBuf::from))
        .collect()
}

/// The model's child pid and socket path from `/admin/ps`; asserts it has
/// no port.
async fn socket_child(d: &Daemon, model: &str) -> (u32, PathBuf) {
    let m = d.wait_state(model, "ready", Duration::from_secs(10)).await;
    assert!(m["port"].is_null(), "a socket child has no port: {m}");
    let socket = PathBuf::from(
        m["socket"]
            .as_str()
            .unwrap_or_else(|| panic!("no socket: {m}")),
    );
    (m["pid"].as_u64().unwrap() as u32, socket)
}

/// This process's effective uid: /proc/self belongs to it.
fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The socket's directory is the daemon's own: 0700, owned by its user;
/// the socket itself grants nothing to group or others.
fn assert_private(socket: &Path) {
    let dir = socket.parent().unwrap();
    let dmeta = std::fs::metadata(dir).unwrap();
    assert_eq!(
        dmeta.permissions().mode() & 0o7777,
        0o700,
        "{} is private",
        dir.display()
    );
    assert_eq!(dmeta.uid(), my_uid());
    let smeta = std::fs::symlink_metadata(socket).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(smeta.file_type().is_socket(), "{}", socket.display());
    assert_eq!(
        smeta.permissions().mode() & 0o077,
        0,
        "{} grants nothing to others: {:o}",
        socket.display(),
        smeta.permissions().mode()
    );
    assert_eq!(smeta.uid(), my_uid());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_llama_child_listens_only_on_a_private_unix_socket_removed_when_it_stops() {
    let mut d = Daemon::start(&tiny_model_table("tiny", ""));
    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny", 2, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let streamed = stream(&d.addr, "/v1/chat/completions", &chat("tiny", 3, true)).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert!(streamed.error.is_none(), "{:?}", streamed.error);
    assert!(streamed.text().contains("[DONE]"), "{}", streamed.text());

    let (pid, socket) = socket_child(&d, "tiny").await;
    assert_eq!(children_of(d.pid()), vec![pid]);
    assert_eq!(
        socket.file_name().unwrap().to_str().unwrap(),
        "tiny-1.sock",
        "named after the model and its start"
    );
    assert_private(&socket);
    assert_eq!(
        tcp_sockets_of(pid),
        Vec::<Vec<String>>::new(),
        "llama-server has no TCP socket at all"
    );
    assert_eq!(unix_listeners_of(pid), vec![socket.clone()]);

    let (status, body) = request_unix(
        &d.socket(),
        hyper::Method::POST,
        "/admin/models/tiny/stop",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let m = d
        .wait_state("tiny", "stopped", Duration::from_secs(10))
        .await;
    assert!(m["socket"].is_null(), "{m}");
    assert!(!socket.exists(), "the socket file goes with the child");
    let dir = socket.parent().unwrap().to_path_buf();
    assert!(dir.is_dir(), "the directory stays while the daemon runs");

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    assert!(
        !dir.exists(),
        "the daemon removes its runtime directory at exit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cmd_with_the_socket_placeholder_is_served_over_its_socket() {
    let argv = [
        python(),
        fake_upstream(),
        "--socket".into(),
        "{socket}".into(),
        "--chunk-delay-ms".into(),
        "5".into(),
    ];
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let d = Daemon::start(&format!(
        "[models.f]\ncmd = [{}]\nmax_connections = 2\n",
        argv.join(", ")
    ));
    // Non-streamed, streamed, several at once through a 2-connection pool.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = d.addr.clone();
        tasks.push(tokio::spawn(async move { chat_status(&addr, "f").await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let s = stream(&d.addr, "/v1/chat/completions", &chat("f", 4, true)).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(
        s.events().len(),
        6,
        "4 tokens, the finish, [DONE]: {}",
        s.text()
    );
    // Raw pass-through, headers included: Host is a fixed name.
    let (status, echo) = d.get("/upstream/f/echo-headers").await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["headers"]["host"], "localhost", "{echo}");

    let (pid, socket) = socket_child(&d, "f").await;
    assert_eq!(socket.file_name().unwrap().to_str().unwrap(), "f-1.sock");
    assert_private(&socket);
    assert!(tcp_sockets_of(pid).is_empty(), "{:?}", tcp_sockets_of(pid));
    assert_eq!(unix_listeners_of(pid), vec![socket]);
    let out = d.cli(&["ps"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("f ") && l.contains(" unix ")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_child_that_dies_leaves_no_socket_file_behind() {
    let argv = [
        python(),
        fake_upstream(),
        "--socket".into(),
        "{socket}".into(),
        "--mode".into(),
        "die-after-ready".into(),
        "--die-after-ms".into(),
        "700".into(),
    ];
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let d = Daemon::start(&format!("[models.f]\ncmd = [{}]\n", argv.join(", ")));
    assert_eq!(chat_status(&d.addr, "f").await, StatusCode::OK);
    let (pid, socket) = socket_child(&d, "f").await;
    assert!(socket.exists());
    assert!(wait_gone(&[pid], Duration::from_secs(5)));
    d.wait_state("f", "failed", Duration::from_secs(5)).await;
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cmd_with_only_the_port_placeholder_stays_on_loopback_tcp() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    assert_eq!(chat_status(&d.addr, "f").await, StatusCode::OK);
    let m = d.wait_state("f", "ready", Duration::from_secs(5)).await;
    assert!(m["socket"].is_null(), "{m}");
    let port = m["port"].as_u64().unwrap();
    let pid = m["pid"].as_u64().unwrap() as u32;
    assert_eq!(
        tcp_listener_of(pid),
        Some(format!("127.0.0.1:{port}")),
        "the child listens on the port ps shows"
    );
    assert!(unix_listeners_of(pid).is_empty());
    assert!(
        !tcp_sockets_of(pid).is_empty(),
        "the TCP detector the socket tests rely on sees this one"
    );
}
