//! The wire side of the stream: the SSE message shapes (an event with its
//! id, the `reset` that tells a client to refetch, the keep-alive comment)
//! and the one-line JSON of each event type. Request events carry ids,
//! names and figures, never content.

use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::events::{Event, RequestRecord};

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

/// A finished request as the stream sends it: a summary of the one request
/// row ([`RequestRecord`]) under the stream's own keys: `id` is the request
/// id (what `request_started` carried), unknown figures are left out rather
/// than null, and its content is never among them.
struct Finished<'a>(&'a RequestRecord);

impl Serialize for Finished<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &r.request_id)?;
        present(&mut m, "model", &r.model)?;
        m.serialize_entry("endpoint", &r.endpoint)?;
        present(&mut m, "key_name", &r.key_name)?;
        m.serialize_entry("status", &r.status)?;
        m.serialize_entry("outcome", &r.outcome)?;
        m.serialize_entry("latency_ms", &r.latency_ms)?;
        present(&mut m, "ttft_ms", &r.ttft_ms)?;
        present(&mut m, "prompt_tokens", &r.usage.prompt_tokens)?;
        present(&mut m, "completion_tokens", &r.usage.completion_tokens)?;
        m.end()
    }
}

/// `key` with its value, or nothing when there is none.
fn present<M: SerializeMap>(
    m: &mut M,
    key: &str,
    v: &Option<impl Serialize>,
) -> Result<(), M::Error> {
    match v {
        Some(v) => m.serialize_entry(key, v),
        None => Ok(()),
    }
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
        Event::Request(r) => ("request", json(&Finished(r))),
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
