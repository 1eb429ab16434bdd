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
//! Connections are capped ([`connections`]): at the cap, or when accept
//! runs out of fds, the connection idle longest is closed to make room;
//! with every connection busy, accepting waits (the kernel's backlog holds
//! new clients) instead of spinning on the error.

mod connections;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};

use crate::api::{self, AppState};
use crate::config::{default_max_open_connections, Config, HttpConfig};
use crate::events::{Bus, Event, ModelState, Topic};
use crate::gpu::Gpus;
use crate::history::{now_ms, Recorder, Sample};
use crate::listen::{Bound, Conn, Listener, Peer};
use crate::metrics::Metrics;
use crate::procfs::{pid_figures, process_figures};
use crate::scheduler::Scheduler;
use crate::systemd::{Notifier, NotifyState};
use connections::{Connections, Registered, Room, Tracked};

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

/// How often STATUS= is refreshed when something changed.
const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// How often the stop timeout is extended while draining.
const EXTEND_PERIOD: Duration = Duration::from_secs(5);
/// How often resource samples go into history.
const SAMPLE_PERIOD: Duration = Duration::from_secs(30);

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
        scheduler: Scheduler::start(&config, bus.clone(), gpus.clone()),
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
    // Before any request can start a model, so its first load already
    // has an expected time and its first placement a learned need.
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
    let fd_limit = fd_limit();
    let conns = Connections::new(connection_cap(&config, fd_limit));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; `recv` returns None once all
    // are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_tasks = Vec::with_capacity(listeners.len());
    for bound in listeners {
        let (name, describe) = (bound.name.clone(), bound.describe());
        match bound.into_listener() {
            Ok(listener) => {
                tracing::info!(listen = %describe, fd_name = %name, "listening");
                accept_tasks.push(tokio::spawn(accept_loop(
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

    let notifier = Arc::new(systemd.notifier);
    let reload_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    notifier.notify(&[NotifyState::Ready]);
    // After READY=1, so a model load never delays the daemon's start.
    state.scheduler.preload();
    let status_task = tokio::spawn(report_status(
        state.clone(),
        notifier.clone(),
        reload_error.clone(),
        model_events,
    ));
    let watchdog_task = systemd
        .watchdog
        .map(|interval| tokio::spawn(watchdog(state.clone(), notifier.clone(), interval)));
    let sample_task = tokio::spawn(sample(state.clone()));
    let trim_task = tokio::spawn(trim_when_idle(state.clone(), conns.clone()));
    let drops_task = tokio::spawn(report_history_drops(state.clone()));

    while let Some(Control::Reload) = control.recv().await {
        reload(&state, &notifier, &systemd.config_path, &reload_error).await;
        conns.set_cap(connection_cap(&state.config(), fd_limit));
    }

    status_task.abort();
    sample_task.abort();
    trim_task.abort();
    drops_task.abort();
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
    notifier.status("stopping: stopping model processes");
    state.scheduler.shutdown().await;
    if let Some(task) = watchdog_task {
        task.abort();
    }
    tracing::info!("all model processes stopped");
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

/// Re-reads the config and applies it; a bad file leaves the old config in
/// force and says why in the log and in STATUS=.
async fn reload(
    state: &AppState,
    notifier: &Notifier,
    path: &std::path::Path,
    reload_error: &std::sync::Mutex<Option<String>>,
) {
    let monotonic = NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0));
    notifier.notify(&[NotifyState::Reloading, monotonic]);
    tracing::info!(config = %path.display(), "reloading configuration");
    let outcome = match Config::load(path) {
        Ok(new) => {
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
        "signal:SIGHUP".into(),
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
async fn report_status(
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

/// How often the history drop count is compared for the events stream.
const DROPS_PERIOD: Duration = Duration::from_secs(1);

/// Emits [`Event::HistoryDrops`] when the count of dropped history rows
/// grew: rows are dropped on the request path, where a bus event per row
/// would add to the very load that drops them.
async fn report_history_drops(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(DROPS_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = 0;
    loop {
        ticker.tick().await;
        let dropped = state.recorder.dropped();
        if dropped > seen {
            seen = dropped;
            state.bus.emit(Event::HistoryDrops { dropped });
        }
    }
}

/// Pings the watchdog only while the runtime runs tasks, the scheduler
/// actor answers and the history writer goes round its loop: a wedged
/// daemon stops pinging and systemd restarts it.
async fn watchdog(state: Arc<AppState>, notifier: Arc<Notifier>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if tokio::time::timeout(interval, state.scheduler.status())
            .await
            .is_err()
        {
            tracing::error!("scheduler did not answer within the watchdog interval");
            continue;
        }
        if !state.recorder.alive(interval * 2) {
            tracing::error!("history writer is stuck");
            continue;
        }
        notifier.notify(&[NotifyState::Watchdog]);
    }
}

/// How often the daemon looks whether it went idle with memory to return.
const TRIM_PERIOD: Duration = Duration::from_secs(2);
/// Growth of the resident set since the last trim that makes one worth it.
const TRIM_GROWTH_BYTES: i64 = 1 << 20;
/// Connections gone since the peak that make a trim worth it: about 1 MiB
/// of their buffers (some 13 KiB each) lies free.
const TRIM_CONNECTIONS_GONE: usize = 64;

/// Gives freed heap memory back to the system once the daemon is idle: a
/// burst of requests leaves glibc holding megabytes of free chunks in its
/// per-thread arenas, which an operator would read as a leak. Runs only when
/// no model request is in flight (idle connections do not count), and only
/// when the resident set grew since the last trim or many connections
/// closed since the most were open: their memory is freed without the
/// resident set growing, so growth alone misses a burst of idle
/// connections that came and went, and trimming on every close would run
/// it all the time under connection churn.
async fn trim_when_idle(state: Arc<AppState>, conns: Arc<Connections>) {
    let mut ticker = tokio::time::interval(TRIM_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut floor = process_figures().map_or(0, |f| f.0);
    loop {
        ticker.tick().await;
        let Some((rss, _)) = process_figures() else {
            return;
        };
        let (open, peak) = conns.open_and_peak();
        if rss < floor + TRIM_GROWTH_BYTES && open + TRIM_CONNECTIONS_GONE > peak {
            floor = floor.min(rss);
            continue;
        }
        if state.scheduler.inflight() == 0 {
            // Before the trim: connections that close while it runs leave
            // the peak above the count, so the next look trims again.
            conns.reset_peak();
            let released = tokio::task::spawn_blocking(release_free_heap).await;
            floor = process_figures().map_or(rss, |f| f.0);
            tracing::debug!(before = rss, after = floor, trimmed = ?released.ok(), "returned free heap memory");
        }
    }
}

/// `malloc_trim(0)`: returns free memory at the top of every glibc arena
/// and free whole pages inside them to the kernel. True if any was.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim takes the arena locks itself and may be called
    // from any thread at any time; it has no preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn release_free_heap() -> bool {
    false
}

/// Low-rate resource figures for dashboards: the daemon's and each loaded
/// model's memory and CPU time.
async fn sample(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        ticker.tick().await;
        let at_ms = now_ms();
        let models = state.scheduler.status().await;
        let daemon = process_figures();
        state.recorder.sample(Sample {
            at_ms,
            model: String::new(),
            rss_bytes: daemon.map(|d| d.0),
            cpu_seconds: daemon.map(|d| d.1),
            inflight: Some(models.iter().map(|m| m.inflight as i64).sum()),
            vram_bytes: None,
        });
        for m in models {
            let Some(pid) = m.pid else { continue };
            let figures = pid_figures(pid);
            state.recorder.sample(Sample {
                at_ms,
                model: m.name,
                rss_bytes: figures.map(|f| f.0),
                cpu_seconds: figures.map(|f| f.1),
                inflight: Some(m.inflight as i64),
                vram_bytes: m.vram_bytes,
            });
        }
    }
}

/// How long a wait for room lasts before looking again: fds held outside
/// the connection table (children, the database) free up without a wake-up.
const ROOM_RECHECK: Duration = Duration::from_secs(1);
/// At most one warning per this long from each accept loop about having no
/// room, with the number held back.
const ROOM_WARN_PERIOD: Duration = Duration::from_secs(10);

async fn accept_loop(
    listener: Listener,
    state: Arc<AppState>,
    conns: Arc<Connections>,
    done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut throttle = Throttle::default();
    let describe = listener.describe();
    // The local socket is admin: like a database's reserved superuser
    // connections, it is never held back at the cap, so an operator can
    // always get in. Its connections still count, and an idle one can be
    // closed to make room.
    let local = listener.is_unix();
    loop {
        // Room first: a connection accepted past the cap would take fds
        // kept for the models and the database.
        let room = if local { Room::Free } else { conns.make_room() };
        if room != Room::Free {
            if room == Room::AllBusy {
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, open = conns.open(), max_open_connections = conns.cap(), held_back,
                        "every connection has a request in flight; not accepting until one ends (http.max_open_connections)");
                }
            }
            if wait_for_room(&conns, room, &mut stop).await {
                continue;
            }
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => return,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) if out_of_fds(&e) => {
                // The client stays in the backlog and the listener stays
                // readable: accepting again before an fd is free would
                // fail the same way at once.
                let room = conns.close_idle_longest();
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, error = %e, open = conns.open(), held_back,
                        "out of file descriptors; closing the connection idle longest or waiting for one to close");
                }
                if wait_for_room(&conns, room, &mut stop).await {
                    continue;
                }
                return;
            }
            Err(e) => {
                // A client that reset before it was accepted, or similar:
                // about that client only. The pause keeps an error that
                // does repeat from spinning.
                if let Some(held_back) = throttle.ready() {
                    tracing::warn!(listen = %describe, error = %e, held_back, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let peer = Arc::new(peer);
        let http = state.config().http.clone();
        let registered = conns.register();
        conns.admitted(&registered);
        let (done, stop, state) = (done.clone(), stop.clone(), state.clone());
        match conn {
            Conn::Tcp(s) => tokio::spawn(serve_conn(http, s, state, peer, registered, done, stop)),
            Conn::Unix(s) => tokio::spawn(serve_conn(http, s, state, peer, registered, done, stop)),
        };
    }
}

/// Accept errors that mean the process (or system) has no fd or buffer
/// for the next connection, rather than anything about the client.
fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Lets one warning through per [`ROOM_WARN_PERIOD`].
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(warnings held back since the last one)` when one may be
    /// logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ROOM_WARN_PERIOD)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Waits until a connection may be accepted (`room` says why not now):
/// false if shutdown began meanwhile.
async fn wait_for_room(conns: &Connections, room: Room, stop: &mut watch::Receiver<bool>) -> bool {
    let (all_busy, recheck) = match room {
        Room::Young(wait) => (true, wait),
        _ => (room == Room::AllBusy, ROOM_RECHECK),
    };
    tokio::select! {
        _ = conns.wait(all_busy, recheck) => true,
        _ = stopped(stop) => false,
    }
}

fn builder(http: &HttpConfig) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(http.header_read_timeout)
        .keep_alive(true);
    b
}

/// An accepted stream, which can be waited on for its first byte.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once the client sent something (or closed).
    fn first_byte(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_;
}

impl Stream for TcpStream {
    async fn first_byte(&self) -> std::io::Result<()> {
        // A peek, not `readable()`: tokio takes a freshly accepted stream
        // as readable without asking the kernel.
        self.peek(&mut [0u8; 1]).await.map(drop)
    }
}

impl Stream for UnixStream {
    async fn first_byte(&self) -> std::io::Result<()> {
        // tokio has no peek here; the unix socket is local (mode 0660), not
        // where idle connections pile up, so hyper just starts.
        Ok(())
    }
}

/// Serves one connection; on shutdown, finishes the request in flight and
/// closes instead of waiting for the next one. Chosen to make room, it
/// closes at once when idle (a half-sent head included) and after its
/// request otherwise.
async fn serve_conn<S: Stream>(
    http: HttpConfig,
    stream: S,
    state: Arc<AppState>,
    peer: Arc<Peer>,
    registered: Registered,
    _done: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let slot = registered.slot().clone();
    // hyper allocates its buffers (8 KiB each way) when it starts; a client
    // that has sent nothing yet gets none, so idle connections cost little.
    // The wait is bounded like a slow head: a client that never sends
    // anything is cut off after `header_read_timeout`, as hyper would.
    tokio::select! {
        // First: a connection chosen to make room before its task first ran
        // may have its request waiting already; that one is served.
        biased;
        first = tokio::time::timeout(http.header_read_timeout, stream.first_byte()) => {
            if !matches!(first, Ok(Ok(()))) {
                return;
            }
        }
        _ = slot.evicted() => return,
        _ = stopped(&mut stop) => return,
    }
    slot.reading();
    let requests = slot.clone();
    // How a handler closes this connection at once: the events stream cuts
    // a client that fell behind, whose connection may be stuck writing.
    let cut = api::event_stream::Disconnect::default();
    let cut_handle = cut.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(cut_handle.clone());
        let busy = requests.begin();
        let handled = api::handle(state.clone(), peer.clone(), req);
        async move {
            let resp = match handled.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, busy)))
        }
    });
    let conn = builder(&http).serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cut.requested() => return,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = cut.requested() => return,
            }
        }
        _ = slot.evicted() => {
            if slot.is_idle() {
                return;
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = cut.requested() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves once shutdown has been signalled (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
