//! One child's task: starts the process (argv, own process group,
//! `PR_SET_PDEATHSIG`, stripped systemd variables, a loopback port or its
//! socket), waits for it to become healthy within its start timeout, then
//! watches it until it exits, stops answering pings or is stopped; reports
//! through [`ChildEvent`]s. It alone owns the process and its [`Running`]
//! state: exactly one terminal event goes out, after the child is reaped
//! and its socket file removed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::output::{self, Captured, Tail};
use super::{health, oom, runtime_dir};
use super::{ChildEvent, ChildSpec, ExitReason, ModelLogs, StartFailure};
use crate::config::ChildAddr;

/// Variables that belong to the daemon's own systemd protocol and must not
/// leak into children.
const STRIPPED_ENV: [&str; 5] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
];
/// Port bind races are retried this many times with a new port.
const PORT_ATTEMPTS: usize = 3;
/// Consecutive failed health pings before a ready child is killed.
const HEALTH_FAILURES: u32 = 3;

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
        if oom::oom_killed(self.oom_kills_at_start, oom::oom_kill_count()) {
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

/// The child's task: finds its socket path, supervises it to the end,
/// removes the socket file and sends the terminal event.
pub(super) async fn run(
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
            .and_then(|dir| runtime_dir::socket_path(dir, &spec.model, spec.instance));
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
        runtime_dir::remove_socket(&spec.model, path);
    }
    let _ = events.send(terminal);
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
                    || oom::oom_killed(running.oom_kills_at_start, oom::oom_kill_count());
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
        runtime_dir::restrict_socket(&model, path);
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
        if health::probe(&running.addr, &spec.health_path, Duration::from_millis(500)).await {
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
                if health::probe(&running.addr, &spec.health_path, Duration::from_secs(5)).await {
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
            runtime_dir::remove_socket(&spec.model, path);
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
    let Captured {
        tail,
        loaded_hint,
        readers,
    } = output::capture(&mut child, spec, pid, logs, events);
    Ok(Running {
        child,
        pid,
        addr,
        tail,
        readers,
        loaded_hint,
        oom_kills_at_start: oom::oom_kill_count(),
    })
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

/// Picks a free loopback port. Another process may take it before the child
/// binds; the child's "address in use" exit is retried on a new port.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
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
