//! Which model runs, when: the single owner of every model's state.
//!
//! The scheduler is a synchronous core ([`core`]) inside a thin async shell
//! ([`shell`]). One task owns all model slots and changes them only in
//! reaction to a message: a request acquiring a model, a lease returned, a
//! child's event, an admin stop, a timer, a reload or shutdown. The core
//! decides and returns the effects; the shell performs them. Nothing else
//! holds a lock on model state, so "a request arrives while the TTL stop
//! is being decided" cannot race: whichever message comes first wins, and
//! a request for a model that is stopping waits for a fresh start.
//!
//! Per model (the core's `Phase`, shown as a [`ModelState`]), with the
//! messages that move it:
//!
//! | phase    | acquire                 | leaves on                                      |
//! |----------|-------------------------|------------------------------------------------|
//! | Stopped  | wait; → Pending         |                                                |
//! | Pending  | wait                    | capacity free → Starting (see [`planner`]); every waiter gone and no preload → Stopped; only a pinned model's place would do → Stopped, waiters failed |
//! | Starting | wait                    | Ready → Ready (waiters served); StartFailed → Failed |
//! | Ready    | served at once          | evicted → Draining; TTL → Stopping; crash → Failed |
//! | Draining | wait (for the restart)  | last lease released → Stopping                 |
//! | Stopping | wait (for the restart)  | Exited → Pending if anyone waits, else Stopped |
//! | Failed   | 503 during backoff, else as Stopped |                                    |
//!
//! Exactly one child is started per Pending → Starting transition, so any
//! number of concurrent requests for a stopped model share one start. A
//! waiter whose client left (its request was dropped) is pruned before the
//! planner runs: it starts nothing and evicts nothing.
//!
//! Requests for a Ready model do not wait for the core: they enter the
//! child's [`gate`] on their own threads; what the core learns of their
//! leases, and how, is set out in [`core`].
//!
//! Besides requests, a model starts by preload ([`Scheduler::preload`],
//! once READY=1 is out, for models with `preload = true`, and on a reload
//! that turns it on) or by [`Scheduler::load`]; a preload is a Pending
//! with no waiter that is not pruned, and it ends at Ready or at a failed
//! start (shown as Failed, logged, never fatal).
//!
//! A pinned model (`pin = true`) is never chosen for eviction: when the
//! only way to start a model is to evict a pinned one, its requests fail
//! at once with [`AcquireError::Pinned`] instead of waiting. A pinned model
//! still stops on an admin stop, its idle TTL (a pin is about room for
//! other models, not idleness: set `ttl = "0"` to keep it up), a reload
//! that removes or changes it, and shutdown.
//!
//! The idle TTL is the model's `ttl` unless [`Scheduler::set_keep_alive`]
//! replaced it (Ollama's `keep_alive`); the override lives in the model's
//! slot, so it outlasts the child's stop and start, and ends when a reload
//! changes that model's `ttl` (or the daemon restarts).
//!
//! While a model is Starting, its load progress is the time since its child
//! was spawned, against the median of its last few successful load times
//! ([`LOAD_TIMES_KEPT`], seeded from history by
//! [`Scheduler::seed_load_times`] and updated at each Ready), with
//! llama-server's own fraction where it prints one. It shows in
//! [`ModelStatus::progress`] and goes out as [`Event::Progress`] about every
//! [`PROGRESS_PERIOD`] while starting, and once at Ready.
//!
//! The scheduler owns every model's output ring ([`ModelLogs`], written by
//! the supervisor's readers); [`Scheduler::logs`] is the reading side.
//!
//! Waiters queue per model, bounded over all models by
//! `scheduler.max_queue` ([`AcquireError::QueueFull`] beyond it). Pending
//! starts are granted by priority (the requester's key's plus the model's),
//! then age. A start that needs a loaded model gone waits while that model
//! is busy until the oldest waiter has waited
//! `scheduler.max_wait_before_swap`, unless the waiters outrank the model:
//! requests for the loaded model keep going straight in, so ABAB traffic
//! is served AABB and nobody waits past the bound.
//!
//! With GPU readings ([`Gpus`]), a model that needs GPU memory (declared
//! `vram_mb`, else the peak of its last runs, else its GGUF estimate) is
//! placed by [`planner::place`] over a reading taken after it began to
//! wait and after the last child went away, and its child gets
//! `CUDA_VISIBLE_DEVICES` for the chosen GPU. Each reading updates every
//! running model's measured use ([`Event::Vram`]); a run's peak is kept
//! (and stored with its stop event) as what the model needs next time. A
//! start that runs out of memory evicts one more idle model and is tried
//! once more.
//!
//! The scheduler reports through the event bus (lifecycle steps, state
//! changes, progress); it never calls metrics, history or the API. The core
//! takes `now` as an argument; the shell's clock is tokio's, so tests drive
//! TTLs and backoff under `tokio::time::pause()`, and the core's own tests
//! pass explicit times.
//!
//! - [`core`]: the decisions, entry point by entry point, and the
//!   [`effect::Effect`]s they return; [`transitions`]: what a child's
//!   events do; [`control`]: admin stop, preload, `keep_alive`, seeds,
//!   reload, shutdown.
//! - [`slot`]: one model's state; [`queue`]: waiters, turn order, the
//!   fairness bound and `max_queue`; [`placement`]: the planner's inputs
//!   from the slots, and GPU readings; [`estimate`]: a model's GGUF
//!   estimate of GPU memory, for placement before its first run.
//! - [`planner`]: pure eviction (groups, `max_loaded`) and GPU placement.
//! - [`shell`]: the run loop, performing effects through a [`Spawner`],
//!   the gates, the bus and the GPU sampler.
//! - [`gate`]: the atomic fast path to a ready child.

