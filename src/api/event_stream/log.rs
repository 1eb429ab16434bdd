//! The sink side: [`EventLog`] numbers every event, renders it once and
//! keeps the last [`REPLAY`] in a ring, and is the door to the hub.
//!
//! Invariant: the ring is the only place that assigns ids; under its one
//! short mutex an event gets the next id and its place in the ring, so ids
//! are global, increase by one, and follow emission order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use super::frame::{self, json, render, StateData};
use super::hub::hub;
use super::{Disconnect, REPLAY};
use crate::events::{Event, ModelEvent, ModelEventKind, Sink};
use crate::metrics::Metrics;

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
pub(super) struct Join {
    pub(super) resume: Resume,
    /// None: replay only.
    pub(super) live: Option<(mpsc::Sender<Bytes>, Disconnect)>,
    /// The replay (starting with a `reset` where needed).
    pub(super) reply: oneshot::Sender<Vec<Bytes>>,
}

/// Where a client starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resume {
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
    pub(super) grew: Notify,
    pub(super) joins: mpsc::UnboundedSender<Join>,
    /// Closed by [`EventLog::close`]: the hub cuts every client and ends.
    closing: tokio::sync::watch::Sender<bool>,
    pub(super) metrics: Arc<Metrics>,
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
    pub(super) fn since(&self, after: u64, upto: u64) -> (Vec<(u64, Bytes)>, bool) {
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
        let message = frame::message(id, kind, &data);
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
