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
        for (name, slot) in &mut self.slots {
            match &slot.config.model_path {
                Some(path) => self.effects.push(Effect::Estimate {
                    model: name.clone(),
                    path: path.clone(),
                    argv: slot.config.argv.clone(),
                }),
                None => slot.estimate = Some(None),
            }
        }
        self.finish()
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
        [ttl, progress, swap].into_iter().flatten().min()
    }

    /// Does what is due at `now`: progress, idle TTLs, a held-back swap.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let starting = self.slots.values().any(|s| s.phase == Phase::Starting);
        if starting && self.next_progress <= now {
            self.emit_progress(now);
        }
        self.expire_idle(now);
        if self.swap_due.is_some_and(|d| d <= now) {
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
        if self.gpus.present() {
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
