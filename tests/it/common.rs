//! Test support: run the real `claracore` binary on a generated config, talk
//! HTTP to it, and inspect its child processes through /proc.
//!
//! A daemon gets its TCP listener already bound and listening (socket
//! activation, fd 3; see [`serve`]), so no other test can take its port
//! between choosing and binding it. Tests of the daemon's own binding
//! (unix socket mode, removal at exit) start it with [`Listen::Itself`]:
//! it binds `127.0.0.1:0`, and the port is read from /proc.
//!
//! The real llama-server, the tiny model and the fake NVML come from
//! `tests/tools/setup-test-deps.sh` through `CLARACORE_TEST_*` variables;
//! `tests/run.sh` sets them. Tests that need them fail (never skip) when
//! they are missing.
#![allow(dead_code)] // each test module uses part of the harness

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use command_fds::{CommandFdExt, FdMapping};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_claracore");

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with tests/run.sh, or first `eval \"$(tests/tools/setup-test-deps.sh)\"`")
    })
}

pub fn llama_server() -> String {
    required_env("CLARACORE_TEST_LLAMA_SERVER")
}

pub fn tiny_model() -> String {
    required_env("CLARACORE_TEST_MODEL")
}

/// The directory of the fake NVML (`libnvidia-ml.so.1`) built from
/// `tests/fake-nvml/fake_nvml.c`.
pub fn fake_nvml_dir() -> PathBuf {
    PathBuf::from(required_env("CLARACORE_TEST_FAKE_NVML_DIR"))
}

/// A python3 with nothing special: the fake upstream needs only the stdlib.
pub fn python() -> String {
    std::env::var("CLARACORE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn fake_upstream() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tools/fake_upstream.py")
        .display()
        .to_string()
}

/// A `[models.NAME]` table for the real llama-server and the tiny model.
pub fn tiny_model_table(name: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nmodel = \"{}\"\nargs = [\"-c\", \"512\", \"-t\", \"1\"]\n{extra}\n",
        tiny_model()
    )
}

/// A `[models.NAME]` table that runs the real llama-server on the tiny
/// model `delay_ms` after its child is spawned, so a test can look at the
/// daemon while the start is certainly still under way.
pub fn delayed_tiny_table(name: &str, delay_ms: u32, extra: &str) -> String {
    let argv = [
        "/bin/sh".to_string(),
        "-c".into(),
        format!("sleep {}; exec \"$@\"", f64::from(delay_ms) / 1000.0),
        "sh".into(),
        llama_server(),
        "-m".into(),
        tiny_model(),
        "--host".into(),
        "{socket}".into(),
        "--port".into(),
        "8080".into(),
        "-c".into(),
        "512".into(),
        "-t".into(),
        "1".into(),
    ];
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!("[models.{name}]\ncmd = [{}]\n{extra}\n", argv.join(", "))
}

/// A `[models.NAME]` table for the fake upstream with extra flags.
pub fn fake_model_table(name: &str, flags: &[&str], extra: &str) -> String {
    let mut argv = vec![python(), fake_upstream(), "--port".into(), "{port}".into()];
    argv.extend(flags.iter().map(|f| f.to_string()));
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!("[models.{name}]\ncmd = [{}]\n{extra}\n", argv.join(", "))
}

/// A port that was free a moment ago. Racy (another process may take it
/// before it is bound again), so only for `systemd-socket-activate`, which
/// must be told an address to bind; the daemon under test gets a
/// [`prebound`] listener or binds `127.0.0.1:0` itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A listening socket on a port the kernel picked, and its address. It is
/// listening before any daemon exists, so nothing can take the port
/// between choosing it and serving on it.
pub fn prebound() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

/// Spawns `claracore serve --config CONFIG`, stderr to `log`.
///
/// With `listener`, the daemon is socket-activated the way systemd does it:
/// the socket at fd 3 (`command-fds` does the dup2 between fork and exec,
/// which safe std cannot), `LISTEN_FDS=1`, `LISTEN_FDNAMES=http`. No
/// `LISTEN_PID`: the child's pid is unknown until after the spawn, and
/// listenfd takes a missing one as "for this process" (systemfd's
/// convention). The activated socket replaces the config's `listen`.
///
/// The `Command`, which owns the harness's copy of the socket, is dropped
/// before this returns, so the daemon holds the only one: when it closes
/// its listener (draining, exit), connecting is refused, as in production.
/// `env` is applied last, over the stripped systemd variables.
pub fn serve(
    config: &Path,
    log: &Path,
    listener: Option<std::net::TcpListener>,
    env: &[(&str, &str)],
) -> Child {
    serve_wrapped(&[], config, log, listener, env)
}

