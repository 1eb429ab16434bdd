//! Which model runs, when: the single owner of every model's state.
//!
//! The scheduler is an actor. One task owns all [`Slot`]s and changes them
//! only in reaction to a message: a request acquiring or releasing a model,
//! a child's [`ChildEvent`], an admin stop, a TTL timer, or shutdown.
//! Nothing else holds a lock on model state, so "a request arrives while the
//! TTL stop is being decided" cannot race: whichever message comes first
//! wins, and a request for a model that is stopping waits for a fresh start.
//!
//! Per model (`Phase`), with the messages that move it:
//!
//! | phase    | acquire                 | leaves on                                      |
//! |----------|-------------------------|------------------------------------------------|
//! | Stopped  | wait; → Pending         |                                                |
//! | Pending  | wait                    | capacity free → Starting (see [`plan`])        |
//! | Starting | wait                    | Ready → Ready (waiters served); StartFailed → Failed |
//! | Ready    | served at once          | evicted → Draining; TTL → Stopping; crash → Failed |
//! | Draining | wait (for the restart)  | last lease released → Stopping                 |
//! | Stopping | wait (for the restart)  | Exited → Pending if anyone waits, else Stopped |
//! | Failed   | 503 during backoff, else as Stopped |                                    |
//!
//! Exactly one child is started per Pending → Starting transition, so any
//! number of concurrent requests for a stopped model share one start.
//!
//! Requests for a Ready model do not wait for the actor: each ready child
//! has a [`Gate`], an atomic word holding an "open" bit and the number of
//! leases, which requests enter and leave on their own threads. The actor
//! closes the gate in the same step in which the model leaves Ready (evicted,
//! TTL, stop, shutdown), so a request either got in before that step and
//! holds a lease the stop waits for, or finds the gate closed and queues with
//! the actor as before. While a gate is closed, the lease that brings its
//! count to zero tells the actor (`Drained`), which ends a drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, ModelConfig, SchedulerConfig};
use crate::history::{now_ms, ModelEvent, Recorder};
use crate::metrics::Metrics;
use crate::proxy::{self, UpstreamClient};
use crate::supervisor::{self, ChildEvent, ChildHandle, ChildSpec, ExitReason};

/// Where the scheduler reports model lifecycle: history rows and metrics.
#[derive(Clone)]
pub struct Observer {
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Observer {
    fn event(&self, model: &str, event: &'static str, f: impl FnOnce(&mut ModelEvent)) {
        let mut e = ModelEvent {
            at_ms: now_ms(),
            model: model.to_string(),
            event,
            reason: None,
            load_ms: None,
            exit_status: None,
            pid: None,
            rss_bytes: None,
        };
        f(&mut e);
        self.recorder.event(e);
    }
}

/// Why the scheduler stopped a model; stored with its `stopped` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Ttl,
    Evicted,
    Admin,
    Shutdown,
    Reload,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            StopReason::Ttl => "ttl",
            StopReason::Evicted => "evicted",
            StopReason::Admin => "admin",
            StopReason::Shutdown => "shutdown",
            StopReason::Reload => "reload",
        }
    }
}

/// A model that ran at least this long before crashing starts its backoff
/// over.
const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// Upper bound of the restart backoff after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a request could not get a model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("model {model} failed to start: {reason}")]
    StartFailed { model: String, reason: String },
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

/// The "open" bit of [`Gate::state`]; the bits below count leases.
const OPEN: usize = 1 << (usize::BITS - 1);

/// Admission to one ready child, shared by the actor and every request.
#[derive(Debug)]
struct Gate {
    /// [`OPEN`] while the model is Ready, plus the number of live leases.
    state: AtomicUsize,
    /// When a lease was last taken or returned, in nanoseconds since
    /// `epoch`.
    last_used: AtomicU64,
    epoch: Instant,
    addr: SocketAddr,
    /// `addr` for the request URI and `Host`, made once.
    authority: Authority,
    host: HeaderValue,
    model: Arc<str>,
    instance: u64,
    /// Where `Drained` goes.
    actor: mpsc::UnboundedSender<Msg>,
    /// This child's connection pool.
    client: UpstreamClient,
    /// Requests that may be forwarded at once (the model's
    /// `max_connections`), if limited.
    connections: Option<Arc<Semaphore>>,
}

