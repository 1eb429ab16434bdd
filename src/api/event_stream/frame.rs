//! The wire side of the stream: the SSE message shapes (an event with its
//! id, the `reset` that tells a client to refetch, the keep-alive comment)
//! and the one-line JSON of each event type. Request events carry ids,
//! names and figures, never content.

use bytes::Bytes;
use serde::Serialize;

use crate::events::Event;

/// What an idle stream sends every [`KEEP_ALIVE`](super::KEEP_ALIVE).
pub(super) const KEEP_ALIVE_FRAME: &[u8] = b": keep-alive\n\n";

/// One event as the stream carries it.
pub(super) fn message(id: u64, kind: &str, data: &str) -> Bytes {
    Bytes::from(format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"))
}

/// Tells a client that missed events to refetch state; `id` is where its
/// next resume starts.
pub(super) fn reset(id: u64) -> Bytes {
    Bytes::from(format!("id: {id}\nevent: reset\ndata: {{}}\n\n"))
}

pub(super) fn json(v: &impl Serialize) -> String {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

#[derive(Serialize)]
pub(super) struct StateData<'a> {
    pub(super) model: &'a str,
    pub(super) state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<&'a str>,
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
pub(super) fn render(event: &Event) -> Option<(&'static str, String)> {
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
