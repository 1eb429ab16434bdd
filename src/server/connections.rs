//! Open client connections: how many there may be, which have a request
//! in flight, and closing the one idle longest to make room for a new
//! client.
//!
//! One [`Connections`] is shared by every accept loop. Its table changes
//! under a short mutex once per connection (accept, close), never per
//! request: a request touches only its own connection's atomics through a
//! [`Busy`] guard (two atomic updates and a clock read), which is what
//! keeps the cost per request flat.
//!
//! Invariant: a connection is in the table from its accept until its task
//! ends ([`Registered`] drops), so the table's size is the number of
//! client fds the daemon holds. A connection is idle while no [`Busy`]
//! guard of it lives and it is not reading its first request; only idle
//! ones are closed to make room, each at most once, and a new one that has
//! sent nothing yet only after [`FIRST_REQUEST_GRACE`].
//!
//! At the cap a new client is accepted only while some connection is idle,
//! and the one idle longest is then closed in its place (so the count is
//! one over the cap until that close). With every connection busy nothing
//! is accepted until one ends or closes; the kernel's backlog holds the
//! clients meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a new connection may take to send its first bytes before it
/// counts as idle: its request may be on the wire while a crowd of idle
/// ones arrives. A flood of silent connections waits this long for room.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(250);

/// [`Slot::phase`]: nothing received yet.
const FRESH: u8 = 0;
/// First bytes here, the service not called yet.
const READING: u8 = 1;
/// A request was handled.
const USED: u8 = 2;

/// The accept loops' view of all connections.
pub struct Connections {
    /// id → connection; see the module's invariant.
    table: Mutex<Table>,
    /// Most connections open at once; changed on reload.
    cap: AtomicUsize,
    signals: Arc<Signals>,
}

#[derive(Default)]
struct Table {
    conns: HashMap<u64, Arc<Slot>>,
    next_id: u64,
    /// Most connections open at once since [`Connections::reset_peak`],
    /// for the idle trim.
    peak: usize,
}

/// What connections and accept loops signal each other through.
struct Signals {
    /// Zero of the connections' idle clocks.
    epoch: Instant,
    /// Woken when a connection closes, and (while `idle_waiters` is not 0)
    /// when one goes idle.
    room: Notify,
    /// Accept loops waiting with every connection busy: only then does a
    /// request ending wake them, so requests pay nothing otherwise.
    idle_waiters: AtomicUsize,
}

/// One connection's state, shared by its task, its requests and the table.
pub struct Slot {
    /// Requests in flight, counted from the service call until the
    /// response body is done or dropped.
    busy: AtomicU32,
    /// When it last went idle (or was accepted), in µs since `epoch`.
    idle_since_us: AtomicU64,
    /// [`FRESH`], [`READING`] (not idle: a request is on its way) or
    /// [`USED`].
    phase: AtomicU8,
    /// Chosen to make room; set once, under the table's lock.
    evicting: AtomicBool,
    /// Tells the connection's task to close.
    evict: Notify,
    signals: Arc<Signals>,
}

/// What [`Connections::make_room`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Below the cap: accept.
    Free,
    /// An idle connection is closing; accept once it has.
    Closing,
    /// Every connection has a request in flight: wait for one to end.
    AllBusy,
    /// The only idle ones are new and may yet send a request: look again
    /// in this long.
    Young(Duration),
}