mod control;
mod core;
mod effect;
mod estimate;
mod gate;
mod placement;
pub mod planner;
mod queue;
mod shell;
mod slot;
mod transitions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ModelConfig, SchedulerConfig};
use crate::events::Bus;
#[cfg(doc)]
use crate::events::Event;
pub use crate::events::ModelState;
use crate::gpu::Gpus;
use crate::supervisor::{ModelLogs, Processes, Spawner, StartFailure};
use crate::upstream::Upstream;
pub use estimate::{vram_estimate, GPU_OVERHEAD_BYTES};
use gate::{Gate, Gates};
use queue::WaiterId;
pub use slot::VramSource;

/// Why a request could not get a model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("model {model} failed to start: {reason}")]
    StartFailed { model: String, reason: StartFailure },
    #[error("model {model} is failing ({reason}); retrying after {}s", retry_after.as_secs().max(1))]
    BackingOff {
        model: String,
        reason: String,
        retry_after: Duration,
    },
    #[error("model {model} stopped ({reason}) before it could serve the request")]
    Stopped { model: String, reason: String },
    #[error("claracore is shutting down")]
    ShuttingDown,
    #[error("unknown model {0}")]
    Unknown(String),
    #[error("{waiting} requests are already waiting for models (scheduler.max_queue); retry after {}s", retry_after.as_secs().max(1))]
    QueueFull {
        waiting: usize,
        retry_after: Duration,
    },
    #[error("model {model} does not fit on any GPU: {detail}")]
    NoRoom { model: String, detail: String },
    #[error("model {model} cannot start without evicting pinned model {} ({why}); stop it first or remove its `pin`", pinned.join(", "))]
    Pinned {
        model: String,
        /// The pinned models holding the places it needs.
        pinned: Vec<String>,
        /// The rule that needs them gone.
        why: PinReason,
    },
}

/// The rule that needs a pinned model gone for a start; shown as
/// `group NAME` or `max_loaded = N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinReason {
    /// It shares the starting model's group.
    Group(String),
    /// Only evicting it would keep `max_loaded` (the value).
    MaxLoaded(usize),
}

