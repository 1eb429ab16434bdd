//! The daemon's run loop: accept on every listener, serve HTTP/1.1, talk to
//! systemd, reload on request, and shut down in order.
//!
//! [`serve`] takes its listeners, its config and a channel of [`Control`]
//! messages (the binary feeds signals into it; tests can feed it directly).
//! Shutdown order: STOPPING=1, stop accepting (unix socket files we created
//! are removed), let in-flight requests finish up to `shutdown_timeout`
//! (extending systemd's stop timeout while that runs), stop every child,
//! return.
//!
//! - [`accept`]: the accept loops and each connection's HTTP.
//! - [`connections`]: the connection cap and closing idle ones for room.
//! - [`reload`]: re-reading the config, and the STATUS= line.
//! - [`housekeeping`]: watchdog, history-drop events, samples, heap trim.

mod accept;
mod connections;
mod folders;
mod housekeeping;
mod reload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::config::{default_max_open_connections, Config};
use crate::events::{Bus, Event, Topic};
use crate::gpu::Gpus;
use crate::history::Recorder;
use crate::listen::Bound;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::systemd::{Notifier, NotifyState};
use connections::Connections;

/// Requests from outside the server, typically signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file (SIGHUP, `systemctl reload`).
    Reload,
    /// Drain and stop (SIGTERM, SIGINT).
    Shutdown,
}

/// The service manager's side: where to notify, how often to ping the
/// watchdog, and which file to re-read on reload.
pub struct Systemd {
    pub notifier: Notifier,
    pub watchdog: Option<Duration>,
    pub config_path: PathBuf,
}

/// How the drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished.
    Clean,
    /// `shutdown_timeout` passed with requests still open; they were cut.
    TimedOut { open: usize },
}

/// How often the stop timeout is extended while draining.
const EXTEND_PERIOD: Duration = Duration::from_secs(5);

/// Serves until a [`Control::Shutdown`] arrives (or the channel closes),
/// then drains and stops children. `recorder` writes history (the caller
/// opened the database and closes its writer after this returns).
pub async fn serve(
    config: Config,
    listeners: Vec<Bound>,
    mut control: mpsc::UnboundedReceiver<Control>,
    systemd: Systemd,
    recorder: Recorder,
    gpus: Gpus,
) -> Drained {
    let config = Arc::new(config);
    let (state, model_events) = app_state(&config, recorder, gpus);
    seed_past_runs(&state).await;
    let fd_limit = fd_limit();
    let conns = Connections::new(connection_cap(&config, fd_limit));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; `recv` returns None once all
    // are gone.
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    let accept_tasks = start_accepting(listeners, &state, &conns, &done_tx, &stop_rx);

    let notifier = Arc::new(systemd.notifier);
    let reload_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    notifier.notify(&[NotifyState::Ready]);
    // After READY=1, so a model load never delays the daemon's start.
    state.scheduler.preload();
    let background = Background::start(
        &state,
        &notifier,
        &reload_error,
        &conns,
        model_events,
        systemd.watchdog,
    );

    let mut folder_changes = folders::start(&config.models_dirs);
    loop {
        let by = tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload) => reload::By::Signal,
                Some(Control::Shutdown) | None => break,
            },
            Some(()) = folders::next_change(&mut folder_changes) => reload::By::ModelsFolder,
        };
        reload::reload(&state, &notifier, &systemd.config_path, &reload_error, by).await;
        conns.set_cap(connection_cap(&state.config(), fd_limit));
    }

    background.stop_before_drain();
    stop_accepting(&state, &stop_tx, accept_tasks).await;
    let drained = drain(&state, &notifier, done_tx, done_rx).await;
    notifier.status("stopping: stopping model processes");
    state.scheduler.shutdown().await;
    if let Some(task) = background.watchdog {
        task.abort();
    }
    tracing::info!("all model processes stopped");
    drained
}

