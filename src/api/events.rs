//! `GET /admin/events`: the bus as Server-Sent Events, with ids, resume
//! from a bounded replay buffer, and slow clients cut off.
//!
//! Three parts, each with one owner:
//!
//! - [`EventLog`] is a bus [`Sink`]: called inline by every emitter, it
//!   renders the event once (`id: N\nevent: TYPE\ndata: JSON\n\n`), gives
//!   it the next id and appends it to the replay ring (the last
//!   [`REPLAY`] events) under one short mutex, then wakes the hub. Ids are
//!   therefore global, increasing by one, and in emission order; the ring
//!   is the only place that assigns them. Being a sink (not a lagging bus
//!   subscriber) it never misses an event.
//! - The hub task owns the list of connected clients. Woken, it copies
//!   what is new in the ring and offers each piece to every client's
//!   bounded queue ([`CLIENT_QUEUE`] messages) with `try_send`; a client
//!   whose queue is full has fallen behind: it is removed, counted in
//!   `claracore_event_clients_dropped_total`, and its connection is cut
//!   through its [`Disconnect`]. The hub never waits for a client, and
//!   the emitters never wait for the hub. A client joins through the hub
//!   too, between two fan-outs, so its replay (from the ring, up to what
//!   the hub has fanned out) and its live events meet without a gap or a
//!   duplicate.
//! - Each client's response body ([`EventBody`]) drains its replay, then
//!   its queue, and sends `: keep-alive` every [`KEEP_ALIVE`].
//!
//! Resume: `Last-Event-ID: N` (or `?last_event_id=N`, for clients that
//! cannot set headers) replays the events after N from the ring. When N
//! is older than the ring, newer than the newest id, or not a number, the
//! client gets `event: reset` first, carrying the newest id so that its
//! next resume starts from there; it must refetch state. `?replay_only=1`
//! ends the stream after the replay.
//!
//! Model states carry the reason of the lifecycle step that led to them
//! (the scheduler emits the step, then the state): `requested`, `ttl`,
//! `evicted`, `admin`, `reload`, `shutdown`, `crash: …`, `health: …` or a
//! start failure's words. Request events carry ids, names, figures and
//! never content.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{ApiError, Ctx};
use crate::events::{Event, ModelEvent, ModelEventKind, Sink};
use crate::metrics::Metrics;
use crate::proxy::BoxBody;
use crate::scheduler::AcquireError;

/// Events kept for resume.
pub const REPLAY: usize = 4096;
/// Live events a client may have waiting before it counts as fallen
/// behind. Each is a shared `Bytes`, so a full queue costs a few KiB of
/// pointers; what the kernel's socket buffer holds comes on top.
pub const CLIENT_QUEUE: usize = 256;
/// How often an idle stream says it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Queued messages one poll of a body takes at most, as one frame.
const FRAME_BATCH: usize = 16;

/// The handle by which a request's connection can be closed at once
/// (not gracefully): the server puts one in every request's extensions
/// and closes the connection when it is cut. The events stream cuts a
/// client that fell behind, whose connection may be stuck writing and
/// would never poll its body again.
#[derive(Clone, Default, Debug)]
pub struct Disconnect(Arc<Notify>);

impl Disconnect {
    /// Asks for the connection to be closed (remembered if nobody waits
    /// yet).
    pub fn cut(&self) {
        self.0.notify_one();
    }

    /// Resolves once [`Disconnect::cut`] was called.
    pub async fn requested(&self) {
        self.0.notified().await;
    }
}

/// The replay ring and the id counter: see the module's invariant.
struct Ring {
    /// The id the newest entry has (0: none yet).
    last_id: u64,
    entries: VecDeque<(u64, Bytes)>,
    /// Per model, the reason of its last lifecycle step, for the state
    /// that follows it.
    reasons: HashMap<String, String>,
}

/// A client's wish, taken by the hub between fan-outs.
struct Join {
    resume: Resume,
    /// None: replay only.
    live: Option<(mpsc::Sender<Bytes>, Disconnect)>,
    /// The replay (starting with a `reset` where needed).
    reply: oneshot::Sender<Vec<Bytes>>,
}

