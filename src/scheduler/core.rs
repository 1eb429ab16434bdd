//! The scheduler's decisions, as a synchronous core: the one owner of every
//! model's [`Slot`] (phase, child, leases as known, waiters, GPU figures).
//!
//! Every entry point takes what happened (a request, a lease returned, a
//! child's event, a GPU reading, a timer) and `now`, changes the slots, and
//! returns the [`Effect`]s to perform: spawn or stop a child, open or close
//! a gate, answer a waiter, put an event on the bus, ask for a GPU reading,
//! read a GGUF estimate. The core itself reads no clock, no /proc, no
//! file, sends nothing and spawns nothing; the shell ([`super::shell`])
//! performs the effects and feeds their results back as calls, so a
//! decision is replayed exactly from its inputs (the unit tests do, with
//! no runtime). [`Core::next_deadline`] says when [`Core::tick`] is next
//! due (idle TTLs, progress, a held-back swap).
//!
//! # What the core knows of leases
//!
//! Requests enter a Ready model's gate on their own threads without a
//! message (see [`super::gate`]); the core learns of leases only by
//! messages, so it knows, per running model:
//! - `busy`: a lease is known to be out. Set when the core hands a lease
//!   to a waiter, or when a gate refuses a conditional close (a lease is
//!   out); cleared by `idle`, which every gate sends when its count
//!   falls to zero while open (the core keeps every Ready gate watched),
//!   and by a close report with no lease out.
//! - `last_used`: the time of the last such message.
//!
//! A request that enters the gate of a model the core takes to be idle is
//! not seen until it returns its lease. So whatever the core does to a
//! model *because* it is idle (its TTL ran out; a swap that would wait for
//! a busy model) closes the gate only if no lease is out, atomically in the
//! gate ([`Close::IfIdleFor`]); a refusal comes back at once
//! ([`Core::gate_closed`]) with the gate's leases and last use, and the
//! decision is made again. What the core does regardless of use (a drain
//! after the fairness bound, an admin stop, a reload) closes at once
//! ([`Close::Now`]) and the report says how many leases to drain. Nothing
//! polls: a model waited on for being busy ends its wait with its `idle`
//! message, or its fairness bound.
//!
//! While a gate close is awaiting its report, the core decides nothing
//! (a start is planned again once every report is in) and publishes no
//! state, so the bus never sees a close that was refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use super::effect::{Close, Effect, GateReport};
use super::placement::{self, Decision, GpuView, Reading};
use super::planner::mib;
use super::queue::{self, Swap, Waiter, WaiterId};
use super::slot::{progress_event, Phase, Slot, StatusDraft, StopReason};
use super::{AcquireError, PROGRESS_PERIOD};
use crate::config::{Config, SchedulerConfig, CUDA_VISIBLE_DEVICES};
use crate::events::{Event, ModelEvent, ModelEventKind};
use crate::supervisor::ChildSpec;

pub(crate) struct Core {
    pub(super) slots: HashMap<Arc<str>, Slot>,
    pub(super) limits: SchedulerConfig,
    pub(super) gpus: GpuView,
    pub(super) next_instance: u64,
    /// When the Starting models' progress next goes out.
    pub(super) next_progress: Instant,
    /// When a swap held back for a busy model is looked at again: its
    /// fairness bound (set by each reconcile).
    pub(super) swap_due: Option<Instant>,
    pub(super) shutting_down: bool,
    /// Gate closes whose report has not come back.
    pub(super) awaiting_gates: usize,
    /// A reconcile was put off until every gate report is in.
    pub(super) replan: bool,
    pub(super) effects: Vec<Effect>,
}

impl Core {
    /// The core for `config`'s models, with the GPU reading at hand.
    pub(crate) fn new(config: &Config, reading: Reading, now: Instant) -> Core {
        Core {
            slots: config
                .models
                .iter()
                .map(|m| (Arc::<str>::from(m.name.as_str()), Slot::new(m.clone(), now)))
                .collect(),
            limits: config.scheduler.clone(),
            gpus: GpuView {
                snapshot: reading.snapshot,
                count: 0,
                gone: Vec::new(),
                first_due: None,
            },
            next_instance: 1,
            next_progress: now,
            swap_due: None,
            shutting_down: false,
            awaiting_gates: 0,
            replan: false,
            effects: Vec::new(),
        }
    }

    /// The first effects: every model's GGUF estimate and state.
    pub(crate) fn start(&mut self) -> Vec<Effect> {
        let names: Vec<Arc<str>> = self.slots.keys().cloned().collect();
        for name in names {
            self.ask_estimate(&name);
        }
        self.finish()
    }

    /// Asks for `name`'s GGUF estimate (placement waits for it where it
    /// is the only need known); a `cmd` model has none.
    pub(super) fn ask_estimate(&mut self, name: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        match &slot.config.model_path {
            Some(path) => {
                slot.estimate = None;
                self.effects.push(Effect::Estimate {
                    model: name.clone(),
                    path: path.clone(),
                    argv: slot.config.argv.clone(),
                });
            }
            None => slot.estimate = Some(None),
        }
    }

    /// GPU readings are coming (NVML loaded): with none yet, nothing is
    /// placed until the first arrives, for [`placement::FIRST_READING_AT_MOST`]
    /// at most.
    pub(crate) fn expect_readings(&mut self, now: Instant) {
        if !self.gpus.present() {
            self.gpus.first_due = Some(now + placement::FIRST_READING_AT_MOST);
        }
    }

    /// Publishes what changed (unless a gate report is awaited) and hands
    /// over the effects.
    pub(super) fn finish(&mut self) -> Vec<Effect> {
        if self.awaiting_gates == 0 {
            self.publish_states();
        }
        std::mem::take(&mut self.effects)
    }

    /// Whether shutdown has begun and every child is gone.
    pub(crate) fn shut_down(&self) -> bool {
        self.shutting_down && self.slots.values().all(|s| !s.has_child)
    }