/// The shared state every request sees, with the bus wired to history,
/// metrics and the events stream, and a receiver of model events that
/// exists before the scheduler starts, so the first states are seen.
fn app_state(
    config: &Arc<Config>,
    recorder: Recorder,
    gpus: Gpus,
) -> (Arc<AppState>, broadcast::Receiver<Event>) {
    let metrics = Arc::new(Metrics::new());
    // Last, so history and metrics see each event before the stream does.
    let events = api::event_stream::EventLog::start(metrics.clone());
    let bus = Bus::new(vec![
        Arc::new(recorder.clone()),
        metrics.clone(),
        events.clone(),
    ]);
    // Before the scheduler starts, so the first states are seen.
    let model_events = bus.subscribe(Topic::Models);
    let state = Arc::new(AppState {
        scheduler: Scheduler::start(config, bus.clone(), gpus.clone()),
        started: Instant::now(),
        accepting: AtomicBool::new(true),
        config: std::sync::RwLock::new(config.clone()),
        recorder,
        metrics,
        bus,
        events,
        auth: std::sync::RwLock::new(Arc::new(crate::auth::Auth::new(&config.auth))),
        body_budget: api::body::BodyBudget::new(
            usize::try_from(config.http.body_memory_bytes).unwrap_or(usize::MAX),
        ),
        next_request: std::sync::atomic::AtomicU64::new(0),
        ollama: Default::default(),
        sessions: Default::default(),
        gpus,
    });
    (state, model_events)
}

/// Seeds the scheduler with past runs, before any request can start a
/// model, so its first load already has an expected time and its first
/// placement a learned need.
async fn seed_past_runs(state: &AppState) {
    let past = {
        let recorder = state.recorder.clone();
        tokio::task::spawn_blocking(move || {
            recorder.past_runs(
                crate::scheduler::LOAD_TIMES_KEPT,
                crate::scheduler::VRAM_RUNS_KEPT,
            )
        })
        .await
        .unwrap_or_default()
    };
    state.scheduler.seed_load_times(past.load_times);
    state.scheduler.seed_vram(past.vram_peaks);
}

/// Starts an accept loop on every listener that can be used; one that
/// cannot is logged and skipped.
fn start_accepting(
    listeners: Vec<Bound>,
    state: &Arc<AppState>,
    conns: &Arc<Connections>,
    done_tx: &mpsc::Sender<()>,
    stop_rx: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut accept_tasks = Vec::with_capacity(listeners.len());
    for bound in listeners {
        let (name, describe) = (bound.name.clone(), bound.describe());
        match bound.into_listener() {
            Ok(listener) => {
                tracing::info!(listen = %describe, fd_name = %name, "listening");
                accept_tasks.push(tokio::spawn(accept::accept_loop(
                    listener,
                    state.clone(),
                    conns.clone(),
                    done_tx.clone(),
                    stop_rx.clone(),
                )));
            }
            Err(e) => tracing::error!(listen = %describe, error = %e, "cannot use listener"),
        }
    }
    accept_tasks
}

/// The tasks that run beside the accept loops while the daemon serves.
struct Background {
    status: JoinHandle<()>,
    sample: JoinHandle<()>,
    trim: JoinHandle<()>,
    drops: JoinHandle<()>,
    /// Pings on until every child has stopped.
    watchdog: Option<JoinHandle<()>>,
}

impl Background {
    fn start(
        state: &Arc<AppState>,
        notifier: &Arc<Notifier>,
        reload_error: &Arc<std::sync::Mutex<Option<String>>>,
        conns: &Arc<Connections>,
        model_events: broadcast::Receiver<Event>,
        watchdog: Option<Duration>,
    ) -> Background {
        let status = tokio::spawn(reload::report_status(
            state.clone(),
            notifier.clone(),
            reload_error.clone(),
            model_events,
        ));
        let watchdog = watchdog.map(|interval| {
            tokio::spawn(housekeeping::watchdog(
                state.clone(),
                notifier.clone(),
                interval,
            ))
        });
        Background {
            status,
            sample: tokio::spawn(housekeeping::sample(state.clone())),
            trim: tokio::spawn(housekeeping::trim_when_idle(state.clone(), conns.clone())),
            drops: tokio::spawn(housekeeping::report_history_drops(state.clone())),
            watchdog,
        }
    }

