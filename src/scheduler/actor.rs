//! The scheduler's run loop: the one owner of every model's [`Slot`].
//!
//! The actor reacts to one message at a time (see the state table in
//! [`super`]); children come from a [`Spawner`], time from tokio's clock,
//! and everything it has to say goes out on the event bus: lifecycle steps
//! as [`ModelEvent`]s, and a [`Event::State`] whenever a model's public
//! state changes (compared once per message, so a burst of transitions in
//! one step shows only where it ended), and an [`Event::Progress`] for each
//! Starting model every [`PROGRESS_PERIOD`] and once at its Ready.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::gate::{Gate, Gates};
use super::planner::{mib, place, plan, Occupant, Placement, Plan, Resident, Room, Rule};
use super::{
    AcquireError, KeepAlive, Lease, ModelState, ModelStatus, Msg, Progress, Reply, Waiter,
    LOAD_TIMES_KEPT, PROGRESS_PERIOD, VRAM_RUNS_KEPT,
};
use crate::config::{Config, ModelConfig, SchedulerConfig, CUDA_VISIBLE_DEVICES};
use crate::events::{Bus, Event, LoadProgress, ModelEvent, ModelEventKind, Reason};
use crate::gpu::{Gpus, Snapshot};
use crate::supervisor::{ChildEvent, ChildHandle, ChildSpec, ExitReason, Spawner, StartFailure};
use crate::upstream::Upstream;

/// Starts the actor task for `config`'s models.
pub(super) fn spawn(
    config: &Config,
    bus: Bus,
    spawner: Arc<dyn Spawner>,
    gpus: Gpus,
    gates: Gates,
    self_tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let readings = gpus.subscribe();
    let snapshot = readings.borrow().clone();
    let actor = Actor {
        snapshot,
        snapshots: 0,
        gone: Vec::new(),
        readings,
        gpus,
        gates,
        limits: config.scheduler.clone(),
        slots: config
            .models
            .iter()
            .map(|m| (Arc::<str>::from(m.name.as_str()), Slot::new(m.clone())))
            .collect(),
        next_instance: 1,
        swap_due: None,
        next_progress: Instant::now(),
        events_tx,
        self_tx,
        shutdown: None,
        bus,
        spawner,
    };
    let mut actor = actor;
    for name in actor.slots.keys().cloned().collect::<Vec<_>>() {
        actor.estimate(&name);
    }
    tokio::spawn(actor.run(rx, events_rx));
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

    /// As stored with the `stopped` event.
    fn reason(self) -> Reason {
        match self {
            StopReason::Ttl => Reason::Ttl,
            StopReason::Evicted => Reason::Evicted,
            StopReason::Admin => Reason::Admin,
            StopReason::Shutdown => Reason::Shutdown,
            StopReason::Reload => Reason::Reload,
        }
    }
}

/// A model that ran at least this long before crashing starts its backoff
/// over.
const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// Upper bound of the restart backoff after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a child that went away may still be listed in GPU readings
/// before placement stops waiting for it to vanish (a process the driver
/// keeps listing, say).
const GONE_LISTED_AT_MOST: Duration = Duration::from_secs(10);
/// While a swap waits for a busy model, how often the actor looks again
/// whether it has gone idle.
const SWAP_RECHECK: Duration = Duration::from_millis(100);
/// An idle TTL shorter than this is not polled while the model is busy:
/// its gate reports the last lease instead (`Msg::Idle`), so a zero TTL
/// stops the model the moment it goes idle without a timer spinning.
const WATCH_IDLE_BELOW: Duration = Duration::from_secs(1);

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
    /// What operators see.
    fn state(self) -> ModelState {
        match self {
            Phase::Stopped => ModelState::Stopped,
            Phase::Pending | Phase::Starting => ModelState::Starting,
            Phase::Ready => ModelState::Ready,
            Phase::Draining | Phase::Stopping => ModelState::Stopping,
            Phase::Failed => ModelState::Failed,
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
    /// A start without a waiter is wanted (preload): Pending is not pruned
    /// back to Stopped. Cleared at Ready, a failed start, a crash, an
    /// admin stop and shutdown.
    preloading: bool,
    /// The idle TTL set at run time, over `config.ttl`; dropped when a
    /// reload changes `config.ttl`.
    keep_alive: Option<KeepAlive>,
    /// Why the current stop was asked for.
    stop_reason: Option<StopReason>,
    /// The state last published on the bus.
    shown: Option<ModelState>,
    /// When the current child was spawned (Starting only).
    starting_since: Option<Instant>,
    /// The current child's own load fraction, if it printed one.
    child_fraction: Option<f64>,
    /// The last successful load times, oldest first, at most
    /// [`LOAD_TIMES_KEPT`].
    load_times: VecDeque<Duration>,
    /// The waiter count last published on the bus.
    shown_waiting: usize,
    /// The GPU the current child was placed on.
    gpu: Option<u32>,
    /// GPU memory of the current child's process tree, last reading.
    vram_now: u64,
    /// The most it used in the current run.
    vram_peak: u64,
    /// The peak of its last runs (this daemon's or, seeded, from history),
    /// oldest first, at most [`VRAM_RUNS_KEPT`].
    vram_runs: VecDeque<u64>,
    /// The estimate from its GGUF: `None` until worked out (off the
    /// actor), `Some(None)` where there is none.
    estimate: Option<Option<u64>>,
    /// The measurement of this run already exceeded `vram_mb` (warned).
    warned_over: bool,
    /// This pending start already made room once after running out of
    /// memory.
    oom_retried: bool,
    /// GPU readings received when it became Pending: it is placed by a
    /// later (fresh) one.
    pending_reading: u64,
    /// A reading taken since its Ready has measured it (until then it is
    /// taken to hold its whole need).
    measured_ready: bool,
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
            preloading: false,
            keep_alive: None,
            stop_reason: None,
            shown: None,
            starting_since: None,
            child_fraction: None,
            load_times: VecDeque::new(),
            shown_waiting: 0,
            gpu: None,
            vram_now: 0,
            vram_peak: 0,
            vram_runs: VecDeque::new(),
            estimate: None,
            warned_over: false,
            oom_retried: false,
            pending_reading: 0,
            measured_ready: false,
        }
    }

    /// The GPU memory it is taken to need, and where that comes from:
    /// `vram_mb`, else the most it used in its recent runs (this one
    /// included), else the GGUF estimate.
    fn vram_need(&self) -> Option<(u64, &'static str)> {
        if let Some(declared) = self.config.vram_bytes {
            return Some((declared, "declared"));
        }
        let measured = self
            .vram_runs
            .iter()
            .copied()
            .chain(Some(self.vram_peak))
            .max()
            .filter(|b| *b > 0);
        if let Some(m) = measured {
            return Some((m, "measured"));
        }
        self.estimate.flatten().map(|e| (e, "estimated"))
    }

    /// The GPUs it may go on: its `gpus`, or the numeric list of its own
    /// `CUDA_VISIBLE_DEVICES`.
    fn allowed_gpus(&self) -> Option<Vec<u32>> {
        if let Some(g) = &self.config.gpus {
            return Some(g.clone());
        }
        let (_, own) = self
            .config
            .env
            .iter()
            .find(|(k, _)| k == CUDA_VISIBLE_DEVICES)?;
        own.split(',').map(|g| g.trim().parse().ok()).collect()
    }

    /// The highest priority and the earliest wait among live waiters.
    fn queue_head(&self) -> Option<(i32, Instant)> {
        let live = self.waiters.iter().filter(|w| !w.is_closed());
        let priority = live.clone().map(|w| w.priority).max()?;
        let since = live.map(|w| w.since).min()?;
        Some((priority, since))
    }

    /// Ends the current run's GPU measurement: its peak joins the learned
    /// need. The caller marks the readings stale.
    fn end_vram_run(&mut self) {
        if self.vram_peak > 0 {
            if self.vram_runs.len() == VRAM_RUNS_KEPT {
                self.vram_runs.pop_front();
            }
            self.vram_runs.push_back(self.vram_peak);
        }
        self.vram_now = 0;
        self.vram_peak = 0;
        self.warned_over = false;
        self.gpu = None;
    }

    /// The median of the kept load times.
    fn expected_load(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.load_times.iter().copied().collect();
        times.sort();
        let n = times.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(times[n / 2]),
            _ => Some((times[n / 2 - 1] + times[n / 2]) / 2),
        }
    }

    fn remember_load(&mut self, took: Duration) {
        if self.load_times.len() == LOAD_TIMES_KEPT {
            self.load_times.pop_front();
        }
        self.load_times.push_back(took);
    }

    /// Progress of the current start, if Starting.
    fn progress(&self, now: Instant) -> Option<Progress> {
        let since = self
            .starting_since
            .filter(|_| self.phase == Phase::Starting)?;
        let elapsed = now.saturating_duration_since(since);
        let expected = self.expected_load();
        let estimate = expected
            .filter(|e| !e.is_zero())
            .map(|e| (elapsed.as_secs_f64() / e.as_secs_f64()).min(0.99));
        Some(Progress {
            elapsed_ms: millis(elapsed),
            expected_ms: expected.map(millis),
            fraction: self.child_fraction.or(estimate),
        })
    }

    /// The idle TTL in force; `None` = never.
    fn ttl(&self) -> Option<Duration> {
        match self.keep_alive {
            Some(keep) => keep.ttl(),
            None => self.config.ttl,
        }
    }

    /// Whether the TTL is too short to poll (see [`WATCH_IDLE_BELOW`]).
    fn watches_idle(&self) -> bool {
        self.ttl().is_some_and(|t| t < WATCH_IDLE_BELOW)
    }

    /// Tells the current gate whether to report its last lease.
    fn sync_idle_watch(&self) {
        if let Some(g) = &self.gate {
            g.watch_idle(self.watches_idle());
        }
    }

    /// Asks for a start with no one waiting (a preload), unless the model
    /// is already on its way up or running.
    fn begin_preload(&mut self) {
        self.preloading = true;
        if matches!(self.phase, Phase::Stopped | Phase::Failed) {
            tracing::info!(model = %self.config.name, "preloading model");
            self.phase = Phase::Pending;
            self.pending_since = Instant::now();
        }
    }

    /// Drops waiters whose requester has gone; true if any are left.
    fn prune_waiters(&mut self) -> bool {
        self.waiters.retain(|w| !w.is_closed());
        !self.waiters.is_empty()
    }

    fn fail_waiters(&mut self, err: &AcquireError) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(err.clone()));
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
            state: self.phase.state(),
            pid: self.pid.filter(|_| self.phase.is_loaded()),
            port: self
                .gate
                .as_ref()
                .filter(|_| running)
                .and_then(|g| g.upstream.addr().port()),
            socket: self
                .gate
                .as_ref()
                .filter(|_| running)
                .and_then(|g| g.upstream.addr().socket().map(Into::into)),
            inflight: self.inflight(),
            waiting: self.waiters.iter().filter(|w| !w.is_closed()).count(),
            uptime_s: self
                .ready_since
                .filter(|_| running)
                .map(|t| now.duration_since(t).as_secs_f64()),
            idle_s: (running && self.inflight() == 0).then(|| {
                now.saturating_duration_since(self.last_used())
                    .as_secs_f64()
            }),
            ttl_s: self.ttl().map(|t| t.as_secs_f64()),
            pinned: self.config.pin,
            starts: self.starts,
            last_error: self.last_error.clone(),
            progress: self.progress(now),
            load_ms: self.load_times.back().copied().map(millis),
            gpu: self.gpu.filter(|_| self.phase.is_loaded()),
            vram_bytes: (self.phase.is_loaded() && self.gpu.is_some()).then_some(self.vram_now),
            vram_need_bytes: self.vram_need().map(|(b, _)| b),
            vram_need_source: self.vram_need().map(|(_, s)| s),
            waiting_priority: self.queue_head().map(|(p, _)| p),
            rss_bytes: self
                .pid
                .filter(|_| self.phase.is_loaded())
                .and_then(crate::procfs::pid_figures)
                .and_then(|(rss, _)| u64::try_from(rss).ok()),
        }
    }
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn progress_event(model: &str, p: Progress) -> Event {
    Event::Progress(Arc::new(LoadProgress {
        model: model.to_string(),
        elapsed_ms: p.elapsed_ms,
        expected_ms: p.expected_ms,
        fraction: p.fraction,
    }))
}

