//! The daemon's vocabulary of things that happened, and the one bus they
//! travel on.
//!
//! Producers (the scheduler, the API, a response's tap) [`Bus::emit`] an
//! [`Event`] and know nothing of who listens. Two kinds of listener:
//!
//! - [`Sink`]s, fixed when the bus is made (history, metrics), are called
//!   inline by the emitter. A sink must never block: history puts the row on
//!   its bounded queue with `try_send`, metrics bump atomics.
//! - Live subscribers ([`Bus::subscribe`]: the STATUS= reporter, later the
//!   SSE stream) read a bounded broadcast buffer per [`Topic`]. A subscriber
//!   that falls behind loses the oldest events (`RecvError::Lagged`) and is
//!   never waited for. Nothing is sent on a topic nobody subscribes to, and
//!   a subscriber to model changes is not woken by every request.
//!
//! This module is a leaf: it imports nothing from the crate, so every layer
//! may emit.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Live events kept for a subscriber that has not read them yet.
const LIVE_BUFFER: usize = 1024;

/// Something that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A model's lifecycle step (history's `model_events`).
    Model(Arc<ModelEvent>),
    /// A model's public state changed.
    State { model: Arc<str>, state: ModelState },
    /// A model left the config (reload) and is gone.
    Removed { model: Arc<str> },
    /// A request finished: answered, refused or cut short.
    Request(Arc<RequestRecord>),
    /// An admin action or a rejected key (history's `audit`).
    Audit(Arc<AuditRecord>),
    /// How far a starting model's load has come: about every 250 ms while
    /// it starts, and once at Ready with `fraction` 1.0.
    Progress(Arc<LoadProgress>),
    /// A request's model is known and it is about to wait for it: the
    /// `request_started` of the events stream. No content, ever.
    RequestStarted(Arc<RequestStart>),
    /// The number of requests waiting for `model` (to start, or to drain
    /// and restart) changed.
    Queue { model: Arc<str>, waiting: usize },
    /// The GPU memory `model`'s process tree uses changed (a GPU reading);
    /// 0 once its child is gone.
    Vram {
        model: Arc<str>,
        gpu: Option<u32>,
        bytes: u64,
    },
    /// A config reload ended (SIGHUP, `systemctl reload`).
    Reload(Arc<ReloadResult>),
    /// History rows dropped since start grew to `dropped` (the running
    /// total).
    HistoryDrops { dropped: u64 },
}

/// Which live events a subscriber gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Lifecycle steps, state changes, removals: a few per model start.
    Models,
    /// Finished requests: one per request.
    Requests,
}

impl Event {
    pub fn topic(&self) -> Topic {
        match self {
            Event::Model(_)
            | Event::State { .. }
            | Event::Removed { .. }
            | Event::Audit(_)
            | Event::Progress(_)
            | Event::Vram { .. }
            | Event::Reload(_)
            | Event::HistoryDrops { .. } => Topic::Models,
            // One or more per request: kept off the topic the STATUS=
            // reporter wakes for.
            Event::Request(_) | Event::RequestStarted(_) | Event::Queue { .. } => Topic::Requests,
        }
    }
}

/// A listener called inline by [`Bus::emit`]; must return at once.
pub trait Sink: Send + Sync {
    fn on_event(&self, event: &Event);
}

/// Where events go; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    sinks: Vec<Arc<dyn Sink>>,
    models: broadcast::Sender<Event>,
    requests: broadcast::Sender<Event>,
}

impl Inner {
    fn live(&self, topic: Topic) -> &broadcast::Sender<Event> {
        match topic {
            Topic::Models => &self.models,
            Topic::Requests => &self.requests,
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("sinks", &self.inner.sinks.len())
            .field("model_subscribers", &self.inner.models.receiver_count())
            .field("request_subscribers", &self.inner.requests.receiver_count())
            .finish()
    }
}

impl Bus {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Bus {
        let (models, _) = broadcast::channel(LIVE_BUFFER);
        let (requests, _) = broadcast::channel(LIVE_BUFFER);
        Bus {
            inner: Arc::new(Inner {
                sinks,
                models,
                requests,
            }),
        }
    }

    /// A bus with no sinks (tests, tools).
    pub fn detached() -> Bus {
        Bus::new(Vec::new())
    }

    pub fn emit(&self, event: Event) {
        for sink in &self.inner.sinks {
            sink.on_event(&event);
        }
        let live = self.inner.live(event.topic());
        if live.receiver_count() > 0 {
            let _ = live.send(event);
        }
    }

    /// Events of `topic` from now on; a subscriber that lags loses the
    /// oldest.
    pub fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        self.inner.live(topic).subscribe()
    }
}