    /// Ends everything but the watchdog.
    fn stop_before_drain(&self) {
        self.status.abort();
        self.sample.abort();
        self.trim.abort();
        self.drops.abort();
    }
}

/// Refuses new work and closes every listener; streams that never end by
/// themselves are ended first, so the drain does not wait for them.
async fn stop_accepting(
    state: &AppState,
    stop_tx: &watch::Sender<bool>,
    accept_tasks: Vec<JoinHandle<()>>,
) {
    state.accepting.store(false, Ordering::Relaxed);
    // Log followers never finish by themselves: end them before the drain.
    state.scheduler.logs().close();
    // Event streams never end on their own; the drain must not wait for
    // them.
    state.events.close();
    let _ = stop_tx.send(true);
    for task in accept_tasks {
        let _ = task.await; // drops the listener
    }
}

/// Waits for in-flight requests up to `shutdown_timeout`, keeping
/// systemd's stop timeout ahead of it.
async fn drain(
    state: &AppState,
    notifier: &Notifier,
    done_tx: mpsc::Sender<()>,
    mut done_rx: mpsc::Receiver<()>,
) -> Drained {
    let open = done_tx.strong_count() - 1;
    drop(done_tx);
    let shutdown_timeout = state.config().scheduler.shutdown_timeout;
    let stop_grace = state.config().scheduler.stop_grace;
    notifier.notify(&[
        NotifyState::Stopping,
        NotifyState::Status(&format!("stopping: draining {open} connections")),
    ]);
    tracing::info!(
        open_connections = open,
        timeout_s = shutdown_timeout.as_secs_f64(),
        "draining in-flight requests"
    );
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    let drained = loop {
        // Keep systemd's stop timeout ahead of our own drain deadline plus
        // the children's stop grace, so it never kills a drain that is
        // within its configured bounds.
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let extend = remaining + stop_grace + EXTEND_PERIOD * 2;
        notifier.notify(&[NotifyState::ExtendTimeoutUsec(
            u32::try_from(extend.as_micros()).unwrap_or(u32::MAX),
        )]);
        match tokio::time::timeout(remaining.min(EXTEND_PERIOD), done_rx.recv()).await {
            Ok(_) => break Drained::Clean,
            Err(_) if remaining <= EXTEND_PERIOD => break Drained::TimedOut { open },
            Err(_) => {}
        }
    };
    if let Drained::TimedOut { open } = drained {
        tracing::warn!(
            open_connections = open,
            "shutdown timeout reached; cutting open requests"
        );
    }
    drained
}

/// Read when the limit is unlimited or unreadable: what the units set.
const FD_LIMIT_FALLBACK: u64 = 65536;

/// The soft `RLIMIT_NOFILE`: the most fds this process may hold.
fn fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != RLIM_INFINITY => soft,
        _ => FD_LIMIT_FALLBACK,
    }
}

/// `http.max_open_connections` or its default for `fd_limit`, said in the
/// log, with a warning when a configured cap eats into the fds kept for
/// models and the database.
fn connection_cap(config: &Config, fd_limit: u64) -> usize {
    let cap = config.max_open_connections(fd_limit);
    let fits = default_max_open_connections(fd_limit, config);
    if cap > fits {
        tracing::warn!(
            max_open_connections = cap,
            fd_limit,
            fits,
            "http.max_open_connections leaves fewer fds than models and the database may need; \
             running out closes idle connections"
        );
    } else {
        tracing::info!(max_open_connections = cap, fd_limit, "connection cap");
    }
    cap
}