/// Where a client starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// No id given: live events from now on.
    Now,
    After(u64),
    /// An id that is not a number.
    Invalid,
}

/// The sink side and the door to the hub; one per daemon.
pub struct EventLog {
    ring: Mutex<Ring>,
    /// Wakes the hub when the ring grew.
    grew: Notify,
    joins: mpsc::UnboundedSender<Join>,
    /// Closed by [`EventLog::close`]: the hub cuts every client and ends.
    closing: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// The log and its hub task (spawned on the current runtime).
    pub fn start(metrics: Arc<Metrics>) -> Arc<EventLog> {
        let (joins, joins_rx) = mpsc::unbounded_channel();
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let log = Arc::new(EventLog {
            ring: Mutex::new(Ring {
                last_id: 0,
                entries: VecDeque::with_capacity(REPLAY),
                reasons: HashMap::new(),
            }),
            grew: Notify::new(),
            joins,
            closing,
            metrics,
        });
        tokio::spawn(hub(log.clone(), joins_rx, closing_rx));
        log
    }

    /// Ends every stream (shutdown): the hub cuts its clients' connections
    /// and refuses new ones.
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// The newest id given out (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.lock().last_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        match self.ring.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Entries with `after < id <= upto`, and whether the ring still held
    /// every one of them.
    fn since(&self, after: u64, upto: u64) -> (Vec<(u64, Bytes)>, bool) {
        let ring = self.lock();
        let oldest = ring.entries.front().map_or(ring.last_id + 1, |e| e.0);
        let complete = after + 1 >= oldest;
        let out = ring
            .entries
            .iter()
            .skip_while(|(id, _)| *id <= after)
            .take_while(|(id, _)| *id <= upto)
            .cloned()
            .collect();
        (out, complete)
    }
}

impl Sink for EventLog {
    fn on_event(&self, event: &Event) {
        // Rendered outside the lock, except states: their reason comes
        // from the step before them, kept under the lock.
        let rendered = match event {
            Event::State { .. } | Event::Model(_) => None,
            other => match render(other) {
                Some(r) => Some(r),
                None => return,
            },
        };
        let mut ring = self.lock();
        let (kind, data) = match (rendered, event) {
            (Some(r), _) => r,
            (None, Event::Model(e)) => {
                match step_reason(e) {
                    Some(why) => ring.reasons.insert(e.model.clone(), why),
                    None => ring.reasons.remove(&e.model),
                };
                return;
            }
            (None, Event::State { model, state }) => {
                let reason = ring.reasons.remove(&**model);
                let data = json(&StateData {
                    model,
                    state: state.as_str(),
                    reason: reason.as_deref(),
                });
                ("state", data)
            }
            (None, _) => return,
        };
        ring.last_id += 1;
        let id = ring.last_id;
        let message = Bytes::from(format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"));
        if ring.entries.len() == REPLAY {
            ring.entries.pop_front();
        }
        ring.entries.push_back((id, message));
        drop(ring);
        self.grew.notify_one();
    }
}

/// The reason a lifecycle step gives the state after it.
fn step_reason(e: &ModelEvent) -> Option<String> {
    let reason = e.reason.as_ref().map(|r| r.text().to_string());
    match e.event {
        ModelEventKind::StartRequested => Some("requested".into()),
        ModelEventKind::Ready => None,
        ModelEventKind::StartFailed | ModelEventKind::Stopped => reason,
        ModelEventKind::Crashed => match (reason, &e.exit_status) {
            (Some(r), Some(exit)) => Some(format!("{r}: {exit}")),
            (r, exit) => r.or_else(|| exit.clone()),
        },
    }
}

fn json(v: &impl Serialize) -> String {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

#[derive(Serialize)]
struct StateData<'a> {
    model: &'a str,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct StartedData<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    endpoint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_name: Option<&'a str>,
    client: &'a str,
}

#[derive(Serialize)]
struct RequestData<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    endpoint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_name: Option<&'a str>,
    status: u16,
    outcome: &'a str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttft_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<i64>,
}

#[derive(Serialize)]
struct AuditData<'a> {
    principal: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    result: &'a str,
}

