//! One child process's lifecycle, from spawn to reaped exit: the types the
//! scheduler sees ([`ChildSpec`], [`ChildEvent`], [`ChildHandle`],
//! [`Spawner`]) and [`spawn`], which hands the child to its own task.
//!
//! [`spawn`] starts a task that owns the child (`child`): it gives it a
//! unix socket in the daemon's private [`RuntimeDir`] (`runtime_dir`) (or,
//! for a `cmd` that asks for a port only, picks a loopback port), execs the
//! argv (never a shell) in a new process group with
//! `PR_SET_PDEATHSIG=SIGKILL`, copies each output line into tracing with the
//! model's name and into the model's ring (`output`, [`logs`]), polls the
//! health path until it answers 200 (`health`), then pings it
//! periodically. It reports to the scheduler through [`ChildEvent`]s,
//! exactly one `Ready` at most and exactly one terminal event
//! (`StartFailed` or `Exited`), and stops the child when its
//! [`ChildHandle`] asks or is dropped. While the child starts, the load
//! fractions llama-server prints (as a router's child does) go out as
//! `Progress` events before `Ready`. A start that fails out of memory is
//! told apart from other failures (`oom`).
//!
//! Stop escalation: SIGTERM to the process group; after the grace period,
//! SIGKILL to the group; then reap. A child's socket file is removed once
//! it has exited, before the terminal event goes out.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::ChildAddr;

mod child;
mod health;
pub mod logs;
mod oom;
mod output;
mod runtime_dir;

pub use health::probe;
pub use logs::{LogLine, LogStream, ModelLogs};
pub use output::parse_load_progress;
pub use runtime_dir::RuntimeDir;

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
    let task = tokio::spawn(child::run(spec, runtime_dir, logs, events, stop_rx));
    ChildHandle {
        stop: Some(stop_tx),
        task: Some(task),
    }
}