impl Gate {
    fn new(
        model: Arc<str>,
        instance: u64,
        addr: SocketAddr,
        actor: mpsc::UnboundedSender<Msg>,
        max_connections: Option<usize>,
    ) -> Gate {
        let text = addr.to_string();
        Gate {
            state: AtomicUsize::new(OPEN),
            last_used: AtomicU64::new(0),
            epoch: Instant::now(),
            addr,
            authority: Authority::try_from(text.as_str())
                .unwrap_or_else(|_| Authority::from_static("127.0.0.1")),
            host: HeaderValue::try_from(text)
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            model,
            instance,
            actor,
            client: proxy::client(max_connections),
            connections: max_connections.map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_used.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last_used(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_used.load(Ordering::Relaxed))
    }

    fn leases(&self) -> usize {
        self.state.load(Ordering::Acquire) & !OPEN
    }

    /// Takes a lease if the gate is open.
    fn enter(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & OPEN == 0 {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.touch();
                    return true;
                }
                Err(now) => s = now,
            }
        }
    }

    /// Returns a lease; true if it was the last one of a closed gate.
    fn leave(&self) -> bool {
        // Touched first: whoever sees the count drop sees the new time.
        self.touch();
        self.state.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Closes the gate; returns the number of leases still out.
    fn close(&self) -> usize {
        self.state.fetch_and(!OPEN, Ordering::AcqRel) & !OPEN
    }

    /// Closes the gate only if no lease is out and none was taken or
    /// returned within `ttl`.
    fn close_if_idle(&self, ttl: Duration, now: Instant) -> bool {
        self.last_used() + ttl <= now
            && self
                .state
                .compare_exchange(OPEN, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

/// Gates of ready models by canonical name, read by requests without the
/// actor.
type Gates = Arc<RwLock<HashMap<Arc<str>, Arc<Gate>>>>;

fn gates_read(gates: &Gates, model: &str) -> Option<Arc<Gate>> {
    let map = match gates.read() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    map.get(model).cloned()
}

fn gates_write(gates: &Gates, f: impl FnOnce(&mut HashMap<Arc<str>, Arc<Gate>>)) {
    match gates.write() {
        Ok(mut map) => f(&mut map),
        Err(poisoned) => f(&mut poisoned.into_inner()),
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

    /// The child's `host:port` for a request URI.
    pub fn authority(&self) -> &Authority {
        &self.gate.authority
    }

    /// The child's `host:port` as a `Host` header.
    pub fn host(&self) -> &HeaderValue {
        &self.gate.host
    }

    /// The child's connection pool.
    pub fn client(&self) -> &UpstreamClient {
        &self.gate.client
    }

    /// Waits for one of the child's connection slots if it has a limit;
    /// hold the permit until the response is complete.
    pub async fn connection_permit(&self) -> Option<OwnedSemaphorePermit> {
        let slots = self.gate.connections.clone()?;
        slots.acquire_owned().await.ok()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.gate.leave() {
            let _ = self.gate.actor.send(Msg::Drained {
                model: self.gate.model.clone(),
                instance: self.gate.instance,
            });
        }
    }
}

/// One model's state as `ps` and `/health` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub aliases: Vec<String>,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub inflight: usize,
    pub waiting: usize,
    pub uptime_s: Option<f64>,
    pub idle_s: Option<f64>,
    pub starts: u64,
    pub last_error: Option<String>,
}

#[derive(Debug)]
enum Msg {
    Acquire {
        model: String,
        reply: oneshot::Sender<Result<Lease, AcquireError>>,
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
    /// Starts the actor for a config's models.
    pub fn start(config: &Config, observer: Observer) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let gates = Gates::default();
        let actor = Actor {
            gates: gates.clone(),
            limits: config.scheduler.clone(),
            slots: config
                .models
                .iter()
                .map(|m| (Arc::<str>::from(m.name.as_str()), Slot::new(m.clone())))
                .collect(),
            next_instance: 1,
            events_tx,
            self_tx: tx.clone(),
            shutdown: None,
            observer,
        };
        tokio::spawn(actor.run(rx, events_rx));
        Scheduler { tx, gates }
    }

    /// Waits until `model` (a canonical name) is ready and leases it.
    pub async fn acquire(&self, model: &str) -> Result<Lease, AcquireError> {
        if let Some(gate) = gates_read(&self.gates, model) {
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

    pub async fn status(&self) -> Vec<ModelStatus> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Status { reply }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stopped,
    Pending,
    Starting,
    Ready,
    Draining,
    Stopping,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Pending | Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining | Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }

    /// Occupies a place under `max_loaded`.
    fn is_loaded(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Draining | Phase::Stopping
        )
    }
}

type Waiter = oneshot::Sender<Result<Lease, AcquireError>>;

struct Slot {
    config: ModelConfig,
    phase: Phase,
    waiters: Vec<Waiter>,
    /// When it became Pending: starts are granted oldest first.
    pending_since: Instant,
    /// The current child's gate, from its Ready on; open only while Ready.
    gate: Option<Arc<Gate>>,
    /// Last use before the current gate (see [`Slot::last_used`]).
    last_used: Instant,
    child: Option<ChildHandle>,
    /// Identity of the current child; events and leases of older ones are
    /// ignored.
    instance: u64,
    pid: Option<u32>,
    ready_since: Option<Instant>,
    /// Consecutive failed starts or crashes.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    starts: u64,
    /// Removed from the config: goes away once its child has stopped.
    removed: bool,
    /// Why the current stop was asked for.
    stop_reason: Option<StopReason>,
}

impl Slot {
    fn new(config: ModelConfig) -> Slot {
        let now = Instant::now();
        Slot {
            config,
            phase: Phase::Stopped,
            waiters: Vec::new(),
            pending_since: now,
            gate: None,
            last_used: now,
            child: None,
            instance: 0,
            pid: None,
            ready_since: None,
            failures: 0,
            retry_at: None,
            last_error: None,
            starts: 0,
            removed: false,
            stop_reason: None,
        }
    }

    fn fail_waiters(&mut self, err: &AcquireError) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(err.clone()));
        }
    }

    /// Leases out on the current child (running phases only).
    fn inflight(&self) -> usize {
        match (&self.gate, self.phase) {
            (Some(g), Phase::Ready | Phase::Draining) => g.leases(),
            _ => 0,
        }
    }

    fn last_used(&self) -> Instant {
        match &self.gate {
            Some(g) => g.last_used().max(self.last_used),
            None => self.last_used,
        }
    }

    /// Closes the gate (no new leases); returns the leases still out.
    fn close_gate(&mut self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.close())
    }

    fn begin_stop(&mut self, why: StopReason) {
        tracing::info!(model = %self.config.name, reason = why.as_str(), "stopping model");
        self.close_gate();
        self.phase = Phase::Stopping;
        self.stop_reason = Some(why);
        if let Some(child) = &mut self.child {
            child.stop();
        }
    }

    fn status(&self, now: Instant) -> ModelStatus {
        let running = matches!(self.phase, Phase::Ready | Phase::Draining);
        ModelStatus {
            name: self.config.name.clone(),
            aliases: self.config.aliases.clone(),
            state: self.phase.name(),
            pid: self.pid.filter(|_| self.phase.is_loaded()),
            port: self
                .gate
                .as_ref()
                .filter(|_| running)
                .map(|g| g.addr.port()),
            inflight: self.inflight(),
            waiting: self.waiters.len(),
            uptime_s: self
                .ready_since
                .filter(|_| running)
                .map(|t| now.duration_since(t).as_secs_f64()),
            idle_s: (running && self.inflight() == 0).then(|| {
                now.saturating_duration_since(self.last_used())
                    .as_secs_f64()
            }),
            starts: self.starts,
            last_error: self.last_error.clone(),
        }
    }
}

