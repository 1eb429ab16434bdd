//! Request history and model lifecycle events in SQLite.
//!
//! Requests never wait on SQLite: [`Recorder`] puts rows on a bounded queue
//! (`try_send`), and one writer thread owns the only write connection and
//! commits in batches (up to `MAX_BATCH` rows, or what arrived within the
//! batch window after the first). A full queue or a failing disk drops rows
//! — counted (`dropped`), warned about at most every 10 s, shown in STATUS
//! and `/metrics` — and the proxy keeps serving; writing resumes by itself
//! when the disk recovers. That holds at start too: a database that cannot
//! be opened because its disk is full or failing is retried by the writer
//! while the daemon serves. On shutdown everything queued is committed
//! before the thread exits.
//!
//! - [`store`]: the file, migrations, queries, retention, backup.
//! - [`tap`]: watches a proxied response to fill in a request's row.

pub mod store;
pub mod tap;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::config::{ContentPolicy, HistoryConfig};
pub use crate::events::{
    now_ms, AuditAction, AuditRecord, ModelEvent, ModelEventKind, Outcome, RequestRecord, Usage,
};
pub use store::StoreError;

use crate::events::{Event, Sink};

/// Rows written in one transaction at most.
const MAX_BATCH: usize = 4096;
/// How often retention and `PRAGMA optimize` run.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);
/// How often the writer retries a database it could not open at start.
const REOPEN_PERIOD: Duration = Duration::from_secs(5);
/// At most one dropped-rows warning per this period.
const WARN_PERIOD: Duration = Duration::from_secs(10);

/// What past runs tell the scheduler ([`Recorder::past_runs`]).
#[derive(Debug, Default)]
pub struct PastRuns {
    /// Each model's last successful load times, oldest first.
    pub load_times: HashMap<String, Vec<Duration>>,
    /// Each model's peak GPU memory of its last runs, oldest first.
    pub vram_peaks: HashMap<String, Vec<u64>>,
}

/// One `samples` row.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: i64,
    pub model: String,
    pub rss_bytes: Option<i64>,
    pub cpu_seconds: Option<f64>,
    pub inflight: Option<i64>,
    /// GPU memory of its process tree at the last reading.
    pub vram_bytes: Option<u64>,
}

/// Kept one pointer wide: the channel allocates (and touches) every slot
/// up front, so inline records would cost `queue` × their size in RSS.
enum Item {
    Request(Arc<RequestRecord>),
    Event(Arc<ModelEvent>),
    Audit(Arc<AuditRecord>),
    Sample(Box<Sample>),
    /// Commit everything before this, then answer; with `true`, then stop.
    Flush(mpsc::Sender<()>, bool),
}

/// Counters shared by the recorders and the writer.
#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    written: AtomicU64,
    depth: AtomicI64,
    /// Milliseconds since `born` when the writer last went round its loop.
    heartbeat_ms: AtomicU64,
    disk_failing: AtomicBool,
    /// Set by [`Writer::close`]: the writer leaves once idle.
    closing: AtomicBool,
    /// The writer thread, to wake it early from its batch window.
    writer: std::sync::OnceLock<std::thread::Thread>,
    last_warning: Mutex<Option<Instant>>,
}

impl Shared {
    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    fn drop_rows(&self, n: u64, why: &str) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        let Ok(mut last) = self.last_warning.lock() else {
            return;
        };
        if last.is_none_or(|t| t.elapsed() >= WARN_PERIOD) {
            *last = Some(Instant::now());
            tracing::warn!(
                dropped_total = self.dropped.load(Ordering::Relaxed),
                reason = why,
                "history rows dropped; requests are still being served"
            );
        }
    }
}

/// The requesting side of the history writer; cheap to clone. A disabled
/// recorder accepts and discards everything.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<SyncSender<Item>>,
    shared: Arc<Shared>,
    born: Instant,
    pub content: ContentPolicy,
    path: Option<PathBuf>,
}