#[derive(Serialize)]
struct VramData<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu: Option<u32>,
    bytes: u64,
}

#[derive(Serialize)]
struct QueueData<'a> {
    model: &'a str,
    waiting: usize,
}

#[derive(Serialize)]
struct ReloadData<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct DropsData {
    dropped: u64,
}

/// The SSE type and one-line JSON of an event that needs no state; None
/// for events the stream does not carry.
fn render(event: &Event) -> Option<(&'static str, String)> {
    Some(match event {
        Event::RequestStarted(s) => (
            "request_started",
            json(&StartedData {
                id: &s.request_id,
                model: s.model.as_deref(),
                endpoint: &s.endpoint,
                key_name: s.key_name.as_deref(),
                client: &s.client,
            }),
        ),
        Event::Request(r) => (
            "request",
            json(&RequestData {
                id: &r.request_id,
                model: r.model.as_deref(),
                endpoint: &r.endpoint,
                key_name: r.key_name.as_deref(),
                status: r.status,
                outcome: r.outcome.as_str(),
                latency_ms: r.latency_ms,
                ttft_ms: r.ttft_ms,
                prompt_tokens: r.usage.prompt_tokens,
                completion_tokens: r.usage.completion_tokens,
            }),
        ),
        Event::Audit(a) => (
            "audit",
            json(&AuditData {
                principal: &a.principal,
                action: a.action.as_str(),
                target: a.target.as_deref(),
                result: &a.result,
            }),
        ),
        Event::Queue { model, waiting } => (
            "queue",
            json(&QueueData {
                model,
                waiting: *waiting,
            }),
        ),
        Event::Vram { model, gpu, bytes } => (
            "vram",
            json(&VramData {
                model,
                gpu: *gpu,
                bytes: *bytes,
            }),
        ),
        Event::Reload(r) => (
            "reload",
            json(&ReloadData {
                ok: r.ok,
                error: r.error.as_deref(),
            }),
        ),
        Event::HistoryDrops { dropped } => {
            ("history_drops", json(&DropsData { dropped: *dropped }))
        }
        // The contract's `{model, elapsed_ms, expected_ms?, fraction?}`:
        // LoadProgress serializes to exactly that.
        Event::Progress(p) => ("progress", json(&**p)),
        // A removed model's end shows as the reload that removed it; its
        // states and steps are rendered by the sink with their reasons.
        Event::Removed { .. } | Event::State { .. } | Event::Model(_) => return None,
    })
}

/// A connected client, as the hub sees it.
struct Client {
    tx: mpsc::Sender<Bytes>,
    cut: Disconnect,
}

/// The one owner of the client list: fans out what the ring gained, lets
/// clients join between fan-outs, drops the ones that fell behind.
async fn hub(
    log: Arc<EventLog>,
    mut joins: mpsc::UnboundedReceiver<Join>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let mut clients: Vec<Client> = Vec::new();
    // Everything up to here went to every client in `clients`.
    let mut sent = log.last_id();
    loop {
        tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => break,
            join = joins.recv() => {
                let Some(join) = join else { break };
                sent = fan_out(&log, &mut clients, sent);
                admit(&log, &mut clients, sent, join);
            }
            _ = log.grew.notified() => sent = fan_out(&log, &mut clients, sent),
        }
    }
    joins.close();
    for c in clients {
        c.cut.cut();
    }
}