    /// When [`Core::tick`] is next due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let ttl = self.slots.values().filter_map(Slot::ttl_deadline).min();
        let progress = self
            .slots
            .values()
            .any(|s| s.phase == Phase::Starting)
            .then_some(self.next_progress);
        let swap = self.swap_due.filter(|_| !self.shutting_down);
        [ttl, progress, swap, self.gpus.first_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// Does what is due at `now`: progress, idle TTLs, a held-back swap.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let starting = self.slots.values().any(|s| s.phase == Phase::Starting);
        if starting && self.next_progress <= now {
            self.emit_progress(now);
        }
        self.expire_idle(now);
        let mut replan = self.swap_due.is_some_and(|d| d <= now);
        if self.gpus.first_due.is_some_and(|d| d <= now) {
            tracing::warn!(
                waited_s = placement::FIRST_READING_AT_MOST.as_secs(),
                "no GPU reading yet; starting models without placing them on a GPU"
            );
            self.gpus.first_due = None;
            replan = true;
        }
        if replan {
            self.reconcile(now);
        }
        self.finish()
    }

    /// A request for `model` with its own `priority`, answered by a
    /// `Lease` or `Fail` effect for `waiter` (now or later).
    pub(crate) fn acquire(
        &mut self,
        model: &str,
        waiter: WaiterId,
        priority: i32,
        now: Instant,
    ) -> Vec<Effect> {
        self.enqueue(model, waiter, priority, now);
        self.finish()
    }

    fn enqueue(&mut self, model: &str, id: WaiterId, priority: i32, now: Instant) {
        let refuse = |error| Effect::Fail { waiter: id, error };
        if self.shutting_down {
            self.effects.push(refuse(AcquireError::ShuttingDown));
            return;
        }
        let Some((name, slot)) = self.slots.get_key_value(model) else {
            self.effects
                .push(refuse(AcquireError::Unknown(model.to_string())));
            return;
        };
        let name = name.clone();
        if slot.phase != Phase::Ready {
            if let Some(full) = queue::full(&self.slots, self.limits.max_queue) {
                self.effects.push(refuse(full));
                return;
            }
        }
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        let waiter = Waiter {
            id,
            since: now,
            priority: priority.saturating_add(slot.config.priority),
        };
        match slot.phase {
            Phase::Ready => {
                // The gate opened after the requester looked.
                slot.busy = true;
                slot.last_used = slot.last_used.max(now);
                self.effects.push(Effect::Lease {
                    waiter: id,
                    model: name,
                });
            }
            Phase::Pending | Phase::Starting | Phase::Draining | Phase::Stopping => {
                slot.waiters.push(waiter);
            }
            Phase::Failed if slot.retry_at.is_some_and(|t| t > now) => {
                let retry_after = slot
                    .retry_at
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                self.effects.push(refuse(AcquireError::BackingOff {
                    model: name.to_string(),
                    reason: slot.last_error.clone().unwrap_or_default(),
                    retry_after,
                }));
            }
            Phase::Stopped | Phase::Failed => {
                slot.waiters.push(waiter);
                self.make_pending(&name, now);
                self.reconcile(now);
            }
        }
    }

    /// The requester of `waiter` went away: it leaves the queue, and a
    /// start no one waits for any more is not made.
    pub(crate) fn left(&mut self, model: &str, waiter: WaiterId) -> Vec<Effect> {
        if let Some(slot) = self.slots.get_mut(model) {
            slot.forget_waiter(waiter);
            if slot.phase == Phase::Pending && slot.waiters.is_empty() && !slot.preloading {
                tracing::debug!(model = %model, "every request waiting for the model has gone; not starting it");
                slot.phase = Phase::Stopped;
                slot.oom_retried = false;
            }
        }
        self.finish()
    }

    /// The last lease out on `model`'s open gate was returned; `used`: the
    /// gate's last use (that return, or a later use).
    pub(crate) fn idle(
        &mut self,
        model: &str,
        instance: u64,
        used: Instant,
        now: Instant,
    ) -> Vec<Effect> {
        if let Some(slot) = current(&mut self.slots, model, instance) {
            if slot.phase == Phase::Ready {
                slot.busy = false;
                slot.last_used = slot.last_used.max(used);
                // A zero TTL ends now; a swap waiting for it goes ahead.
                self.expire_idle(now);
                self.reconcile(now);
            }
        }
        self.finish()
    }

    /// The last lease out on `model`'s closed gate was returned.
    pub(crate) fn drained(&mut self, model: &str, instance: u64) -> Vec<Effect> {
        // Drains of children that are already gone are ignored.
        if let Some(slot) = current(&mut self.slots, model, instance) {
            if slot.phase == Phase::Draining && !slot.closing {
                let why = slot.stop_reason.unwrap_or(StopReason::Evicted);
                self.begin_stop(model, why);
            }
        }
        self.finish()
    }

    /// What `model`'s gate said to a [`Effect::CloseGate`].
    pub(crate) fn gate_closed(
        &mut self,
        model: &str,
        instance: u64,
        report: GateReport,
        now: Instant,
    ) -> Vec<Effect> {
        self.awaiting_gates = self.awaiting_gates.saturating_sub(1);
        if let Some(slot) = current(&mut self.slots, model, instance).filter(|s| s.closing) {
            slot.closing = false;
            let why = slot.stop_reason.unwrap_or(StopReason::Evicted);
            match (report.closed, report.leases) {
                (true, 0) => self.begin_stop(model, why),
                (true, inflight) => {
                    tracing::info!(model = %model, inflight, reason = why.as_str(),
                        "draining model before stopping it");
                    slot.busy = true;
                }
                (false, leases) => {
                    // In use after all: it stays, and what wanted it gone
                    // is decided again.
                    slot.phase = Phase::Ready;
                    slot.stop_reason = None;
                    slot.busy = leases > 0;
                    slot.last_used = slot.last_used.max(report.last_used);
                    self.replan = true;
                }
            }
        }
        if self.awaiting_gates == 0 && std::mem::take(&mut self.replan) {
            self.reconcile(now);
        }
        self.finish()
    }

    /// Every model's status as far as the core knows (sorted by name).
    pub(crate) fn status(&self, now: Instant) -> Vec<StatusDraft> {
        let mut list: Vec<StatusDraft> = self.slots.values().map(|s| s.status(now)).collect();
        list.sort_by(|a, b| a.status.name.cmp(&b.status.name));
        list
    }

