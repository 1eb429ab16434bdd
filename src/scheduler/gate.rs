//! The fast path to a ready child: an atomic word holding an "open" bit and
//! the number of leases, which requests enter and leave on their own
//! threads without a message to the scheduler's loop. This is the data
//! plane; what the core knows of it comes only by the messages below.
//!
//! The core closes the gate (through the shell) in the same step in which
//! the model leaves Ready (evicted, TTL, stop, shutdown), so a request
//! either got in before that step and holds a lease the stop waits for, or
//! finds the gate closed and queues with the core. A close says how many
//! leases are still out; while a gate is closed, the lease that brings its
//! count to zero tells the core (`Drained`), which ends a drain.
//!
//! A gate may also watch for idleness, and every gate the shell opens
//! does: then the lease that brings an open gate's count to zero tells the
//! core (`Idle`), so the core learns each busy-to-idle edge, at most one
//! message per return to idle (none while requests overlap), and never a
//! message as a request enters. The flag and the count are both
//! sequentially consistent, so of "watching is turned on, then the count
//! is read" and "a lease drops the count, then reads the flag", at least
//! one sees the other: no last lease goes unseen.
//!
//! Invariant, for the core: a lease entered without a message can only be
//! seen by closing. So the core closes a gate it takes to be idle only with
//! [`Gate::close_if_unused`] or [`Gate::close_if_idle`], which fail while a
//! lease is out (atomically with `enter`), and then learns the count and
//! the last use from the gate's answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Msg;
use crate::upstream::Upstream;

/// [`Gate::gpu`] when no GPU is known.
const NO_GPU: u32 = u32::MAX;

/// The "open" bit of [`Gate::state`]; the bits below count leases.
const OPEN: usize = 1 << (usize::BITS - 1);

/// Admission to one ready child, shared by the shell and every request.
#[derive(Debug)]
pub(crate) struct Gate {
    /// [`OPEN`] while the model is Ready, plus the number of live leases.
    state: AtomicUsize,
    /// When a lease was last taken or returned, in nanoseconds since
    /// `epoch`.
    last_used: AtomicU64,
    epoch: Instant,
    /// Whether the last lease of an open gate sends `Idle`.
    watch_idle: AtomicBool,
    /// The GPU the child runs on ([`NO_GPU`]: none known); set when
    /// placed or first measured.
    gpu: AtomicU32,
    pub(crate) model: Arc<str>,
    pub(crate) instance: u64,
    /// Where `Drained` and `Idle` go.
    notify: mpsc::UnboundedSender<Msg>,
    pub(crate) upstream: Upstream,
}

impl Gate {
    pub(crate) fn new(
        model: Arc<str>,
        instance: u64,
        upstream: Upstream,
        notify: mpsc::UnboundedSender<Msg>,
    ) -> Gate {
        Gate {
            state: AtomicUsize::new(OPEN),
            last_used: AtomicU64::new(0),
            epoch: Instant::now(),
            watch_idle: AtomicBool::new(false),
            gpu: AtomicU32::new(NO_GPU),
            model,
            instance,
            notify,
            upstream,
        }
    }

    pub(crate) fn set_gpu(&self, gpu: Option<u32>) {
        self.gpu.store(gpu.unwrap_or(NO_GPU), Ordering::Relaxed);
    }

    pub(crate) fn gpu(&self) -> Option<u32> {
        Some(self.gpu.load(Ordering::Relaxed)).filter(|g| *g != NO_GPU)
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_used.fetch_max(nanos, Ordering::Relaxed);
    }

