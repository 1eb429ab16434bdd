//! Reloading the config on request, and the STATUS= line systemd shows:
//! which models are loaded, requests in flight, dropped history rows and
//! the last reload's failure while it stands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::events::{Event, ModelState};
use crate::history::Recorder;
use crate::scheduler::Scheduler;
use crate::systemd::{Notifier, NotifyState};

/// How often STATUS= is refreshed when something changed.
const STATUS_PERIOD: Duration = Duration::from_secs(1);

/// What asked for a reload, for the log and the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum By {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// A change in a models folder.
    ModelsFolder,
}

impl By {
    fn actor(self) -> &'static str {
        match self {
            By::Signal => "signal:SIGHUP",
            By::ModelsFolder => "models-folder",
        }
    }
}

/// Re-reads the config (and the models folders and store it names) and
/// applies it; a bad file leaves the old config in force and says why in
/// the log and in STATUS=.
pub(super) async fn reload(
    state: &AppState,
    notifier: &Notifier,
    path: &std::path::Path,
    reload_error: &std::sync::Mutex<Option<String>>,
    by: By,
) {
    let monotonic = NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0));
    notifier.notify(&[NotifyState::Reloading, monotonic]);
    tracing::info!(config = %path.display(), by = by.actor(), "reloading configuration");
    let outcome = match Config::load(path) {
        Ok(mut new) => {
            crate::sources::apply(&mut new);
            let old = state.config();
            if old.listeners_differ(&new) {
                tracing::warn!(
                    old = ?old.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    new = ?new.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "listener changes take effect only after a restart"
                );
            }
            if old.http.body_memory_bytes != new.http.body_memory_bytes {
                tracing::warn!(
                    old = old.http.body_memory_bytes,
                    new = new.http.body_memory_bytes,
                    "http.body_memory_bytes takes effect only after a restart"
                );
            }
            if old.gpu != new.gpu {
                tracing::warn!(
                    old = ?old.gpu,
                    new = ?new.gpu,
                    "the [gpu] table takes effect only after a restart; GPU readings go on as before"
                );
            }
            if old.http.worker_threads != new.http.worker_threads {
                tracing::warn!(
                    old = old.worker_threads(),
                    new = new.worker_threads(),
                    "http.worker_threads takes effect only after a restart"
                );
            }
            let new = Arc::new(new);
            state.scheduler.reconfigure(&new).await;
            let models = new.models.len();
            state.set_config(new);
            tracing::info!(models, "configuration reloaded");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; still running on the previous configuration");
            Some(e.to_string())
        }
    };
    api::audit(
        state,
        by.actor().into(),
        crate::events::AuditAction::Reload,
        Some(&path.display().to_string()),
        outcome.as_deref().unwrap_or("ok"),
    );
    state
        .bus
        .emit(Event::Reload(Arc::new(crate::events::ReloadResult {
            ok: outcome.is_none(),
            error: outcome.clone(),
        })));
    if let Ok(mut slot) = reload_error.lock() {
        *slot = outcome;
    }
    let models = models_now(&state.scheduler).await;
    let text = status_text(
        &models,
        state.scheduler.inflight(),
        &state.recorder,
        reload_error,
    );
    notifier.notify(&[NotifyState::Ready, NotifyState::Status(&text)]);
}

/// Every model's state by name, as STATUS= sees it.
type Models = BTreeMap<Arc<str>, ModelState>;

/// Every model's state, asked of the scheduler (after a reload, or when
/// the event stream lagged).
async fn models_now(scheduler: &Scheduler) -> Models {
    let status = scheduler.status().await;
    status
        .into_iter()
        .map(|m| (Arc::from(m.name.as_str()), m.state))
        .collect()
}

/// "2/5 models loaded (coder, tiny); 3 requests in flight", plus dropped
/// history rows and the last reload error while they matter. A model
/// counts as loaded from the moment it is starting until it has stopped.
fn status_text(
    models: &Models,
    inflight: usize,
    recorder: &Recorder,
    reload_error: &std::sync::Mutex<Option<String>>,
) -> String {
    let loaded: Vec<&str> = models
        .iter()
        .filter(|(_, s)| s.is_loaded())
        .map(|(name, _)| &**name)
        .collect();
    let mut text = format!(
        "{}/{} models loaded{}; {} request{} in flight",
        loaded.len(),
        models.len(),
        if loaded.is_empty() {
            String::new()
        } else {
            format!(" ({})", loaded.join(", "))
        },
        inflight,
        if inflight == 1 { "" } else { "s" },
    );
    let dropped = recorder.dropped();
    if dropped > 0 {
        text.push_str(&format!(
            "; {dropped} history rows dropped{}",
            if recorder.disk_failing() {
                " (database not writable)"
            } else {
                ""
            }
        ));
    }
    if let Some(err) = reload_error.lock().ok().and_then(|e| e.clone()) {
        text.push_str("; reload failed, running on the previous config: ");
        text.push_str(&err);
    }
    text
}

/// Keeps STATUS= current: model states follow the bus's model events (a
/// lagging receiver re-reads them from the scheduler once); in-flight
/// requests and dropped rows are read every [`STATUS_PERIOD`].
pub(super) async fn report_status(
    state: Arc<AppState>,
    notifier: Arc<Notifier>,
    reload_error: Arc<std::sync::Mutex<Option<String>>>,
    mut events: broadcast::Receiver<Event>,
) {
    if !notifier.enabled() {
        return;
    }
    let mut models = Models::new();
    let mut last = String::new();
    let mut ticker = tokio::time::interval(STATUS_PERIOD);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::State { model, state }) => {
                    models.insert(model, state);
                }
                Ok(Event::Removed { model }) => {
                    models.remove(&model);
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => models = models_now(&state.scheduler).await,
                Err(RecvError::Closed) => return,
            },
            _ = ticker.tick() => {}
        }
        let text = status_text(
            &models,
            state.scheduler.inflight(),
            &state.recorder,
            &reload_error,
        );
        if text != last {
            notifier.status(&text);
            last = text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_says_what_runs_in_plain_words() {
        let err = std::sync::Mutex::new(None);
        let rec = Recorder::disabled();
        let mut models: Models = [
            ("tiny", ModelState::Ready),
            ("coder", ModelState::Starting),
            ("big", ModelState::Stopped),
        ]
        .into_iter()
        .map(|(n, s)| (Arc::from(n), s))
        .collect();
        assert_eq!(
            status_text(&models, 3, &rec, &err),
            "2/3 models loaded (coder, tiny); 3 requests in flight"
        );
        models.retain(|n, _| &**n == "big");
        assert_eq!(
            status_text(&models, 0, &rec, &err),
            "0/1 models loaded; 0 requests in flight"
        );
        *err.lock().unwrap() = Some("c.toml:3:1: unknown field".into());
        assert!(status_text(&models, 1, &rec, &err)
            .ends_with("1 request in flight; reload failed, running on the previous config: c.toml:3:1: unknown field"));
    }
}
