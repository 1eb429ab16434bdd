//! `GET /admin/events`: the bus as Server-Sent Events, with ids, resume
//! from a bounded replay buffer, and slow clients cut off.
//!
//! Five parts, each in its own file:
//!
//! - [`log`]: [`EventLog`] is a bus [`Sink`](crate::events::Sink): called
//!   inline by every emitter, it renders the event once
//!   (`id: N\nevent: TYPE\ndata: JSON\n\n`), gives it the next id and
//!   appends it to the replay ring (the last [`REPLAY`] events) under one
//!   short mutex, then wakes the hub. Ids are therefore global, increasing
//!   by one, and in emission order; the ring is the only place that
//!   assigns them. Being a sink (not a lagging bus subscriber) it never
//!   misses an event.
//! - [`hub`]: the hub task owns the list of connected clients. Woken, it
//!   copies what is new in the ring and offers each piece to every
//!   client's bounded queue ([`CLIENT_QUEUE`] messages) with `try_send`; a
//!   client whose queue is full has fallen behind: it is removed, counted
//!   in `claracore_event_clients_dropped_total`, and its connection is cut
//!   through its [`Disconnect`]. The hub never waits for a client, and the
//!   emitters never wait for the hub. A client joins through the hub too,
//!   between two fan-outs, so its replay (from the ring, up to what the
//!   hub has fanned out) and its live events meet without a gap or a
//!   duplicate.
//! - [`body`]: each client's response body ([`EventBody`]) drains its
//!   replay, then its queue, and sends `: keep-alive` every [`KEEP_ALIVE`].
//! - [`frame`]: the SSE messages and the JSON of each event type.
//! - [`route`]: the handler, and where a request asks to start.
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

mod body;
mod frame;
mod hub;
mod log;
mod route;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub use body::EventBody;
pub use log::EventLog;
pub(super) use route::stream;

/// Events kept for resume.
pub const REPLAY: usize = 4096;
/// Live events a client may have waiting before it counts as fallen
/// behind. Each is a shared `Bytes`, so a full queue costs a few KiB of
/// pointers; what the kernel's socket buffer holds comes on top.
pub const CLIENT_QUEUE: usize = 256;
/// How often an idle stream says it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
