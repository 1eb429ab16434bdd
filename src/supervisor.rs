//! One child process's lifecycle, from spawn to reaped exit.
//!
//! [`spawn`] starts a task that owns the child: it picks a loopback port,
//! execs the argv (never a shell) in a new process group with
//! `PR_SET_PDEATHSIG=SIGKILL`, copies each output line into tracing with the
//! model's name, polls the health path until it answers 200, then pings it
//! periodically. It reports to the scheduler through [`ChildEvent`]s, exactly
//! one `Ready` at most and exactly one terminal event (`StartFailed` or
//! `Exited`), and stops the child when its [`ChildHandle`] asks or is dropped.
//!
//! Stop escalation: SIGTERM to the process group; after the grace period,
//! SIGKILL to the group; then reap.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

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
    /// Its health check did not pass within `start_timeout`.
    #[error("model did not become healthy within {}", humantime::format_duration(*.after))]
    Timeout { after: Duration },
}

/// Reports from a child's task to the scheduler.
#[derive(Debug)]
pub enum ChildEvent {
    Ready {
        model: Arc<str>,
        instance: u64,
        addr: SocketAddr,
        pid: u32,
        load_time: Duration,
    },
    StartFailed {
        model: Arc<str>,
        instance: u64,
        reason: StartFailure,
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

/// Real child processes, each supervised by its own task.
#[derive(Debug, Default, Clone, Copy)]
pub struct Processes;

impl Spawner for Processes {
    fn spawn(&self, spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle {
        spawn(spec, events)
    }
}

/// Starts supervising a new child.
pub fn spawn(spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle {
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(run(spec, events, stop_rx));
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
}

/// A running child and the tasks copying its output.
struct Running {
    child: Child,
    pid: u32,
    addr: SocketAddr,
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
    events: mpsc::UnboundedSender<ChildEvent>,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let model = spec.model.clone();
    let instance = spec.instance;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.start_timeout;

    let mut attempt = 0;
    let mut running = loop {
        attempt += 1;
        let mut running = match start_child(&spec) {
            Ok(r) => r,
            Err(reason) => {
                let _ = events.send(ChildEvent::StartFailed {
                    model,
                    instance,
                    reason: StartFailure::Spawn(reason),
                });
                return;
            }
        };
        tracing::info!(model = %model, pid = running.pid, port = running.addr.port(),
            argv = ?spec.argv, "started child");
        match wait_ready(&spec, &mut running, deadline, &mut stop_rx).await {
            Readiness::Ready => break running,
            Readiness::StopRequested => {
                running.stop(&model, spec.stop_grace).await;
                let _ = events.send(ChildEvent::Exited {
                    model,
                    instance,
                    reason: ExitReason::Stopped,
                });
                return;
            }
            Readiness::Exited(status) => {
                running.drain_output().await;
                if running.tail.mentions_port_in_use() && attempt < PORT_ATTEMPTS {
                    tracing::warn!(model = %model, port = running.addr.port(),
                        "child could not bind its port; retrying on another");
                    continue;
                }
                let tail = running.tail.text();
                let status = running.exit_text(status);
                tracing::error!(model = %model, status = %status, stderr_tail = %tail,
                    "child exited while starting");
                let reason = StartFailure::Exited { status };
                let _ = events.send(ChildEvent::StartFailed {
                    model,
                    instance,
                    reason,
                });
                return;
            }
            Readiness::TimedOut => {
                running.stop(&model, spec.stop_grace).await;
                let reason = StartFailure::Timeout {
                    after: spec.start_timeout,
                };
                tracing::error!(model = %model, stderr_tail = %running.tail.text(), "{reason}");
                let _ = events.send(ChildEvent::StartFailed {
                    model,
                    instance,
                    reason,
                });
                return;
            }
        }
    };

    let load_time = started.elapsed();
    tracing::info!(model = %model, pid = running.pid, load_ms = load_time.as_millis() as u64, "child ready");
    let _ = events.send(ChildEvent::Ready {
        model: model.clone(),
        instance,
        addr: running.addr,
        pid: running.pid,
        load_time,
    });

    let reason = supervise_ready(&spec, &mut running, &mut stop_rx).await;
    let _ = events.send(ChildEvent::Exited {
        model,
        instance,
        reason,
    });
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
        if probe(running.addr, &spec.health_path, Duration::from_millis(500)).await {
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
                if probe(running.addr, &spec.health_path, Duration::from_secs(5)).await {
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

fn start_child(spec: &ChildSpec) -> Result<Running, String> {
    let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
    let argv: Vec<String> = spec
        .argv
        .iter()
        .map(|a| a.replace(crate::config::PORT_PLACEHOLDER, &port.to_string()))
        .collect();
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
    let mut readers = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        let output = Output {
            model: spec.model.clone(),
            pid,
            tail: None,
            loaded_hint: loaded_hint.clone(),
        };
        readers.push(tokio::spawn(copy_lines(out, output)));
    }
    if let Some(err) = child.stderr.take() {
        let output = Output {
            model: spec.model.clone(),
            pid,
            tail: Some(tail.clone()),
            loaded_hint: loaded_hint.clone(),
        };
        readers.push(tokio::spawn(copy_lines(err, output)));
    }
    Ok(Running {
        child,
        pid,
        addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
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

/// Copies a child's output into tracing line by line.
/// Where a child's output stream goes.
struct Output {
    model: Arc<str>,
    pid: u32,
    /// Kept for failure reports (stderr only).
    tail: Option<Tail>,
    loaded_hint: Arc<Notify>,
}

/// llama-server's log line once its model is loaded; `/health` turns 200
/// right after it.
const LOADED_MARKER: &str = "model loaded";

async fn copy_lines(stream: impl AsyncRead + Unpin, out: Output) {
    let Output {
        model,
        pid,
        tail,
        loaded_hint,
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
        if line.contains(LOADED_MARKER) {
            loaded_hint.notify_one();
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
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head[..9] == b"HTTP/1.1 " || &head[..9] == b"HTTP/1.0 ")
            .filter(|ok| *ok)
            .map(|_| &head[9..12] == b"200")
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
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
    fn oom_kills_are_read_from_memory_events() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(events), Some(2));
        assert_eq!(parse_oom_kills("low 0\n"), None);
        assert!(oom_killed(Some(2), Some(3)));
        assert!(!oom_killed(Some(2), Some(2)));
        assert!(!oom_killed(None, Some(3)));
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
}