/// [`serve`] through `wrapper` (an argv that execs the rest, such as
/// `prlimit --nofile=256:256`), so the daemon keeps the wrapper's pid.
pub fn serve_wrapped(
    wrapper: &[&str],
    config: &Path,
    log: &Path,
    listener: Option<std::net::TcpListener>,
    env: &[(&str, &str)],
) -> Child {
    let fds = listener
        .map(|l| (OwnedFd::from(l), "http"))
        .into_iter()
        .collect();
    serve_activated(wrapper, config, log, fds, env)
}

/// [`serve_wrapped`] with any number of activated sockets, each with its
/// `LISTEN_FDNAMES` name (`http`, `local`), at fds 3, 4, …
pub fn serve_activated(
    wrapper: &[&str],
    config: &Path,
    log: &Path,
    fds: Vec<(OwnedFd, &str)>,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(BIN);
            cmd
        }
        None => Command::new(BIN),
    };
    cmd.args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // Whatever this process inherited is not for the daemon under test.
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_FDS_FIRST_FD",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    if !fds.is_empty() {
        let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let mappings = fds
            .into_iter()
            .enumerate()
            .map(|(i, (fd, _))| FdMapping {
                parent_fd: fd,
                child_fd: 3 + i as i32,
            })
            .collect();
        cmd.fd_mappings(mappings).unwrap();
    }
    cmd.envs(env.iter().copied());
    cmd.spawn().unwrap()
}

/// How the daemon under test gets its sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A [`prebound`] TCP listener and a unix socket (`local`), both
    /// socket-activated (see [`serve_activated`]).
    Prebound,
    /// The daemon binds its config's `listen` itself: `127.0.0.1:0` and a
    /// unix socket in its directory (see [`Daemon::socket`]). For tests of
    /// its own binding: socket mode, removal at exit. The harness reads the
    /// port it got from /proc.
    Itself,
}

/// A running daemon, killed (SIGKILL) on drop if still alive.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    listen: Listen,
}

impl Daemon {
    /// Starts `claracore serve` with `body` appended to a generated config,
    /// on a [`prebound`] listener, and waits until `/live` answers.
    pub fn start(body: &str) -> Daemon {
        Daemon::start_with(Listen::Prebound, body)
    }

    /// [`Daemon::start`] with the sockets as `listen` says.
    pub fn start_with(listen: Listen, body: &str) -> Daemon {
        Daemon::start_wrapped(listen, &[], body)
    }

    /// [`Daemon::start_with`], run through `wrapper` (see [`serve_wrapped`]).
    pub fn start_wrapped(listen: Listen, wrapper: &[&str], body: &str) -> Daemon {
        Daemon::start_full(listen, wrapper, body, &[])
    }

    /// [`Daemon::start`] with more environment variables for the daemon
    /// (such as `LD_LIBRARY_PATH` and `FAKE_NVML_STATE` for the fake NVML).
    pub fn start_env(body: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(Listen::Prebound, &[], body, env)
    }