    /// A model's GGUF estimate of GPU memory, worked out.
    pub(crate) fn estimated(
        &mut self,
        model: &str,
        bytes: Option<u64>,
        now: Instant,
    ) -> Vec<Effect> {
        if let Some(slot) = self.slots.get_mut(model) {
            slot.estimate = Some(bytes);
        }
        self.reconcile(now);
        self.finish()
    }

    /// The pids whose process trees a GPU reading should measure.
    pub(crate) fn measured_pids(&self) -> Vec<u32> {
        self.slots
            .values()
            .filter(|s| s.phase.is_loaded())
            .filter_map(|s| s.pid)
            .collect()
    }

    /// A new GPU reading: measurements, then waiting starts planned again.
    pub(crate) fn reading(&mut self, reading: Reading, now: Instant) -> Vec<Effect> {
        self.gpus
            .reading(reading, &mut self.slots, now, &mut self.effects);
        self.reconcile(now);
        self.finish()
    }

    /// Answers every waiter of `name` with `err`.
    pub(super) fn fail_waiters(&mut self, name: &str, err: &AcquireError) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        for w in slot.waiters.drain(..) {
            self.effects.push(Effect::Fail {
                waiter: w.id,
                error: err.clone(),
            });
        }
    }

    pub(super) fn remove_slot(&mut self, name: &str) {
        if let Some((name, _)) = self.slots.remove_entry(name) {
            self.effects.push(Effect::DropGate {
                model: name.clone(),
            });
            self.effects
                .push(Effect::Emit(Event::Removed { model: name }));
        }
    }

    /// A model with waiters (or a preload) and no child: it is placed by
    /// the next GPU reading, so the memory it is placed by is fresh.
    pub(super) fn make_pending(&mut self, name: &str, now: Instant) {
        let fresh = self.gpus.count;
        if let Some(slot) = self.slots.get_mut(name) {
            slot.phase = Phase::Pending;
            slot.pending_since = now;
            slot.pending_reading = fresh;
        }
        if self.gpus.expected() {
            self.effects.push(Effect::RefreshGpus);
        }
    }

    fn close_gate(&mut self, model: &Arc<str>, instance: u64, close: Close) {
        self.awaiting_gates += 1;
        self.effects.push(Effect::CloseGate {
            model: model.clone(),
            instance,
            close,
        });
    }

    /// Stops a model's child now if idle, else after its last request
    /// (the gate's report says which); new requests wait for the restart.
    pub(super) fn retire(&mut self, name: &Arc<str>, why: StopReason, close: Close) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        match slot.phase {
            Phase::Ready => {
                slot.phase = Phase::Draining;
                slot.stop_reason = Some(why);
                slot.closing = true;
                let instance = slot.instance;
                self.close_gate(name, instance, close);
            }
            Phase::Starting => self.begin_stop(name, why),
            _ => {}
        }
    }

    /// Asks the child to stop, closing its gate first if it still admits.
    pub(super) fn begin_stop(&mut self, name: &str, why: StopReason) {
        let Some((name, slot)) = self.slots.get_key_value(name) else {
            return;
        };
        let (name, instance, open) = (name.clone(), slot.instance, slot.phase == Phase::Ready);
        tracing::info!(model = %name, reason = why.as_str(), "stopping model");
        if open {
            self.close_gate(&name, instance, Close::Now);
        }
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        slot.phase = Phase::Stopping;
        slot.stop_reason = Some(why);
        slot.closing = false;
        if slot.has_child {
            self.effects.push(Effect::StopChild { model: name });
        }
    }

    /// Closes the gates of Ready models whose idle TTL has run out (if
    /// they are still idle; see the module's header).
    pub(super) fn expire_idle(&mut self, now: Instant) {
        let due: Vec<(Arc<str>, Duration)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.ttl_deadline().is_some_and(|d| d <= now))
            .filter_map(|(n, s)| Some((n.clone(), s.ttl()?)))
            .collect();
        for (name, ttl) in due {
            self.retire(&name, StopReason::Ttl, Close::IfIdleFor(ttl));
        }
    }

    /// Sends every Starting model's progress.
    fn emit_progress(&mut self, now: Instant) {
        self.next_progress = now + PROGRESS_PERIOD;
        for (name, slot) in &self.slots {
            if let Some(p) = slot.progress(now) {
                self.effects.push(Effect::Emit(progress_event(name, p)));
            }
        }
    }

    /// Emits the state, and the number of requests waiting, of every
    /// model where they changed since they were last shown.
    fn publish_states(&mut self) {
        for (name, slot) in &mut self.slots {
            let state = slot.phase.state();
            if slot.shown != Some(state) {
                slot.shown = Some(state);
                self.effects.push(Effect::Emit(Event::State {
                    model: name.clone(),
                    state,
                }));
            }
            let waiting = slot.waiters.len();
            if slot.shown_waiting != waiting {
                slot.shown_waiting = waiting;
                self.effects.push(Effect::Emit(Event::Queue {
                    model: name.clone(),
                    waiting,
                }));
            }
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
    pub(super) fn reconcile(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        if self.awaiting_gates > 0 {
            self.replan = true;
            return;
        }
        self.swap_due = None;
        for (std::cmp::Reverse(priority), since, name) in queue::pending_in_turn(&self.slots) {
            // A request whose client left starts and evicts nothing.
            if let Some(slot) = self.slots.get_mut(&name) {
                if slot.waiters.is_empty() && !slot.preloading {
                    tracing::debug!(model = %name, "every request waiting for the model has gone; not starting it");
                    slot.phase = Phase::Stopped;
                    slot.oom_retried = false;
                    continue;
                }
            }
            let decision = match placement::rules(&self.slots, &name, self.limits.max_loaded) {
                Decision::Start => placement::placement(
                    &self.gpus,
                    &self.slots,
                    &name,
                    self.limits.vram_reserve_bytes,
                ),
                other => other,
            };
            match decision {
                Decision::Start => self.start_child(&name, None, now),
                Decision::StartOn(gpu) => self.start_child(&name, Some(gpu), now),
                Decision::Blocked(err) => self.refuse(&name, &err),
                Decision::Evict(victims) if victims.is_empty() => {}
                Decision::Evict(victims) => {
                    self.make_room(&name, &victims, (priority, since), now);
                }
            }
        }
    }

    /// Fails a pending model's waiters: it cannot start.
    fn refuse(&mut self, name: &Arc<str>, err: &AcquireError) {
        if let Some(slot) = self.slots.get_mut(name) {
            tracing::warn!(model = %name, error = %err, "cannot start model");
            slot.preloading = false;
            slot.oom_retried = false;
            slot.phase = Phase::Stopped;
        }
        self.fail_waiters(name, err);
    }

    /// Retires `victims` for `name`, unless the fairness bound holds the
    /// swap back.
    fn make_room(
        &mut self,
        name: &Arc<str>,
        victims: &[Arc<str>],
        head: (i32, Instant),
        now: Instant,
    ) {
        let bound = self.limits.max_wait_before_swap;
        let close = match queue::swap(&self.slots, victims, head, bound, now) {
            Swap::Hold(due) => {
                self.swap_due = Some(self.swap_due.map_or(due, |d| d.min(due)));
                return;
            }
            Swap::Go { only_if_idle: true } => Close::IfIdle,
            Swap::Go {
                only_if_idle: false,
            } => Close::Now,
        };
        for victim in victims {
            if let Some(v) = self.slots.get(victim) {
                tracing::info!(model = %victim, for_model = %name, busy = v.in_use(),
                    "evicting model to make room");
            }
            self.retire(victim, StopReason::Evicted, close);
        }
    }

    fn start_child(&mut self, name: &Arc<str>, gpu: Option<u32>, now: Instant) {
        let instance = self.next_instance;
        self.next_instance += 1;
        let Some(slot) = self.slots.get(name) else {
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
            let need = slot.vram_need();
            tracing::info!(model = %name, gpu = g, need_mib = need.map(|(b, _)| mib(b)),
                source = need.map(|(_, s)| s.as_str()), "placing model on GPU");
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
        let mut requested = ModelEvent::new(name, ModelEventKind::StartRequested, 0);
        requested.gpu = gpu;
        self.effects.push(Effect::Lifecycle {
            event: requested,
            rss_of: None,
        });
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
        slot.has_gate = false;
        slot.busy = false;
        slot.ready_since = None;
        slot.starts += 1;
        slot.has_child = true;
        self.effects.push(Effect::Spawn(spec));
    }
}

/// A lifecycle step of `model`, to be stamped and emitted by the shell.
pub(super) fn lifecycle(
    model: &str,
    kind: ModelEventKind,
    f: impl FnOnce(&mut ModelEvent),
) -> Effect {
    let mut e = ModelEvent::new(model, kind, 0);
    f(&mut e);
    Effect::Lifecycle {
        event: e,
        rss_of: None,
    }
}

/// The slot of `model` if `instance` is still its current child: events
/// from children that were already replaced are ignored.
pub(super) fn current<'a>(
    slots: &'a mut HashMap<Arc<str>, Slot>,
    model: &str,
    instance: u64,
) -> Option<&'a mut Slot> {
    slots.get_mut(model).filter(|s| s.instance == instance)
}

