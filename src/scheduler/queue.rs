//! The waiting requests: who waits for which model, in which order starts
//! are granted, and when the queue is full.
//!
//! A waiter is an id, a priority and the time it began to wait; its reply
//! channel stays with the shell, which answers it when the core says so.
//! A waiter leaves the queue when it is answered or when its requester
//! goes away (`Left`), so every waiter the core holds is live as far as
//! its messages tell.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::slot::{Phase, Slot};
use super::AcquireError;

/// Names one waiting request across the core and the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WaiterId(pub(crate) u64);

/// A requester waiting for a model.
#[derive(Debug, Clone)]
pub(super) struct Waiter {
    pub(super) id: WaiterId,
    /// When it began to wait: the fairness bound counts from here.
    pub(super) since: Instant,
    /// Its key's priority plus its model's.
    pub(super) priority: i32,
}

/// The highest priority and the earliest wait among `waiters`.
pub(super) fn head(waiters: &[Waiter]) -> Option<(i32, Instant)> {
    let priority = waiters.iter().map(|w| w.priority).max()?;
    let since = waiters.iter().map(|w| w.since).min()?;
    Some((priority, since))
}

/// Refuses a new waiter when `limit` are already waiting over all models,
/// with a retry time: the shortest expected load among models with
/// waiters, at least a second.
pub(super) fn full(slots: &HashMap<Arc<str>, Slot>, limit: usize) -> Option<AcquireError> {
    let waiting: usize = slots.values().map(|s| s.waiters.len()).sum();
    (waiting >= limit).then(|| AcquireError::QueueFull {
        waiting,
        retry_after: slots
            .values()
            .filter(|s| !s.waiters.is_empty())
            .filter_map(Slot::expected_load)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1)),
    })
}

/// A pending model's place in line: its best waiter's priority, then its
/// oldest waiter's age (a preload: the model's priority and when it became
/// pending).
pub(super) type Turn = (Reverse<i32>, Instant, Arc<str>);

/// The pending models in the order their starts are granted.
pub(super) fn pending_in_turn(slots: &HashMap<Arc<str>, Slot>) -> Vec<Turn> {
    let mut pending: Vec<Turn> = slots
        .iter()
        .filter(|(_, s)| s.phase == Phase::Pending)
        .map(|(n, s)| {
            let (priority, since) =
                head(&s.waiters).unwrap_or((s.config.priority, s.pending_since));
            (Reverse(priority), since, n.clone())
        })
        .collect();
    pending.sort();
    pending
}

/// Whether a start that needs `victims` gone goes ahead now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Swap {
    /// One of them is in use, the waiters do not outrank them all, and the
    /// oldest waiter has not yet waited the fairness bound: look again at
    /// this time (or when they go idle).
    Hold(Instant),
    /// Evict them now. `only_if_idle`: the swap goes ahead only because
    /// they are taken to be idle, so each one's gate closes only if no
    /// lease is out (a request may have entered since the core last
    /// heard); one that refuses is busy, and the start is decided again.
    Go { only_if_idle: bool },
}

/// The fairness rule for a start that needs `victims` gone, for waiters
/// whose best priority and oldest wait are `head`.
pub(super) fn swap(
    slots: &HashMap<Arc<str>, Slot>,
    victims: &[Arc<str>],
    (priority, since): (i32, Instant),
    bound: Duration,
    now: Instant,
) -> Swap {
    let due_at = since + bound;
    let outranks = victims
        .iter()
        .all(|v| slots.get(v).is_some_and(|s| priority > s.config.priority));
    let in_use = victims
        .iter()
        .any(|v| slots.get(v).is_some_and(Slot::in_use));
    let waits_for_idle = !outranks && now < due_at;
    match (in_use, waits_for_idle) {
        (true, true) => Swap::Hold(due_at),
        (false, true) => Swap::Go { only_if_idle: true },
        (_, false) => Swap::Go {
            only_if_idle: false,
        },
    }
}
