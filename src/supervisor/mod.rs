//! One child process's lifecycle, from spawn to reaped exit.
//!
//! [`spawn`] starts a task that owns the child: it gives it a unix socket
//! in the daemon's private [`RuntimeDir`] (or, for a `cmd` that asks for a
//! port only, picks a loopback port), execs the argv (never a shell) in a
//! new process group with
//! `PR_SET_PDEATHSIG=SIGKILL`, copies each output line into tracing with the
//! model's name and into the model's ring ([`logs`]), polls the health path
//! until it answers 200, then pings it periodically. It reports to the
//! scheduler through [`ChildEvent`]s, exactly one `Ready` at most and exactly
//! one terminal event (`StartFailed` or `Exited`), and stops the child when
//! its [`ChildHandle`] asks or is dropped. While the child starts, the load
//! fractions llama-server prints (as a router's child does) go out as
//! `Progress` events before `Ready`.
//!
//! Stop escalation: SIGTERM to the process group; after the grace period,
//! SIGKILL to the group; then reap. A child's socket file is removed once
//! it has exited, before the terminal event goes out.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::ChildAddr;

pub mod logs;
pub use logs::{LogLine, LogStream, ModelLogs};

/// Variables that belong to the daemon's own systemd protocol and must not
/// leak into children.
const STRIPPED_ENV: [&str; 5] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
];
/// How many stderr lines are kept for failure reports.
const TAIL_LINES: usize = 12;
/// Port bind races are retried this many times with a new port.
const PORT_ATTEMPTS: usize = 3;
/// Consecutive failed health pings before a ready child is killed.
const HEALTH_FAILURES: u32 = 3;
/// The longest path a unix socket address holds: `sun_path` is 108 bytes,
/// the terminating NUL included.
const SUN_PATH_MAX: usize = 107;
/// A child's socket file: only the daemon's user may connect (the
/// directory is 0700 already; this holds if it is ever shared).
const SOCKET_MODE: u32 = 0o600;

/// What a child is started with.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub model: Arc<str>,
    /// Scheduler's identity of this start, echoed in events.
    pub instance: u64,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub health_path: String,
    pub start_timeout: Duration,
    pub stop_grace: Duration,
    pub health_interval: Option<Duration>,
}

/// Why a child is no longer running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Stopped because the scheduler asked.
    Stopped,
    /// Exited on its own while ready.
    Crashed(String),
    /// Stopped answering health pings and was killed.
    Unhealthy(String),
}

/// Why a child never became ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartFailure {
    /// The process could not be started at all (exec failed, no port).
    #[error("{0}")]
    Spawn(String),
    /// It exited before its health check passed.
    #[error("model process exited while starting ({status})")]
    Exited { status: String },
    /// It exited before its health check passed, out of memory: its output
    /// said so (CUDA's or llama.cpp's allocation failures) or the OOM
    /// killer took it. The scheduler may make room and try once more.
    #[error("model process ran out of memory while starting ({status})")]
    OutOfMemory { status: String },
    /// Its health check did not pass within `start_timeout`.
    #[error("model did not become healthy within {}", humantime::format_duration(*.after))]
    Timeout { after: Duration },
}

/// Reports from a child's task to the scheduler.
#[derive(Debug)]
pub enum ChildEvent {
    /// The child printed how far its load has come (0.0 to 1.0); only
    /// before `Ready`.
    Progress {
        model: Arc<str>,
        instance: u64,
        fraction: f64,
    },
    Ready {
        model: Arc<str>,
        instance: u64,
        addr: ChildAddr,
        pid: u32,
        load_time: Duration,
    },
    StartFailed {
        model: Arc<str>,
        instance: u64,
        reason: StartFailure,
        /// The process that failed, if one was spawned (now gone).
        pid: Option<u32>,
    },
    Exited {
        model: Arc<str>,
        instance: u64,
        reason: ExitReason,
    },
}