/// Offers every entry after `sent` to every client; returns the new
/// `sent`.
fn fan_out(log: &EventLog, clients: &mut Vec<Client>, sent: u64) -> u64 {
    let (fresh, complete) = log.since(sent, u64::MAX);
    let Some(&(newest, _)) = fresh.last() else {
        return sent;
    };
    if !complete {
        // The hub itself fell a whole ring behind: every client missed
        // events. Cut them all; each resumes with its last id and is told
        // to reset.
        tracing::warn!(
            clients = clients.len(),
            "events hub fell behind; disconnecting every events client"
        );
        for c in clients.drain(..) {
            log.metrics.event_client_dropped();
            c.cut.cut();
        }
        return newest;
    }
    clients.retain(|c| {
        for (_, message) in &fresh {
            match c.tx.try_send(message.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::info!(
                        queue = CLIENT_QUEUE,
                        "events client fell behind; disconnecting it"
                    );
                    log.metrics.event_client_dropped();
                    c.cut.cut();
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    });
    newest
}

/// Answers a join with its replay (everything up to `sent`) and, for a
/// live client, adds it to the fan-out from `sent` on.
fn admit(log: &EventLog, clients: &mut Vec<Client>, sent: u64, join: Join) {
    let reset = || Bytes::from(format!("id: {sent}\nevent: reset\ndata: {{}}\n\n"));
    let replay = match join.resume {
        Resume::Now => Vec::new(),
        Resume::Invalid => vec![reset()],
        Resume::After(n) if n > sent => vec![reset()],
        Resume::After(n) => match log.since(n, sent) {
            (entries, true) => entries.into_iter().map(|(_, m)| m).collect(),
            (_, false) => vec![reset()],
        },
    };
    if join.reply.send(replay).is_err() {
        return; // the client left while waiting
    }
    if let Some((tx, cut)) = join.live {
        clients.push(Client { tx, cut });
    }
}

/// Where a request asks to start, and whether it wants the replay only.
fn parse_request(
    last_event_id: Option<&HeaderValue>,
    query: Option<&str>,
) -> Result<(Resume, bool), ApiError> {
    let mut from_query = None;
    let mut replay_only = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "last_event_id" => from_query = Some(v.into_owned()),
            "replay_only" => {
                replay_only = match &*v {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "replay_only: expected 1, true, 0 or false, got {:?}",
                            super::error::cut(&v, 32)
                        )))
                    }
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                "unknown query parameter {:?}; /admin/events takes last_event_id and replay_only",
                super::error::cut(other, 32)
            )))
            }
        }
    }
    // The header wins: a browser's EventSource sends it on reconnect,
    // with the URL (and its query) unchanged.
    let given = match last_event_id {
        Some(h) => Some(h.to_str().unwrap_or("").trim().to_string()),
        None => from_query,
    };
    let resume = match given {
        None => Resume::Now,
        Some(s) => s.parse().map_or(Resume::Invalid, Resume::After),
    };
    Ok((resume, replay_only))
}