/// Backoff before the next start after `failures` consecutive failures: the
/// first retry is immediate, then 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(5)).min(MAX_BACKOFF),
    }
}

/// A loaded model as the eviction planner sees it.
#[derive(Debug, Clone)]
pub struct Resident<'a> {
    pub name: &'a str,
    pub group: Option<&'a str>,
    /// Ready and accepting requests (only these can be chosen to go).
    pub ready: bool,
    /// Already draining or stopping.
    pub leaving: bool,
    pub busy: bool,
    pub last_used: Instant,
}

/// What a pending model needs before it can start.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'a> {
    Start,
    /// Drain and stop these first, then ask again.
    Evict(Vec<&'a str>),
    /// Nothing can be evicted yet (models still starting or leaving).
    Wait,
}

/// Decides whether a model of `group` can start beside `loaded`, or which
/// residents must go first: every ready model of the same group, and then
/// as many least recently used ready models as `max_loaded` requires, idle
/// ones before busy ones.
pub fn plan<'a>(group: Option<&str>, loaded: &[Resident<'a>], max_loaded: usize) -> Plan<'a> {
    let same_group = |r: &Resident<'_>| group.is_some() && r.group == group;
    if loaded.len() < max_loaded && !loaded.iter().any(same_group) {
        return Plan::Start;
    }
    let mut evict: Vec<&Resident<'a>> = loaded
        .iter()
        .filter(|r| same_group(r) && r.ready && !r.leaving)
        .collect();
    let staying = loaded
        .iter()
        .filter(|r| !r.leaving && !same_group(r))
        .count();
    let excess = (staying + 1).saturating_sub(max_loaded);
    let mut candidates: Vec<&Resident<'a>> = loaded
        .iter()
        .filter(|r| r.ready && !r.leaving && !same_group(r))
        .collect();
    candidates.sort_by_key(|r| (r.busy, r.last_used));
    evict.extend(candidates.into_iter().take(excess));
    if evict.is_empty() {
        Plan::Wait
    } else {
        Plan::Evict(evict.into_iter().map(|r| r.name).collect())
    }
}