/// The scheduler's end of a child: dropping it stops the child too.
#[derive(Debug)]
pub struct ChildHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ChildHandle {
    /// Asks the child to stop; the `Exited` event says when it has.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the child's task to finish (after [`stop`](Self::stop)).
    pub async fn join(self) {
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

impl ChildHandle {
    /// A handle whose stop request goes to `stop` and that supervises
    /// nothing: for a [`Spawner`] that stands in for real processes.
    pub fn detached(stop: oneshot::Sender<()>) -> ChildHandle {
        ChildHandle {
            stop: Some(stop),
            task: None,
        }
    }
}

/// Starts children for the scheduler: [`Processes`] for real ones, a fake
/// in the scheduler's unit tests.
pub trait Spawner: Send + Sync + 'static {
    fn spawn(&self, spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle;
}

/// Real child processes, each supervised by its own task; their sockets
/// go in `runtime_dir` (without one, a child that needs a socket fails to
/// start), their output lines in `logs`.
#[derive(Debug, Default, Clone)]
pub struct Processes {
    pub runtime_dir: Option<Arc<Path>>,
    pub logs: ModelLogs,
}

impl Spawner for Processes {
    fn spawn(&self, spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle {
        spawn(spec, self.runtime_dir.clone(), self.logs.clone(), events)
    }
}

/// Starts supervising a new child, its socket (if it takes one) in
/// `runtime_dir`, its output kept in `logs`.
pub fn spawn(
    spec: ChildSpec,
    runtime_dir: Option<Arc<Path>>,
    logs: ModelLogs,
    events: mpsc::UnboundedSender<ChildEvent>,
) -> ChildHandle {
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(run(spec, runtime_dir, logs, events, stop_rx));
    ChildHandle {
        stop: Some(stop_tx),
        task: Some(task),
    }
}

/// The last lines a child wrote to stderr.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn mentions_port_in_use(&self) -> bool {
        let text = self.text().to_ascii_lowercase();
        text.contains("address already in use") || text.contains("couldn't bind")
    }

    /// Whether the output reports a failed (GPU) memory allocation.
    fn mentions_out_of_memory(&self) -> bool {
        mentions_out_of_memory(&self.text())
    }
}

/// Whether a child's output reports that an allocation failed: CUDA's
/// "out of memory" (cudaMalloc, cuBLAS), or llama.cpp's own "failed to
/// allocate" of a buffer.
fn mentions_out_of_memory(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("out of memory") || text.contains("failed to allocate")
}

/// A running child and the tasks copying its output.
struct Running {
    child: Child,
    pid: u32,
    addr: ChildAddr,
    tail: Tail,
    readers: Vec<JoinHandle<()>>,
    /// Signalled when the child's output says it has finished loading, so
    /// readiness is probed at once rather than at the next poll.
    loaded_hint: Arc<Notify>,
    /// The cgroup's OOM kill count when the child started, to tell an OOM
    /// kill from another SIGKILL.
    oom_kills_at_start: Option<u64>,
}

impl Running {
    /// Waits for the output readers so the tail holds the last lines.
    async fn drain_output(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_millis(500), reader).await;
        }
    }

    /// How the child ended, naming the OOM killer when the cgroup's OOM
    /// count rose since the child started.
    fn exit_text(&self, status: ExitStatus) -> String {
        let mut text = describe(status);
        if oom_killed(self.oom_kills_at_start, oom_kill_count()) {
            text.push_str(", by the OOM killer: the service's memory limit was reached");
        }
        text
    }

    /// SIGTERM to the group, SIGKILL after `grace`, then reap.
    async fn stop(&mut self, model: &str, grace: Duration) -> Option<ExitStatus> {
        let group = Pid::from_raw(self.pid as i32);
        if let Ok(Some(status)) = self.child.try_wait() {
            // Reaped already; take the rest of its group down all the same.
            let _ = killpg(group, Signal::SIGKILL);
            return Some(status);
        }
        let _ = killpg(group, Signal::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(
                    model,
                    pid = self.pid,
                    grace_ms = grace.as_millis() as u64,
                    "child ignored SIGTERM; sending SIGKILL to its process group"
                );
                let _ = killpg(group, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        // Grandchildren that outlived the leader go too.
        let _ = killpg(group, Signal::SIGKILL);
        status
    }
}

async fn run(
    spec: ChildSpec,
    runtime_dir: Option<Arc<Path>>,
    logs: ModelLogs,
    events: mpsc::UnboundedSender<ChildEvent>,
    stop_rx: oneshot::Receiver<()>,
) {
    let socket = if crate::config::uses_socket(&spec.argv) {
        let path = runtime_dir
            .as_deref()
            .ok_or_else(|| "no runtime directory for the model's unix socket".to_string())
            .and_then(|dir| socket_path(dir, &spec.model, spec.instance));
        match path {
            Ok(path) => Some(path),
            Err(reason) => {
                tracing::error!(model = %spec.model, "{reason}");
                let _ = events.send(ChildEvent::StartFailed {
                    model: spec.model.clone(),
                    instance: spec.instance,
                    reason: StartFailure::Spawn(reason),
                    pid: None,
                });
                return;
            }
        }
    } else {
        None
    };
    let terminal = supervise(&spec, socket.as_deref(), &logs, &events, stop_rx).await;
    // Gone before anyone hears the child has stopped.
    if let Some(path) = &socket {
        remove_socket(&spec.model, path);
    }
    let _ = events.send(terminal);
}

/// Removes a child's socket file (it does not do so itself).
fn remove_socket(model: &str, path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(model, path = %path.display(), error = %e,
            "cannot remove the child's socket file"),
    }
}