    /// [`Daemon::start_wrapped`] with `env` added to the daemon's own.
    pub fn start_full(
        listen: Listen,
        wrapper: &[&str],
        body: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("claracore.sock");
        let (listener, listen_line) = match listen {
            Listen::Prebound => {
                // The config names the same addresses: a daemon that
                // ignored the activated sockets would fail to bind them,
                // loudly.
                let (listener, addr) = prebound();
                (
                    Some(listener),
                    format!("listen = [\"{addr}\", \"unix:{}\"]", socket.display()),
                )
            }
            Listen::Itself => (
                None,
                format!(
                    "listen = [\"127.0.0.1:0\", \"unix:{}/claracore.sock\"]",
                    dir.path().display()
                ),
            ),
        };
        let config = format!(
            "{listen_line}\nllama_server = \"{}\"\nstate_dir = \"{}\"\n{body}",
            std::env::var("CLARACORE_TEST_LLAMA_SERVER").unwrap_or_else(|_| "llama-server".into()),
            dir.path().join("state").display(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("daemon.log");
        let addr = listener
            .as_ref()
            .map(|l| l.local_addr().unwrap().to_string());
        let mut fds = Vec::new();
        if let Some(l) = listener {
            fds.push((OwnedFd::from(l), "http"));
            let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            fds.push((OwnedFd::from(unix), "local"));
        }
        let mut daemon_env = vec![("CLARACORE_LOG", "info,claracore=debug"), ("NO_COLOR", "1")];
        daemon_env.extend_from_slice(env);
        let mut child = serve_activated(wrapper, &config_path, &log, fds, &daemon_env);
        let addr = addr.unwrap_or_else(|| own_listener(&mut child, Some(&log)));
        wait_live(&addr, &mut child, &log);
        Daemon {
            child,
            addr,
            dir,
            log,
            listen,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's unix socket (activated, or bound by the daemon with
    /// [`Listen::Itself`]): the local principal, admin.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("claracore.sock")
    }

    /// Whether the daemon bound its own sockets.
    pub fn binds_itself(&self) -> bool {
        self.listen == Listen::Itself
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "daemon did not exit within {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A GET on the local socket (admin: no key needed there).
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        request_unix(&self.socket(), Method::GET, path, None).await
    }

    /// A POST without a body on the local socket (admin).
    pub async fn post_unix(&self, path: &str) -> (StatusCode, Value) {
        request_unix(&self.socket(), Method::POST, path, None).await
    }

    /// A GET over TCP, as a client without a key.
    pub async fn get_tcp(&self, path: &str) -> (StatusCode, Value) {
        request(&self.addr, Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        request(&self.addr, Method::POST, path, Some(body.to_string())).await
    }

    /// The state of one model as `/admin/ps` reports it.
    pub async fn model(&self, name: &str) -> Value {
        let (_, ps) = self.get("/admin/ps").await;
        ps["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("model {name} not in {ps}"))
    }

    /// Polls `/admin/ps` until `name` is in `state`.
    pub async fn wait_state(&self, name: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let m = self.model(name).await;
            if m["state"] == state {
                return m;
            }
            if Instant::now() > deadline {
                panic!(
                    "model {name} not {state} within {within:?}: {m}\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/admin/ps` until `name`'s entry satisfies `what`; returns
    /// that entry. Fails with `why`, the last entry and the log after
    /// `within`.
    pub async fn wait_model(
        &self,
        name: &str,
        within: Duration,
        why: &str,
        what: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let m = self.model(name).await;
            if what(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{why} within {within:?}: {m}\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A client subcommand of the binary aimed at this daemon's local
    /// socket, not yet spawned (for its stdin, environment or a wrapper).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env(
            "CLARACORE_HOST",
            format!("unix:{}", self.socket().display()),
        );
        cmd
    }

    /// Polls `/admin/history` until it holds at least `n` rows; returns
    /// them, newest first.
    pub async fn wait_rows(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let (_, page) = self.get("/admin/history?limit=1000").await;
            let rows = page["requests"].as_array().cloned().unwrap_or_default();
            if rows.len() >= n {
                return rows;
            }
            if Instant::now() > deadline {
                panic!(
                    "fewer than {n} history rows within {within:?}: {page}\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs a client subcommand of the binary against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env(
                "CLARACORE_HOST",
                format!("unix:{}", self.socket().display()),
            )
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; the body parsed as JSON
/// (or a JSON string of the raw text if it is not JSON).
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> (StatusCode, Value) {
    json_of(send(addr, method, path, body).await).await
}

/// [`request`] on a unix socket.
pub async fn request_unix(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> (StatusCode, Value) {
    json_of(send_unix(socket, method, path, body).await).await
}

/// A response's status and its body as JSON (or a JSON string of the text).
async fn json_of(resp: hyper::Response<hyper::body::Incoming>) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// [`send`] on a unix socket.
pub async fn send_unix(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    exchange(stream, "localhost", method, path, body).await
}

pub async fn send(
    addr: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(stream, addr, method, path, body).await
}

/// One JSON request on `stream`, which is then done.
async fn exchange<S>(
    stream: S,
    host: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> hyper::Response<hyper::body::Incoming>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// Frames of a streamed response with the time each arrived.
pub struct Streamed {
    pub status: StatusCode,
    pub frames: Vec<(Duration, Bytes)>,
    /// The body ended with a transport error (not a clean end).
    pub error: Option<String>,
    pub total: Duration,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    /// The `data:` payloads of the SSE events, in order.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Sends a request and records every body frame as it arrives.
pub async fn stream(addr: &str, path: &str, body: &Value) -> Streamed {
    let start = Instant::now();
    let resp = send(addr, Method::POST, path, Some(body.to_string())).await;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    frames.push((start.elapsed(), data));
                }
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Streamed {
        status,
        frames,
        error,
        total: start.elapsed(),
    }
}

/// One short non-streamed chat request on a fresh connection; its status.
pub async fn chat_status(addr: &str, model: &str) -> StatusCode {
    request(
        addr,
        Method::POST,
        "/v1/chat/completions",
        Some(chat(model, 1, false).to_string()),
    )
    .await
    .0
}

pub fn chat(model: &str, max_tokens: u32, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": true,
    })
}

/// Live (non-zombie) processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((state, parent)) = stat(pid) {
            if parent == ppid && state != 'Z' {
                out.push(pid);
            }
        }
    }
    out
}

/// (state, ppid) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let mut fields = after.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z')
}

/// Polls `what` every 20 ms until it holds; panics with `why` after
/// `within`. For state outside the daemon's API (/proc, files, a child).
pub fn wait_until(within: Duration, why: &str, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !what() {
        assert!(Instant::now() < deadline, "{why} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for async tests: the same check, without blocking a
/// runtime worker between looks.
pub async fn wait_until_async(within: Duration, why: &str, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !what() {
        assert!(Instant::now() < deadline, "{why} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until none of `pids` is alive.
pub fn wait_gone(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|p| !alive(*p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Kills (SIGKILL) and reaps a child when dropped, so a failing test leaves
/// no process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits (up to 10 s) until something accepts connections on `addr`; on
/// timeout the failure shows `log`, when given.
pub fn wait_listening(addr: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never listened\n{}",
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 10 s) until `/live` on `addr` answers 200. On a prebound
/// socket a connect succeeds at once (the kernel queues it), so only an
/// answer shows the daemon is serving. Fails at once if `child` exits.
pub fn wait_live(addr: &str, child: &mut Child, log: &Path) {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited at start with {status}:\n{}", log_text());
        }
        let answer = std::net::TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        if answer.is_ok_and(|text| text.starts_with("HTTP/1.1 200")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not answer /live on {addr} within 10s:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (up to 10 s) until `child` itself listens on a TCP port (a daemon
/// that binds `127.0.0.1:0`) and returns that address, read from /proc.
/// Fails at once if `child` exits; the failure shows `log`, when given.
pub fn own_listener(child: &mut Child, log: Option<&Path>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_text = || {
        log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .unwrap_or_default()
    };
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited at start with {status}:\n{}", log_text());
        }
        if let Some(addr) = tcp_listener_of(child.id()) {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "pid {} did not listen on TCP within 10s:\n{}",
            child.id(),
            log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The IPv4 address of the one TCP socket in LISTEN state among `pid`'s
/// fds (None with none, or with more than one), from /proc.
pub fn tcp_listener_of(pid: u32) -> Option<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    let mut found = table.lines().skip(1).filter_map(|line| {
        // sl local_address rem_address st ... uid timeout inode
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != "0A" || !inodes.iter().any(|i| i == inode) {
            return None;
        }
        let (ip, port) = local.split_once(':')?;
        // The address is the in-memory (network order) word printed as a
        // native integer; the port is in host order.
        let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        Some(format!("{ip}:{}", u16::from_str_radix(port, 16).ok()?))
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// One request with a raw body and its own Content-Type (a multipart
/// form, say) on a fresh TCP connection; status, headers and the body as
/// JSON (or a JSON string of the text).
pub async fn send_raw(
    addr: &str,
    method: Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, hyper::HeaderMap, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let headers = resp.headers().clone();
    let (status, value) = json_of(resp).await;
    (status, headers, value)
}

/// One request on a fresh TCP connection with extra `headers` (a session
/// cookie, a CSRF token) and an optional JSON body; status, headers and
/// the body as JSON (or a JSON string of the text).
pub async fn send_with_headers(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, hyper::HeaderMap, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let headers = resp.headers().clone();
    let (status, value) = json_of(resp).await;
    (status, headers, value)
}

/// Every live descendant of `pid` (children, their children, …), parents
/// before their children.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        for c in children_of(p) {
            out.push(c);
            next.push(c);
        }
    }
    out
}

/// A multipart/form-data body with `fields` (name, value) and one file
/// part, and its Content-Type.
pub fn multipart(fields: &[(&str, &str)], file: &[u8]) -> (String, Vec<u8>) {
    let boundary = "claracore-test-7d1f3a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