struct Actor {
    gates: Gates,
    limits: SchedulerConfig,
    slots: HashMap<Arc<str>, Slot>,
    next_instance: u64,
    events_tx: mpsc::UnboundedSender<ChildEvent>,
    self_tx: mpsc::UnboundedSender<Msg>,
    /// Set once shutdown began: who to tell when the last child is gone.
    shutdown: Option<Vec<oneshot::Sender<()>>>,
    observer: Observer,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut events: mpsc::UnboundedReceiver<ChildEvent>,
    ) {
        loop {
            let ttl_deadline = self.next_ttl_deadline();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    // Every Scheduler handle is gone: nothing can ask again.
                    None => {
                        self.begin_shutdown();
                    }
                },
                Some(event) = events.recv() => self.on_child_event(event),
                _ = sleep_until_opt(ttl_deadline) => self.expire_idle(),
            }
            if self.shutdown.is_some() && self.slots.values().all(|s| s.child.is_none()) {
                for reply in self.shutdown.take().into_iter().flatten() {
                    let _ = reply.send(());
                }
                // Late requests still get an answer, not a hang.
                self.shutdown = Some(Vec::new());
                if rx.is_closed() {
                    return;
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire { model, reply } => self.acquire(&model, reply),
            Msg::Drained { model, instance } => self.drained(&model, instance),
            Msg::Stop { model, reply } => {
                let _ = reply.send(self.stop(&model));
            }
            Msg::Status { reply } => {
                let now = Instant::now();
                let mut list: Vec<ModelStatus> =
                    self.slots.values().map(|s| s.status(now)).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(list);
            }
            Msg::Reconfigure {
                limits,
                models,
                reply,
            } => {
                self.reconfigure(limits, models);
                let _ = reply.send(());
            }
            Msg::Shutdown { reply } => {
                self.begin_shutdown();
                if let Some(waiting) = &mut self.shutdown {
                    waiting.push(reply);
                }
            }
        }
    }

    /// A lease on a Ready slot's child.
    fn lease(slot: &Slot) -> Option<Lease> {
        let gate = slot.gate.as_ref().filter(|g| g.enter())?;
        Some(Lease { gate: gate.clone() })
    }

    fn acquire(&mut self, model: &str, reply: Waiter) {
        if self.shutdown.is_some() {
            let _ = reply.send(Err(AcquireError::ShuttingDown));
            return;
        }
        let Some(name) = self.slots.get_key_value(model).map(|(n, _)| n.clone()) else {
            let _ = reply.send(Err(AcquireError::Unknown(model.to_string())));
            return;
        };
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        match slot.phase {
            Phase::Ready => {
                // The gate opened after the requester looked.
                if let Some(lease) = Actor::lease(slot) {
                    if let Err(Ok(lease)) = reply.send(Ok(lease)) {
                        drop(lease); // the requester left; Release follows
                    }
                }
            }
            Phase::Pending | Phase::Starting | Phase::Draining | Phase::Stopping => {
                slot.waiters.push(reply);
            }
            Phase::Failed if slot.retry_at.is_some_and(|t| t > Instant::now()) => {
                let retry_after = slot.retry_at.map_or(Duration::ZERO, |t| {
                    t.saturating_duration_since(Instant::now())
                });
                let _ = reply.send(Err(AcquireError::BackingOff {
                    model: name.to_string(),
                    reason: slot.last_error.clone().unwrap_or_default(),
                    retry_after,
                }));
            }
            Phase::Stopped | Phase::Failed => {
                slot.waiters.push(reply);
                slot.phase = Phase::Pending;
                slot.pending_since = Instant::now();
                self.reconcile();
            }
        }
    }

    fn drained(&mut self, model: &str, instance: u64) {
        // Drains of children that are already gone are ignored.
        if let Some(slot) = current(&mut self.slots, model, instance) {
            if slot.phase == Phase::Draining {
                slot.begin_stop(slot.stop_reason.unwrap_or(StopReason::Evicted));
            }
        }
    }

    fn stop(&mut self, model: &str) -> Option<bool> {
        let slot = self.slots.get_mut(model)?;
        Some(match slot.phase {
            Phase::Ready | Phase::Starting => {
                retire(slot, StopReason::Admin);
                true
            }
            Phase::Pending => {
                slot.phase = Phase::Stopped;
                slot.fail_waiters(&AcquireError::Stopped {
                    model: model.to_string(),
                    reason: "stopped by admin".into(),
                });
                false
            }
            Phase::Draining | Phase::Stopping => true,
            Phase::Stopped | Phase::Failed => false,
        })
    }

    fn reconfigure(&mut self, limits: SchedulerConfig, models: Vec<ModelConfig>) {
        self.limits = limits;
        let mut keep = std::collections::HashSet::new();
        for config in models {
            let name: Arc<str> = Arc::from(config.name.as_str());
            keep.insert(name.clone());
            match self.slots.get_mut(&name) {
                None => {
                    tracing::info!(model = %name, "model added by reload");
                    self.slots.insert(name, Slot::new(config));
                }
                Some(slot) => {
                    let restart = slot.config.launch_differs(&config) && slot.child.is_some();
                    slot.config = config;
                    slot.removed = false;
                    if restart {
                        tracing::info!(model = %name, "model changed by reload; restarting it once idle");
                        retire(slot, StopReason::Reload);
                    }
                }
            }
        }
        let removed: Vec<Arc<str>> = self
            .slots
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in removed {
            let Some(slot) = self.slots.get_mut(&name) else {
                continue;
            };
            tracing::info!(model = %name, "model removed by reload");
            slot.removed = true;
            slot.fail_waiters(&AcquireError::Unknown(name.to_string()));
            if slot.child.is_some() {
                retire(slot, StopReason::Reload);
            } else {
                self.remove_slot(&name);
            }
        }
        self.reconcile();
    }

    fn remove_slot(&mut self, name: &str) {
        self.slots.remove(name);
        gates_write(&self.gates, |map| {
            map.remove(name);
        });
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(Vec::new());
        for slot in self.slots.values_mut() {
            slot.fail_waiters(&AcquireError::ShuttingDown);
            match slot.phase {
                Phase::Starting | Phase::Ready | Phase::Draining => {
                    slot.begin_stop(StopReason::Shutdown)
                }
                Phase::Pending => slot.phase = Phase::Stopped,
                _ => {}
            }
        }
    }

    fn on_child_event(&mut self, event: ChildEvent) {
        match event {
            ChildEvent::Ready {
                model,
                instance,
                addr,
                pid,
                load_time,
            } => {
                let Some(slot) = current(&mut self.slots, &model, instance)
                    .filter(|s| s.phase == Phase::Starting)
                else {
                    return; // a stop was requested meanwhile; Exited follows
                };
                tracing::info!(model = %model, load_ms = load_time.as_millis() as u64,
                    waiting = slot.waiters.len(), "model ready");
                slot.phase = Phase::Ready;
                slot.pid = Some(pid);
                let load_ms = load_time.as_secs_f64() * 1000.0;
                self.observer
                    .metrics
                    .observe_start(&model, true, Some(load_time.as_secs_f64()));
                self.observer.event(&model, "ready", |e| {
                    e.load_ms = Some(load_ms);
                    e.pid = Some(pid);
                    e.rss_bytes = crate::metrics::pid_figures(pid).map(|(rss, _)| rss);
                });
                slot.ready_since = Some(Instant::now());
                slot.last_error = None;
                let gate = Arc::new(Gate::new(
                    model.clone(),
                    instance,
                    addr,
                    self.self_tx.clone(),
                    slot.config.max_connections,
                ));
                slot.gate = Some(gate.clone());
                gates_write(&self.gates, |map| {
                    map.insert(model.clone(), gate);
                });
                let waiters = std::mem::take(&mut slot.waiters);
                for w in waiters {
                    if let Some(lease) = Actor::lease(slot) {
                        let _ = w.send(Ok(lease));
                    }
                }
            }
            ChildEvent::StartFailed {
                model,
                instance,
                reason,
            } => {
                let Some(slot) = current(&mut self.slots, &model, instance) else {
                    return;
                };
                slot.child = None;
                slot.pid = None;
                slot.failures += 1;
                slot.last_error = Some(reason.clone());
                self.observer.metrics.observe_start(&model, false, None);
                self.observer
                    .event(&model, "start_failed", |e| e.reason = Some(reason.clone()));
                slot.retry_at = Some(Instant::now() + backoff(slot.failures));
                slot.phase = Phase::Failed;
                slot.fail_waiters(&AcquireError::StartFailed {
                    model: model.to_string(),
                    reason,
                });
                if slot.removed {
                    self.remove_slot(&model);
                }
            }
            ChildEvent::Exited {
                model,
                instance,
                reason,
            } => {
                let Some(slot) = current(&mut self.slots, &model, instance) else {
                    return;
                };
                slot.child = None;
                slot.close_gate();
                slot.last_used = slot.last_used();
                let pid = slot.pid;
                let stop_reason = slot.stop_reason.take();
                self.observer.event(
                    &model,
                    if reason == ExitReason::Stopped {
                        "stopped"
                    } else {
                        "crashed"
                    },
                    |e| {
                        e.pid = pid;
                        (e.reason, e.exit_status) = match &reason {
                            ExitReason::Stopped => {
                                (stop_reason.map(|r| r.as_str().to_string()), None)
                            }
                            ExitReason::Crashed(why) => (Some("crash".into()), Some(why.clone())),
                            ExitReason::Unhealthy(why) => {
                                (Some("health".into()), Some(why.clone()))
                            }
                        };
                    },
                );
                if slot.removed {
                    self.remove_slot(&model);
                    if self.shutdown.is_none() {
                        self.reconcile();
                    }
                    return;
                }
                let ran = slot.ready_since.map(|t| t.elapsed());
                match reason {
                    ExitReason::Stopped => {
                        if ran.is_some() {
                            slot.failures = 0;
                        }
                        slot.phase = if slot.waiters.is_empty() {
                            Phase::Stopped
                        } else {
                            slot.pending_since = Instant::now();
                            Phase::Pending
                        };
                    }
                    ExitReason::Crashed(why) | ExitReason::Unhealthy(why) => {
                        if ran.is_some_and(|r| r >= STABLE_UPTIME) {
                            slot.failures = 0;
                        }
                        slot.failures += 1;
                        slot.retry_at = Some(Instant::now() + backoff(slot.failures));
                        slot.last_error = Some(why.clone());
                        slot.phase = Phase::Failed;
                        if !slot.waiters.is_empty() {
                            if backoff(slot.failures).is_zero() {
                                slot.phase = Phase::Pending;
                                slot.pending_since = Instant::now();
                            } else {
                                slot.fail_waiters(&AcquireError::Stopped {
                                    model: model.to_string(),
                                    reason: why,
                                });
                            }
                        }
                    }
                }
            }
        }
        if self.shutdown.is_none() {
            self.reconcile();
        }
    }

    /// Starts pending models where capacity allows, evicting as needed.
    fn reconcile(&mut self) {
        let mut pending: Vec<(Instant, Arc<str>)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.phase == Phase::Pending)
            .map(|(n, s)| (s.pending_since, n.clone()))
            .collect();
        pending.sort();
        for (_, name) in pending {
            let group = self.slots.get(&name).and_then(|s| s.config.group.clone());
            let decision = {
                let loaded: Vec<Resident<'_>> = self
                    .slots
                    .iter()
                    .filter(|(_, s)| s.phase.is_loaded())
                    .map(|(n, s)| Resident {
                        name: n,
                        group: s.config.group.as_deref(),
                        ready: s.phase == Phase::Ready,
                        leaving: matches!(s.phase, Phase::Draining | Phase::Stopping),
                        busy: s.inflight() > 0,
                        last_used: s.last_used(),
                    })
                    .collect();
                match plan(group.as_deref(), &loaded, self.limits.max_loaded) {
                    Plan::Start => None,
                    Plan::Wait => Some(Vec::new()),
                    Plan::Evict(names) => Some(names.into_iter().map(Arc::<str>::from).collect()),
                }
            };
            match decision {
                None => self.start_child(&name),
                Some(victims) => {
                    for victim in victims {
                        if let Some(v) = self.slots.get_mut(&victim) {
                            tracing::info!(model = %victim, for_model = %name, inflight = v.inflight(),
                                "evicting model to make room");
                            retire(v, StopReason::Evicted);
                        }
                    }
                }
            }
        }
    }

    fn start_child(&mut self, name: &Arc<str>) {
        let instance = self.next_instance;
        self.next_instance += 1;
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let spec = ChildSpec {
            model: name.clone(),
            instance,
            argv: slot.config.argv.clone(),
            env: slot.config.env.clone(),
            health_path: slot.config.health.clone(),
            start_timeout: self.limits.start_timeout,
            stop_grace: self.limits.stop_grace,
            health_interval: self.limits.health_interval,
        };
        self.observer.event(name, "start_requested", |_| {});
        slot.phase = Phase::Starting;
        slot.instance = instance;
        slot.gate = None;
        slot.ready_since = None;
        slot.starts += 1;
        slot.child = Some(supervisor::spawn(spec, self.events_tx.clone()));
    }

    /// When the next idle TTL may run out. Leases come and go without the
    /// actor, so this is a time to look again: a model busy now is looked
    /// at one TTL later (by then its last use has moved on, or it is still
    /// busy).
    fn next_ttl_deadline(&self) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        self.slots
            .values()
            .filter(|s| s.phase == Phase::Ready)
            .filter_map(|s| {
                let ttl = s.config.ttl?;
                Some(if s.inflight() > 0 {
                    now + ttl
                } else {
                    s.last_used() + ttl
                })
            })
            .min()
            .map(tokio::time::Instant::from_std)
    }

    fn expire_idle(&mut self) {
        let now = Instant::now();
        for slot in self.slots.values_mut() {
            let expired = slot.phase == Phase::Ready
                && slot.config.ttl.is_some_and(|ttl| {
                    slot.gate
                        .as_ref()
                        .is_some_and(|g| g.close_if_idle(ttl, now))
                });
            if expired {
                slot.begin_stop(StopReason::Ttl);
            }
        }
    }
}