/// Runs the child from start to exit; sends `Ready` on the way and
/// returns the terminal event.
async fn supervise(
    spec: &ChildSpec,
    socket: Option<&Path>,
    logs: &ModelLogs,
    events: &mpsc::UnboundedSender<ChildEvent>,
    mut stop_rx: oneshot::Receiver<()>,
) -> ChildEvent {
    let model = spec.model.clone();
    let instance = spec.instance;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.start_timeout;
    let start_failed = |reason, pid| ChildEvent::StartFailed {
        model: model.clone(),
        instance,
        reason,
        pid,
    };

    let mut attempt = 0;
    let mut running = loop {
        attempt += 1;
        let mut running = match start_child(spec, socket, logs, events) {
            Ok(r) => r,
            Err(reason) => return start_failed(StartFailure::Spawn(reason), None),
        };
        tracing::info!(model = %model, pid = running.pid, addr = %running.addr,
            argv = ?spec.argv, "started child");
        match wait_ready(spec, &mut running, deadline, &mut stop_rx).await {
            Readiness::Ready => break running,
            Readiness::StopRequested => {
                running.stop(&model, spec.stop_grace).await;
                return ChildEvent::Exited {
                    model,
                    instance,
                    reason: ExitReason::Stopped,
                };
            }
            Readiness::Exited(status) => {
                running.drain_output().await;
                // A socket in the private directory cannot be taken by
                // anyone else: only a loopback port is worth another try.
                let tcp = matches!(running.addr, ChildAddr::Tcp(_));
                if tcp && running.tail.mentions_port_in_use() && attempt < PORT_ATTEMPTS {
                    tracing::warn!(model = %model, addr = %running.addr,
                        "child could not bind its port; retrying on another");
                    continue;
                }
                let tail = running.tail.text();
                let oom = running.tail.mentions_out_of_memory()
                    || oom_killed(running.oom_kills_at_start, oom_kill_count());
                let status = running.exit_text(status);
                tracing::error!(model = %model, status = %status, stderr_tail = %tail,
                    "child exited while starting");
                let reason = if oom {
                    StartFailure::OutOfMemory { status }
                } else {
                    StartFailure::Exited { status }
                };
                return start_failed(reason, Some(running.pid));
            }
            Readiness::TimedOut => {
                running.stop(&model, spec.stop_grace).await;
                let reason = StartFailure::Timeout {
                    after: spec.start_timeout,
                };
                tracing::error!(model = %model, stderr_tail = %running.tail.text(), "{reason}");
                return start_failed(reason, Some(running.pid));
            }
        }
    };

    if let ChildAddr::Unix(path) = &running.addr {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        {
            tracing::warn!(model = %model, path = %path.display(), error = %e,
                "cannot restrict the child's socket file");
        }
    }
    let load_time = started.elapsed();
    tracing::info!(model = %model, pid = running.pid, load_ms = load_time.as_millis() as u64, "child ready");
    let _ = events.send(ChildEvent::Ready {
        model: model.clone(),
        instance,
        addr: running.addr.clone(),
        pid: running.pid,
        load_time,
    });

    let reason = supervise_ready(spec, &mut running, &mut stop_rx).await;
    ChildEvent::Exited {
        model,
        instance,
        reason,
    }
}

enum Readiness {
    Ready,
    StopRequested,
    Exited(ExitStatus),
    TimedOut,
}