impl std::fmt::Display for PinReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinReason::Group(g) => write!(f, "group {g}"),
            PinReason::MaxLoaded(n) => write!(f, "max_loaded = {n}"),
        }
    }
}

/// Tells the scheduler when a waiting acquire is dropped before its
/// answer.
struct Withdraw<'a> {
    tx: &'a mpsc::UnboundedSender<Msg>,
    model: &'a str,
    waiter: WaiterId,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Left {
                model: self.model.to_string(),
                waiter: self.waiter,
            });
        }
    }
}

/// An idle TTL set at run time (Ollama's `keep_alive`), replacing the
/// model's configured `ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Never unloaded for being idle.
    Never,
    /// Unloaded once idle this long; `Duration::ZERO`: as soon as the last
    /// lease is returned.
    For(Duration),
}

impl KeepAlive {
    /// As an idle TTL (`None` = never).
    pub fn ttl(self) -> Option<Duration> {
        match self {
            KeepAlive::Never => None,
            KeepAlive::For(d) => Some(d),
        }
    }
}

/// Permission to send requests to a ready child. While any lease on a child
/// is alive, the child is not stopped (except by a crash or shutdown).
#[derive(Debug)]
pub struct Lease {
    gate: Arc<Gate>,
}

impl Lease {
    pub fn model(&self) -> &str {
        &self.gate.model
    }

    /// The child as an HTTP peer.
    pub fn upstream(&self) -> &Upstream {
        &self.gate.upstream
    }

    /// The GPU the child runs on, where known.
    pub fn gpu(&self) -> Option<u32> {
        self.gate.gpu()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// How often a starting model's progress goes out on the bus.
pub const PROGRESS_PERIOD: Duration = Duration::from_millis(250);
/// Successful load times kept per model for the expected load time.
pub const LOAD_TIMES_KEPT: usize = 5;
/// Peak GPU memory of past runs kept per model for its learned need.
pub const VRAM_RUNS_KEPT: usize = 5;

/// A starting model's load progress, as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Since its child was spawned.
    pub elapsed_ms: u64,
    /// The median of its last successful load times, if it loaded before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_ms: Option<u64>,
    /// llama-server's own fraction where it prints one, else
    /// `elapsed / expected` capped at 0.99; none without either.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
}

/// One model's state as `ps` and `/health` show it; `claracore ps` reads
/// it back (a field the answer lacks reads as its default).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStatus {
    pub name: String,
    pub aliases: Vec<String>,
    pub state: ModelState,
    pub pid: Option<u32>,
    /// The loopback port of a ready child on TCP (a `cmd` with `{port}`
    /// only).
    pub port: Option<u16>,
    /// The unix socket of a ready child on one.
    pub socket: Option<std::path::PathBuf>,
    pub inflight: usize,
    pub waiting: usize,
    pub uptime_s: Option<f64>,
    pub idle_s: Option<f64>,
    /// The idle TTL in force (configured or set by
    /// [`Scheduler::set_keep_alive`]); `None` = never unloaded for idleness.
    /// A ready model with `idle_s` unloads once `idle_s` reaches it.
    pub ttl_s: Option<f64>,
    /// `pin = true`: never evicted for another model.
    pub pinned: bool,
    pub starts: u64,
    pub last_error: Option<String>,
    /// While Starting with a child spawned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Its last successful load time (this run or, seeded, from history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
    /// The child's resident memory, read from /proc when the status is
    /// asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The GPU it was placed on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// GPU memory its process tree uses, at the last reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_bytes: Option<u64>,
    /// The GPU memory it is taken to need (only with GPU readings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_need_bytes: Option<u64>,
    /// Where that need comes from: `declared` (`vram_mb`), `measured` (its
    /// past runs) or `estimated` (its GGUF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_need_source: Option<VramSource>,
    /// The highest priority among its waiting requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_priority: Option<i32>,
}