/// The slot of `model` if `instance` is still its current child: events
/// from children that were already replaced are ignored.
fn current<'a>(
    slots: &'a mut HashMap<Arc<str>, Slot>,
    model: &str,
    instance: u64,
) -> Option<&'a mut Slot> {
    slots.get_mut(model).filter(|s| s.instance == instance)
}

/// Stops a model's child now if idle, else after its last request; new
/// requests wait for the restart.
fn retire(slot: &mut Slot, why: StopReason) {
    match slot.phase {
        Phase::Ready => match slot.close_gate() {
            0 => slot.begin_stop(why),
            inflight => {
                tracing::info!(model = %slot.config.name, inflight, reason = why.as_str(),
                    "draining model before stopping it");
                slot.phase = Phase::Draining;
                slot.stop_reason = Some(why);
            }
        },
        Phase::Starting => slot.begin_stop(why),
        _ => {}
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r<'a>(name: &'a str, group: Option<&'a str>, busy: bool, age_s: u64) -> Resident<'a> {
        Resident {
            name,
            group,
            ready: true,
            leaving: false,
            busy,
            last_used: Instant::now() - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn starts_when_there_is_room() {
        assert_eq!(plan(None, &[], 1), Plan::Start);
        assert_eq!(plan(None, &[r("a", None, false, 1)], 2), Plan::Start);
    }

    #[test]
    fn evicts_least_recently_used_idle_first() {
        let loaded = [
            r("old-busy", None, true, 100),
            r("new-idle", None, false, 1),
            r("old-idle", None, false, 50),
        ];
        assert_eq!(plan(None, &loaded, 3), Plan::Evict(vec!["old-idle"]));
        assert_eq!(
            plan(None, &loaded, 2),
            Plan::Evict(vec!["old-idle", "new-idle"])
        );
        // Only busy ones left: the least recently used is drained.
        assert_eq!(plan(None, &loaded[..1], 1), Plan::Evict(vec!["old-busy"]));
    }

    #[test]
    fn same_group_is_exclusive_regardless_of_max_loaded() {
        let loaded = [r("a", Some("g"), false, 1), r("b", None, false, 100)];
        assert_eq!(plan(Some("g"), &loaded, 10), Plan::Evict(vec!["a"]));
        assert_eq!(plan(Some("other"), &loaded, 10), Plan::Start);
    }

    #[test]
    fn waits_while_residents_are_starting_or_leaving() {
        let mut starting = r("s", None, false, 1);
        starting.ready = false;
        assert_eq!(plan(None, &[starting.clone()], 1), Plan::Wait);
        let mut leaving = r("l", None, false, 1);
        leaving.leaving = true;
        assert_eq!(
            plan(None, &[leaving], 1),
            Plan::Wait,
            "no second eviction while one is under way"
        );
        let mut g = starting;
        g.group = Some("g");
        assert_eq!(plan(Some("g"), &[g], 5), Plan::Wait);
    }

    fn gate() -> (Arc<Gate>, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = SocketAddr::from(([127, 0, 0, 1], 4321));
        (Arc::new(Gate::new(Arc::from("m"), 7, addr, tx, None)), rx)
    }

    #[test]
    fn gate_admits_while_open_and_reports_the_last_lease_of_a_drain() {
        let (g, mut rx) = gate();
        assert_eq!(g.authority.as_str(), "127.0.0.1:4321");
        assert!(g.enter());
        let a = Lease { gate: g.clone() };
        assert!(g.enter());
        let b = Lease { gate: g.clone() };
        assert_eq!(g.leases(), 2);
        assert_eq!(g.close(), 2, "closing reports the leases still out");
        assert!(!g.enter(), "a closed gate admits no one");
        drop(a);
        assert!(rx.try_recv().is_err(), "one lease is still out");
        drop(b);
        match rx.try_recv() {
            Ok(Msg::Drained { model, instance }) => assert_eq!((&*model, instance), ("m", 7)),
            other => panic!("expected Drained, got {other:?}"),
        }
        assert_eq!(g.leases(), 0);
    }

    #[test]
    fn an_open_gate_says_nothing_when_leases_come_back() {
        let (g, mut rx) = gate();
        for _ in 0..3 {
            assert!(g.enter());
            drop(Lease { gate: g.clone() });
        }
        assert!(rx.try_recv().is_err());
        assert_eq!(g.close(), 0);
    }

    #[test]
    fn idle_close_needs_no_leases_and_a_full_ttl() {
        let (g, _rx) = gate();
        let ttl = Duration::from_secs(60);
        let now = Instant::now();
        assert!(!g.close_if_idle(ttl, now), "just used");
        assert!(g.enter());
        let later = now + Duration::from_secs(120);
        assert!(!g.close_if_idle(ttl, later), "a lease is out");
        drop(Lease { gate: g.clone() });
        assert!(g.close_if_idle(ttl, later + ttl));
        assert!(!g.enter());
    }

    #[test]
    fn racing_leases_and_a_close_drain_exactly_once() {
        for _ in 0..50 {
            let (g, mut rx) = gate();
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let mut held = 0;
                        for _ in 0..2000 {
                            if g.enter() {
                                held += 1;
                                drop(Lease { gate: g.clone() });
                            }
                        }
                        held
                    })
                })
                .collect();
            std::thread::yield_now();
            let out = g.close();
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(g.leases(), 0);
            let drained = std::iter::from_fn(|| rx.try_recv().ok()).count();
            assert_eq!(drained, usize::from(out > 0), "{out} leases out at close");
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(50), MAX_BACKOFF);
    }
}
