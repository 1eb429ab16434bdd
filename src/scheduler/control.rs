//! The core's entry points for operators and the daemon rather than for
//! requests: admin stop, preload, `keep_alive`, seeds from history, reload
//! and shutdown.
//!
//! Part of the core: the same rules as [`super::core`] (no clock, no
//! effects performed here).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::Core;
use super::effect::{Close, Effect};
use super::slot::{Phase, Slot, StopReason};
use super::{AcquireError, KeepAlive, LOAD_TIMES_KEPT, VRAM_RUNS_KEPT};
use crate::config::{ModelConfig, SchedulerConfig};

impl Core {
    /// Admin stop (after draining). `None`: no such model; `Some(false)`:
    /// it was not running.
    pub(crate) fn stop(&mut self, model: &str) -> (Option<bool>, Vec<Effect>) {
        let answer = self.stop_model(model);
        (answer, self.finish())
    }

    fn stop_model(&mut self, model: &str) -> Option<bool> {
        let (name, slot) = self.slots.get_key_value(model)?;
        let name = name.clone();
        let phase = slot.phase;
        if let Some(slot) = self.slots.get_mut(&name) {
            slot.preloading = false;
        }
        Some(match phase {
            Phase::Ready | Phase::Starting => {
                self.retire(&name, StopReason::Admin, Close::Now);
                true
            }
            Phase::Pending => {
                let err = AcquireError::Stopped {
                    model: model.to_string(),
                    reason: "stopped by admin".into(),
                };
                if let Some(slot) = self.slots.get_mut(&name) {
                    slot.phase = Phase::Stopped;
                }
                self.fail_waiters(&name, &err);
                false
            }
            Phase::Draining | Phase::Stopping => true,
            Phase::Stopped | Phase::Failed => false,
        })
    }

    /// Starts every model with `preload = true` that is not running.
    pub(crate) fn preload(&mut self, now: Instant) -> Vec<Effect> {
        if !self.shutting_down {
            let names: Vec<Arc<str>> = self
                .slots
                .iter()
                .filter(|(_, s)| s.config.preload)
                .map(|(n, _)| n.clone())
                .collect();
            for name in names {
                self.begin_preload(&name, now);
            }
            self.reconcile(now);
        }
        self.finish()
    }

    /// Asks for a start with no one waiting (a preload), unless the model
    /// is already on its way up or running.
    fn begin_preload(&mut self, name: &str, now: Instant) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.preloading = true;
        if matches!(slot.phase, Phase::Stopped | Phase::Failed) {
            tracing::info!(model = %name, "preloading model");
            slot.phase = Phase::Pending;
            slot.pending_since = now;
        }
    }

    /// Replaces `model`'s idle TTL; one that has already run out stops an
    /// idle model now. False: no such model.
    pub(crate) fn set_keep_alive(
        &mut self,
        model: &str,
        keep: KeepAlive,
        now: Instant,
    ) -> (bool, Vec<Effect>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return (false, self.finish());
        };
        tracing::info!(model, keep_alive = ?keep, "idle TTL set at run time");
        slot.keep_alive = Some(keep);
        self.expire_idle(now);
        (true, self.finish())
    }

    /// Load times from history, oldest first, for models that have none.
    pub(crate) fn seed_load_times(&mut self, loads: HashMap<String, Vec<Duration>>) -> Vec<Effect> {
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
        self.finish()
    }

    /// Peak GPU memory of past runs from history, oldest first, for
    /// models that have none.
    pub(crate) fn seed_vram(&mut self, peaks: HashMap<String, Vec<u64>>) -> Vec<Effect> {
        for (model, runs) in peaks {
            if let Some(slot) = self.slots.get_mut(model.as_str()) {
                if slot.vram_runs.is_empty() {
                    let skip = runs.len().saturating_sub(VRAM_RUNS_KEPT);
                    slot.vram_runs.extend(runs.into_iter().skip(skip));
                }
            }
        }
        self.finish()
    }

    /// Applies a reloaded config: new models become available, removed
    /// ones are drained and stopped, changed ones restart once idle.
    pub(crate) fn reconfigure(
        &mut self,
        limits: SchedulerConfig,
        models: Vec<ModelConfig>,
        now: Instant,
    ) -> Vec<Effect> {
        self.limits = limits;
        let mut keep = HashSet::new();
        for config in models {
            let name: Arc<str> = Arc::from(config.name.as_str());
            keep.insert(name.clone());
            self.reconfigure_model(name, config, now);
        }
        let removed: Vec<Arc<str>> = self
            .slots
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in removed {
            tracing::info!(model = %name, "model removed by reload");
            self.fail_waiters(&name, &AcquireError::Unknown(name.to_string()));
            let Some(slot) = self.slots.get_mut(&name) else {
                continue;
            };
            slot.removed = true;
            if slot.has_child {
                self.retire(&name, StopReason::Reload, Close::Now);
            } else {
                self.remove_slot(&name);
            }
        }
        self.reconcile(now);
        self.finish()
    }

    fn reconfigure_model(&mut self, name: Arc<str>, config: ModelConfig, now: Instant) {
        let Some(slot) = self.slots.get_mut(&name) else {
            tracing::info!(model = %name, "model added by reload");
            let preload = config.preload && !self.shutting_down;
            self.slots.insert(name.clone(), Slot::new(config, now));
            // Without it, a model whose only need is its GGUF's would wait
            // for it forever once GPU readings exist.
            self.ask_estimate(&name);
            if preload {
                self.begin_preload(&name, now);
            }
            return;
        };
        let restart = slot.config.launch_differs(&config) && slot.has_child;
        let estimate_differs =
            slot.config.model_path != config.model_path || slot.config.argv != config.argv;
        let newly_preloaded = config.preload && !slot.config.preload;
        if slot.config.ttl != config.ttl {
            slot.keep_alive = None;
        }
        slot.config = config;
        slot.removed = false;
        let preload = slot.config.preload;
        if estimate_differs {
            self.ask_estimate(&name);
        }
        if restart {
            tracing::info!(model = %name, "model changed by reload; restarting it once idle");
            self.retire(&name, StopReason::Reload, Close::Now);
        }
        // A preloaded model that restarts comes back by itself.
        if !self.shutting_down && preload && (newly_preloaded || restart) {
            self.begin_preload(&name, now);
        }
    }

    /// Fails waiting requests and stops every child; [`Core::shut_down`]
    /// says when all have exited.
    pub(crate) fn shutdown(&mut self) -> Vec<Effect> {
        if !self.shutting_down {
            self.shutting_down = true;
            let names: Vec<Arc<str>> = self.slots.keys().cloned().collect();
            for name in names {
                self.fail_waiters(&name, &AcquireError::ShuttingDown);
                let Some(slot) = self.slots.get_mut(&name) else {
                    continue;
                };
                slot.preloading = false;
                match slot.phase {
                    Phase::Starting | Phase::Ready | Phase::Draining => {
                        self.begin_stop(&name, StopReason::Shutdown)
                    }
                    Phase::Pending => slot.phase = Phase::Stopped,
                    _ => {}
                }
            }
        }
        self.finish()
    }
}