impl Connections {
    pub fn new(cap: usize) -> Arc<Connections> {
        Arc::new(Connections {
            table: Mutex::default(),
            cap: AtomicUsize::new(cap),
            signals: Arc::new(Signals {
                epoch: Instant::now(),
                room: Notify::new(),
                idle_waiters: AtomicUsize::new(0),
            }),
        })
    }

    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap.max(1), Ordering::Relaxed);
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table().conns.len()
    }

    /// Connections open now, and the most open at once since the last
    /// [`Connections::reset_peak`].
    pub fn open_and_peak(&self) -> (usize, usize) {
        let table = self.table();
        (table.conns.len(), table.peak)
    }

    pub fn reset_peak(&self) {
        let mut table = self.table();
        table.peak = table.conns.len();
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is consistent after every statement; a panic elsewhere
        // while it was held leaves nothing half-done.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an accepted connection.
    pub fn register(self: &Arc<Self>) -> Registered {
        let slot = Arc::new(Slot {
            busy: AtomicU32::new(0),
            idle_since_us: AtomicU64::new(self.signals.now_us()),
            phase: AtomicU8::new(FRESH),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
            signals: self.signals.clone(),
        });
        let mut table = self.table();
        let id = table.next_id;
        table.next_id += 1;
        table.conns.insert(id, slot.clone());
        table.peak = table.peak.max(table.conns.len());
        Registered {
            conns: self.clone(),
            id,
            slot,
        }
    }

    /// Whether to accept now: below the cap, or at it with an idle
    /// connection for the newcomer to replace ([`Connections::admitted`]
    /// closes it). Over the cap (every connection was busy when the last
    /// newcomer came) it closes the idle-longest itself. A scan of the
    /// table, only at the cap.
    pub fn make_room(&self) -> Room {
        let table = self.table();
        let (open, cap) = (table.conns.len(), self.cap());
        if open < cap {
            return Room::Free;
        }
        match self.idle_longest(&table, None) {
            Pick::Closing => Room::Closing,
            Pick::None => Room::AllBusy,
            Pick::Young(wait) => Room::Young(wait),
            Pick::Idle(_) if open == cap => Room::Free,
            Pick::Idle(slot) => self.evict(&table, slot),
        }
    }

    /// After `new` was accepted: over the cap, closes the connection idle
    /// longest other than `new`.
    pub fn admitted(&self, new: &Registered) {
        let table = self.table();
        if table.conns.len() <= self.cap() {
            return;
        }
        if let Pick::Idle(slot) = self.idle_longest(&table, Some(new.id)) {
            self.evict(&table, slot);
        }
    }

    /// Out of fds: tells the connection idle longest to close, unless an
    /// idle one is already closing (its fd is as good as free).
    /// [`Room::AllBusy`] when none is idle.
    pub fn close_idle_longest(&self) -> Room {
        let table = self.table();
        match self.idle_longest(&table, None) {
            Pick::Closing => Room::Closing,
            Pick::None => Room::AllBusy,
            Pick::Young(wait) => Room::Young(wait),
            Pick::Idle(slot) => self.evict(&table, slot),
        }
    }

    fn evict(&self, table: &Table, slot: &Slot) -> Room {
        slot.evicting.store(true, Ordering::Relaxed);
        slot.evict.notify_one();
        let since = slot.idle_since_us.load(Ordering::Relaxed);
        tracing::debug!(
            open = table.conns.len(),
            idle_ms = self.signals.now_us().saturating_sub(since) / 1000,
            "closing the connection idle longest to make room"
        );
        Room::Closing
    }

    /// Waits until a connection closes, one goes idle (only when
    /// `all_busy`: with one closing, its close is what matters), or
    /// `fallback` passes. The caller then looks again.
    pub async fn wait(&self, all_busy: bool, fallback: Duration) {
        let notified = self.signals.room.notified();
        tokio::pin!(notified);
        // Registered before looking again, so a close or an idle request
        // in between still wakes us.
        notified.as_mut().enable();
        if all_busy {
            self.signals.idle_waiters.fetch_add(1, Ordering::SeqCst);
            let _undo = Undo(&self.signals.idle_waiters);
            if matches!(
                self.idle_longest(&self.table(), None),
                Pick::Idle(_) | Pick::Closing
            ) {
                return;
            }
            let _ = tokio::time::timeout(fallback, notified).await;
        } else {
            let _ = tokio::time::timeout(fallback, notified).await;
        }
    }
}

enum Pick<'a> {
    Idle(&'a Slot),
    /// An idle one is closing already.
    Closing,
    /// Only new ones within their grace; the first leaves it in this long.
    Young(Duration),
    None,
}

impl Connections {
    /// The connection idle longest, other than `except`.
    fn idle_longest<'t>(&self, table: &'t Table, except: Option<u64>) -> Pick<'t> {
        let now = self.signals.now_us();
        let grace = u64::try_from(FIRST_REQUEST_GRACE.as_micros()).unwrap_or(u64::MAX);
        let mut oldest: Option<(&Slot, u64)> = None;
        let mut young_until: Option<u64> = None;
        for (id, slot) in &table.conns {
            if Some(*id) == except || !slot.is_idle() {
                continue;
            }
            if slot.evicting.load(Ordering::Relaxed) {
                return Pick::Closing;
            }
            let since = slot.idle_since_us.load(Ordering::Relaxed);
            if slot.phase.load(Ordering::Relaxed) == FRESH && now < since.saturating_add(grace) {
                let until = since.saturating_add(grace);
                young_until = Some(young_until.map_or(until, |u| u.min(until)));
                continue;
            }
            if oldest.is_none_or(|(_, t)| since < t) {
                oldest = Some((slot, since));
            }
        }
        match (oldest, young_until) {
            (Some((slot, _)), _) => Pick::Idle(slot),
            (None, Some(until)) => {
                Pick::Young(Duration::from_micros(until.saturating_sub(now).max(1000)))
            }
            (None, None) => Pick::None,
        }
    }
}