/// Polls the health path fast at first (readiness is on the request's
/// critical path), then backs off; probes at once when the child logs that
/// its model is loaded.
async fn wait_ready(
    spec: &ChildSpec,
    running: &mut Running,
    deadline: tokio::time::Instant,
    stop_rx: &mut oneshot::Receiver<()>,
) -> Readiness {
    let begun = Instant::now();
    let mut hinted: Option<Instant> = None;
    loop {
        if probe(&running.addr, &spec.health_path, Duration::from_millis(500)).await {
            return Readiness::Ready;
        }
        let interval = if hinted.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            // Loaded, not yet serving: it is a matter of a millisecond or two.
            Duration::from_millis(1)
        } else if begun.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        tokio::select! {
            status = running.child.wait() => {
                return match status {
                    Ok(status) => Readiness::Exited(status),
                    Err(_) => Readiness::TimedOut,
                };
            }
            _ = &mut *stop_rx => return Readiness::StopRequested,
            _ = tokio::time::sleep_until(deadline) => return Readiness::TimedOut,
            _ = tokio::time::sleep(interval) => {}
            _ = running.loaded_hint.notified() => hinted = Some(Instant::now()),
        }
    }
}

/// Watches a ready child until it exits, stops answering, or is stopped.
async fn supervise_ready(
    spec: &ChildSpec,
    running: &mut Running,
    stop_rx: &mut oneshot::Receiver<()>,
) -> ExitReason {
    let mut failures = 0u32;
    let interval = spec.health_interval.unwrap_or(Duration::MAX / 4);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            status = running.child.wait() => {
                running.drain_output().await;
                let _ = killpg(Pid::from_raw(running.pid as i32), Signal::SIGKILL);
                let status = status.map(|s| running.exit_text(s)).unwrap_or_else(|e| e.to_string());
                tracing::error!(model = %spec.model, pid = running.pid, status = %status,
                    stderr_tail = %running.tail.text(), "child exited unexpectedly");
                return ExitReason::Crashed(format!("model process exited unexpectedly ({status})"));
            }
            _ = &mut *stop_rx => {
                let status = running.stop(&spec.model, spec.stop_grace).await;
                tracing::info!(model = %spec.model, pid = running.pid,
                    status = %status.map(describe).unwrap_or_default(), "child stopped");
                return ExitReason::Stopped;
            }
            _ = ticker.tick() => {
                if probe(&running.addr, &spec.health_path, Duration::from_secs(5)).await {
                    failures = 0;
                    continue;
                }
                failures += 1;
                tracing::warn!(model = %spec.model, pid = running.pid, failures, "health ping failed");
                if failures >= HEALTH_FAILURES {
                    running.stop(&spec.model, Duration::ZERO).await;
                    return ExitReason::Unhealthy(format!(
                        "model stopped answering {} ({failures} pings failed); killed",
                        spec.health_path
                    ));
                }
            }
        }
    }
}

/// Starts the child on `socket`, or on a fresh loopback port without one
/// (a `{port}` beside a `{socket}` gets a free port too, unused by
/// claracore).
fn start_child(
    spec: &ChildSpec,
    socket: Option<&Path>,
    logs: &ModelLogs,
    events: &mpsc::UnboundedSender<ChildEvent>,
) -> Result<Running, String> {
    let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
    let addr = match socket {
        Some(path) => {
            // Left over only if a daemon before this one died uncleanly.
            remove_socket(&spec.model, path);
            ChildAddr::Unix(path.to_path_buf())
        }
        None => ChildAddr::Tcp(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))),
    };
    let argv = crate::config::fill_placeholders(&spec.argv, port, socket.unwrap_or(Path::new("")));
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for var in STRIPPED_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        tracing::error!(model = %spec.model, program = %program, error = %e, "cannot start child");
        format!("cannot start model process: {}", io_kind(&e))
    })?;
    let pid = child
        .id()
        .ok_or("child exited before it could be tracked")?;
    // Under memory pressure the kernel should pick a model process, not the
    // daemon that reports the failure and serves the next request.
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "500") {
        tracing::debug!(model = %spec.model, error = %e, "cannot raise the child's oom_score_adj");
    }
    let tail = Tail::default();
    let loaded_hint = Arc::new(Notify::new());
    let ring = logs.ring(&spec.model);
    let output = |stream, tail| Output {
        model: spec.model.clone(),
        instance: spec.instance,
        pid,
        tail,
        loaded_hint: loaded_hint.clone(),
        ring: ring.clone(),
        stream,
        events: events.clone(),
    };
    let mut readers = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        let output = output(LogStream::Stdout, None);
        readers.push(tokio::spawn(copy_lines(out, output)));
    }
    if let Some(err) = child.stderr.take() {
        let output = output(LogStream::Stderr, Some(tail.clone()));
        readers.push(tokio::spawn(copy_lines(err, output)));
    }
    Ok(Running {
        child,
        pid,
        addr,
        tail,
        readers,
        loaded_hint,
        oom_kills_at_start: oom_kill_count(),
    })
}