/// Where a requester waits for its lease.
type Reply = oneshot::Sender<Result<Lease, AcquireError>>;

#[derive(Debug)]
enum Msg {
    Acquire {
        model: String,
        waiter: WaiterId,
        /// The requester's own (its key's) priority.
        priority: i32,
        reply: Reply,
    },
    /// A requester waiting for `model` went away (its request was
    /// dropped): its place in the queue is freed now.
    Left {
        model: String,
        waiter: WaiterId,
    },
    /// The last lease of a closed gate was returned.
    Drained {
        model: Arc<str>,
        instance: u64,
    },
    /// The last lease of an open gate that watches for idleness (every
    /// Ready gate: see core.rs) was returned.
    Idle {
        model: Arc<str>,
        instance: u64,
    },
    Stop {
        model: String,
        reply: oneshot::Sender<Option<bool>>,
    },
    /// Start every model with `preload = true` that is not running.
    Preload,
    SetKeepAlive {
        model: String,
        keep: KeepAlive,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<Vec<ModelStatus>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// Load times from history, oldest first, for models that have none
    /// yet.
    SeedLoadTimes {
        loads: HashMap<String, Vec<Duration>>,
    },
    /// A model's GGUF estimate of GPU memory, worked out off the loop.
    Estimated {
        model: String,
        bytes: Option<u64>,
    },
    /// Peak GPU memory of past runs from history, oldest first, for
    /// models that have none yet.
    SeedVram {
        peaks: HashMap<String, Vec<u64>>,
    },
    Reconfigure {
        limits: SchedulerConfig,
        models: Vec<ModelConfig>,
        reply: oneshot::Sender<()>,
    },
}

/// The requesting side of the scheduler; cheap to clone.
#[derive(Clone, Debug)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Msg>,
    gates: Gates,
    logs: ModelLogs,
    /// Names each request that waits, across every handle.
    next_waiter: Arc<AtomicU64>,
}

impl Scheduler {
    /// Starts the scheduler for a config's models, with real child processes
    /// whose sockets go in the config's runtime directory.
    pub fn start(config: &Config, bus: Bus, gpus: Gpus) -> Scheduler {
        let logs = ModelLogs::new(config.model_log_lines);
        let processes = Processes {
            runtime_dir: config.runtime_dir.as_deref().map(Arc::from),
            logs: logs.clone(),
        };
        Scheduler::with_parts(config, bus, Arc::new(processes), logs, gpus)
    }

    /// Starts the scheduler with children made by `spawner`, without GPU
    /// readings.
    pub fn with_spawner(config: &Config, bus: Bus, spawner: Arc<dyn Spawner>) -> Scheduler {
        Scheduler::with_spawner_and_gpus(config, bus, spawner, Gpus::absent())
    }

    /// Starts the scheduler with children made by `spawner` and readings from
    /// `gpus`.
    pub fn with_spawner_and_gpus(
        config: &Config,
        bus: Bus,
        spawner: Arc<dyn Spawner>,
        gpus: Gpus,
    ) -> Scheduler {
        let logs = ModelLogs::new(config.model_log_lines);
        Scheduler::with_parts(config, bus, spawner, logs, gpus)
    }