/// Decrements a waiter count when the wait ends, however it ends.
struct Undo<'a>(&'a AtomicUsize);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Signals {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Slot {
    /// Marks a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        // A plain load first: only the first request pays for a store.
        if self.phase.load(Ordering::Relaxed) != USED {
            self.phase.store(USED, Ordering::Relaxed);
        }
        Busy(self.clone())
    }

    /// The first bytes of its first request arrived.
    pub fn reading(&self) {
        self.phase.store(READING, Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0 && self.phase.load(Ordering::Relaxed) != READING
    }

    /// Resolves once this connection was chosen to close.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// A request in flight on its connection.
pub struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        // Stamped before the count falls, so whoever sees it idle sees
        // since when.
        slot.idle_since_us
            .store(slot.signals.now_us(), Ordering::Relaxed);
        // SeqCst pairs with `wait`: it counts itself a waiter, then looks
        // at every `busy`; this lowers `busy`, then looks at the waiters.
        // One of the two sees the other.
        if slot.busy.fetch_sub(1, Ordering::SeqCst) == 1
            && slot.signals.idle_waiters.load(Ordering::SeqCst) > 0
        {
            slot.signals.room.notify_waiters();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until
    /// hyper has written it out (or dropped it): a streamed response is
    /// busy for as long as it streams.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        _busy: Busy,
    }
}

impl<B> Tracked<B> {
    pub fn new(body: B, busy: Busy) -> Tracked<B> {
        Tracked { body, _busy: busy }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's place in the table; dropping it (the connection's task
/// ending) removes it and wakes accept loops waiting for room.
pub struct Registered {
    conns: Arc<Connections>,
    id: u64,
    slot: Arc<Slot>,
}

impl Registered {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.table().conns.remove(&self.id);
        self.conns.signals.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicting(r: &Registered) -> bool {
        r.slot().evicting.load(Ordering::Relaxed)
    }

    /// A connection that has had a request answered.
    fn used(conns: &Arc<Connections>) -> Registered {
        let r = conns.register();
        drop(r.slot().begin());
        r
    }

    #[test]
    fn a_new_connection_is_not_idle_until_its_grace_has_passed() {
        let conns = Connections::new(1);
        let a = conns.register();
        let b = conns.register();
        conns.admitted(&b);
        assert!(!evicting(&a), "a may still send its request");
        assert!(matches!(conns.make_room(), Room::Young(d) if d <= FIRST_REQUEST_GRACE));
        std::thread::sleep(FIRST_REQUEST_GRACE);
        assert_eq!(conns.make_room(), Room::Closing);
        assert!(evicting(&a));
    }

    #[test]
    fn a_newcomer_replaces_the_idle_longest_and_busy_ones_never() {
        let conns = Connections::new(3);
        let a = used(&conns);
        let b = used(&conns);
        let c = used(&conns);
        let busy_a = a.slot().begin();
        std::thread::sleep(Duration::from_millis(2));
        // b went idle after c was accepted: c has been idle longest.
        drop(b.slot().begin());
        assert_eq!(
            conns.make_room(),
            Room::Free,
            "at the cap, c may be replaced"
        );
        let d = used(&conns);
        conns.admitted(&d);
        assert!(evicting(&c) && !evicting(&b) && !evicting(&d));
        // While c closes, nobody else is chosen.
        assert_eq!(conns.make_room(), Room::Closing);
        assert!(!evicting(&b));
        drop(c);
        assert_eq!(conns.open_and_peak(), (3, 4));
        conns.reset_peak();
        assert_eq!(conns.open_and_peak(), (3, 3));
        // b reads a request head (as a first one); d is busy: nothing to
        // replace.
        b.slot().reading();
        let busy_d = d.slot().begin();
        assert_eq!(conns.make_room(), Room::AllBusy);
        drop(busy_a);
        std::thread::sleep(Duration::from_millis(2));
        drop(b.slot().begin());
        // a went idle before b: a goes when it must.
        assert_eq!(conns.close_idle_longest(), Room::Closing);
        assert!(evicting(&a) && !evicting(&b));
        drop(busy_d);
    }

    #[test]
    fn over_the_cap_the_idle_longest_closes_without_a_newcomer() {
        let conns = Connections::new(1);
        let a = used(&conns);
        let busy = a.slot().begin();
        let b = used(&conns);
        conns.admitted(&b);
        assert!(!evicting(&a) && !evicting(&b), "a is busy, b is new");
        assert_eq!(conns.make_room(), Room::Closing, "b is idle now");
        assert!(evicting(&b));
        drop(busy);
    }

    #[tokio::test]
    async fn a_waiter_with_all_busy_wakes_when_a_request_ends() {
        let conns = Connections::new(1);
        let a = used(&conns);
        let busy = a.slot().begin();
        let waiter = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.wait(true, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(busy);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conns.make_room(), Room::Free, "a newcomer may replace a");
    }
}
