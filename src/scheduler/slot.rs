//! One model's state as the core keeps it: its [`Phase`], its child's
//! identity, what the core knows of its leases, its waiters, its load
//! times and its GPU figures.
//!
//! A slot changes only inside the core (see [`super::core`]); nothing here
//! reads a clock, the gate or /proc: every time comes in as an argument.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::queue::Waiter;
use super::{KeepAlive, ModelState, ModelStatus, Progress, LOAD_TIMES_KEPT, VRAM_RUNS_KEPT};
use crate::config::{ModelConfig, CUDA_VISIBLE_DEVICES};
use crate::events::{Event, LoadProgress, Reason};

/// A model that ran at least this long before crashing starts its backoff
/// over.
pub(super) const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// Upper bound of the restart backoff after repeated failures.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the scheduler stopped a model; stored with its `stopped` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    Ttl,
    Evicted,
    Admin,
    Shutdown,
    Reload,
}

impl StopReason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            StopReason::Ttl => "ttl",
            StopReason::Evicted => "evicted",
            StopReason::Admin => "admin",
            StopReason::Shutdown => "shutdown",
            StopReason::Reload => "reload",
        }
    }

    /// As stored with the `stopped` event.
    pub(super) fn reason(self) -> Reason {
        match self {
            StopReason::Ttl => Reason::Ttl,
            StopReason::Evicted => Reason::Evicted,
            StopReason::Admin => Reason::Admin,
            StopReason::Shutdown => Reason::Shutdown,
            StopReason::Reload => Reason::Reload,
        }
    }
}

/// Where a model's GPU memory need comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VramSource {
    /// Its `vram_mb`.
    Declared,
    /// The peak of its recent runs.
    Measured,
    /// Its GGUF's estimate.
    Estimated,
}

impl VramSource {
    /// As `ps` and the logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            VramSource::Declared => "declared",
            VramSource::Measured => "measured",
            VramSource::Estimated => "estimated",
        }
    }
}

impl std::fmt::Display for VramSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
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
    pub(super) fn state(self) -> ModelState {
        match self {
            Phase::Stopped => ModelState::Stopped,
            Phase::Pending | Phase::Starting => ModelState::Starting,
            Phase::Ready => ModelState::Ready,
            Phase::Draining | Phase::Stopping => ModelState::Stopping,
            Phase::Failed => ModelState::Failed,
        }
    }

    /// Occupies a place under `max_loaded`.
    pub(super) fn is_loaded(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Draining | Phase::Stopping
        )
    }

    /// Serving or draining: its child is up and its gate exists.
    pub(super) fn is_running(self) -> bool {
        matches!(self, Phase::Ready | Phase::Draining)
    }
}

pub(super) struct Slot {
    pub(super) config: ModelConfig,
    pub(super) phase: Phase,
    pub(super) waiters: Vec<Waiter>,
    /// When it became Pending: starts are granted oldest first.
    pub(super) pending_since: Instant,
    /// A lease on the current child is known to be out: the core handed
    /// one to a waiter, or its gate refused to close for one; cleared by
    /// the gate's report of its last lease (see [`super::gate`]).
    pub(super) busy: bool,
    /// The last use the core knows of: the last lease returned, a lease
    /// handed out, or the child's Ready.
    pub(super) last_used: Instant,
    /// A child exists (from its spawn to its Exited or StartFailed).
    pub(super) has_child: bool,
    /// The current child has a gate (from its Ready on); open only while
    /// Ready.
    pub(super) has_gate: bool,
    /// Identity of the current child; events and leases of older ones are
    /// ignored.
    pub(super) instance: u64,
    pub(super) pid: Option<u32>,
    pub(super) ready_since: Option<Instant>,
    /// Consecutive failed starts or crashes.
    pub(super) failures: u32,
    pub(super) retry_at: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) starts: u64,
    /// Removed from the config: goes away once its child has stopped.
    pub(super) removed: bool,
    /// A start without a waiter is wanted (preload): Pending is not pruned
    /// back to Stopped. Cleared at Ready, a failed start, a crash, an
    /// admin stop and shutdown.
    pub(super) preloading: bool,
    /// The idle TTL set at run time, over `config.ttl`; dropped when a
    /// reload changes `config.ttl`.
    pub(super) keep_alive: Option<KeepAlive>,
    /// Why the current stop was asked for.
    pub(super) stop_reason: Option<StopReason>,
    /// Its gate was asked to close for a stop and the report is awaited
    /// (Draining until then).
    pub(super) closing: bool,
    /// The state last published on the bus.
    pub(super) shown: Option<ModelState>,
    /// When the current child was spawned (Starting only).
    pub(super) starting_since: Option<Instant>,
    /// The current child's own load fraction, if it printed one.
    pub(super) child_fraction: Option<f64>,
    /// The last successful load times, oldest first, at most
    /// [`LOAD_TIMES_KEPT`].
    pub(super) load_times: VecDeque<Duration>,
    /// The waiter count last published on the bus.
    pub(super) shown_waiting: usize,
    /// The GPU the current child was placed on.
    pub(super) gpu: Option<u32>,
    /// GPU memory of the current child's process tree, last reading.
    pub(super) vram_now: u64,
    /// The most it used in the current run.
    pub(super) vram_peak: u64,
    /// The peak of its last runs (this daemon's or, seeded, from history),
    /// oldest first, at most [`VRAM_RUNS_KEPT`].
    pub(super) vram_runs: VecDeque<u64>,
    /// The estimate from its GGUF: `None` until worked out (off the
    /// loop), `Some(None)` where there is none.
    pub(super) estimate: Option<Option<u64>>,
    /// The measurement of this run already exceeded `vram_mb` (warned).
    pub(super) warned_over: bool,
    /// This pending start already made room once after running out of
    /// memory.
    pub(super) oom_retried: bool,
    /// GPU readings received when it became Pending: it is placed by a
    /// later (fresh) one.
    pub(super) pending_reading: u64,
    /// A reading taken since its Ready has measured it (until then it is
    /// taken to hold its whole need).
    pub(super) measured_ready: bool,
}