/// The writer thread; [`Writer::close`] commits what is queued and joins.
pub struct Writer {
    thread: Option<JoinHandle<()>>,
    tx: Option<SyncSender<Item>>,
    shared: Arc<Shared>,
}

impl Recorder {
    /// A recorder that records nothing (`[history] enabled = false`).
    pub fn disabled() -> Recorder {
        Recorder {
            tx: None,
            shared: Arc::default(),
            born: Instant::now(),
            content: ContentPolicy::None,
            path: None,
        }
    }

    /// Opens and migrates the database, then starts the writer thread.
    /// Returns a note to log when a corrupt file was moved aside.
    ///
    /// A database that cannot be opened because its disk is full or
    /// failing does not stop the daemon: the writer retries the open every
    /// [`REOPEN_PERIOD`] and drops rows (counted) until it succeeds, as it
    /// does when the disk fills later.
    pub fn start(config: &HistoryConfig) -> Result<(Recorder, Writer, Option<String>), StoreError> {
        let (opened, note) = match store::open_for_writing(&config.path) {
            Ok((conn, note)) => (Some(conn), note),
            Err(e) if e.is_disk_failure() => {
                tracing::error!(error = %e, retry_s = REOPEN_PERIOD.as_secs(),
                    "cannot open the history database; serving anyway, dropping history rows (counted) until it opens");
                (None, None)
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = mpsc::sync_channel(config.queue.max(1));
        let shared = Arc::new(Shared::default());
        shared
            .disk_failing
            .store(opened.is_none(), Ordering::Relaxed);
        let born = Instant::now();
        let recorder = Recorder {
            tx: Some(tx.clone()),
            shared: shared.clone(),
            born,
            content: config.content,
            path: Some(config.path.clone()),
        };
        let config = config.clone();
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("history-writer".into())
            .spawn(move || {
                let conn = match opened {
                    Some(conn) => Some(conn),
                    None => open_when_possible(&rx, &writer_shared, born, &config),
                };
                if let Some(mut conn) = conn {
                    writer_loop(&mut conn, &rx, &writer_shared, born, &config);
                }
            })
            .map_err(|source| StoreError::Io {
                path: recorder.path.clone().unwrap_or_default(),
                source,
            })?;
        Ok((
            recorder,
            Writer {
                thread: Some(thread),
                tx: Some(tx),
                shared,
            },
            note,
        ))
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The database file, when recording.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What past runs tell the scheduler, read once (blocking) from the
    /// database: each model's last `loads_kept` successful load times and
    /// the peak GPU memory of its last `vram_kept` runs, oldest first. Both
    /// empty when history is disabled or cannot be read (logged: without
    /// them load progress has no expected time and models are placed by
    /// their estimates until they run).
    pub fn past_runs(&self, loads_kept: usize, vram_kept: usize) -> PastRuns {
        let Some(path) = self.path() else {
            return PastRuns::default();
        };
        let read = store::open_for_reading(path)
            .map_err(|e| e.to_string())
            .and_then(|conn| {
                let loads = store::recent_load_times(&conn, loads_kept);
                let peaks = store::recent_vram_peaks(&conn, vram_kept);
                loads
                    .and_then(|l| peaks.map(|p| (l, p)))
                    .map_err(|e| e.to_string())
            });
        match read {
            Ok((loads, peaks)) => PastRuns {
                load_times: loads
                    .into_iter()
                    .map(|(model, times)| {
                        let times = times
                            .into_iter()
                            .filter(|ms| ms.is_finite() && *ms >= 0.0)
                            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                            .collect();
                        (model, times)
                    })
                    .collect(),
                vram_peaks: peaks.into_iter().collect(),
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot read past model runs; load progress has no expected time and models are placed by their estimates until they run");
                PastRuns::default()
            }
        }
    }

    fn send(&self, item: Item) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(item) {
            Ok(()) => {
                self.shared.depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => self.shared.drop_rows(1, "queue full"),
            Err(TrySendError::Disconnected(_)) => self.shared.drop_rows(1, "writer stopped"),
        }
    }

    pub fn request(&self, record: RequestRecord) {
        self.send(Item::Request(Arc::new(record)));
    }

    pub fn sample(&self, sample: Sample) {
        self.send(Item::Sample(Box::new(sample)));
    }

    /// Rows dropped since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Rows committed since start.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Rows waiting for the writer.
    pub fn depth(&self) -> u64 {
        self.shared.depth.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn disk_failing(&self) -> bool {
        self.shared.disk_failing.load(Ordering::Relaxed)
    }

    /// True when the writer went round its loop within `within` (it wakes
    /// at least once a second), or when history is off.
    pub fn alive(&self, within: Duration) -> bool {
        if self.tx.is_none() {
            return true;
        }
        let beat = Duration::from_millis(self.shared.heartbeat_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(beat) <= within.max(Duration::from_secs(2))
    }

    /// Waits (blocking) until everything queued so far is committed or
    /// dropped. For the backup endpoint and tests.
    pub fn flush_blocking(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (ack, done) = mpsc::channel();
        if tx.send(Item::Flush(ack, false)).is_err() {
            return false;
        }
        self.shared.wake_writer();
        done.recv_timeout(timeout).is_ok()
    }
}

/// History keeps every finished request and every lifecycle step.
impl Sink for Recorder {
    fn on_event(&self, event: &Event) {
        match event {
            Event::Request(r) => self.send(Item::Request(r.clone())),
            Event::Model(e) => self.send(Item::Event(e.clone())),
            Event::Audit(a) => self.send(Item::Audit(a.clone())),
            Event::Progress(_)
            | Event::State { .. }
            | Event::Removed { .. }
            | Event::RequestStarted(_)
            | Event::Queue { .. }
            | Event::Vram { .. }
            | Event::Reload(_)
            | Event::HistoryDrops { .. } => {}
        }
    }
}

impl Writer {
    /// Commits what is queued and stops the thread. Every [`Recorder`]
    /// clone may still exist: the writer stops on the Flush this sends,
    /// not on the channel closing.
    pub fn close(mut self) {
        if let Some(tx) = self.tx.take() {
            self.shared.closing.store(true, Ordering::Relaxed);
            let (ack, done) = mpsc::channel();
            if tx.send(Item::Flush(ack, true)).is_ok() {
                self.shared.wake_writer();
                let _ = done.recv_timeout(Duration::from_secs(30));
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn writer_loop(
    conn: &mut rusqlite::Connection,
    rx: &mpsc::Receiver<Item>,
    shared: &Shared,
    born: Instant,
    config: &HistoryConfig,
) {
    let _ = shared.writer.set(std::thread::current());
    let mut last_maintenance: Option<Instant> = None;
    loop {
        shared
            .heartbeat_ms
            .store(born.elapsed().as_millis() as u64, Ordering::Relaxed);
        if last_maintenance.is_none_or(|t| t.elapsed() >= MAINTENANCE_PERIOD) {
            maintenance(conn, config);
            last_maintenance = Some(Instant::now());
        }
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                if shared.closing.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        let mut disconnected = drain(rx, &mut batch);
        if !disconnected && batch.len() < MAX_BATCH && !ends_with_flush(&batch) {
            // Sleep out the batch window rather than waking for every row
            // (each wake-up costs the request path a futex call); a flush
            // or close unparks the thread early.
            std::thread::park_timeout(config.batch_window);
            disconnected = drain(rx, &mut batch);
        }
        shared.depth.fetch_sub(
            batch
                .iter()
                .filter(|i| !matches!(i, Item::Flush(..)))
                .count() as i64,
            Ordering::Relaxed,
        );
        let stop = matches!(batch.last(), Some(Item::Flush(_, true)));
        commit(conn, batch, shared);
        if disconnected || stop {
            return;
        }
    }
}

/// The writer while the database could not be opened at start: rows are
/// dropped (counted), flushes answered, and the open retried every
/// [`REOPEN_PERIOD`]. `None` when the daemon stops first.
fn open_when_possible(
    rx: &mpsc::Receiver<Item>,
    shared: &Shared,
    born: Instant,
    config: &HistoryConfig,
) -> Option<rusqlite::Connection> {
    let _ = shared.writer.set(std::thread::current());
    let mut next_try = Instant::now() + REOPEN_PERIOD;
    loop {
        shared
            .heartbeat_ms
            .store(born.elapsed().as_millis() as u64, Ordering::Relaxed);
        let wait = next_try
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        match rx.recv_timeout(wait) {
            Ok(Item::Flush(ack, stop)) => {
                let _ = ack.send(());
                if stop {
                    return None;
                }
            }
            Ok(_) => {
                shared.depth.fetch_sub(1, Ordering::Relaxed);
                shared.drop_rows(1, "the history database could not be opened");
            }
            Err(RecvTimeoutError::Timeout) if shared.closing.load(Ordering::Relaxed) => {
                return None
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
        if Instant::now() < next_try {
            continue;
        }
        match store::open_for_writing(&config.path) {
            Ok((conn, note)) => {
                if let Some(note) = note {
                    tracing::error!("{note}");
                }
                tracing::info!(path = %config.path.display(), "history database open; recording again");
                shared.disk_failing.store(false, Ordering::Relaxed);
                return Some(conn);
            }
            Err(e) => {
                tracing::debug!(error = %e, "history database still cannot be opened");
                next_try = Instant::now() + REOPEN_PERIOD;
            }
        }
    }
}

fn ends_with_flush(batch: &[Item]) -> bool {
    matches!(batch.last(), Some(Item::Flush(..)))
}

/// Moves what is queued into `batch` without blocking, up to a flush or
/// [`MAX_BATCH`]. True when every sender is gone.
fn drain(rx: &mpsc::Receiver<Item>, batch: &mut Vec<Item>) -> bool {
    while batch.len() < MAX_BATCH && !ends_with_flush(batch) {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => return true,
        }
    }
    false
}

fn commit(conn: &mut rusqlite::Connection, batch: Vec<Item>, shared: &Shared) {
    let (mut requests, mut events, mut samples, mut audits, mut acks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for item in batch {
        match item {
            Item::Request(r) => requests.push(r),
            Item::Event(e) => events.push(e),
            Item::Audit(a) => audits.push(a),
            Item::Sample(s) => samples.push(*s),
            Item::Flush(ack, _) => acks.push(ack),
        }
    }
    let rows = (requests.len() + events.len() + samples.len() + audits.len()) as u64;
    if rows > 0 {
        match store::write_batch(conn, &requests, &events, &samples, &audits) {
            Ok(()) => {
                shared.written.fetch_add(rows, Ordering::Relaxed);
                if shared.disk_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("history database is writable again");
                }
            }
            Err(e) => {
                shared.disk_failing.store(true, Ordering::Relaxed);
                shared.drop_rows(rows, &format!("write failed: {e}"));
            }
        }
    }
    for ack in acks {
        let _ = ack.send(());
    }
}

fn maintenance(conn: &rusqlite::Connection, config: &HistoryConfig) {
    let now = now_ms();
    let cut = |d: Duration| now - d.as_millis() as i64;
    match store::apply_retention(
        conn,
        cut(config.retention),
        cut(config.events_retention),
        cut(config.samples_retention),
    ) {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, "history retention deleted old rows"),
        Err(e) => tracing::warn!(error = %e, "history retention failed"),
    }
    if let Err(e) = store::maintain(conn) {
        tracing::debug!(error = %e, "history maintenance failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_items_stay_one_pointer_wide() {
        // The Flush variant (a Sender and a flag) sets the size; records are boxed.
        assert!(
            std::mem::size_of::<Item>() <= 24,
            "{}",
            std::mem::size_of::<Item>()
        );
    }
}