/// Backoff before the next start after `failures` consecutive failures: the
/// first retry is immediate, then 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(5)).min(MAX_BACKOFF),
    }
}

struct Actor {
    gates: Gates,
    /// Where GPU readings come from (none without NVML).
    gpus: Gpus,
    readings: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    /// The last GPU reading.
    snapshot: Option<Arc<Snapshot>>,
    /// GPU readings received so far.
    snapshots: u64,
    /// Children that went away while readings exist, with when: their
    /// memory shows in readings (one may have been under way as they
    /// went) until one no longer lists them, so placement waits for that.
    gone: Vec<(u32, Instant)>,
    limits: SchedulerConfig,
    slots: HashMap<Arc<str>, Slot>,
    next_instance: u64,
    /// When the Starting models' progress next goes out.
    next_progress: Instant,
    events_tx: mpsc::UnboundedSender<ChildEvent>,
    self_tx: mpsc::UnboundedSender<Msg>,
    /// When a swap held back for a busy model is looked at again: its
    /// fairness bound, or sooner to see whether the model went idle (set by
    /// each reconcile).
    swap_due: Option<Instant>,
    /// Set once shutdown began: who to tell when the last child is gone.
    shutdown: Option<Vec<oneshot::Sender<()>>>,
    bus: Bus,
    spawner: Arc<dyn Spawner>,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut events: mpsc::UnboundedReceiver<ChildEvent>,
    ) {
        self.publish_states();
        let mut readings_open = true;
        loop {
            let ttl_deadline = self.next_ttl_deadline();
            let progress_deadline = self.next_progress_deadline();
            let swap_deadline = self.next_swap_deadline();
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
                _ = sleep_until_opt(progress_deadline) => self.emit_progress(),
                _ = sleep_until_opt(swap_deadline) => {
                    if self.shutdown.is_none() {
                        self.reconcile();
                    }
                }
                changed = self.readings.changed(), if readings_open => match changed {
                    Ok(()) => {
                        let snapshot = self.readings.borrow_and_update().clone();
                        self.on_reading(snapshot);
                    }
                    Err(_) => readings_open = false,
                },
            }
            self.publish_states();
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

    /// When progress is next due: only while a model is Starting.
    fn next_progress_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .any(|s| s.phase == Phase::Starting)
            .then_some(self.next_progress)
    }

    /// Sends every Starting model's progress.
    fn emit_progress(&mut self) {
        let now = Instant::now();
        self.next_progress = now + PROGRESS_PERIOD;
        for (name, slot) in &self.slots {
            if let Some(p) = slot.progress(now) {
                self.bus.emit(progress_event(name, p));
            }
        }
    }

    /// Emits the state, and the number of requests waiting, of every
    /// model where they changed since they were last shown. The count is
    /// of waiters held, a client that left among them until the next
    /// prune: counting live ones would cost a pass over the queue per
    /// message.
    fn publish_states(&mut self) {
        for (name, slot) in &mut self.slots {
            let state = slot.phase.state();
            if slot.shown != Some(state) {
                slot.shown = Some(state);
                self.bus.emit(Event::State {
                    model: name.clone(),
                    state,
                });
            }
            let waiting = slot.waiters.len();
            if slot.shown_waiting != waiting {
                slot.shown_waiting = waiting;
                self.bus.emit(Event::Queue {
                    model: name.clone(),
                    waiting,
                });
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire {
                model,
                priority,
                reply,
            } => self.acquire(&model, priority, reply),
            Msg::Drained { model, instance } => self.drained(&model, instance),
            Msg::Left { model } => {
                if let Some(slot) = self.slots.get_mut(model.as_str()) {
                    let anyone = slot.prune_waiters();
                    if slot.phase == Phase::Pending && !anyone && !slot.preloading {
                        tracing::debug!(model = %model, "every request waiting for the model has gone; not starting it");
                        slot.phase = Phase::Stopped;
                        slot.oom_retried = false;
                    }
                }
            }
            Msg::Idle { model, instance } => {
                if current(&mut self.slots, &model, instance).is_some() {
                    self.expire_idle();
                }
            }
            Msg::Stop { model, reply } => {
                let _ = reply.send(self.stop(&model));
            }
            Msg::Preload => self.preload(),
            Msg::SetKeepAlive { model, keep, reply } => {
                let _ = reply.send(self.set_keep_alive(&model, keep));
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
            Msg::SeedVram { peaks } => {
                for (model, runs) in peaks {
                    if let Some(slot) = self.slots.get_mut(model.as_str()) {
                        if slot.vram_runs.is_empty() {
                            let skip = runs.len().saturating_sub(VRAM_RUNS_KEPT);
                            slot.vram_runs.extend(runs.into_iter().skip(skip));
                        }
                    }
                }
            }
            Msg::Estimated { model, bytes } => {
                if let Some(slot) = self.slots.get_mut(model.as_str()) {
                    slot.estimate = Some(bytes);
                }
                if self.shutdown.is_none() {
                    self.reconcile();
                }
            }
            Msg::SeedLoadTimes { loads } => {
                for (model, times) in loads {
                    if let Some(slot) = self.slots.get_mut(model.as_str()) {
                        if slot.load_times.is_empty() {
                            let skip = times.len().saturating_sub(LOAD_TIMES_KEPT);
                            for t in times.into_iter().skip(skip) {
                                slot.remember_load(t);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A lease on a Ready slot's child.
    fn lease(slot: &Slot) -> Option<Lease> {
        let gate = slot.gate.as_ref().filter(|g| g.enter())?;
        Some(Lease { gate: gate.clone() })
    }

    fn acquire(&mut self, model: &str, priority: i32, reply: Reply) {
        if self.shutdown.is_some() {
            let _ = reply.send(Err(AcquireError::ShuttingDown));
            return;
        }
        let Some(name) = self.slots.get_key_value(model).map(|(n, _)| n.clone()) else {
            let _ = reply.send(Err(AcquireError::Unknown(model.to_string())));
            return;
        };
        let ready = self
            .slots
            .get(&name)
            .is_some_and(|s| s.phase == Phase::Ready);
        if !ready {
            if let Some(full) = self.queue_full() {
                let _ = reply.send(Err(full));
                return;
            }
        }
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        let waiter = Waiter {
            reply,
            since: Instant::now(),
            priority: priority.saturating_add(slot.config.priority),
        };
        match slot.phase {
            Phase::Ready => {
                // The gate opened after the requester looked.
                if let Some(lease) = Actor::lease(slot) {
                    if let Err(Ok(lease)) = waiter.reply.send(Ok(lease)) {
                        drop(lease); // the requester left; Release follows
                    }
                }
            }
            Phase::Pending | Phase::Starting | Phase::Draining | Phase::Stopping => {
                slot.waiters.push(waiter);
            }
            Phase::Failed if slot.retry_at.is_some_and(|t| t > Instant::now()) => {
                let retry_after = slot.retry_at.map_or(Duration::ZERO, |t| {
                    t.saturating_duration_since(Instant::now())
                });
                let _ = waiter.reply.send(Err(AcquireError::BackingOff {
                    model: name.to_string(),
                    reason: slot.last_error.clone().unwrap_or_default(),
                    retry_after,
                }));
            }
            Phase::Stopped | Phase::Failed => {
                slot.waiters.push(waiter);
                self.make_pending(&name);
                self.reconcile();
            }
        }
    }

    /// Refuses a new waiter when `max_queue` are already waiting (those
    /// whose client left are dropped first).
    fn queue_full(&mut self) -> Option<AcquireError> {
        let limit = self.limits.max_queue;
        let count = |slots: &HashMap<Arc<str>, Slot>| -> usize {
            slots.values().map(|s| s.waiters.len()).sum()
        };
        if count(&self.slots) < limit {
            return None;
        }
        for slot in self.slots.values_mut() {
            slot.waiters.retain(|w| !w.is_closed());
        }
        let waiting = count(&self.slots);
        (waiting >= limit).then(|| AcquireError::QueueFull {
            waiting,
            retry_after: self
                .slots
                .values()
                .filter(|s| !s.waiters.is_empty())
                .filter_map(Slot::expected_load)
                .min()
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_secs(1)),
        })
    }

    /// A model with waiters (or a preload) and no child: it is placed by
    /// the next GPU reading, so the memory it is placed by is fresh.
    fn make_pending(&mut self, name: &str) {
        let fresh = self.snapshots;
        if let Some(slot) = self.slots.get_mut(name) {
            slot.phase = Phase::Pending;
            slot.pending_since = Instant::now();
            slot.pending_reading = fresh;
        }
        if self.snapshot.is_some() {
            self.gpus.refresh();
        }
    }

    /// Works out a model's GGUF estimate off the actor (header reads
    /// block); `Msg::Estimated` brings it back.
    fn estimate(&mut self, name: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let Some(path) = slot.config.model_path.clone() else {
            slot.estimate = Some(None);
            return;
        };
        slot.estimate = None;
        let args = slot.config.argv.clone();
        let tx = self.self_tx.clone();
        let model = name.to_string();
        // Outside a runtime (some unit tests build an actor by hand) there
        // is no estimate.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            slot.estimate = Some(None);
            return;
        };
        handle.spawn_blocking(move || {
            let bytes = std::fs::metadata(&path).ok().and_then(|meta| {
                crate::gguf::read(&path)
                    .ok()
                    .map(|h| crate::gguf::vram_estimate(&h, meta.len(), &args))
            });
            let _ = tx.send(Msg::Estimated { model, bytes });
        });
    }

    /// A new GPU reading: each loaded model's use (its process tree's)
    /// is taken from it; a model using more than its `vram_mb` is warned
    /// about once a run; waiting starts are planned again.
    fn on_reading(&mut self, snapshot: Option<Arc<Snapshot>>) {
        self.snapshots += 1;
        self.snapshot = snapshot;
        if let Some(snap) = self.snapshot.clone() {
            let now = Instant::now();
            self.gone.retain(|(pid, since)| {
                now.saturating_duration_since(*since) < GONE_LISTED_AT_MOST
                    && snap.processes.iter().any(|p| p.pid == *pid)
            });
            for (name, slot) in &mut self.slots {
                let Some(pid) = slot.pid.filter(|_| slot.phase.is_loaded()) else {
                    continue;
                };
                let usage = snap.tree_usage(pid);
                let total: u64 = usage.iter().map(|(_, b)| b).sum();
                if slot.gpu.is_none() {
                    slot.gpu = usage.iter().max_by_key(|(_, b)| *b).map(|(g, _)| *g);
                    if let Some(gate) = &slot.gate {
                        gate.set_gpu(slot.gpu);
                    }
                }
                if slot.phase == Phase::Ready {
                    slot.measured_ready = true;
                }
                if slot.vram_now != total {
                    self.bus.emit(Event::Vram {
                        model: name.clone(),
                        gpu: slot.gpu,
                        bytes: total,
                    });
                }
                slot.vram_now = total;
                slot.vram_peak = slot.vram_peak.max(total);
                if let Some(declared) = slot.config.vram_bytes {
                    if total > declared && !slot.warned_over {
                        slot.warned_over = true;
                        tracing::warn!(model = %name, measured_mib = mib(total),
                            vram_mb = mib(declared),
                            "model uses more GPU memory than its vram_mb declares; raise vram_mb or leave it out to use the measurement");
                    }
                }
            }
        }
        if self.shutdown.is_none() {
            self.reconcile();
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

    fn preload(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        for slot in self.slots.values_mut().filter(|s| s.config.preload) {
            slot.begin_preload();
        }
        self.reconcile();
    }

    fn set_keep_alive(&mut self, model: &str, keep: KeepAlive) -> bool {
        let Some(slot) = self.slots.get_mut(model) else {
            return false;
        };
        tracing::info!(model, keep_alive = ?keep, "idle TTL set at run time");
        slot.keep_alive = Some(keep);
        slot.sync_idle_watch();
        // A TTL that has already run out stops the model now.
        self.expire_idle();
        true
    }

    fn stop(&mut self, model: &str) -> Option<bool> {
        let slot = self.slots.get_mut(model)?;
        slot.preloading = false;
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
        let mut keep = HashSet::new();
        for config in models {
            let name: Arc<str> = Arc::from(config.name.as_str());
            keep.insert(name.clone());
            match self.slots.get_mut(&name) {
                None => {
                    tracing::info!(model = %name, "model added by reload");
                    let mut slot = Slot::new(config);
                    if slot.config.preload && self.shutdown.is_none() {
                        slot.begin_preload();
                    }
                    self.slots.insert(name, slot);
                }
                Some(slot) => {
                    let restart = slot.config.launch_differs(&config) && slot.child.is_some();
                    let newly_preloaded = config.preload && !slot.config.preload;
                    if slot.config.ttl != config.ttl {
                        slot.keep_alive = None;
                    }
                    slot.config = config;
                    slot.removed = false;
                    slot.sync_idle_watch();
                    if restart {
                        tracing::info!(model = %name, "model changed by reload; restarting it once idle");
                        retire(slot, StopReason::Reload);
                    }
                    // A preloaded model that restarts comes back by itself.
                    if self.shutdown.is_none()
                        && slot.config.preload
                        && (newly_preloaded || restart)
                    {
                        slot.begin_preload();
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
        self.gates.remove(name);
        if let Some((name, _)) = self.slots.remove_entry(name) {
            self.bus.emit(Event::Removed { model: name });
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(Vec::new());
        for slot in self.slots.values_mut() {
            slot.preloading = false;
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
            ChildEvent::Progress {
                model,
                instance,
                fraction,
            } => {
                if let Some(slot) = current(&mut self.slots, &model, instance)
                    .filter(|s| s.phase == Phase::Starting)
                {
                    slot.child_fraction = Some(fraction);
                }
                return;
            }
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
                let done = Progress {
                    elapsed_ms: millis(load_time),
                    expected_ms: slot.expected_load().map(millis),
                    fraction: Some(1.0),
                };
                self.bus.emit(progress_event(&model, done));
                slot.remember_load(load_time);
                slot.starting_since = None;
                slot.child_fraction = None;
                slot.phase = Phase::Ready;
                slot.preloading = false;
                slot.pid = Some(pid);
                slot.ready_since = Some(Instant::now());
                slot.last_error = None;
                let upstream = Upstream::new(addr, slot.config.max_connections);
                let gate = Arc::new(Gate::new(
                    model.clone(),
                    instance,
                    upstream,
                    self.self_tx.clone(),
                ));
                gate.set_gpu(slot.gpu);
                slot.gate = Some(gate.clone());
                slot.sync_idle_watch();
                self.gates.insert(model.clone(), gate);
                let load_ms = load_time.as_secs_f64() * 1000.0;
                lifecycle(&self.bus, &model, ModelEventKind::Ready, |e| {
                    e.load_ms = Some(load_ms);
                    e.pid = Some(pid);
                    e.rss_bytes = crate::procfs::pid_figures(pid).map(|(rss, _)| rss);
                });
                slot.oom_retried = false;
                slot.measured_ready = false;
                let waiters = std::mem::take(&mut slot.waiters);
                for w in waiters {
                    if let Some(lease) = Actor::lease(slot) {
                        let _ = w.reply.send(Ok(lease));
                    }
                }
                // Measure what it took as soon as possible.
                if self.snapshot.is_some() {
                    self.gpus.refresh();
                }
            }
            ChildEvent::StartFailed {
                model,
                instance,
                reason,
                pid: failed_pid,
            } => {
                let Some(slot) = current(&mut self.slots, &model, instance) else {
                    return;
                };
                slot.child = None;
                slot.pid = None;
                slot.starting_since = None;
                slot.child_fraction = None;
                let placed_on = slot.gpu;
                slot.end_vram_run();
                if let (Some(pid), Some(_)) = (failed_pid, &self.snapshot) {
                    self.gone.push((pid, Instant::now()));
                    self.gpus.refresh();
                }
                let retry = matches!(reason, StartFailure::OutOfMemory { .. })
                    && !slot.oom_retried
                    && !slot.removed
                    && (slot.preloading || slot.prune_waiters());
                if retry {
                    slot.oom_retried = true;
                    lifecycle(&self.bus, &model, ModelEventKind::StartFailed, |e| {
                        e.reason = Some(Reason::StartFailed(reason.to_string()));
                        e.gpu = placed_on;
                    });
                    if let Some(victim) = self.oom_victim(&model, placed_on) {
                        tracing::warn!(model = %model, evicting = %victim, error = %reason,
                            "model ran out of GPU memory while starting; evicting one more model and trying once more");
                        if let Some(v) = self.slots.get_mut(&victim) {
                            retire(v, StopReason::Evicted);
                        }
                    } else {
                        tracing::warn!(model = %model, error = %reason,
                            "model ran out of memory while starting; nothing idle to evict, trying once more");
                    }
                    self.make_pending(&model);
                    if self.shutdown.is_none() {
                        self.reconcile();
                    }
                    return;
                }
                slot.oom_retried = false;
                if std::mem::take(&mut slot.preloading) {
                    tracing::warn!(model = %model, reason = %reason, "preload failed");
                }
                slot.failures += 1;
                slot.last_error = Some(reason.to_string());
                lifecycle(&self.bus, &model, ModelEventKind::StartFailed, |e| {
                    e.reason = Some(Reason::StartFailed(reason.to_string()))
                });
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
                let (gpu, peak) = (slot.gpu, slot.vram_peak);
                if slot.vram_now > 0 {
                    self.bus.emit(Event::Vram {
                        model: model.clone(),
                        gpu,
                        bytes: 0,
                    });
                }
                slot.end_vram_run();
                if let (Some(pid), Some(_)) = (pid, &self.snapshot) {
                    self.gone.push((pid, Instant::now()));
                    self.gpus.refresh();
                }
                lifecycle(
                    &self.bus,
                    &model,
                    if reason == ExitReason::Stopped {
                        ModelEventKind::Stopped
                    } else {
                        ModelEventKind::Crashed
                    },
                    |e| {
                        e.pid = pid;
                        e.gpu = gpu;
                        e.vram_bytes = (peak > 0).then_some(peak);
                        (e.reason, e.exit_status) = match &reason {
                            ExitReason::Stopped => (stop_reason.map(StopReason::reason), None),
                            ExitReason::Crashed(why) => (Some(Reason::Crash), Some(why.clone())),
                            ExitReason::Unhealthy(why) => (Some(Reason::Health), Some(why.clone())),
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
                        if !slot.prune_waiters() && !slot.preloading {
                            slot.phase = Phase::Stopped;
                        } else {
                            self.make_pending(&model);
                        }
                    }
                    ExitReason::Crashed(why) | ExitReason::Unhealthy(why) => {
                        if ran.is_some_and(|r| r >= STABLE_UPTIME) {
                            slot.failures = 0;
                        }
                        slot.preloading = false;
                        slot.failures += 1;
                        slot.retry_at = Some(Instant::now() + backoff(slot.failures));
                        slot.last_error = Some(why.clone());
                        slot.phase = Phase::Failed;
                        if slot.prune_waiters() {
                            if backoff(slot.failures).is_zero() {
                                self.make_pending(&model);
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

    /// Starts pending models where capacity allows, evicting as needed:
    /// the highest-priority, longest-waiting first. A busy model is not
    /// swapped out for another's requests until the oldest of them has
    /// waited `max_wait_before_swap`, unless they have a higher priority
    /// than the busy model: its own requests keep going straight in
    /// meanwhile, so ABAB traffic from concurrent clients is served AABB
    /// without starving anyone, while an idle model (a lone client
    /// alternating models) is swapped at once.
    fn reconcile(&mut self) {
        let now = Instant::now();
        self.swap_due = None;
        let mut pending: Vec<(std::cmp::Reverse<i32>, Instant, Arc<str>)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.phase == Phase::Pending)
            .map(|(n, s)| {
                let (priority, since) = s
                    .queue_head()
                    .unwrap_or((s.config.priority, s.pending_since));
                (std::cmp::Reverse(priority), since, n.clone())
            })
            .collect();
        pending.sort();
        for (std::cmp::Reverse(priority), since, name) in pending {
            // A request whose client left starts and evicts nothing.
            if let Some(slot) = self.slots.get_mut(&name) {
                if !slot.prune_waiters() && !slot.preloading {
                    tracing::debug!(model = %name, "every request waiting for the model has gone; not starting it");
                    slot.phase = Phase::Stopped;
                    slot.oom_retried = false;
                    continue;
                }
            }
            let decision = match self.rules(&name) {
                Decision::Start => self.placement(&name),
                other => other,
            };
            match decision {
                Decision::Start => self.start_child(&name, None),
                Decision::StartOn(gpu) => self.start_child(&name, Some(gpu)),
                Decision::Blocked(err) => {
                    if let Some(slot) = self.slots.get_mut(&name) {
                        tracing::warn!(model = %name, error = %err, "cannot start model");
                        slot.preloading = false;
                        slot.oom_retried = false;
                        slot.phase = Phase::Stopped;
                        slot.fail_waiters(&err);
                    }
                }
                Decision::Evict(victims) => {
                    if victims.is_empty() {
                        continue;
                    }
                    let due_at = since + self.limits.max_wait_before_swap;
                    let outranks = victims.iter().all(|v| {
                        self.slots
                            .get(v)
                            .is_some_and(|s| priority > s.config.priority)
                    });
                    let in_use = victims
                        .iter()
                        .any(|v| self.slots.get(v).is_some_and(|s| s.inflight() > 0));
                    if in_use && !outranks && now < due_at {
                        let look_again = due_at.min(now + SWAP_RECHECK);
                        self.swap_due =
                            Some(self.swap_due.map_or(look_again, |d| d.min(look_again)));
                        continue;
                    }
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

    /// What groups and `max_loaded` say of starting `name` now.
    fn rules(&self, name: &Arc<str>) -> Decision {
        let group = self.slots.get(name).and_then(|s| s.config.group.as_deref());
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
                pinned: s.config.pin,
                last_used: s.last_used(),
            })
            .collect();
        match plan(group, &loaded, self.limits.max_loaded) {
            Plan::Start => Decision::Start,
            Plan::Wait => Decision::Evict(Vec::new()),
            Plan::Evict(names) => {
                Decision::Evict(names.into_iter().map(Arc::<str>::from).collect())
            }
            Plan::Blocked { pinned, rule } => {
                let mut pinned: Vec<String> = pinned.into_iter().map(str::to_string).collect();
                pinned.sort();
                Decision::Blocked(AcquireError::Pinned {
                    model: name.to_string(),
                    pinned,
                    why: match rule {
                        Rule::Group(g) => format!("group {g}"),
                        Rule::MaxLoaded(n) => format!("max_loaded = {n}"),
                    },
                })
            }
        }
    }

    /// Where `name` goes by GPU memory, once the rules let it start: with
    /// no GPU readings, or no need known, anywhere (no placement).
    fn placement(&self, name: &Arc<str>) -> Decision {
        let (Some(snap), Some(slot)) = (&self.snapshot, self.slots.get(name)) else {
            return Decision::Start;
        };
        if snap.gpus.is_empty() {
            return Decision::Start;
        }
        let need = match slot.vram_need() {
            Some((0, _)) => return Decision::Start,
            Some((need, _)) => need,
            // Its estimate is still being worked out: Estimated follows.
            None if slot.estimate.is_none() => return Decision::Evict(Vec::new()),
            None => return Decision::Start,
        };
        // Placed by a reading taken after it began to wait, in which no
        // child that went away still holds memory.
        if self.snapshots <= slot.pending_reading || !self.gone.is_empty() {
            return Decision::Evict(Vec::new());
        }
        let rooms: Vec<Room> = snap
            .gpus
            .iter()
            .map(|g| Room {
                gpu: g.index,
                total: g.total_bytes,
                used: g.used_bytes,
            })
            .collect();
        let occupants: Vec<Occupant<'_>> = self
            .slots
            .iter()
            .filter(|(n, s)| *n != name && s.phase.is_loaded())
            .filter_map(|(n, s)| {
                let gpu = s.gpu?;
                let loading =
                    s.phase == Phase::Starting || (s.phase == Phase::Ready && !s.measured_ready);
                let promised = if loading {
                    s.vram_need()
                        .map_or(0, |(need, _)| need.saturating_sub(s.vram_now))
                } else {
                    0
                };
                Some(Occupant {
                    name: n,
                    gpu,
                    measured: s.vram_now,
                    promised,
                    ready: s.phase == Phase::Ready,
                    leaving: matches!(s.phase, Phase::Draining | Phase::Stopping),
                    busy: s.inflight() > 0,
                    pinned: s.config.pin,
                    last_used: s.last_used(),
                })
            })
            .collect();
        let allowed = slot.allowed_gpus();
        match place(
            need,
            allowed.as_deref(),
            &rooms,
            &occupants,
            self.limits.vram_reserve_bytes,
        ) {
            Placement::On(gpu) => Decision::StartOn(gpu),
            Placement::Evict(names) => {
                Decision::Evict(names.into_iter().map(Arc::<str>::from).collect())
            }
            Placement::Wait => Decision::Evict(Vec::new()),
            Placement::NeverFits(detail) => Decision::Blocked(AcquireError::NoRoom {
                model: name.to_string(),
                detail,
            }),
        }
    }

    /// One more model to evict after `model` ran out of memory while
    /// starting: the least recently used idle, unpinned, ready one, on
    /// the GPU it was placed on if it was.
    fn oom_victim(&self, model: &str, gpu: Option<u32>) -> Option<Arc<str>> {
        self.slots
            .iter()
            .filter(|(n, s)| {
                &***n != model
                    && s.phase == Phase::Ready
                    && !s.config.pin
                    && s.inflight() == 0
                    && (gpu.is_none() || s.gpu == gpu)
            })
            .min_by_key(|(_, s)| s.last_used())
            .map(|(n, _)| n.clone())
    }

    /// When a swap held back for a busy model is looked at again: fixed
    /// when it was held back, so a stream of other messages cannot keep
    /// pushing it out.
    fn next_swap_deadline(&self) -> Option<Instant> {
        self.swap_due
    }

    fn start_child(&mut self, name: &Arc<str>, gpu: Option<u32>) {
        let instance = self.next_instance;
        self.next_instance += 1;
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let mut env = slot.config.env.clone();
        if let Some(g) = gpu {
            // NVML numbers GPUs in PCI bus order; CUDA, unless told,
            // fastest first.
            for (key, value) in [
                (CUDA_VISIBLE_DEVICES, g.to_string()),
                ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string()),
            ] {
                if !env.iter().any(|(k, _)| k == key) {
                    env.push((key.to_string(), value));
                }
            }
            tracing::info!(model = %name, gpu = g, need_mib = slot.vram_need().map(|(b, _)| mib(b)),
                source = slot.vram_need().map(|(_, s)| s), "placing model on GPU");
        }
        let spec = ChildSpec {
            model: name.clone(),
            instance,
            argv: slot.config.argv.clone(),
            env,
            health_path: slot.config.health.clone(),
            start_timeout: self.limits.start_timeout,
            stop_grace: self.limits.stop_grace,
            health_interval: self.limits.health_interval,
        };
        lifecycle(&self.bus, name, ModelEventKind::StartRequested, |e| {
            e.gpu = gpu
        });
        let now = Instant::now();
        if !self.slots.values().any(|s| s.phase == Phase::Starting) {
            self.next_progress = now + PROGRESS_PERIOD;
        }
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.gpu = gpu;
        slot.starting_since = Some(now);
        slot.child_fraction = None;
        slot.phase = Phase::Starting;
        slot.instance = instance;
        slot.gate = None;
        slot.ready_since = None;
        slot.starts += 1;
        slot.child = Some(self.spawner.spawn(spec, self.events_tx.clone()));
    }

    /// When the next idle TTL may run out. Leases come and go without the
    /// actor, so this is a time to look again: a model busy now is looked
    /// at one TTL later (by then its last use has moved on, or it is still
    /// busy).
    /// A model whose gate watches for idleness is not looked at while busy:
    /// its last lease says when.
    fn next_ttl_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.slots
            .values()
            .filter(|s| s.phase == Phase::Ready)
            .filter_map(|s| {
                let ttl = s.ttl()?;
                match (s.inflight() > 0, s.watches_idle()) {
                    (true, true) => None,
                    (true, false) => Some(now + ttl),
                    (false, _) => Some(s.last_used() + ttl),
                }
            })
            .min()
    }

    fn expire_idle(&mut self) {
        let now = Instant::now();
        for slot in self.slots.values_mut() {
            let expired = slot.phase == Phase::Ready
                && slot.ttl().is_some_and(|ttl| {
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

/// What [`Actor::reconcile`] does for one pending model.
enum Decision {
    Start,
    /// Start it on this GPU.
    StartOn(u32),
    /// Retire these first (none: wait).
    Evict(Vec<Arc<str>>),
    /// Fail its waiters: only evicting pinned models would make room.
    Blocked(AcquireError),
}

/// Records a lifecycle step of `model`.
fn lifecycle(bus: &Bus, model: &str, kind: ModelEventKind, f: impl FnOnce(&mut ModelEvent)) {
    let mut e = ModelEvent::new(model, kind, crate::events::now_ms());
    f(&mut e);
    bus.emit(Event::Model(Arc::new(e)));
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

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChildAddr;
    use crate::scheduler::Scheduler;
    use std::sync::Mutex;

    /// One child the fake spawner was asked for.
    struct Spawned {
        spec: ChildSpec,
        events: mpsc::UnboundedSender<ChildEvent>,
        stop: oneshot::Receiver<()>,
    }

    /// Records every start; the test plays the child's part.
    #[derive(Default)]
    struct Fake(Mutex<Vec<Spawned>>);

    impl Spawner for Fake {
        fn spawn(&self, spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle {
            let (tx, stop) = oneshot::channel();
            self.0.lock().unwrap().push(Spawned { spec, events, stop });
            ChildHandle::detached(tx)
        }
    }

    impl Fake {
        fn started(&self) -> Vec<String> {
            let all = self.0.lock().unwrap();
            all.iter().map(|s| s.spec.model.to_string()).collect()
        }

        fn with_last<T>(&self, model: &str, f: impl FnOnce(&mut Spawned) -> T) -> T {
            let mut all = self.0.lock().unwrap();
            let s = all
                .iter_mut()
                .rev()
                .find(|s| &*s.spec.model == model)
                .unwrap_or_else(|| panic!("{model} was never started"));
            f(s)
        }

        fn ready(&self, model: &str) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Ready {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                    pid: 4242,
                    load_time: Duration::from_millis(5),
                });
            });
        }

        fn exit(&self, model: &str, reason: ExitReason) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Exited {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    reason,
                });
            });
        }

        /// Whether the scheduler asked the newest child of `model` to stop.
        fn stop_asked(&self, model: &str) -> bool {
            self.with_last(model, |s| s.stop.try_recv().is_ok())
        }
    }

    const TWO_MODELS: &str =
        "[models.a]\ncmd = [\"a\", \"{port}\"]\n[models.b]\ncmd = [\"b\", \"{port}\"]\n";

    fn config(text: &str) -> Config {
        Config::from_toml(std::path::Path::new("test.toml"), text).unwrap()
    }

    fn start(text: &str) -> (Scheduler, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let s = Scheduler::with_spawner(&config(text), Bus::detached(), fake.clone());
        (s, fake)
    }

    /// Lets the actor (and any spawned requests) run until idle.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    async fn state_of(s: &Scheduler, model: &str) -> ModelState {
        settle().await;
        let all = s.status().await;
        all.into_iter().find(|m| m.name == model).unwrap().state
    }

    fn acquire(s: &Scheduler, model: &str) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let (s, model) = (s.clone(), model.to_string());
        tokio::spawn(async move { s.acquire(&model, 0).await })
    }

    /// Starts `model` through a request and returns that request's lease.
    async fn lease(s: &Scheduler, fake: &Fake, model: &str) -> Lease {
        let waiting = acquire(s, model);
        settle().await;
        fake.ready(model);
        waiting.await.unwrap().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_model_is_drained_before_a_swap_and_the_other_starts_after() {
        // Grouping off: the busy model is drained for the other at once.
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"0s\"\n{TWO_MODELS}"
        ));
        let a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(!fake.stop_asked("a"), "a busy model is not stopped");
        assert_eq!(fake.started(), ["a"]);
        drop(a);
        settle().await;
        assert!(fake.stop_asked("a"), "the last lease ends the drain");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        assert_eq!(fake.started(), ["a", "b"], "b starts once a is gone");
        fake.ready("b");
        assert_eq!(b.await.unwrap().unwrap().model(), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_model_restarts_with_its_new_command_once_idle() {
        let (s, fake) = start(TWO_MODELS);
        let a = lease(&s, &fake, "a").await;
        s.reconfigure(&config(
            &TWO_MODELS.replace("\"a\", \"{port}\"", "\"a2\", \"{port}\""),
        ))
        .await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(!fake.stop_asked("a"), "busy: waits for its request");
        drop(a);
        settle().await;
        assert!(fake.stop_asked("a"));
        fake.exit("a", ExitReason::Stopped);
        assert_eq!(state_of(&s, "a").await, ModelState::Stopped);
        let again = acquire(&s, "a");
        settle().await;
        assert_eq!(fake.started(), ["a", "a"]);
        assert_eq!(fake.with_last("a", |c| c.spec.argv[0].clone()), "a2");
        fake.ready("a");
        assert!(again.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_crashes_back_off_and_the_backoff_runs_out() {
        let (s, fake) = start(TWO_MODELS);
        drop(lease(&s, &fake, "a").await);
        fake.exit("a", ExitReason::Crashed("signal 9".into()));
        assert_eq!(state_of(&s, "a").await, ModelState::Failed);
        // The first retry is immediate.
        drop(lease(&s, &fake, "a").await);
        fake.exit("a", ExitReason::Crashed("signal 9".into()));
        assert_eq!(state_of(&s, "a").await, ModelState::Failed);
        match s.acquire("a", 0).await {
            Err(AcquireError::BackingOff { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            other => panic!("expected a backoff, got {other:?}"),
        }
        assert_eq!(fake.started().len(), 2, "no start while backing off");
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(lease(&s, &fake, "a").await);
        assert_eq!(fake.started().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_racing_the_ttl_stop_waits_for_a_fresh_start() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"10s\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        // A use inside the TTL moves the deadline.
        tokio::time::advance(Duration::from_secs(9)).await;
        drop(s.acquire("a", 0).await.unwrap());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
        let late = acquire(&s, "a");
        settle().await;
        assert!(!late.is_finished(), "waits for the restart, is not failed");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        assert_eq!(fake.started(), ["a", "a"]);
        fake.ready("a");
        assert!(late.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_client_left_starts_and_evicts_nothing() {
        let (s, fake) = start(&format!("[scheduler]\nmax_loaded = 1\n{TWO_MODELS}"));
        let a = acquire(&s, "a");
        settle().await;
        // b must wait: a is still starting and takes the only place.
        let b = acquire(&s, "b");
        assert_eq!(state_of(&s, "b").await, ModelState::Starting);
        b.abort();
        settle().await;
        fake.ready("a");
        let a = a.await.unwrap().unwrap();
        assert_eq!(state_of(&s, "b").await, ModelState::Stopped);
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert!(
            !fake.stop_asked("a"),
            "a is not evicted for a request that left"
        );
        assert_eq!(fake.started(), ["a"], "b never starts");
        let status = s.status().await;
        assert!(status.iter().all(|m| m.waiting == 0), "{status:?}");
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn lifecycle_and_state_changes_go_out_on_the_bus() {
        let fake = Arc::new(Fake::default());
        let bus = Bus::detached();
        let mut models = bus.subscribe(crate::events::Topic::Models);
        let s = Scheduler::with_spawner(&config(TWO_MODELS), bus, fake.clone());
        drop(lease(&s, &fake, "a").await);
        let mut seen = Vec::new();
        while let Ok(e) = models.try_recv() {
            match e {
                Event::State { model, state } if &*model == "a" => {
                    seen.push(state.as_str().to_string())
                }
                Event::Model(m) if m.model == "a" => seen.push(m.event.as_str().to_string()),
                _ => {}
            }
        }
        assert_eq!(
            seen,
            ["stopped", "start_requested", "starting", "ready", "ready"],
            "{seen:?}"
        );
    }

    const PINNED_A: &str = "[scheduler]\nmax_loaded = 1\n[models.a]\ncmd = [\"a\", \"{port}\"]\npin = true\n[models.b]\ncmd = [\"b\", \"{port}\"]\n";

    #[tokio::test(start_paused = true)]
    async fn a_pinned_model_is_not_evicted_and_the_other_start_fails_at_once() {
        let (s, fake) = start(PINNED_A);
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = tokio::time::timeout(Duration::from_secs(1), s.acquire("b", 0))
            .await
            .expect("fails at once, does not wait");
        match b {
            Err(e @ AcquireError::Pinned { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("pinned model a") && text.contains("max_loaded = 1"),
                    "{text}"
                );
            }
            other => panic!("expected Pinned, got {other:?}"),
        }
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert_eq!(state_of(&s, "b").await, ModelState::Stopped);
        assert!(!fake.stop_asked("a"));
        assert_eq!(fake.started(), ["a"]);
        let status = s.status().await;
        assert!(
            status.iter().any(|m| m.name == "a" && m.pinned),
            "{status:?}"
        );
        assert!(
            status.iter().any(|m| m.name == "b" && !m.pinned),
            "{status:?}"
        );
        // An admin stop still stops it; then b may start.
        assert_eq!(s.stop("a").await, Some(true));
        settle().await;
        assert!(fake.stop_asked("a"));
        fake.exit("a", ExitReason::Stopped);
        drop(lease(&s, &fake, "b").await);
        assert_eq!(fake.started(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_group_member_blocks_its_group_at_once() {
        let (s, fake) = start(
            "[models.a]\ncmd = [\"a\", \"{port}\"]\ngroup = \"g\"\npin = true\n\
             [models.b]\ncmd = [\"b\", \"{port}\"]\ngroup = \"g\"\n",
        );
        drop(lease(&s, &fake, "a").await);
        match s.acquire("b", 0).await {
            Err(AcquireError::Pinned { pinned, why, .. }) => {
                assert_eq!((pinned, why.as_str()), (vec!["a".to_string()], "group g"))
            }
            other => panic!("expected Pinned, got {other:?}"),
        }
        assert_eq!(fake.started(), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpinned_model_is_evicted_instead_of_an_older_pinned_one() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 2\nmax_wait_before_swap = \"0s\"\n[models.a]\ncmd = [\"a\", \"{port}\"]\npin = true\n\
             [models.b]\ncmd = [\"b\", \"{port}\"]\n[models.c]\ncmd = [\"c\", \"{port}\"]\n",
        );
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(lease(&s, &fake, "b").await);
        let c = acquire(&s, "c");
        settle().await;
        assert!(fake.stop_asked("b"), "b goes, though a was used longer ago");
        assert!(!fake.stop_asked("a"));
        fake.exit("b", ExitReason::Stopped);
        settle().await;
        fake.ready("c");
        assert!(c.await.unwrap().is_ok());
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_zero_unloads_once_idle_and_not_while_busy() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        let held = lease(&s, &fake, "a").await;
        assert!(s.set_keep_alive("a", KeepAlive::For(Duration::ZERO)).await);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready, "busy");
        assert!(!fake.stop_asked("a"));
        let status = s.status().await;
        assert_eq!(status[0].ttl_s, Some(0.0), "{status:?}");
        // A second request in and out while the first is held: not idle yet.
        drop(s.acquire("a", 0).await.unwrap());
        settle().await;
        assert!(!fake.stop_asked("a"), "one lease is still out");
        drop(held);
        // No time passes: the last lease itself ends it.
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_never_keeps_a_model_past_its_ttl() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"10s\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        assert!(s.set_keep_alive("a", KeepAlive::Never).await);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert_eq!(s.status().await[0].ttl_s, None);
        assert!(
            !s.set_keep_alive("nope", KeepAlive::Never).await,
            "unknown model"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_for_counts_from_the_last_use() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        assert!(
            s.set_keep_alive("a", KeepAlive::For(Duration::from_secs(30)))
                .await
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(s.acquire("a", 0).await.unwrap());
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "45 s in, 25 s idle"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_that_already_ran_out_stops_an_idle_model_now() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(
            s.set_keep_alive("a", KeepAlive::For(Duration::from_secs(10)))
                .await
        );
        // Asked right after the call, with no time passing.
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!(a.state, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_outlives_a_restart_until_a_reload_changes_the_ttl() {
        let text = TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]");
        let (s, fake) = start(&text);
        // Set while stopped; applies to the child started later.
        assert!(s.set_keep_alive("a", KeepAlive::For(Duration::ZERO)).await);
        for _ in 0..2 {
            drop(lease(&s, &fake, "a").await);
            assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
            fake.exit("a", ExitReason::Stopped);
            assert_eq!(state_of(&s, "a").await, ModelState::Stopped);
        }
        // A reload that leaves the ttl alone keeps the override…
        s.reconfigure(&config(&text)).await;
        assert_eq!(s.status().await[0].ttl_s, Some(0.0));
        // …one that changes it ends it.
        s.reconfigure(&config(&text.replace("\"1h\"", "\"2h\"")))
            .await;
        assert_eq!(s.status().await[0].ttl_s, Some(7200.0));
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn preload_starts_a_model_with_no_request_and_a_failure_shows_as_failed() {
        let text = "[models.a]\ncmd = [\"a\", \"{port}\"]\npreload = true\n\
                    [models.b]\ncmd = [\"b\", \"{port}\"]\n[models.c]\ncmd = [\"c\", \"{port}\"]\n";
        let (s, fake) = start(&format!("[scheduler]\nmax_loaded = 3\n{text}"));
        settle().await;
        assert!(fake.started().is_empty(), "nothing before the daemon asks");
        s.preload();
        assert_eq!(state_of(&s, "a").await, ModelState::Starting);
        assert_eq!(fake.started(), ["a"], "only the model with preload = true");
        tokio::time::advance(Duration::from_secs(30)).await;
        fake.ready("a");
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!((a.inflight, a.waiting), (0, 0));
        // A reload that turns preload on for b (and adds d with it) starts them.
        let reloaded = format!(
            "[scheduler]\nmax_loaded = 3\n{}[models.d]\ncmd = [\"d\", \"{{port}}\"]\npreload = true\n",
            text.replace("[models.c]", "preload = true\n[models.c]")
        );
        s.reconfigure(&config(&reloaded)).await;
        settle().await;
        let mut started = fake.started();
        started.sort();
        assert_eq!(started, ["a", "b", "d"]);
        fake.with_last("b", |c| {
            let _ = c.events.send(ChildEvent::StartFailed {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                reason: crate::supervisor::StartFailure::Exited {
                    status: "exit status: 1".into(),
                },
                pid: None,
            });
        });
        assert_eq!(state_of(&s, "b").await, ModelState::Failed);
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "others unaffected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn load_waits_for_ready_holds_no_lease_and_is_instant_when_ready() {
        let (s, fake) = start(TWO_MODELS);
        let loading = {
            let s = s.clone();
            tokio::spawn(async move { s.load("a").await })
        };
        settle().await;
        tokio::time::advance(Duration::from_millis(1500)).await;
        fake.ready("a");
        let took = loading.await.unwrap().unwrap();
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!((a.state, a.inflight), (ModelState::Ready, 0));
        assert_eq!(s.load("a").await.unwrap(), Duration::ZERO);
        assert!(matches!(s.load("zz").await, Err(AcquireError::Unknown(_))));
        assert_eq!(fake.started(), ["a"]);
    }

    fn ready_after(fake: &Fake, model: &str, took: Duration) {
        fake.with_last(model, |c| {
            let _ = c.events.send(ChildEvent::Ready {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                pid: 4242,
                load_time: took,
            });
        });
    }

    async fn status_of(s: &Scheduler, model: &str) -> ModelStatus {
        s.status()
            .await
            .into_iter()
            .find(|m| m.name == model)
            .unwrap()
    }

    fn progress_events(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<LoadProgress> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let Event::Progress(p) = e {
                out.push((*p).clone());
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn progress_counts_from_the_spawn_and_expects_the_median_of_past_loads() {
        let fake = Arc::new(Fake::default());
        let bus = Bus::detached();
        let mut models = bus.subscribe(crate::events::Topic::Models);
        let s = Scheduler::with_spawner(&config(TWO_MODELS), bus, fake.clone());
        let first = acquire(&s, "a");
        settle().await;
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(250)).await;
            settle().await;
        }
        let a = status_of(&s, "a").await;
        let p = a.progress.expect("starting shows progress");
        assert_eq!(
            (p.elapsed_ms, p.expected_ms, p.fraction),
            (1000, None, None)
        );
        assert_eq!(a.load_ms, None);
        let seen = progress_events(&mut models);
        assert_eq!(seen.len(), 4, "one every 250 ms: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0].elapsed_ms < w[1].elapsed_ms));
        ready_after(&fake, "a", Duration::from_millis(1000));
        drop(first.await.unwrap().unwrap());
        let a = status_of(&s, "a").await;
        assert_eq!((a.progress, a.load_ms), (None, Some(1000)));
        let at_ready = progress_events(&mut models);
        assert_eq!(at_ready.last().and_then(|p| p.fraction), Some(1.0));
        assert_eq!(at_ready.last().map(|p| p.elapsed_ms), Some(1000));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(progress_events(&mut models).is_empty(), "none once ready");

        // The next start expects what the first took.
        assert_eq!(s.stop("a").await, Some(true));
        fake.exit("a", ExitReason::Stopped);
        let second = acquire(&s, "a");
        settle().await;
        tokio::time::advance(Duration::from_millis(500)).await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!((p.elapsed_ms, p.expected_ms), (500, Some(1000)));
        assert_eq!(p.fraction, Some(0.5));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.fraction, Some(0.99), "capped while still starting");
        // The child's own figure wins over the estimate.
        fake.with_last("a", |c| {
            let _ = c.events.send(ChildEvent::Progress {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                fraction: 0.25,
            });
        });
        // Child events and requests are separate channels: let it land.
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.fraction, Some(0.25));
        ready_after(&fake, "a", Duration::from_millis(3000));
        drop(second.await.unwrap().unwrap());
        // Median of 1000 and 3000.
        assert_eq!(status_of(&s, "a").await.load_ms, Some(3000));
        assert_eq!(s.stop("a").await, Some(true));
        fake.exit("a", ExitReason::Stopped);
        let third = acquire(&s, "a");
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.expected_ms, Some(2000));
        third.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_load_times_set_the_expectation_until_the_model_loads_itself() {
        let (s, fake) = start(TWO_MODELS);
        let ms = Duration::from_millis;
        s.seed_load_times(HashMap::from([
            (
                "a".to_string(),
                vec![
                    ms(9000),
                    ms(9000),
                    ms(100),
                    ms(200),
                    ms(300),
                    ms(400),
                    ms(500),
                ],
            ),
            ("gone".to_string(), vec![ms(1)]),
        ]));
        let a = status_of(&s, "a").await;
        assert_eq!(a.load_ms, Some(500), "the newest seeded");
        let waiting = acquire(&s, "a");
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.expected_ms, Some(300), "median of the last five");
        assert_eq!(status_of(&s, "b").await.load_ms, None);
        ready_after(&fake, "a", ms(50));
        drop(waiting.await.unwrap().unwrap());
        // A later seed does not replace what this run has measured.
        s.seed_load_times(HashMap::from([("a".to_string(), vec![ms(7)])]));
        assert_eq!(status_of(&s, "a").await.load_ms, Some(50));
    }

    fn acquire_with(
        s: &Scheduler,
        model: &str,
        priority: i32,
    ) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let (s, model) = (s.clone(), model.to_string());
        tokio::spawn(async move { s.acquire(&model, priority).await })
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_in_use_is_not_swapped_out_until_the_fairness_bound() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n{TWO_MODELS}"
        ));
        let a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        settle().await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "a keeps serving"
        );
        // More requests for the loaded model go straight in meanwhile.
        let again = s.acquire("a", 0).await.unwrap();
        drop(a);
        tokio::time::advance(Duration::from_millis(4800)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Stopping,
            "b's request has waited 5 s: a drains for it"
        );
        drop(again);
        settle().await;
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        fake.ready("b");
        assert_eq!(b.await.unwrap().unwrap().model(), "b");
        assert_eq!(fake.started(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_model_is_swapped_at_once_and_a_busy_one_once_it_goes_idle() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n{TWO_MODELS}"
        ));
        // A lone client alternating models waits for no bound.
        drop(lease(&s, &fake, "a").await);
        let b = acquire(&s, "b");
        settle().await;
        assert!(fake.stop_asked("a"), "an idle model does not hold b back");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        fake.ready("b");
        let b = b.await.unwrap().unwrap();
        // Busy: held; idle before the bound: it goes at the next look.
        let _a = acquire(&s, "a");
        tokio::time::advance(Duration::from_millis(1000)).await;
        settle().await;
        assert!(!fake.stop_asked("b"));
        drop(b);
        tokio::time::advance(SWAP_RECHECK).await;
        settle().await;
        assert!(fake.stop_asked("b"), "once idle, b goes before the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_priority_request_swaps_a_busy_model_at_once_and_goes_first() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
             [models.a]\ncmd = [\"a\", \"{port}\"]\n[models.b]\ncmd = [\"b\", \"{port}\"]\n\
             [models.c]\ncmd = [\"c\", \"{port}\"]\n",
        );
        let a = lease(&s, &fake, "a").await;
        let _b = acquire_with(&s, "b", 0);
        settle().await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        let c = acquire_with(&s, "c", 10);
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Stopping,
            "priority 10 outranks a"
        );
        let status = s.status().await;
        let c_status = status.iter().find(|m| m.name == "c").unwrap();
        assert_eq!(c_status.waiting_priority, Some(10));
        drop(a);
        settle().await;
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        assert_eq!(
            fake.started(),
            ["a", "c"],
            "c, waiting later, starts before b"
        );
        fake.ready("c");
        assert!(c.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_priority_counts_for_its_requests() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
             [models.a]\ncmd = [\"a\", \"{port}\"]\n\
             [models.urgent]\ncmd = [\"u\", \"{port}\"]\npriority = 5\n",
        );
        let _a = lease(&s, &fake, "a").await;
        let _u = acquire(&s, "urgent");
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_client_left_leaves_the_queue_at_once() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n{TWO_MODELS}"
        ));
        let _a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        settle().await;
        assert_eq!(status_of(&s, "b").await.waiting, 1);
        b.abort();
        settle().await;
        let st = status_of(&s, "b").await;
        assert_eq!((st.waiting, st.state), (0, ModelState::Stopped));
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert!(
            !fake.stop_asked("a"),
            "the bound of a gone waiter evicts nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_queue_a_request_is_refused_with_retry_after_and_no_start() {
        let (s, fake) = start(&format!("[scheduler]\nmax_queue = 2\n{TWO_MODELS}"));
        let w1 = acquire(&s, "a");
        let w2 = acquire(&s, "a");
        settle().await;
        match s.acquire("b", 0).await {
            Err(AcquireError::QueueFull {
                waiting,
                retry_after,
            }) => {
                assert_eq!(waiting, 2);
                assert!(retry_after >= Duration::from_secs(1));
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        assert_eq!(fake.started(), ["a"], "the refused request started nothing");
        // A waiter whose client left makes room.
        w2.abort();
        settle().await;
        let w3 = acquire(&s, "a");
        settle().await;
        fake.ready("a");
        assert!(w1.await.unwrap().is_ok());
        assert!(w3.await.unwrap().is_ok());
    }

    fn reading(gpus: &[(u32, u64, u64)], procs: &[(u32, u32, u64)]) -> Option<Arc<Snapshot>> {
        const MB: u64 = 1 << 20;
        Some(Arc::new(Snapshot {
            taken_at_ms: 0,
            gpus: gpus
                .iter()
                .map(|&(index, total, used)| crate::gpu::GpuReading {
                    index,
                    name: "fake".into(),
                    total_bytes: total * MB,
                    used_bytes: used * MB,
                    free_bytes: (total - used) * MB,
                    utilization: Some(0.5),
                    temperature_c: None,
                    power_watts: None,
                })
                .collect(),
            processes: procs
                .iter()
                .map(|&(pid, gpu, used)| crate::gpu::ProcessReading {
                    pid,
                    gpu,
                    used_bytes: used * MB,
                })
                .collect(),
        }))
    }

    type Readings = tokio::sync::watch::Sender<Option<Arc<Snapshot>>>;

    /// Asks for `model`, then sends `fresh` as the reading (taken after it
    /// began to wait) that it is placed by.
    async fn ask_placed(
        s: &Scheduler,
        tx: &Readings,
        model: &str,
        fresh: Option<Arc<Snapshot>>,
    ) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let waiting = acquire(s, model);
        settle().await;
        tx.send_replace(fresh);
        settle().await;
        waiting
    }

    fn start_with_gpus(text: &str) -> (Scheduler, Arc<Fake>, Readings) {
        let fake = Arc::new(Fake::default());
        let (gpus, tx) = Gpus::manual();
        let s =
            Scheduler::with_spawner_and_gpus(&config(text), Bus::detached(), fake.clone(), gpus);
        (s, fake, tx)
    }

    /// Starts `a` (pid 101) on GPU 0 of `total_mib`, 500 MiB used by others,
    /// measures it at 6000 MiB and leaves it idle for a second.
    async fn a_resident_and_idle(s: &Scheduler, fake: &Fake, tx: &Readings, total_mib: u64) {
        let empty = [(0, total_mib, 500)];
        tx.send_replace(reading(&empty, &[]));
        settle().await;
        let a = ask_placed(s, tx, "a", reading(&empty, &[])).await;
        fake.ready_as("a", 101);
        drop(a.await.unwrap().unwrap());
        tx.send_replace(reading(&[(0, total_mib, 6500)], &[(101, 0, 6000)]));
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }

    impl Fake {
        fn ready_as(&self, model: &str, pid: u32) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Ready {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                    pid,
                    load_time: Duration::from_millis(5),
                });
            });
        }

        fn env_of(&self, model: &str, key: &str) -> Option<String> {
            self.with_last(model, |s| {
                s.spec
                    .env
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            })
        }

        fn fail_start(&self, model: &str, reason: StartFailure) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::StartFailed {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    reason,
                    pid: None,
                });
            });
        }
    }

    const GPU_MODELS: &str = "[scheduler]\nmax_loaded = 4\nvram_reserve_mb = 500\n\
         [models.a]\ncmd = [\"a\", \"{port}\"]\nvram_mb = 6000\n\
         [models.b]\ncmd = [\"b\", \"{port}\"]\nvram_mb = 6000\n\
         [models.big]\ncmd = [\"big\", \"{port}\"]\nvram_mb = 20000\n\
         [models.one]\ncmd = [\"one\", \"{port}\"]\nvram_mb = 1000\ngpus = [1]\n";

    #[tokio::test(start_paused = true)]
    async fn a_model_goes_on_a_gpu_it_fits_by_a_fresh_reading_with_cuda_visible_devices() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        tx.send_replace(reading(&[(0, 8000, 4000), (1, 8000, 500)], &[]));
        settle().await;
        let a = acquire(&s, "a");
        settle().await;
        assert!(
            fake.started().is_empty(),
            "waits for a reading taken after it asked"
        );
        tx.send_replace(reading(&[(0, 8000, 4000), (1, 8000, 500)], &[]));
        settle().await;
        assert_eq!(fake.started(), ["a"]);
        assert_eq!(
            fake.env_of("a", "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("1")
        );
        assert_eq!(
            fake.env_of("a", "CUDA_DEVICE_ORDER").as_deref(),
            Some("PCI_BUS_ID")
        );
        fake.ready_as("a", 101);
        let lease = a.await.unwrap().unwrap();
        assert_eq!(lease.gpu(), Some(1));
        // The reading after the start is its measurement.
        tx.send_replace(reading(
            &[(0, 8000, 4000), (1, 8000, 5500)],
            &[(101, 1, 5000)],
        ));
        settle().await;
        let st = status_of(&s, "a").await;
        assert_eq!((st.gpu, st.vram_bytes), (Some(1), Some(5000 << 20)));
        assert_eq!(st.vram_need_source, Some("declared"));
    }

    #[tokio::test(start_paused = true)]
    async fn short_of_memory_the_idle_least_recently_used_model_on_that_gpu_goes() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        let gpus = [(0, 8000, 500)];
        a_resident_and_idle(&s, &fake, &tx, 8000).await;
        let b = ask_placed(&s, &tx, "b", reading(&[(0, 8000, 6500)], &[(101, 0, 6000)])).await;
        assert!(fake.stop_asked("a"), "a (idle) makes room for b");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        // A reading taken as a went still lists it: not one to place by.
        tx.send_replace(reading(&[(0, 8000, 6500)], &[(101, 0, 6000)]));
        settle().await;
        assert_eq!(fake.started(), ["a"], "nor a failure: b waits");
        assert_eq!(status_of(&s, "b").await.state, ModelState::Starting);
        tx.send_replace(reading(&gpus, &[]));
        settle().await;
        assert_eq!(fake.started(), ["a", "b"]);
        fake.ready_as("b", 102);
        assert!(b.await.unwrap().is_ok());
        let st = status_of(&s, "a").await;
        assert_eq!(st.vram_need_source, Some("declared"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_that_can_never_fit_fails_at_once_with_the_numbers() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        tx.send_replace(reading(&[(0, 16000, 1000), (1, 8000, 500)], &[]));
        settle().await;
        let big = ask_placed(
            &s,
            &tx,
            "big",
            reading(&[(0, 16000, 1000), (1, 8000, 500)], &[]),
        )
        .await;
        match big.await.unwrap() {
            Err(AcquireError::NoRoom { model, detail }) => {
                assert_eq!(model, "big");
                assert!(detail.contains("needs 20000 MiB"), "{detail}");
                assert!(detail.contains("GPU 0: 16000 MiB total"), "{detail}");
                assert!(detail.contains("other processes 1000 MiB"), "{detail}");
            }
            other => panic!("expected NoRoom, got {other:?}"),
        }
        assert!(fake.started().is_empty());
        // `gpus` that name no present GPU never fit either.
        tx.send_replace(reading(&[(0, 16000, 1000)], &[]));
        let one = ask_placed(&s, &tx, "one", reading(&[(0, 16000, 1000)], &[])).await;
        assert!(matches!(
            one.await.unwrap(),
            Err(AcquireError::NoRoom { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn measured_use_is_learned_and_replaces_the_estimate() {
        let (s, fake, tx) = start_with_gpus(
            "[models.m]\ncmd = [\"m\", \"{port}\"]\n[models.n]\ncmd = [\"n\", \"{port}\"]\n",
        );
        s.seed_vram(HashMap::from([("n".to_string(), vec![3 << 30, 2 << 30])]));
        let gpus = [(0, 8000, 500)];
        tx.send_replace(reading(&gpus, &[]));
        settle().await;
        assert_eq!(
            status_of(&s, "m").await.vram_need_bytes,
            None,
            "no estimate for a cmd model"
        );
        let n = status_of(&s, "n").await;
        assert_eq!(
            (n.vram_need_bytes, n.vram_need_source),
            (Some(3 << 30), Some("measured"))
        );
        let m = ask_placed(&s, &tx, "m", reading(&gpus, &[])).await;
        fake.ready_as("m", 201);
        drop(m.await.unwrap().unwrap());
        tx.send_replace(reading(&[(0, 8000, 2548)], &[(201, 0, 2048)]));
        settle().await;
        let st = status_of(&s, "m").await;
        assert_eq!(st.vram_need_bytes, Some(2048 << 20));
        assert_eq!(st.gpu, Some(0), "learned from where it was measured");
        s.stop("m").await;
        fake.exit("m", ExitReason::Stopped);
        settle().await;
        let st = status_of(&s, "m").await;
        assert_eq!(
            (st.vram_need_bytes, st.vram_need_source),
            (Some(2048 << 20), Some("measured")),
            "the run's peak outlives the run"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_memory_while_starting_evicts_one_more_and_retries_once() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        let gpus = [(0, 16000, 500)];
        a_resident_and_idle(&s, &fake, &tx, 16000).await;
        // b fits by the numbers, but runs out of memory while loading.
        let b = ask_placed(
            &s,
            &tx,
            "b",
            reading(&[(0, 16000, 6500)], &[(101, 0, 6000)]),
        )
        .await;
        assert_eq!(fake.started(), ["a", "b"]);
        let oom = || StartFailure::OutOfMemory {
            status: "exit status 1".into(),
        };
        fake.fail_start("b", oom());
        settle().await;
        assert!(fake.stop_asked("a"), "one more model is evicted");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        tx.send_replace(reading(&gpus, &[]));
        settle().await;
        assert_eq!(fake.started(), ["a", "b", "b"], "and b tries once more");
        fake.fail_start("b", oom());
        match b.await.unwrap() {
            Err(AcquireError::StartFailed { reason, .. }) => assert_eq!(reason, oom()),
            other => panic!("a second out-of-memory fails the request, got {other:?}"),
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
