//! What a child's events do to its model: load progress, Ready (waiters
//! served), a failed start (out of memory: one more eviction and one more
//! try; else backoff), and an exit (stopped: start again if anyone waits;
//! crashed: backoff).
//!
//! Part of the core: the same rules as [`super::core`] (no clock, no
//! effects performed here), and events of a child that is no longer the
//! model's current one are ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{current, lifecycle, Close, Core, Effect};
use super::placement;
use super::slot::{backoff, millis, progress_event, Phase, StopReason, STABLE_UPTIME};
use super::{AcquireError, Progress};
use crate::config::ChildAddr;
use crate::events::{Event, ModelEventKind, Reason};
use crate::supervisor::{ChildEvent, ExitReason, StartFailure};

impl Core {
    /// A child's event.
    pub(crate) fn child_event(&mut self, event: ChildEvent, now: Instant) -> Vec<Effect> {
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
                return self.finish();
            }
            ChildEvent::Ready {
                model,
                instance,
                addr,
                pid,
                load_time,
            } => self.ready(&model, instance, addr, pid, load_time, now),
            ChildEvent::StartFailed {
                model,
                instance,
                reason,
                pid,
            } => self.start_failed(&model, instance, reason, pid, now),
            ChildEvent::Exited {
                model,
                instance,
                reason,
            } => self.exited(&model, instance, reason, now),
        }
        self.reconcile(now);
        self.finish()
    }

    fn ready(
        &mut self,
        model: &Arc<str>,
        instance: u64,
        addr: ChildAddr,
        pid: u32,
        load_time: Duration,
        now: Instant,
    ) {
        let Some(slot) =
            current(&mut self.slots, model, instance).filter(|s| s.phase == Phase::Starting)
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
        self.effects.push(Effect::Emit(progress_event(model, done)));
        slot.remember_load(load_time);
        slot.starting_since = None;
        slot.child_fraction = None;
        slot.phase = Phase::Ready;
        slot.preloading = false;
        slot.pid = Some(pid);
        slot.ready_since = Some(now);
        slot.last_error = None;
        slot.has_gate = true;
        slot.busy = false;
        slot.last_used = slot.last_used.max(now);
        self.effects.push(Effect::OpenGate {
            model: model.clone(),
            instance,
            addr,
            max_connections: slot.config.max_connections,
            gpu: slot.gpu,
        });
        let load_ms = load_time.as_secs_f64() * 1000.0;
        let mut ready = lifecycle(model, ModelEventKind::Ready, |e| {
            e.load_ms = Some(load_ms);
            e.pid = Some(pid);
        });
        if let Effect::Lifecycle { rss_of, .. } = &mut ready {
            *rss_of = Some(pid);
        }
        self.effects.push(ready);
        slot.oom_retried = false;
        slot.measured_ready = false;
        for w in std::mem::take(&mut slot.waiters) {
            slot.busy = true;
            self.effects.push(Effect::Lease {
                waiter: w.id,
                model: model.clone(),
            });
        }
        // Measure what it took as soon as possible.
        if self.gpus.present() {
            self.effects.push(Effect::RefreshGpus);
        }
    }

    fn start_failed(
        &mut self,
        model: &Arc<str>,
        instance: u64,
        reason: StartFailure,
        failed_pid: Option<u32>,
        now: Instant,
    ) {
        let Some(slot) = current(&mut self.slots, model, instance) else {
            return;
        };
        slot.has_child = false;
        slot.pid = None;
        slot.starting_since = None;
        slot.child_fraction = None;
        let placed_on = slot.gpu;
        slot.end_vram_run();
        let retry = matches!(reason, StartFailure::OutOfMemory { .. })
            && !slot.oom_retried
            && !slot.removed
            && (slot.preloading || !slot.waiters.is_empty());
        self.effects.push(Effect::ForgetChild {
            model: model.clone(),
        });
        if self.gpus.child_gone(failed_pid, now) {
            self.effects.push(Effect::RefreshGpus);
        }
        if retry {
            self.retry_out_of_memory(model, reason, placed_on, now);
            return;
        }
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        slot.oom_retried = false;
        if std::mem::take(&mut slot.preloading) {
            tracing::warn!(model = %model, reason = %reason, "preload failed");
        }
        slot.failures += 1;
        slot.last_error = Some(reason.to_string());
        self.effects
            .push(lifecycle(model, ModelEventKind::StartFailed, |e| {
                e.reason = Some(Reason::StartFailed(reason.to_string()))
            }));
        slot.retry_at = Some(now + backoff(slot.failures));
        slot.phase = Phase::Failed;
        let removed = slot.removed;
        let err = AcquireError::StartFailed {
            model: model.to_string(),
            reason,
        };
        self.fail_waiters(model, &err);
        if removed {
            self.remove_slot(model);
        }
    }

    /// A start that ran out of memory: one more idle model goes (on the GPU
    /// it was placed on, if it was) and it is tried once more.
    fn retry_out_of_memory(
        &mut self,
        model: &Arc<str>,
        reason: StartFailure,
        placed_on: Option<u32>,
        now: Instant,
    ) {
        if let Some(slot) = self.slots.get_mut(model) {
            slot.oom_retried = true;
        }
        self.effects
            .push(lifecycle(model, ModelEventKind::StartFailed, |e| {
                e.reason = Some(Reason::StartFailed(reason.to_string()));
                e.gpu = placed_on;
            }));
        if let Some(victim) = placement::oom_victim(&self.slots, model, placed_on) {
            tracing::warn!(model = %model, evicting = %victim, error = %reason,
                "model ran out of GPU memory while starting; evicting one more model and trying once more");
            self.retire(&victim, StopReason::Evicted, Close::Now);
        } else {
            tracing::warn!(model = %model, error = %reason,
                "model ran out of memory while starting; nothing idle to evict, trying once more");
        }
        self.make_pending(model, now);
    }

    fn exited(&mut self, model: &Arc<str>, instance: u64, reason: ExitReason, now: Instant) {
        let Some(slot) = current(&mut self.slots, model, instance) else {
            return;
        };
        slot.has_child = false;
        let open = slot.phase == Phase::Ready;
        slot.has_gate = false;
        slot.closing = false;
        let pid = slot.pid;
        let stop_reason = slot.stop_reason.take();
        let (gpu, peak) = (slot.gpu, slot.vram_peak);
        if slot.vram_now > 0 {
            self.effects.push(Effect::Emit(Event::Vram {
                model: model.clone(),
                gpu,
                bytes: 0,
            }));
        }
        slot.end_vram_run();
        let removed = slot.removed;
        let ran = slot.ready_since.map(|t| now.saturating_duration_since(t));
        self.effects.push(Effect::ForgetChild {
            model: model.clone(),
        });
        if open {
            // A crash while Ready: no lease may enter a dead child.
            self.close_gate_of(model, instance);
        }
        if self.gpus.child_gone(pid, now) {
            self.effects.push(Effect::RefreshGpus);
        }
        let kind = if reason == ExitReason::Stopped {
            ModelEventKind::Stopped
        } else {
            ModelEventKind::Crashed
        };
        self.effects.push(lifecycle(model, kind, |e| {
            e.pid = pid;
            e.gpu = gpu;
            e.vram_bytes = (peak > 0).then_some(peak);
            (e.reason, e.exit_status) = match &reason {
                ExitReason::Stopped => (stop_reason.map(StopReason::reason), None),
                ExitReason::Crashed(why) => (Some(Reason::Crash), Some(why.clone())),
                ExitReason::Unhealthy(why) => (Some(Reason::Health), Some(why.clone())),
            };
        }));
        if removed {
            self.remove_slot(model);
            return;
        }
        match reason {
            ExitReason::Stopped => self.after_stop(model, ran.is_some(), now),
            ExitReason::Crashed(why) | ExitReason::Unhealthy(why) => {
                self.after_crash(model, ran, why, now)
            }
        }
    }

    fn close_gate_of(&mut self, model: &Arc<str>, instance: u64) {
        self.awaiting_gates += 1;
        self.effects.push(Effect::CloseGate {
            model: model.clone(),
            instance,
            close: Close::Now,
        });
    }

    /// A child stopped as asked: start again if anyone waits.
    fn after_stop(&mut self, model: &Arc<str>, ran: bool, now: Instant) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        if ran {
            slot.failures = 0;
        }
        if slot.waiters.is_empty() && !slot.preloading {
            slot.phase = Phase::Stopped;
        } else {
            self.make_pending(model, now);
        }
    }

    /// A child crashed or stopped answering: backoff, and its waiters
    /// either start it again at once (the first failure) or fail.
    fn after_crash(&mut self, model: &Arc<str>, ran: Option<Duration>, why: String, now: Instant) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        if ran.is_some_and(|r| r >= STABLE_UPTIME) {
            slot.failures = 0;
        }
        slot.preloading = false;
        slot.failures += 1;
        slot.retry_at = Some(now + backoff(slot.failures));
        slot.last_error = Some(why.clone());
        slot.phase = Phase::Failed;
        if slot.waiters.is_empty() {
            return;
        }
        if backoff(slot.failures).is_zero() {
            self.make_pending(model, now);
        } else {
            let err = AcquireError::Stopped {
                model: model.to_string(),
                reason: why,
            };
            self.fail_waiters(model, &err);
        }
    }
}