impl Slot {
    pub(super) fn new(config: ModelConfig, now: Instant) -> Slot {
        Slot {
            config,
            phase: Phase::Stopped,
            waiters: Vec::new(),
            pending_since: now,
            busy: false,
            last_used: now,
            has_child: false,
            has_gate: false,
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
            closing: false,
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
    pub(super) fn vram_need(&self) -> Option<(u64, VramSource)> {
        if let Some(declared) = self.config.vram_bytes {
            return Some((declared, VramSource::Declared));
        }
        let measured = self
            .vram_runs
            .iter()
            .copied()
            .chain(Some(self.vram_peak))
            .max()
            .filter(|b| *b > 0);
        if let Some(m) = measured {
            return Some((m, VramSource::Measured));
        }
        self.estimate.flatten().map(|e| (e, VramSource::Estimated))
    }

    /// The GPUs it may go on: its `gpus`, or the numeric list of its own
    /// `CUDA_VISIBLE_DEVICES`.
    pub(super) fn allowed_gpus(&self) -> Option<Vec<u32>> {
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

    /// Ends the current run's GPU measurement: its peak joins the learned
    /// need. The caller marks the readings stale.
    pub(super) fn end_vram_run(&mut self) {
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
    pub(super) fn expected_load(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.load_times.iter().copied().collect();
        times.sort();
        let n = times.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(times[n / 2]),
            _ => Some((times[n / 2 - 1] + times[n / 2]) / 2),
        }
    }

    pub(super) fn remember_load(&mut self, took: Duration) {
        if self.load_times.len() == LOAD_TIMES_KEPT {
            self.load_times.pop_front();
        }
        self.load_times.push_back(took);
    }

    /// Progress of the current start, if Starting.
    pub(super) fn progress(&self, now: Instant) -> Option<Progress> {
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
    pub(super) fn ttl(&self) -> Option<Duration> {
        match self.keep_alive {
            Some(keep) => keep.ttl(),
            None => self.config.ttl,
        }
    }

    /// When its idle TTL runs out, as far as the core knows: only while
    /// Ready and no lease is known to be out (the gate reports the last
    /// one returned, which sets the time again).
    pub(super) fn ttl_deadline(&self) -> Option<Instant> {
        let ttl = self.ttl()?;
        (self.phase == Phase::Ready && !self.busy).then(|| self.last_used + ttl)
    }

    /// Whether its requests are known to hold the child (running phases
    /// only).
    pub(super) fn in_use(&self) -> bool {
        self.phase.is_running() && self.busy
    }

    /// Drops the waiter `id` if it waits here; true if it did.
    pub(super) fn forget_waiter(&mut self, id: super::queue::WaiterId) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.id != id);
        self.waiters.len() != before
    }

    /// Its status as far as the core knows; live figures (leases out,
    /// resident memory) are the shell's to add (see [`StatusDraft`]).
    pub(super) fn status(&self, now: Instant) -> StatusDraft {
        let running = self.phase.is_running();
        let need = self.vram_need();
        let status = ModelStatus {
            name: self.config.name.clone(),
            aliases: self.config.aliases.clone(),
            state: self.phase.state(),
            pid: self.pid.filter(|_| self.phase.is_loaded()),
            port: None,
            socket: None,
            inflight: 0,
            waiting: self.waiters.len(),
            uptime_s: self
                .ready_since
                .filter(|_| running)
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            idle_s: None,
            ttl_s: self.ttl().map(|t| t.as_secs_f64()),
            pinned: self.config.pin,
            starts: self.starts,
            last_error: self.last_error.clone(),
            progress: self.progress(now),
            load_ms: self.load_times.back().copied().map(millis),
            gpu: self.gpu.filter(|_| self.phase.is_loaded()),
            vram_bytes: (self.phase.is_loaded() && self.gpu.is_some()).then_some(self.vram_now),
            vram_need_bytes: need.map(|(b, _)| b),
            vram_need_source: need.map(|(_, s)| s),
            waiting_priority: super::queue::head(&self.waiters).map(|(p, _)| p),
            rss_bytes: None,
        };
        StatusDraft {
            status,
            running,
            last_used: self.last_used,
        }
    }
}

/// A model's status from the core, for the shell to complete with what
/// only a live read gives: the gate's leases, address and last use while
/// running, and the child's resident memory from /proc for `status.pid`.
#[derive(Debug)]
pub(crate) struct StatusDraft {
    pub(crate) status: ModelStatus,
    /// Ready or draining: the gate is the child's.
    pub(crate) running: bool,
    /// The last use the core knows of (the gate's may be later).
    pub(crate) last_used: Instant,
}

/// Whole milliseconds, saturating.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn progress_event(model: &str, p: Progress) -> Event {
    Event::Progress(Arc::new(LoadProgress {
        model: model.to_string(),
        elapsed_ms: p.elapsed_ms,
        expected_ms: p.expected_ms,
        fraction: p.fraction,
    }))
}

/// Backoff before the next start after `failures` consecutive failures: the
/// first retry is immediate, then 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
pub(super) fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(5)).min(MAX_BACKOFF),
    }
}