#[cfg(test)]
mod tests {
    //! The core alone: no runtime, no channels, no sleeps. Each test feeds
    //! what happens with explicit times and asserts on the effects; a small
    //! stand-in plays the gates (leases, closes) the way `gate.rs` does.

    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Close, Core, Effect, GateReport};
    use crate::config::{ChildAddr, Config};
    use crate::gpu::{GpuReading, ProcessReading, Snapshot};
    use crate::scheduler::placement::Reading;
    use crate::scheduler::queue::WaiterId;
    use crate::scheduler::{AcquireError, ModelState};
    use crate::supervisor::{ChildEvent, ExitReason, StartFailure};

    const MB: u64 = 1 << 20;

    /// A gate as the core's effects leave it.
    struct FakeGate {
        instance: u64,
        open: bool,
        leases: usize,
        last_used: Instant,
    }

    struct Harness {
        core: Core,
        t0: Instant,
        gates: HashMap<String, FakeGate>,
        /// The instance of each model's newest child.
        children: HashMap<String, u64>,
        next_waiter: u64,
    }

    fn config(text: &str) -> Config {
        Config::from_toml(Path::new("test.toml"), text).unwrap()
    }

    impl Harness {
        fn new(text: &str) -> Harness {
            Harness::with_reading(text, Reading::default())
        }

        fn with_reading(text: &str, reading: Reading) -> Harness {
            let t0 = Instant::now();
            let mut core = Core::new(&config(text), reading, t0);
            let first = core.start();
            let mut h = Harness {
                core,
                t0,
                gates: HashMap::new(),
                children: HashMap::new(),
                next_waiter: 1,
            };
            h.run(first, t0);
            h
        }

        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }

        /// Plays the gates' part in `effects` (a close's report goes back to
        /// the core at once, as the shell does); returns every effect, those
        /// the reports brought included.
        fn run(&mut self, effects: Vec<Effect>, now: Instant) -> Vec<Effect> {
            let mut all = Vec::new();
            for effect in effects {
                match &effect {
                    Effect::Spawn(spec) => {
                        self.children.insert(spec.model.to_string(), spec.instance);
                    }
                    Effect::OpenGate {
                        model, instance, ..
                    } => {
                        let gate = FakeGate {
                            instance: *instance,
                            open: true,
                            leases: 0,
                            last_used: now,
                        };
                        self.gates.insert(model.to_string(), gate);
                    }
                    Effect::Lease { model, .. } => {
                        let gate = self.gates.get_mut(&**model).unwrap();
                        assert!(gate.open, "a lease on a closed gate");
                        gate.leases += 1;
                        gate.last_used = now;
                    }
                    _ => {}
                }
                let report = match &effect {
                    Effect::CloseGate {
                        model,
                        instance,
                        close,
                    } => Some((model.clone(), *instance, self.close(model, *close, now))),
                    _ => None,
                };
                all.push(effect);
                if let Some((model, instance, report)) = report {
                    let more = self.core.gate_closed(&model, instance, report, now);
                    all.extend(self.run(more, now));
                }
            }
            all
        }

        fn close(&mut self, model: &str, close: Close, now: Instant) -> GateReport {
            let gate = self.gates.get_mut(model).unwrap();
            let closed = match close {
                Close::Now => true,
                Close::IfIdle => gate.leases == 0,
                Close::IfIdleFor(ttl) => gate.leases == 0 && gate.last_used + ttl <= now,
            };
            gate.open &= !closed;
            GateReport {
                closed,
                leases: gate.leases,
                last_used: gate.last_used,
            }
        }

        fn acquire_with(&mut self, model: &str, priority: i32, at: f64) -> (WaiterId, Vec<Effect>) {
            let id = WaiterId(self.next_waiter);
            self.next_waiter += 1;
            let now = self.at(at);
            let effects = self.core.acquire(model, id, priority, now);
            (id, self.run(effects, now))
        }

        fn acquire(&mut self, model: &str, at: f64) -> (WaiterId, Vec<Effect>) {
            self.acquire_with(model, 0, at)
        }

        fn event(&mut self, event: ChildEvent, at: f64) -> Vec<Effect> {
            let now = self.at(at);
            let effects = self.core.child_event(event, now);
            self.run(effects, now)
        }

        fn instance(&self, model: &str) -> u64 {
            self.children[model]
        }

        fn ready(&mut self, model: &str, pid: u32, at: f64) -> Vec<Effect> {
            let event = ChildEvent::Ready {
                model: Arc::from(model),
                instance: self.instance(model),
                addr: ChildAddr::Unix("/run/test/m.sock".into()),
                pid,
                load_time: Duration::from_millis(5),
            };
            self.event(event, at)
        }

        fn exit(&mut self, model: &str, reason: ExitReason, at: f64) -> Vec<Effect> {
            let event = ChildEvent::Exited {
                model: Arc::from(model),
                instance: self.instance(model),
                reason,
            };
            self.event(event, at)
        }

        fn fail_start(&mut self, model: &str, reason: StartFailure, at: f64) -> Vec<Effect> {
            let event = ChildEvent::StartFailed {
                model: Arc::from(model),
                instance: self.instance(model),
                reason,
                pid: None,
            };
            self.event(event, at)
        }

        /// A request that entered `model`'s gate without the core.
        fn enter(&mut self, model: &str, at: f64) {
            let now = self.at(at);
            let gate = self.gates.get_mut(model).unwrap();
            assert!(gate.open);
            gate.leases += 1;
            gate.last_used = now;
        }

        /// A lease returned: the gate's message when it was the last.
        fn release(&mut self, model: &str, at: f64) -> Vec<Effect> {
            let now = self.at(at);
            let gate = self.gates.get_mut(model).unwrap();
            gate.leases -= 1;
            gate.last_used = now;
            let (open, instance, last) = (gate.open, gate.instance, gate.leases == 0);
            let effects = match (last, open) {
                (false, _) => return Vec::new(),
                (true, true) => self.core.idle(model, instance, now, now),
                (true, false) => self.core.drained(model, instance),
            };
            self.run(effects, now)
        }

        fn tick(&mut self, at: f64) -> Vec<Effect> {
            let now = self.at(at);
            let effects = self.core.tick(now);
            self.run(effects, now)
        }

        fn reading(&mut self, reading: Reading, at: f64) -> Vec<Effect> {
            let now = self.at(at);
            let effects = self.core.reading(reading, now);
            self.run(effects, now)
        }

        fn state(&self, model: &str) -> ModelState {
            let all = self.core.status(self.t0);
            all.into_iter()
                .find(|d| d.status.name == model)
                .unwrap()
                .status
                .state
        }

        /// Starts `model` for one request, which keeps its lease.
        fn leased(&mut self, model: &str, pid: u32, at: f64) -> WaiterId {
            let (id, effects) = self.acquire(model, at);
            assert_eq!(spawned(&effects), [model], "{effects:?}");
            let effects = self.ready(model, pid, at);
            assert_eq!(leased(&effects), [id]);
            id
        }
    }

    fn spawned(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Spawn(spec) => Some(spec.model.to_string()),
                _ => None,
            })
            .collect()
    }

    fn stop_asked(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::StopChild { model } => Some(model.to_string()),
                _ => None,
            })
            .collect()
    }

    fn closes(effects: &[Effect]) -> Vec<(String, Close)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::CloseGate { model, close, .. } => Some((model.to_string(), *close)),
                _ => None,
            })
            .collect()
    }

    fn leased(effects: &[Effect]) -> Vec<WaiterId> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Lease { waiter, .. } => Some(*waiter),
                _ => None,
            })
            .collect()
    }

    fn failed(effects: &[Effect]) -> Vec<(WaiterId, AcquireError)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Fail { waiter, error } => Some((*waiter, error.clone())),
                _ => None,
            })
            .collect()
    }

    fn two(extra: &str) -> String {
        format!(
            "{extra}[models.a]\ncmd = [\"a\", \"{{port}}\"]\n[models.b]\ncmd = [\"b\", \"{{port}}\"]\n"
        )
    }

    #[test]
    fn a_busy_model_is_drained_before_a_swap() {
        let mut h = Harness::new(&two(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"0s\"\n",
        ));
        h.leased("a", 101, 0.0);
        let (_, effects) = h.acquire("b", 1.0);
        assert_eq!(closes(&effects), [("a".to_string(), Close::Now)]);
        assert!(
            stop_asked(&effects).is_empty(),
            "a busy model is not stopped"
        );
        assert_eq!(h.state("a"), ModelState::Stopping);
        let effects = h.release("a", 2.0);
        assert_eq!(stop_asked(&effects), ["a"], "the last lease ends the drain");
        let effects = h.exit("a", ExitReason::Stopped, 3.0);
        assert_eq!(spawned(&effects), ["b"], "b starts once a is gone");
    }

    #[test]
    fn an_idle_ttl_runs_from_the_last_lease_returned() {
        let mut h = Harness::new(&two("[scheduler]\nidle_ttl = \"10s\"\n"));
        h.leased("a", 101, 0.0);
        assert_eq!(h.core.next_deadline(), None, "busy: no TTL runs");
        h.release("a", 5.0);
        assert_eq!(h.core.next_deadline(), Some(h.at(15.0)));
        assert!(h.tick(14.0).is_empty());
        let effects = h.tick(15.0);
        assert_eq!(
            closes(&effects),
            [("a".to_string(), Close::IfIdleFor(Duration::from_secs(10)))]
        );
        assert_eq!(stop_asked(&effects), ["a"]);
        assert_eq!(h.state("a"), ModelState::Stopping);
    }

    #[test]
    fn a_ttl_close_refused_for_an_unseen_request_keeps_the_model() {
        let mut h = Harness::new(&two("[scheduler]\nidle_ttl = \"10s\"\n"));
        h.leased("a", 101, 0.0);
        h.release("a", 0.0);
        // A request entered on its own thread: the core has not heard.
        h.enter("a", 8.0);
        let effects = h.tick(10.0);
        assert_eq!(closes(&effects).len(), 1);
        assert!(stop_asked(&effects).is_empty(), "the gate refused");
        assert_eq!(h.state("a"), ModelState::Ready);
        assert_eq!(h.core.next_deadline(), None, "busy now, as the gate said");
        h.release("a", 12.0);
        assert_eq!(h.core.next_deadline(), Some(h.at(22.0)));
    }

    #[test]
    fn repeated_crashes_back_off() {
        let mut h = Harness::new(&two(""));
        let (w, _) = h.acquire("a", 0.0);
        h.ready("a", 101, 0.0);
        h.release("a", 0.0);
        h.exit("a", ExitReason::Crashed("signal 9".into()), 1.0);
        assert_eq!(h.state("a"), ModelState::Failed);
        // The first retry is immediate.
        let (_, effects) = h.acquire("a", 1.0);
        assert_eq!(spawned(&effects), ["a"]);
        h.ready("a", 102, 1.0);
        h.release("a", 1.0);
        h.exit("a", ExitReason::Crashed("signal 9".into()), 2.0);
        let (w2, effects) = h.acquire("a", 2.5);
        assert!(spawned(&effects).is_empty(), "no start while backing off");
        match &failed(&effects)[..] {
            [(id, AcquireError::BackingOff { retry_after, .. })] => {
                assert_eq!((*id, *retry_after), (w2, Duration::from_millis(500)))
            }
            other => panic!("expected a backoff, got {other:?}"),
        }
        let (_, effects) = h.acquire("a", 3.0);
        assert_eq!(spawned(&effects), ["a"], "the backoff ran out");
        assert_ne!(w, w2);
    }

    #[test]
    fn a_waiter_that_left_starts_and_evicts_nothing() {
        let mut h = Harness::new(&two("[scheduler]\nmax_loaded = 1\n"));
        let (_, effects) = h.acquire("a", 0.0);
        assert_eq!(spawned(&effects), ["a"]);
        let (b, effects) = h.acquire("b", 0.1);
        assert!(spawned(&effects).is_empty(), "a takes the only place");
        assert_eq!(h.state("b"), ModelState::Starting);
        let effects = h.core.left("b", b);
        h.run(effects, h.t0);
        assert_eq!(h.state("b"), ModelState::Stopped);
        let effects = h.ready("a", 101, 1.0);
        assert!(closes(&effects).is_empty(), "{effects:?}");
        assert!(spawned(&effects).is_empty());
        assert_eq!(h.state("a"), ModelState::Ready);
    }

    #[test]
    fn a_busy_model_is_held_until_the_fairness_bound_and_an_idle_one_goes_at_once() {
        let mut h = Harness::new(&two(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n",
        ));
        h.leased("a", 101, 0.0);
        let (_, effects) = h.acquire("b", 1.0);
        assert!(closes(&effects).is_empty(), "a is busy: b waits");
        assert_eq!(h.core.next_deadline(), Some(h.at(6.0)));
        assert!(closes(&h.tick(5.9)).is_empty());
        let effects = h.tick(6.0);
        assert_eq!(
            closes(&effects),
            [("a".to_string(), Close::Now)],
            "the bound"
        );

        // Idle before the bound: it goes when its last lease comes back.
        let mut h = Harness::new(&two(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n",
        ));
        h.leased("a", 101, 0.0);
        h.acquire("b", 1.0);
        let effects = h.release("a", 2.0);
        assert_eq!(closes(&effects), [("a".to_string(), Close::IfIdle)]);
        assert_eq!(stop_asked(&effects), ["a"]);
    }

    #[test]
    fn a_swap_for_a_model_taken_as_idle_waits_if_its_gate_has_a_lease() {
        let mut h = Harness::new(&two(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n",
        ));
        h.leased("a", 101, 0.0);
        h.release("a", 0.5);
        h.enter("a", 0.8);
        let (_, effects) = h.acquire("b", 1.0);
        assert_eq!(closes(&effects), [("a".to_string(), Close::IfIdle)]);
        assert!(stop_asked(&effects).is_empty(), "refused: a is in use");
        assert_eq!(h.state("a"), ModelState::Ready);
        assert_eq!(h.core.next_deadline(), Some(h.at(6.0)), "held to the bound");
        let effects = h.release("a", 2.0);
        assert_eq!(stop_asked(&effects), ["a"], "idle: it goes");
    }

    #[test]
    fn a_higher_priority_swaps_a_busy_model_at_once_and_starts_first() {
        let mut h = Harness::new(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
             [models.a]\ncmd = [\"a\", \"{port}\"]\n[models.b]\ncmd = [\"b\", \"{port}\"]\n\
             [models.c]\ncmd = [\"c\", \"{port}\"]\n",
        );
        h.leased("a", 101, 0.0);
        let (_, effects) = h.acquire_with("b", 0, 1.0);
        assert!(closes(&effects).is_empty());
        let (_, effects) = h.acquire_with("c", 10, 2.0);
        assert_eq!(
            closes(&effects),
            [("a".to_string(), Close::Now)],
            "10 outranks a"
        );
        h.release("a", 3.0);
        let effects = h.exit("a", ExitReason::Stopped, 4.0);
        assert_eq!(
            spawned(&effects),
            ["c"],
            "c, waiting later, starts before b"
        );
    }

    #[test]
    fn beyond_max_queue_a_request_is_refused_and_starts_nothing() {
        let mut h = Harness::new(&two("[scheduler]\nmax_queue = 2\n"));
        let (_, effects) = h.acquire("a", 0.0);
        assert_eq!(spawned(&effects), ["a"]);
        h.acquire("a", 0.1);
        let (b, effects) = h.acquire("b", 0.2);
        match &failed(&effects)[..] {
            [(id, AcquireError::QueueFull { waiting: 2, .. })] => assert_eq!(*id, b),
            other => panic!("expected QueueFull, got {other:?}"),
        }
        assert!(spawned(&effects).is_empty());
    }

    fn reading(gpus: &[(u32, u64, u64)], procs: &[(u32, u32, u64)]) -> Reading {
        let snapshot = Snapshot {
            taken_at_ms: 0,
            gpus: gpus
                .iter()
                .map(|&(index, total, used)| GpuReading {
                    index,
                    name: "fake".into(),
                    total_bytes: total * MB,
                    used_bytes: used * MB,
                    free_bytes: (total - used) * MB,
                    utilization: None,
                    temperature_c: None,
                    power_watts: None,
                })
                .collect(),
            processes: procs
                .iter()
                .map(|&(pid, gpu, used)| ProcessReading {
                    pid,
                    gpu,
                    used_bytes: used * MB,
                })
                .collect(),
        };
        // Each process is its own tree.
        let trees = procs
            .iter()
            .map(|&(pid, gpu, used)| (pid, vec![(gpu, used * MB)]))
            .collect();
        Reading {
            snapshot: Some(Arc::new(snapshot)),
            trees,
        }
    }

    const GPU_MODELS: &str = "[scheduler]\nmax_loaded = 4\nvram_reserve_mb = 500\n\
         [models.a]\ncmd = [\"a\", \"{port}\"]\nvram_mb = 6000\n\
         [models.b]\ncmd = [\"b\", \"{port}\"]\nvram_mb = 6000\n\
         [models.big]\ncmd = [\"big\", \"{port}\"]\nvram_mb = 20000\n";

    fn env_of(effects: &[Effect], key: &str) -> Option<String> {
        effects.iter().find_map(|e| match e {
            Effect::Spawn(spec) => spec
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone()),
            _ => None,
        })
    }

    /// `a` (pid 101) on GPU 0 of 8000 MiB, measured at 6000 MiB and idle.
    fn a_resident_and_idle() -> Harness {
        let empty = [(0, 8000, 500)];
        let mut h = Harness::with_reading(GPU_MODELS, reading(&empty, &[]));
        let (_, effects) = h.acquire("a", 0.0);
        assert!(spawned(&effects).is_empty(), "placed by a fresh reading");
        let effects = h.reading(reading(&empty, &[]), 0.1);
        assert_eq!(spawned(&effects), ["a"]);
        assert_eq!(
            env_of(&effects, "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("0")
        );
        h.ready("a", 101, 1.0);
        h.release("a", 1.0);
        h.reading(reading(&[(0, 8000, 6500)], &[(101, 0, 6000)]), 1.5);
        h
    }

    #[test]
    fn short_of_memory_the_idle_model_on_the_gpu_is_evicted() {
        let mut h = a_resident_and_idle();
        let (_, effects) = h.acquire("b", 2.0);
        assert!(closes(&effects).is_empty(), "waits for a fresh reading");
        let effects = h.reading(reading(&[(0, 8000, 6500)], &[(101, 0, 6000)]), 2.1);
        assert_eq!(closes(&effects), [("a".to_string(), Close::IfIdle)]);
        assert_eq!(stop_asked(&effects), ["a"]);
        h.exit("a", ExitReason::Stopped, 3.0);
        // A reading that still lists a is not one to place by.
        let effects = h.reading(reading(&[(0, 8000, 6500)], &[(101, 0, 6000)]), 3.1);
        assert!(spawned(&effects).is_empty());
        let effects = h.reading(reading(&[(0, 8000, 500)], &[]), 3.2);
        assert_eq!(spawned(&effects), ["b"]);
        assert_eq!(
            env_of(&effects, "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("0")
        );
    }

    #[test]
    fn a_model_that_never_fits_is_refused_at_once() {
        let gpus = [(0, 16000, 1000), (1, 8000, 500)];
        let mut h = Harness::with_reading(GPU_MODELS, reading(&gpus, &[]));
        let (big, _) = h.acquire("big", 0.0);
        let effects = h.reading(reading(&gpus, &[]), 0.1);
        match &failed(&effects)[..] {
            [(id, AcquireError::NoRoom { detail, .. })] => {
                assert_eq!(*id, big);
                assert!(detail.contains("needs 20000 MiB"), "{detail}");
            }
            other => panic!("expected NoRoom, got {other:?}"),
        }
        assert!(spawned(&effects).is_empty());
        assert_eq!(h.state("big"), ModelState::Stopped);
    }

    #[test]
    fn out_of_memory_while_starting_evicts_one_more_and_retries_once() {
        let gpus = [(0, 16000, 500)];
        let mut h = Harness::with_reading(GPU_MODELS, reading(&gpus, &[]));
        h.acquire("a", 0.0);
        h.reading(reading(&gpus, &[]), 0.1);
        h.ready("a", 101, 1.0);
        h.release("a", 1.0);
        let measured = reading(&[(0, 16000, 6500)], &[(101, 0, 6000)]);
        h.reading(measured.clone(), 1.5);
        let (b, _) = h.acquire("b", 2.0);
        let effects = h.reading(measured, 2.1);
        assert_eq!(spawned(&effects), ["b"], "b fits by the numbers");
        let oom = || StartFailure::OutOfMemory {
            status: "exit status 1".into(),
        };
        let effects = h.fail_start("b", oom(), 3.0);
        assert_eq!(stop_asked(&effects), ["a"], "one more model is evicted");
        assert!(failed(&effects).is_empty());
        h.exit("a", ExitReason::Stopped, 4.0);
        let effects = h.reading(reading(&gpus, &[]), 4.1);
        assert_eq!(spawned(&effects), ["b"], "and b tries once more");
        let effects = h.fail_start("b", oom(), 5.0);
        match &failed(&effects)[..] {
            [(id, AcquireError::StartFailed { reason, .. })] => {
                assert_eq!((*id, reason), (b, &oom()))
            }
            other => panic!("a second out-of-memory fails the request, got {other:?}"),
        }
    }

    #[test]
    fn a_pinned_model_blocks_a_start_at_once() {
        let mut h = Harness::new(
            "[scheduler]\nmax_loaded = 1\n[models.a]\ncmd = [\"a\", \"{port}\"]\npin = true\n\
             [models.b]\ncmd = [\"b\", \"{port}\"]\n",
        );
        h.leased("a", 101, 0.0);
        h.release("a", 0.0);
        let (b, effects) = h.acquire("b", 60.0);
        match &failed(&effects)[..] {
            [(id, e @ AcquireError::Pinned { .. })] => {
                assert_eq!(*id, b);
                let text = e.to_string();
                assert!(text.contains("(max_loaded = 1)"), "{text}");
            }
            other => panic!("expected Pinned, got {other:?}"),
        }
        assert!(closes(&effects).is_empty());
    }

    #[test]
    fn shutdown_fails_waiters_stops_children_and_ends_once_they_exit() {
        let mut h = Harness::new(&two("[scheduler]\nmax_loaded = 1\n"));
        h.leased("a", 101, 0.0);
        let (b, _) = h.acquire("b", 1.0);
        let effects = h.core.shutdown();
        let effects = h.run(effects, h.at(2.0));
        assert!(matches!(
            &failed(&effects)[..],
            [(id, AcquireError::ShuttingDown)] if *id == b
        ));
        assert_eq!(
            stop_asked(&effects),
            ["a"],
            "in-flight requests are not waited for"
        );
        assert!(!h.core.shut_down());
        h.exit("a", ExitReason::Stopped, 3.0);
        assert!(h.core.shut_down());
    }

    /// The models whose GGUF estimate `effects` ask for, with the file.
    fn estimates_asked(effects: &[Effect]) -> Vec<(String, std::path::PathBuf)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Estimate { model, path, .. } => Some((model.to_string(), path.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_model_added_by_a_reload_has_its_gguf_estimate_read_and_placed_by_it() {
        let gpus = [(0, 8000, 500)];
        let mut h = Harness::with_reading(GPU_MODELS, reading(&gpus, &[]));
        let added = config(&format!(
            "{GPU_MODELS}[models.g]\nmodel = \"/models/g.gguf\"\n"
        ));
        let now = h.at(1.0);
        let effects = h
            .core
            .reconfigure(added.scheduler.clone(), added.models.clone(), now);
        let effects = h.run(effects, now);
        assert_eq!(
            estimates_asked(&effects),
            [("g".to_string(), "/models/g.gguf".into())]
        );
        // No `vram_mb`, no past run: its estimate is its only need.
        h.acquire("g", 2.0);
        let effects = h.reading(reading(&gpus, &[]), 2.1);
        assert!(spawned(&effects).is_empty(), "waits for its estimate");
        let now = h.at(2.2);
        let effects = h.core.estimated("g", Some(2000 * MB), now);
        let effects = h.run(effects, now);
        assert_eq!(spawned(&effects), ["g"]);
        assert_eq!(
            env_of(&effects, "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("0")
        );
        // A reload that changes its arguments asks again; one that
        // changes nothing of its launch does not.
        let changed = config(&format!(
            "{GPU_MODELS}[models.g]\nmodel = \"/models/g.gguf\"\nargs = [\"-c\", \"8192\"]\n"
        ));
        let now = h.at(3.0);
        let effects = h
            .core
            .reconfigure(changed.scheduler.clone(), changed.models.clone(), now);
        assert_eq!(estimates_asked(&h.run(effects, now)).len(), 1);
        let effects = h
            .core
            .reconfigure(changed.scheduler.clone(), changed.models.clone(), now);
        assert!(estimates_asked(&h.run(effects, now)).is_empty());
    }

    /// Models with a need learned from history only, as after a restart.
    const LEARNED: &str =
        "[models.m]\ncmd = [\"m\", \"{port}\"]\n[models.n]\ncmd = [\"n\", \"{port}\"]\n";

    /// A core whose GPU readings are expected but has none yet (the
    /// sampler's first is under way), `m` having needed 3000 MiB before.
    fn restarted() -> Harness {
        let mut h = Harness::new(LEARNED);
        h.core.expect_readings(h.t0);
        let effects = h
            .core
            .seed_vram(HashMap::from([("m".to_string(), vec![3000 * MB])]));
        h.run(effects, h.t0);
        h
    }

    fn gate_gpu(effects: &[Effect]) -> Option<Option<u32>> {
        effects.iter().find_map(|e| match e {
            Effect::OpenGate { gpu, .. } => Some(*gpu),
            _ => None,
        })
    }

    #[test]
    fn before_the_first_gpu_reading_a_start_waits_for_it_and_is_placed_by_it() {
        let mut h = restarted();
        let (_, effects) = h.acquire("m", 0.1);
        assert!(spawned(&effects).is_empty(), "not started unplaced");
        assert!(
            effects.iter().any(|e| matches!(e, Effect::RefreshGpus)),
            "a reading is asked for"
        );
        let effects = h.reading(reading(&[(0, 8000, 500)], &[]), 0.2);
        assert_eq!(spawned(&effects), ["m"]);
        assert_eq!(
            env_of(&effects, "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("0")
        );
        // Its gate, and so its first request's history row, knows the GPU.
        assert_eq!(gate_gpu(&h.ready("m", 101, 1.0)), Some(Some(0)));
    }

    #[test]
    fn without_any_gpu_reading_a_start_waits_only_so_long() {
        let mut h = restarted();
        h.acquire("m", 0.1);
        let bound = super::placement::FIRST_READING_AT_MOST.as_secs_f64();
        assert_eq!(h.core.next_deadline(), Some(h.at(bound)));
        assert!(spawned(&h.tick(bound - 0.1)).is_empty());
        let effects = h.tick(bound);
        assert_eq!(spawned(&effects), ["m"], "started unplaced after all");
        assert_eq!(env_of(&effects, "CUDA_VISIBLE_DEVICES"), None);
        assert_eq!(
            h.core.next_deadline(),
            Some(h.at(bound) + super::PROGRESS_PERIOD)
        );
    }
}