    pub(crate) fn last_used(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_used.load(Ordering::Relaxed))
    }

    pub(crate) fn leases(&self) -> usize {
        self.state.load(Ordering::Acquire) & !OPEN
    }

    /// Takes a lease if the gate is open.
    pub(crate) fn enter(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & OPEN == 0 {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.touch();
                    return true;
                }
                Err(now) => s = now,
            }
        }
    }

    /// Returns a lease; tells the core if it was the last one of a closed
    /// gate, or of a watched open one.
    pub(crate) fn leave(&self) {
        // Touched first: whoever sees the count drop sees the new time.
        self.touch();
        let before = self.state.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            let _ = self.notify.send(Msg::Drained {
                model: self.model.clone(),
                instance: self.instance,
            });
        } else if before == OPEN | 1 && self.watch_idle.load(Ordering::SeqCst) {
            let _ = self.notify.send(Msg::Idle {
                model: self.model.clone(),
                instance: self.instance,
            });
        }
    }

    /// Turns the `Idle` notice on or off; returns the leases out after the
    /// change (when on, a lease returned later is reported).
    pub(crate) fn watch_idle(&self, on: bool) -> usize {
        self.watch_idle.store(on, Ordering::SeqCst);
        self.state.load(Ordering::SeqCst) & !OPEN
    }

    /// Closes the gate; returns the number of leases still out.
    pub(crate) fn close(&self) -> usize {
        self.state.fetch_and(!OPEN, Ordering::AcqRel) & !OPEN
    }

    /// Closes the gate only if no lease is out and none was taken or
    /// returned within `ttl`.
    pub(crate) fn close_if_idle(&self, ttl: Duration, now: Instant) -> bool {
        self.last_used() + ttl <= now && self.close_if_unused()
    }

    /// Closes the gate only if no lease is out.
    pub(crate) fn close_if_unused(&self) -> bool {
        self.state
            .compare_exchange(OPEN, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

/// Gates of ready models by canonical name, read by requests without the
/// run loop. A poisoned lock is still used: every write leaves the map
/// whole.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gates(Arc<RwLock<HashMap<Arc<str>, Arc<Gate>>>>);

impl Gates {
    pub(crate) fn get(&self, model: &str) -> Option<Arc<Gate>> {
        let map = match self.0.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(model).cloned()
    }

    /// Leases out on every gate.
    pub(crate) fn inflight(&self) -> usize {
        let map = match self.0.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.values().map(|g| g.leases()).sum()
    }

    pub(crate) fn insert(&self, model: Arc<str>, gate: Arc<Gate>) {
        self.write(|map| {
            map.insert(model, gate);
        });
    }

    pub(crate) fn remove(&self, model: &str) {
        self.write(|map| {
            map.remove(model);
        });
    }

    fn write(&self, f: impl FnOnce(&mut HashMap<Arc<str>, Arc<Gate>>)) {
        match self.0.write() {
            Ok(mut map) => f(&mut map),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChildAddr;
    use crate::scheduler::Lease;
    use std::net::SocketAddr;

    fn gate() -> (Arc<Gate>, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = SocketAddr::from(([127, 0, 0, 1], 4321));
        let upstream = Upstream::new(ChildAddr::Tcp(addr), None);
        (Arc::new(Gate::new(Arc::from("m"), 7, upstream, tx)), rx)
    }

    #[test]
    fn gate_admits_while_open_and_reports_the_last_lease_of_a_drain() {
        let (g, mut rx) = gate();
        assert!(g.enter());
        let a = Lease { gate: g.clone() };
        assert!(g.enter());
        let b = Lease { gate: g.clone() };
        assert_eq!(g.leases(), 2);
        assert_eq!(g.close(), 2, "closing reports the leases still out");
        assert!(!g.enter(), "a closed gate admits no one");
        drop(a);
        assert!(rx.try_recv().is_err(), "one lease is still out");
        drop(b);
        match rx.try_recv() {
            Ok(Msg::Drained { model, instance }) => assert_eq!((&*model, instance), ("m", 7)),
            other => panic!("expected Drained, got {other:?}"),
        }
        assert_eq!(g.leases(), 0);
    }

    #[test]
    fn an_open_gate_says_nothing_when_leases_come_back() {
        let (g, mut rx) = gate();
        for _ in 0..3 {
            assert!(g.enter());
            drop(Lease { gate: g.clone() });
        }
        assert!(rx.try_recv().is_err());
        assert_eq!(g.close(), 0);
    }

    #[test]
    fn a_watched_gate_reports_its_last_lease_and_an_unwatched_one_does_not() {
        let (g, mut rx) = gate();
        assert!(g.enter());
        drop(Lease { gate: g.clone() });
        assert!(rx.try_recv().is_err(), "not watched");
        assert!(g.enter());
        let a = Lease { gate: g.clone() };
        assert_eq!(g.watch_idle(true), 1);
        assert!(g.enter());
        drop(Lease { gate: g.clone() });
        assert!(rx.try_recv().is_err(), "one lease is still out");
        drop(a);
        match rx.try_recv() {
            Ok(Msg::Idle { model, instance }) => assert_eq!((&*model, instance), ("m", 7)),
            other => panic!("expected Idle, got {other:?}"),
        }
        assert_eq!(g.watch_idle(false), 0);
        assert!(g.enter());
        drop(Lease { gate: g.clone() });
        assert!(rx.try_recv().is_err(), "no longer watched");
    }

    #[test]
    fn idle_close_needs_no_leases_and_a_full_ttl() {
        let (g, _rx) = gate();
        let ttl = Duration::from_secs(60);
        let now = Instant::now();
        assert!(!g.close_if_idle(ttl, now), "just used");
        assert!(g.enter());
        let later = now + Duration::from_secs(120);
        assert!(!g.close_if_idle(ttl, later), "a lease is out");
        drop(Lease { gate: g.clone() });
        assert!(g.close_if_idle(ttl, later + ttl));
        assert!(!g.enter());
    }

    #[test]
    fn racing_leases_and_a_close_drain_exactly_once() {
        for _ in 0..50 {
            let (g, mut rx) = gate();
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let mut held = 0;
                        for _ in 0..2000 {
                            if g.enter() {
                                held += 1;
                                drop(Lease { gate: g.clone() });
                            }
                        }
                        held
                    })
                })
                .collect();
            std::thread::yield_now();
            let out = g.close();
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(g.leases(), 0);
            let drained = std::iter::from_fn(|| rx.try_recv().ok()).count();
            assert_eq!(drained, usize::from(out > 0), "{out} leases out at close");
        }
    }
}