/// Wall-clock time in unix milliseconds, as history rows record it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A model's state as operators see it (`ps`, `/health`, metrics, STATUS=).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    #[default]
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 5] = [
        ModelState::Stopped,
        ModelState::Starting,
        ModelState::Ready,
        ModelState::Stopping,
        ModelState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Stopped => "stopped",
            ModelState::Starting => "starting",
            ModelState::Ready => "ready",
            ModelState::Stopping => "stopping",
            ModelState::Failed => "failed",
        }
    }

    /// Holds a process (pid shown, counts as loaded).
    pub fn is_loaded(self) -> bool {
        matches!(
            self,
            ModelState::Starting | ModelState::Ready | ModelState::Stopping
        )
    }
}

/// Why a lifecycle step happened, stored with its [`ModelEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Stopped after its idle TTL.
    Ttl,
    /// Stopped to make room for another model.
    Evicted,
    /// Stopped through `/admin/models/{name}/stop`.
    Admin,
    Shutdown,
    /// Removed or changed by a config reload.
    Reload,
    /// Exited on its own while ready.
    Crash,
    /// Stopped answering health pings.
    Health,
    /// Never became ready; the supervisor's words.
    StartFailed(String),
}

impl Reason {
    /// The `model_events.reason` column.
    pub fn text(&self) -> &str {
        match self {
            Reason::Ttl => "ttl",
            Reason::Evicted => "evicted",
            Reason::Admin => "admin",
            Reason::Shutdown => "shutdown",
            Reason::Reload => "reload",
            Reason::Crash => "crash",
            Reason::Health => "health",
            Reason::StartFailed(why) => why,
        }
    }
}

/// What an [`AuditRecord`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Stop,
    /// `POST /admin/models/{name}/load`.
    Load,
    Backup,
    /// A call through the raw `/upstream/{model}/…` pass-through.
    Upstream,
    Reload,
    Restore,
    /// A presented API key that was wrong or expired.
    KeyRejected,
    /// A dashboard login (password or key); the target is the client's IP.
    Login,
    /// A refused dashboard login; the principal is the client's IP.
    LoginFailed,
    /// A dashboard session ended by `POST /ui/logout`.
    Logout,
}

impl AuditAction {
    /// The `audit.action` column.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Stop => "stop",
            AuditAction::Load => "load",
            AuditAction::Backup => "backup",
            AuditAction::Upstream => "upstream",
            AuditAction::Reload => "reload",
            AuditAction::Restore => "restore",
            AuditAction::KeyRejected => "key_rejected",
            AuditAction::Login => "login",
            AuditAction::LoginFailed => "login_failed",
            AuditAction::Logout => "logout",
        }
    }
}

/// One `audit` row: who did what to what, and how it went.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub at_ms: i64,
    /// A key's name, `local:uid=N`, `ip:ADDR` or `signal:SIGHUP`.
    pub principal: String,
    pub action: AuditAction,
    pub target: Option<String>,
    pub result: String,
}

/// What step of a model's lifecycle a [`ModelEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelEventKind {
    StartRequested,
    Ready,
    StartFailed,
    Stopped,
    Crashed,
}

impl ModelEventKind {
    /// The `model_events.event` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelEventKind::StartRequested => "start_requested",
            ModelEventKind::Ready => "ready",
            ModelEventKind::StartFailed => "start_failed",
            ModelEventKind::Stopped => "stopped",
            ModelEventKind::Crashed => "crashed",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// The client went away before the response was complete.
    Cancelled,
    UpstreamError,
    Timeout,
    /// Refused before reaching a model (bad request, unknown model, too
    /// large, shutting down).
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        [
            Outcome::Ok,
            Outcome::Cancelled,
            Outcome::UpstreamError,
            Outcome::Timeout,
            Outcome::Rejected,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// Token counts and llama.cpp timings of one response; a request row's
/// JSON carries them beside its other figures (flattened).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub prompt_ms: Option<f64>,
    pub predicted_ms: Option<f64>,
    pub prompt_per_second: Option<f64>,
    pub predicted_per_second: Option<f64>,
}

/// One request, the one type of its row everywhere: what the proxy emits
/// when it ends, what the history writer stores in `requests`, what
/// `/admin/history` answers (with its row id, as
/// `history::store::RequestRow`) and the CLI reads back. Its JSON keys are
/// the table's columns. The events stream sends a content-free summary of
/// it under its own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub client: String,
    pub key_name: Option<String>,
    pub endpoint: String,
    pub model: Option<String>,
    pub status: u16,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    #[serde(flatten)]
    pub usage: Usage,
    pub streamed: bool,
    pub request_content: Option<String>,
    pub response_content: Option<String>,
    pub content_truncated: bool,
    /// How long it waited for its model (a start, a swap, the queue);
    /// `None` when it never asked for one.
    pub queue_wait_ms: Option<f64>,
    /// The GPU its model ran on, with readings around it: the `gpu`,
    /// `gpu_mem_before_bytes`, `gpu_mem_after_bytes` and `gpu_utilization`
    /// columns, all null without one.
    #[serde(flatten, with = "gpu_columns")]
    pub gpu: Option<GpuUse>,
}