/// `oom_kill` from the memory.events of the cgroup this process runs in
/// (cgroup v2), e.g. /sys/fs/cgroup/system.slice/claracore.service.
fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", path.trim())).ok()?;
    parse_oom_kills(&events)
}

fn parse_oom_kills(memory_events: &str) -> Option<u64> {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn oom_killed(before: Option<u64>, after: Option<u64>) -> bool {
    matches!((before, after), (Some(b), Some(a)) if a > b)
}

/// Makes the kernel SIGKILL the child when the thread that spawned it dies.
/// Children are spawned from tokio worker threads, which live as long as the
/// runtime, i.e. the daemon.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid); it allocates nothing.
    // Checking getppid afterwards closes the race where the parent died
    // before prctl took effect.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

/// Where a child's output stream goes.
struct Output {
    model: Arc<str>,
    instance: u64,
    pid: u32,
    /// Kept for failure reports (stderr only).
    tail: Option<Tail>,
    loaded_hint: Arc<Notify>,
    /// The model's ring, shared with its other children.
    ring: Arc<logs::Ring>,
    stream: LogStream,
    /// Where load progress goes.
    events: mpsc::UnboundedSender<ChildEvent>,
}

/// llama-server's log line once its model is loaded; `/health` turns 200
/// right after it.
const LOADED_MARKER: &str = "model loaded";

/// What llama-server prints, as a router's child, for each state change
/// (followed by one line of JSON); loading carries its fraction.
const ROUTER_STATE_MARKER: &str = "cmd_child_to_router:state:";

/// The load fraction of a llama-server state line such as
/// `cmd_child_to_router:state:{"state":"loading","payload":{"value":0.42}}`
/// (the fraction in `payload.value`, or `value` beside it in some
/// versions), clamped to 0.0..=1.0. Anything else: none.
pub fn parse_load_progress(line: &str) -> Option<f64> {
    let (_, json) = line.split_once(ROUTER_STATE_MARKER)?;
    let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    if v.get("state")?.as_str()? != "loading" {
        return None;
    }
    let value = v
        .get("payload")
        .and_then(|p| p.get("value"))
        .or_else(|| v.get("value"))?
        .as_f64()?;
    value.is_finite().then(|| value.clamp(0.0, 1.0))
}

/// Copies a child's output into tracing and its model's ring line by line.
async fn copy_lines(stream: impl AsyncRead + Unpin, out: Output) {
    let Output {
        model,
        instance,
        pid,
        tail,
        loaded_hint,
        ring,
        stream: which,
        events,
    } = out;
    let mut lines = BufReader::new(stream).lines();
    // Non-UTF-8 output ends line mode; the pipe then closes and the child
    // gets EPIPE rather than blocking.
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        match child_level(line) {
            tracing::Level::ERROR => {
                tracing::error!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
            _ => {
                tracing::info!(target: "claracore::child", model = %model, child_pid = pid, "{line}")
            }
        }
        ring.push(crate::events::now_ms(), which, line);
        if line.contains(LOADED_MARKER) {
            loaded_hint.notify_one();
        }
        if let Some(fraction) = parse_load_progress(line) {
            let _ = events.send(ChildEvent::Progress {
                model: model.clone(),
                instance,
                fraction,
            });
        }
        if let Some(tail) = &tail {
            tail.push(line.to_string());
        }
    }
}

/// The level of a child's output line: llama.cpp writes `<time> <L> text`
/// with L one of D, I, W, E; anything else is info.
fn child_level(line: &str) -> tracing::Level {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    let marker = if first.len() == 1 {
        Some(first)
    } else {
        words.next()
    };
    match marker {
        Some("E") => tracing::Level::ERROR,
        Some("W") => tracing::Level::WARN,
        Some("D") => tracing::Level::DEBUG,
        _ => tracing::Level::INFO,
    }
}

/// Picks a free loopback port. Another process may take it before the child
/// binds; the child's "address in use" exit is retried on a new port.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// `GET path` on the child; true on a 200.
pub async fn probe(addr: &ChildAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        match addr {
            ChildAddr::Tcp(a) => {
                let host = a.to_string();
                probe_on(TcpStream::connect(a).await.ok()?, &host, path).await
            }
            // Any name will do: llama-server does not check it.
            ChildAddr::Unix(p) => {
                probe_on(UnixStream::connect(p).await.ok()?, "localhost", path).await
            }
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

async fn probe_on(
    mut stream: impl AsyncRead + tokio::io::AsyncWrite + Unpin,
    host: &str,
    path: &str,
) -> Option<bool> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    Some(&head[..9] == b"HTTP/1.1 " || &head[..9] == b"HTTP/1.0 ")
        .filter(|ok| *ok)
        .map(|_| &head[9..12] == b"200")
}

/// `<dir>/<model>-<instance>.sock`, or `<dir>/<instance>.sock` when a long
/// model name would not fit a unix socket address (instances are unique
/// within a daemon, so either name is).
fn socket_path(dir: &Path, model: &str, instance: u64) -> Result<PathBuf, String> {
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

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => Signal::try_from(sig)
            .map(|s| format!("killed by {s}"))
            .unwrap_or_else(|_| format!("killed by signal {sig}")),
        _ => "unknown status".into(),
    }
}

/// An OS error's kind without paths, for client-facing text.
fn io_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "program not found",
        std::io::ErrorKind::PermissionDenied => "permission denied",
        _ => "spawn failed",
    }
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
    fn oom_kills_are_read_from_memory_events() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(events), Some(2));
        assert_eq!(parse_oom_kills("low 0\n"), None);
        assert!(oom_killed(Some(2), Some(3)));
        assert!(!oom_killed(Some(2), Some(2)));
        assert!(!oom_killed(None, Some(3)));
    }

    #[test]
    fn llama_server_load_progress_lines_are_parsed() {
        // As llama-server prints them when run by a router (captured from
        // llama.cpp's server-context load_progress_callback); the child's
        // pid prefix is how a router's own log shows them.
        let lines = [
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"stages":["text_model"],"current":"text_model","value":0.0}}"#, Some(0.0)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"stages":["text_model","mmproj_model"],"current":"text_model","value":0.4375}}"#, Some(0.4375)),
            (r#"[39281] cmd_child_to_router:state:{"state":"loading","payload":{"current":"text_model","value":1.4}}"#, Some(1.0)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"id":"m"},"value":0.25}"#, Some(0.25)),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"value":-0.2}}"#, Some(0.0)),
            (r#"cmd_child_to_router:state:{"state":"ready","payload":{"n_ctx":8192}}"#, None),
            (r#"cmd_child_to_router:state:{"state":"loading""#, None),
            (r#"cmd_child_to_router:state:{"state":"loading","payload":{"value":"half"}}"#, None),
            ("0.00.102.822 I srv  llama_server: model loaded", None),
            ("0.00.047.132 I load_tensors: loading model tensors, this can take a while... (load_mode = none)", None),
            ("..................................................", None),
        ];
        for (line, want) in lines {
            assert_eq!(parse_load_progress(line), want, "{line}");
        }
    }

    #[test]
    fn llama_cpp_level_markers_map_to_levels() {
        assert_eq!(
            child_level("0.00.151.863 I slot print_timing: id 3"),
            tracing::Level::INFO
        );
        assert_eq!(
            child_level("0.00.167.645 W slot operator(): need to evaluate"),
            tracing::Level::WARN
        );
        assert_eq!(
            child_level("0.01.000.000 E main: failed to load model"),
            tracing::Level::ERROR
        );
        assert_eq!(
            child_level("0.01.000.000 D debug line"),
            tracing::Level::DEBUG
        );
        assert_eq!(child_level("main: plain line"), tracing::Level::INFO);
        assert_eq!(
            child_level("fake-upstream: listening"),
            tracing::Level::INFO
        );
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