/// `GET /admin/events`.
pub(super) async fn stream(
    ctx: &Ctx<'_>,
    req: &Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let (resume, replay_only) =
        parse_request(req.headers().get("last-event-id"), req.uri().query())?;
    let log = &ctx.state.events;
    let (reply, replay) = oneshot::channel();
    let (live, rx) = if replay_only {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let cut = req
            .extensions()
            .get::<Disconnect>()
            .cloned()
            .unwrap_or_default();
        (Some((tx, cut)), Some(rx))
    };
    let shutting_down = || ApiError::Unavailable(AcquireError::ShuttingDown);
    log.joins
        .send(Join {
            resume,
            live,
            reply,
        })
        .map_err(|_| shutting_down())?;
    // Answered once the hub has taken the client in: from the response
    // head on, nothing emitted is missed.
    let replay = replay.await.map_err(|_| shutting_down())?;
    let body = EventBody::new(replay, rx, log.metrics.clone());
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies such as nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// One client's stream: its replay, then its queue, with keep-alives.
/// Counted in `claracore_event_clients` while it exists.
pub struct EventBody {
    replay: VecDeque<Bytes>,
    /// None: replay only, or the hub let go of it (shutdown, fell behind).
    live: Option<mpsc::Receiver<Bytes>>,
    keep_alive: tokio::time::Interval,
    metrics: Arc<Metrics>,
}

impl EventBody {
    fn new(replay: Vec<Bytes>, live: Option<mpsc::Receiver<Bytes>>, metrics: Arc<Metrics>) -> Self {
        metrics.event_clients_add(1);
        let start = tokio::time::Instant::now() + KEEP_ALIVE;
        EventBody {
            replay: replay.into(),
            live,
            keep_alive: tokio::time::interval_at(start, KEEP_ALIVE),
            metrics,
        }
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        self.metrics.event_clients_add(-1);
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let mut frame = BytesMut::new();
            for message in this.replay.drain(..this.replay.len().min(FRAME_BATCH)) {
                frame.extend_from_slice(&message);
            }
            return Poll::Ready(Some(Ok(Frame::data(frame.freeze()))));
        }
        let Some(live) = this.live.as_mut() else {
            return Poll::Ready(None);
        };
        match live.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                let mut frame = BytesMut::from(&first[..]);
                for _ in 1..FRAME_BATCH {
                    match live.try_recv() {
                        Ok(m) => frame.extend_from_slice(&m),
                        Err(_) => break,
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(frame.freeze()))));
            }
            Poll::Ready(None) => {
                this.live = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        match this.keep_alive.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty() && self.live.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Bus, ModelState, Outcome, Reason, RequestRecord, RequestStart, Usage};

    fn started(id: &str) -> Event {
        Event::RequestStarted(Arc::new(RequestStart {
            request_id: id.into(),
            model: Some("tiny".into()),
            endpoint: "/v1/chat/completions".into(),
            key_name: None,
            client: "127.0.0.1:1".into(),
        }))
    }

    fn text(messages: &[Bytes]) -> String {
        messages
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    async fn join(log: &EventLog, resume: Resume) -> (Vec<Bytes>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let (reply, replay) = oneshot::channel();
        log.joins
            .send(Join {
                resume,
                live: Some((tx, Disconnect::default())),
                reply,
            })
            .unwrap();
        (replay.await.unwrap(), rx)
    }

    #[tokio::test]
    async fn ids_increase_and_resume_replays_exactly_what_was_missed() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        for i in 0..10 {
            log.on_event(&started(&format!("r{i}")));
        }
        let (replay, _rx) = join(&log, Resume::After(7)).await;
        let t = text(&replay);
        assert!(
            t.starts_with("id: 8\nevent: request_started\ndata: {\"id\":\"r7\""),
            "{t}"
        );
        assert!(t.contains("id: 10\n") && !t.contains("id: 7\n"), "{t}");
        // The newest id: nothing missed, no reset.
        assert!(join(&log, Resume::After(10)).await.0.is_empty());
        let future = text(&join(&log, Resume::After(11)).await.0);
        assert_eq!(future, "id: 10\nevent: reset\ndata: {}\n\n");
        let bad = text(&join(&log, Resume::Invalid).await.0);
        assert!(bad.contains("event: reset"), "{bad}");
    }

    #[tokio::test]
    async fn an_id_older_than_the_ring_gets_a_reset_and_live_events_follow() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        for i in 0..REPLAY + 5 {
            log.on_event(&started(&format!("r{i}")));
        }
        let (replay, mut rx) = join(&log, Resume::After(3)).await;
        assert_eq!(
            text(&replay),
            format!("id: {}\nevent: reset\ndata: {{}}\n\n", REPLAY + 5)
        );
        // The oldest kept is id 6: resuming from 5 misses nothing.
        let (replay, _) = join(&log, Resume::After(5)).await;
        assert_eq!(replay.len(), REPLAY);
        log.on_event(&started("next"));
        let live = String::from_utf8(rx.recv().await.unwrap().to_vec()).unwrap();
        assert!(live.starts_with(&format!("id: {}\n", REPLAY + 6)), "{live}");
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_cut_and_counted_and_others_keep_everything() {
        let metrics = Arc::new(Metrics::new());
        let log = EventLog::start(metrics.clone());
        let (tx, _stalled) = mpsc::channel(CLIENT_QUEUE);
        let cut = Disconnect::default();
        let (reply, replay) = oneshot::channel();
        log.joins
            .send(Join {
                resume: Resume::Now,
                live: Some((tx, cut.clone())),
                reply,
            })
            .unwrap();
        replay.await.unwrap();
        let (_, mut reader) = join(&log, Resume::Now).await;
        let n = CLIENT_QUEUE * 4;
        let reading = tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < n {
                let m = reader.recv().await.unwrap();
                let t = String::from_utf8(m.to_vec()).unwrap();
                ids.push(t.lines().next().unwrap().to_string());
            }
            ids
        });
        for i in 0..n {
            log.on_event(&started(&format!("r{i}")));
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(Duration::from_secs(5), cut.requested())
            .await
            .expect("the stalled client is cut");
        let ids = reading.await.unwrap();
        let expected: Vec<String> = (1..=n).map(|i| format!("id: {i}")).collect();
        assert_eq!(ids, expected);
        let text = metrics.render(0, &crate::history::Recorder::disabled(), None);
        assert!(
            text.contains("claracore_event_clients_dropped_total 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn states_carry_the_reason_of_the_step_before_them_and_requests_no_content() {
        let log = EventLog::start(Arc::new(Metrics::new()));
        let bus = Bus::new(vec![log.clone() as Arc<dyn Sink>]);
        let step = |kind, reason| {
            let mut e = ModelEvent::new("tiny", kind, 0);
            e.reason = reason;
            Event::Model(Arc::new(e))
        };
        let state = |s| Event::State {
            model: Arc::from("tiny"),
            state: s,
        };
        bus.emit(step(ModelEventKind::StartRequested, None));
        bus.emit(state(ModelState::Starting));
        bus.emit(step(ModelEventKind::Ready, None));
        bus.emit(state(ModelState::Ready));
        bus.emit(step(ModelEventKind::Stopped, Some(Reason::Ttl)));
        bus.emit(state(ModelState::Stopped));
        bus.emit(Event::Request(Arc::new(RequestRecord {
            request_id: "r1".into(),
            started_at_ms: 0,
            finished_at_ms: 1,
            client: "c".into(),
            key_name: Some("k".into()),
            endpoint: "/v1/completions".into(),
            model: Some("tiny".into()),
            status: 200,
            outcome: Outcome::Ok,
            error: None,
            latency_ms: 2.5,
            ttfb_ms: None,
            ttft_ms: None,
            usage: Usage {
                prompt_tokens: Some(3),
                ..Usage::default()
            },
            streamed: false,
            request_content: Some("SECRET-PROMPT".into()),
            response_content: Some("SECRET-ANSWER".into()),
            content_truncated: false,
            queue_wait_ms: None,
            gpu: None,
        })));
        let (replay, _) = join(&log, Resume::After(0)).await;
        let t = text(&replay);
        let expected = "id: 1\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"starting\",\"reason\":\"requested\"}\n\n\
            id: 2\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"ready\"}\n\n\
            id: 3\nevent: state\ndata: {\"model\":\"tiny\",\"state\":\"stopped\",\"reason\":\"ttl\"}\n\n\
            id: 4\nevent: request\ndata: {\"id\":\"r1\",\"model\":\"tiny\",\"endpoint\":\"/v1/completions\",\"key_name\":\"k\",\"status\":200,\"outcome\":\"ok\",\"latency_ms\":2.5,\"prompt_tokens\":3}\n\n";
        assert_eq!(t, expected);
        assert!(!t.contains("SECRET"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_sends_a_keep_alive_every_fifteen_seconds() {
        let (_tx, rx) = mpsc::channel(1);
        let mut body = EventBody::new(Vec::new(), Some(rx), Arc::new(Metrics::new()));
        let next = tokio::time::timeout(KEEP_ALIVE - Duration::from_millis(10), body.frame()).await;
        assert!(next.is_err(), "nothing before 15 s");
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&frame[..], b": keep-alive\n\n");
    }

    #[test]
    fn the_header_wins_over_the_query_and_bad_parameters_are_named() {
        let h = HeaderValue::from_static("12");
        assert_eq!(
            parse_request(Some(&h), Some("last_event_id=3")).unwrap(),
            (Resume::After(12), false)
        );
        assert_eq!(
            parse_request(None, Some("last_event_id=3&replay_only=1")).unwrap(),
            (Resume::After(3), true)
        );
        assert_eq!(parse_request(None, None).unwrap(), (Resume::Now, false));
        let junk = HeaderValue::from_static("abc");
        assert_eq!(parse_request(Some(&junk), None).unwrap().0, Resume::Invalid);
        let e = parse_request(None, Some("since=1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("since"), "{e}");
    }
}