/// [`RequestRecord::gpu`] as its four columns: a row with no GPU has them
/// all null, one with a GPU always has its index.
mod gpu_columns {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::GpuUse;

    #[derive(Serialize, Deserialize)]
    struct Columns {
        gpu: Option<u32>,
        gpu_mem_before_bytes: Option<u64>,
        gpu_mem_after_bytes: Option<u64>,
        gpu_utilization: Option<f64>,
    }

    pub fn serialize<S: Serializer>(gpu: &Option<GpuUse>, s: S) -> Result<S::Ok, S::Error> {
        let g = gpu.as_ref();
        Columns {
            gpu: g.map(|g| g.index),
            gpu_mem_before_bytes: g.and_then(|g| g.mem_before_bytes),
            gpu_mem_after_bytes: g.and_then(|g| g.mem_after_bytes),
            gpu_utilization: g.and_then(|g| g.utilization),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<GpuUse>, D::Error> {
        let c = Columns::deserialize(d)?;
        Ok(c.gpu.map(|index| GpuUse {
            index,
            mem_before_bytes: c.gpu_mem_before_bytes,
            mem_after_bytes: c.gpu_mem_after_bytes,
            utilization: c.gpu_utilization,
        }))
    }
}

/// A request's GPU figures, from the GPU readings (sampled every
/// `gpu.sample_interval`, so as fine as that).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuUse {
    pub index: u32,
    /// The GPU's used memory as last read when its model was leased.
    pub mem_before_bytes: Option<u64>,
    /// As last read when the request ended.
    pub mem_after_bytes: Option<u64>,
    /// The GPU's utilization (0 to 1) as last read when it ended.
    pub utilization: Option<f64>,
}

/// A starting model's load progress, as the bus, the SSE stream and the
/// dashboard carry it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadProgress {
    pub model: String,
    /// Since the child was spawned.
    pub elapsed_ms: u64,
    /// The median of this model's last successful load times, when it has
    /// loaded before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_ms: Option<u64>,
    /// 0.0 to 1.0: llama-server's own figure where it prints one, else
    /// `elapsed / expected` capped at 0.99; absent with neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
}

/// A request whose model is known, as it goes to wait for it.
#[derive(Debug, Clone)]
pub struct RequestStart {
    /// The id its [`RequestRecord`] will carry.
    pub request_id: String,
    pub model: Option<String>,
    pub endpoint: String,
    pub key_name: Option<String>,
    pub client: String,
}

/// How a config reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadResult {
    pub ok: bool,
    /// Why the new file was refused (the old config stays in force).
    pub error: Option<String>,
}

/// One `model_events` row.
#[derive(Debug, Clone)]
pub struct ModelEvent {
    pub at_ms: i64,
    pub model: String,
    pub event: ModelEventKind,
    pub reason: Option<Reason>,
    pub load_ms: Option<f64>,
    pub exit_status: Option<String>,
    pub pid: Option<u32>,
    pub rss_bytes: Option<i64>,
    /// The GPU the child was placed on.
    pub gpu: Option<u32>,
    /// On a stop or crash: the most GPU memory its process tree used in
    /// that run (what the model learns to need).
    pub vram_bytes: Option<u64>,
}

impl ModelEvent {
    /// An event of `kind` for `model` now, with no details yet.
    pub fn new(model: &str, event: ModelEventKind, at_ms: i64) -> ModelEvent {
        ModelEvent {
            at_ms,
            model: model.to_string(),
            event,
            reason: None,
            load_ms: None,
            exit_status: None,
            pid: None,
            rss_bytes: None,
            gpu: None,
            vram_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Sink for Count {
        fn on_event(&self, _: &Event) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn state(s: ModelState) -> Event {
        Event::State {
            model: Arc::from("m"),
            state: s,
        }
    }

    #[test]
    fn sinks_see_every_event_and_subscribers_only_later_ones() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let bus = Bus::new(vec![count.clone()]);
        bus.emit(state(ModelState::Starting));
        let mut live = bus.subscribe(Topic::Models);
        let mut requests = bus.subscribe(Topic::Requests);
        bus.emit(state(ModelState::Ready));
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(
            requests.try_recv().is_err(),
            "a state change is not a request"
        );
        match live.try_recv() {
            Ok(Event::State { state, .. }) => assert_eq!(state, ModelState::Ready),
            other => panic!("expected the Ready state, got {other:?}"),
        }
        assert!(live.try_recv().is_err());
    }

    #[test]
    fn a_slow_subscriber_loses_the_oldest_events_and_never_blocks_the_emitter() {
        let bus = Bus::detached();
        let mut live = bus.subscribe(Topic::Models);
        for _ in 0..LIVE_BUFFER + 10 {
            bus.emit(state(ModelState::Ready));
        }
        assert!(matches!(
            live.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
    }

    #[test]
    fn state_names_are_the_serialized_names() {
        for s in ModelState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