    fn with_parts(
        config: &Config,
        bus: Bus,
        spawner: Arc<dyn Spawner>,
        logs: ModelLogs,
        gpus: Gpus,
    ) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        let gates = Gates::default();
        shell::spawn(config, bus, spawner, gpus, gates.clone(), tx.clone(), rx);
        Scheduler {
            tx,
            gates,
            logs,
            next_waiter: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Every model's recent output lines.
    pub fn logs(&self) -> &ModelLogs {
        &self.logs
    }

    /// Gives models their past load times (from history, oldest first) for
    /// the expected time of their next load; a model that has loaded in
    /// this run already keeps its own.
    pub fn seed_load_times(&self, loads: HashMap<String, Vec<Duration>>) {
        let _ = self.tx.send(Msg::SeedLoadTimes { loads });
    }

    /// Gives models the peak GPU memory of their past runs (from history,
    /// oldest first): what they are learned to need.
    pub fn seed_vram(&self, peaks: HashMap<String, Vec<u64>>) {
        let _ = self.tx.send(Msg::SeedVram { peaks });
    }

    /// Waits until `model` (a canonical name) is ready and leases it.
    /// `priority` is the requester's own (its key's); the model's is added.
    /// Dropping the future withdraws the request: if it was still waiting,
    /// it starts and evicts nothing.
    pub async fn acquire(&self, model: &str, priority: i32) -> Result<Lease, AcquireError> {
        if let Some(gate) = self.gates.get(model) {
            if gate.enter() {
                return Ok(Lease { gate });
            }
        }
        let (reply, rx) = oneshot::channel();
        let waiter = WaiterId(self.next_waiter.fetch_add(1, Ordering::Relaxed));
        self.tx
            .send(Msg::Acquire {
                model: model.to_string(),
                waiter,
                priority,
                reply,
            })
            .map_err(|_| AcquireError::ShuttingDown)?;
        let mut waiting = Withdraw {
            tx: &self.tx,
            model,
            waiter,
            armed: true,
        };
        let result = rx.await.unwrap_or(Err(AcquireError::ShuttingDown));
        waiting.armed = false;
        result
    }

    /// Starts `model` (a canonical name) if needed and returns once it is
    /// ready, with how long that took (about zero if it already was). It
    /// holds no lease afterwards; like a request, it counts as a use for
    /// the idle TTL. Dropping the future withdraws it, as for
    /// [`Scheduler::acquire`].
    pub async fn load(&self, model: &str) -> Result<Duration, AcquireError> {
        let began = tokio::time::Instant::now();
        drop(self.acquire(model, 0).await?);
        Ok(began.elapsed())
    }

    /// Starts every model with `preload = true` (without waiting for any).
    /// The daemon calls it once READY=1 is sent; a reload starts models
    /// that newly have it by itself.
    pub fn preload(&self) {
        let _ = self.tx.send(Msg::Preload);
    }

    /// Replaces `model`'s idle TTL (a canonical name) from now on, running
    /// or not, until a reload changes its `ttl`. A ready, idle model whose
    /// new TTL has already passed starts stopping before this returns.
    /// False: no such model.
    pub async fn set_keep_alive(&self, model: &str, keep: KeepAlive) -> bool {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::SetKeepAlive {
            model: model.to_string(),
            keep,
            reply,
        };
        if self.tx.send(msg).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Stops a model (after draining). `None`: no such model;
    /// `Some(false)`: it was not running.
    pub async fn stop(&self, model: &str) -> Option<bool> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Stop {
                model: model.to_string(),
                reply,
            })
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Every model's state, from the run loop (sorted by name).
    pub async fn status(&self) -> Vec<ModelStatus> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Status { reply }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Requests holding a model right now; read from the gates, without
    /// the run loop.
    pub fn inflight(&self) -> usize {
        self.gates.inflight()
    }

    /// Applies a reloaded config: new models become available, removed ones
    /// are drained and stopped, changed ones restart once idle.
    pub async fn reconfigure(&self, config: &Config) {
        self.logs.set_capacity(config.model_log_lines);
        self.logs
            .retain(&config.models.iter().map(|m| m.name.as_str()).collect());
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Reconfigure {
            limits: config.scheduler.clone(),
            models: config.models.clone(),
            reply,
        };
        if self.tx.send(msg).is_ok() {
            let _ = rx.await;
        }
    }

    /// Fails waiting requests, stops every child, and returns once all
    /// have exited.
    pub async fn shutdown(&self) {
        // Log followers hold connections open; the drain must not wait on
        // them.
        self.logs.close();
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}
