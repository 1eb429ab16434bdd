//! Which model runs, when: the single owner of every model's state.
//!
//! The scheduler is an actor ([`actor`]). One task owns all model slots and
//! changes them only in reaction to a message: a request acquiring a model,
//! a lease drained, a child's event, an admin stop, a TTL timer, a reload
//! or shutdown. Nothing else holds a lock on model state, so "a request
//! arrives while the TTL stop is being decided" cannot race: whichever
//! message comes first wins, and a request for a model that is stopping
//! waits for a fresh start.
//!
//! Per model (the actor's `Phase`, shown as a [`ModelState`]), with the
//! messages that move it:
//!
//! | phase    | acquire                 | leaves on                                      |
//! |----------|-------------------------|------------------------------------------------|
//! | Stopped  | wait; → Pending         |                                                |
//! | Pending  | wait                    | capacity free → Starting (see [`planner`]); every waiter gone → Stopped |
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
//! Requests for a Ready model do not wait for the actor: they enter the
//! child's [`gate`] on their own threads.
//!
//! The scheduler reports through the event bus (lifecycle steps and state
//! changes); it never calls metrics, history or the API. Its clock is
//! tokio's, so tests drive TTLs and backoff under `tokio::time::pause()`.
//!
//! - [`gate`]: the atomic fast path to a ready child.
//! - [`planner`]: pure eviction (groups, `max_loaded`).
//! - [`actor`]: the run loop, behind a [`Spawner`].

mod actor;
mod gate;
pub mod planner;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ModelConfig, SchedulerConfig};
use crate::events::Bus;
pub use crate::events::ModelState;
use crate::supervisor::{Processes, Spawner, StartFailure};
use crate::upstream::Upstream;
use gate::{Gate, Gates};

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
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// One model's state as `ps` and `/health` show it.
#[derive(Debug, Clone, Serialize)]
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
    pub starts: u64,
    pub last_error: Option<String>,
}

/// A requester waiting for a model.
type Waiter = oneshot::Sender<Result<Lease, AcquireError>>;

#[derive(Debug)]
enum Msg {
    Acquire {
        model: String,
        reply: Waiter,
    },
    /// The last lease of a closed gate was returned.
    Drained {
        model: Arc<str>,
        instance: u64,
    },
    Stop {
        model: String,
        reply: oneshot::Sender<Option<bool>>,
    },
    Status {
        reply: oneshot::Sender<Vec<ModelStatus>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
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
}

impl Scheduler {
    /// Starts the actor for a config's models, with real child processes
    /// whose sockets go in the config's runtime directory.
    pub fn start(config: &Config, bus: Bus) -> Scheduler {
        let processes = Processes {
            runtime_dir: config.runtime_dir.as_deref().map(Arc::from),
        };
        Scheduler::with_spawner(config, bus, Arc::new(processes))
    }

    /// Starts the actor with children made by `spawner`.
    pub fn with_spawner(config: &Config, bus: Bus, spawner: Arc<dyn Spawner>) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        let gates = Gates::default();
        actor::spawn(config, bus, spawner, gates.clone(), tx.clone(), rx);
        Scheduler { tx, gates }
    }

    /// Waits until `model` (a canonical name) is ready and leases it.
    /// Dropping the future withdraws the request: if it was still waiting,
    /// it starts and evicts nothing.
    pub async fn acquire(&self, model: &str) -> Result<Lease, AcquireError> {
        if let Some(gate) = self.gates.get(model) {
            if gate.enter() {
                return Ok(Lease { gate });
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Acquire {
                model: model.to_string(),
                reply,
            })
            .map_err(|_| AcquireError::ShuttingDown)?;
        rx.await.unwrap_or(Err(AcquireError::ShuttingDown))
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

    /// Every model's state, from the actor (sorted by name).
    pub async fn status(&self) -> Vec<ModelStatus> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Status { reply }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Requests holding a model right now; read from the gates, without
    /// the actor.
    pub fn inflight(&self) -> usize {
        self.gates.inflight()
    }

    /// Applies a reloaded config: new models become available, removed ones
    /// are drained and stopped, changed ones restart once idle.
    pub async fn reconfigure(&self, config: &Config) {
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
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}
