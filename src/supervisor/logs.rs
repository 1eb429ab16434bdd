//! Each model's recent output: a bounded ring of its children's lines,
//! shared across that model's restarts, and a live feed for followers.
//!
//! The child's output readers ([`super`]) push every line into the ring of
//! its model ([`ModelLogs::ring`]); `/admin/logs/{model}` reads a snapshot
//! ([`ModelLogs::lines`]) or follows ([`ModelLogs::follow`]).
//!
//! Invariants:
//! - A ring never holds more than the configured number of lines (read at
//!   every push, so a reload that lowers it trims at the next line), and a
//!   line never more than [`MAX_LINE_BYTES`] of text (longer ones are cut
//!   and say so): memory per model is bounded whatever the child prints.
//! - Pushing never waits for a follower: each ring has its own bounded
//!   broadcast ([`FOLLOW_BUFFER`] lines), so a follower that falls behind
//!   loses lines (`Lagged`) and is dropped by its reader, and subscribers
//!   of the global event bus are not woken per log line.
//! - The snapshot and the subscription of a follower are taken under the
//!   ring's lock, so a follower sees every line exactly once: each is
//!   either in the backlog or on its receiver.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// The most text kept of one line; the rest is cut, with [`CUT_MARK`].
pub const MAX_LINE_BYTES: usize = 4096;
/// Appended to a line that was cut at [`MAX_LINE_BYTES`].
pub const CUT_MARK: &str = " […line cut]";
/// Lines a follower may fall behind by before it is dropped.
pub const FOLLOW_BUFFER: usize = 256;

/// Which of the child's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of a child's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// Unix milliseconds when claracore read it.
    pub at_ms: i64,
    pub stream: LogStream,
    pub text: String,
}

/// Every model's ring; cheap to clone. Made by the scheduler, written by
/// the supervisor's readers, read by the API.
#[derive(Clone)]
pub struct ModelLogs {
    inner: Arc<Inner>,
}

struct Inner {
    /// Lines each ring keeps; 0 keeps none (followers still see live
    /// lines).
    capacity: Arc<AtomicUsize>,
    rings: Mutex<HashMap<Arc<str>, Arc<Ring>>>,
    /// Turns true at shutdown: followers end.
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for ModelLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelLogs")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for ModelLogs {
    fn default() -> Self {
        ModelLogs::new(crate::config::DEFAULT_MODEL_LOG_LINES)
    }
}

/// A follower's start: what the ring held, then what comes.
pub struct Follow {
    pub backlog: Vec<Arc<LogLine>>,
    pub live: broadcast::Receiver<Arc<LogLine>>,
    /// Turns true when the daemon shuts down.
    pub closed: watch::Receiver<bool>,
}

impl ModelLogs {
    pub fn new(capacity: usize) -> ModelLogs {
        let (closed, _) = watch::channel(false);
        ModelLogs {
            inner: Arc::new(Inner {
                capacity: Arc::new(AtomicUsize::new(capacity)),
                rings: Mutex::new(HashMap::new()),
                closed,
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity.load(Ordering::Relaxed)
    }

    /// Applies a reloaded `model_log_lines`; rings trim at their next line.
    pub fn set_capacity(&self, lines: usize) {
        self.inner.capacity.store(lines, Ordering::Relaxed);
    }

    /// The ring of `model`, made on first use.
    pub fn ring(&self, model: &Arc<str>) -> Arc<Ring> {
        let mut rings = match self.inner.rings.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        rings
            .entry(model.clone())
            .or_insert_with(|| {
                let (live, _) = broadcast::channel(FOLLOW_BUFFER);
                Arc::new(Ring {
                    capacity: self.inner.capacity.clone(),
                    state: Mutex::new(RingState {
                        lines: VecDeque::new(),
                        live,
                    }),
                })
            })
            .clone()
    }

    /// Forgets the rings of models no longer configured.
    pub fn retain(&self, models: &HashSet<&str>) {
        if let Ok(mut rings) = self.inner.rings.lock() {
            rings.retain(|name, _| models.contains(&**name));
        }
    }

    /// `model`'s kept lines, oldest first.
    pub fn lines(&self, model: &str) -> Vec<Arc<LogLine>> {
        self.ring(&Arc::from(model)).snapshot().0
    }

    /// The kept lines and a receiver of the next ones, with nothing lost or
    /// repeated between them.
    pub fn follow(&self, model: &str) -> Follow {
        let (backlog, live) = self.ring(&Arc::from(model)).snapshot();
        Follow {
            backlog,
            live,
            closed: self.inner.closed.subscribe(),
        }
    }

    /// Ends every follower (shutdown).
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }
}

/// One model's lines.
pub struct Ring {
    capacity: Arc<AtomicUsize>,
    state: Mutex<RingState>,
}

struct RingState {
    lines: VecDeque<Arc<LogLine>>,
    live: broadcast::Sender<Arc<LogLine>>,
}

impl Ring {
    /// Keeps `text` (cut to [`MAX_LINE_BYTES`]) as the newest line, drops
    /// the oldest beyond the capacity, and sends it to followers.
    pub fn push(&self, at_ms: i64, stream: LogStream, text: &str) {
        let line = Arc::new(LogLine {
            at_ms,
            stream,
            text: cut_line(text),
        });
        let capacity = self.capacity.load(Ordering::Relaxed);
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        while state.lines.len() >= capacity.max(1) {
            state.lines.pop_front();
        }
        if capacity > 0 {
            state.lines.push_back(line.clone());
        }
        if state.live.receiver_count() > 0 {
            let _ = state.live.send(line);
        }
    }

    fn snapshot(&self) -> (Vec<Arc<LogLine>>, broadcast::Receiver<Arc<LogLine>>) {
        let state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        (
            state.lines.iter().cloned().collect(),
            state.live.subscribe(),
        )
    }

    /// Lines held now.
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.lines.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `text`, or its first [`MAX_LINE_BYTES`] (on a character boundary) and
/// [`CUT_MARK`].
fn cut_line(text: &str) -> String {
    if text.len() <= MAX_LINE_BYTES {
        return text.to_string();
    }
    let mut end = MAX_LINE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    #[test]
    fn a_ring_keeps_the_last_lines_in_order_and_no_more() {
        let logs = ModelLogs::new(3);
        let ring = logs.ring(&Arc::from("m"));
        for i in 0..10_000 {
            ring.push(i, LogStream::Stderr, &format!("line {i}"));
            assert!(ring.len() <= 3);
        }
        let texts: Vec<String> = logs.lines("m").iter().map(|l| l.text.clone()).collect();
        assert_eq!(texts, ["line 9997", "line 9998", "line 9999"]);
        assert!(logs.lines("other").is_empty());
    }

    #[test]
    fn the_ring_is_the_models_across_handles_and_capacity_changes_apply() {
        let logs = ModelLogs::new(5);
        let first = logs.ring(&Arc::from("m"));
        for i in 0..5 {
            first.push(i, LogStream::Stdout, &format!("a{i}"));
        }
        // A restarted child gets the same ring.
        let second = logs.ring(&Arc::from("m"));
        second.push(9, LogStream::Stderr, "b0");
        logs.set_capacity(2);
        second.push(10, LogStream::Stderr, "b1");
        let lines = logs.lines("m");
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["b0", "b1"]);
        assert_eq!(lines[0].stream, LogStream::Stderr);
        logs.set_capacity(0);
        second.push(11, LogStream::Stdout, "c");
        assert!(logs.lines("m").is_empty(), "0 keeps none");
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary_and_marked() {
        let logs = ModelLogs::new(2);
        let ring = logs.ring(&Arc::from("m"));
        let long = "é".repeat(MAX_LINE_BYTES); // two bytes each
        ring.push(0, LogStream::Stdout, &long);
        let text = &logs.lines("m")[0].text;
        assert!(text.ends_with(CUT_MARK), "{}", &text[text.len() - 20..]);
        assert!(text.len() <= MAX_LINE_BYTES + CUT_MARK.len());
        ring.push(1, LogStream::Stdout, "short");
        assert_eq!(logs.lines("m")[1].text, "short");
    }

    #[test]
    fn a_follower_gets_the_backlog_then_each_new_line_once() {
        let logs = ModelLogs::new(10);
        let ring = logs.ring(&Arc::from("m"));
        ring.push(0, LogStream::Stdout, "old");
        let mut f = logs.follow("m");
        ring.push(1, LogStream::Stdout, "new");
        assert_eq!(f.backlog.len(), 1);
        assert_eq!(f.backlog[0].text, "old");
        assert_eq!(
            f.live.try_recv().map(|l| l.text.clone()).ok().as_deref(),
            Some("new")
        );
        assert!(matches!(f.live.try_recv(), Err(TryRecvError::Empty)));
        assert!(!*f.closed.borrow());
        logs.close();
        assert!(*f.closed.borrow_and_update());
    }

    #[test]
    fn a_follower_that_falls_behind_lags_and_the_pusher_never_waits() {
        let logs = ModelLogs::new(10);
        let ring = logs.ring(&Arc::from("m"));
        let mut f = logs.follow("m");
        for i in 0..(FOLLOW_BUFFER as i64 + 50) {
            ring.push(i, LogStream::Stdout, "x");
        }
        assert!(matches!(f.live.try_recv(), Err(TryRecvError::Lagged(50))));
        assert_eq!(logs.lines("m").len(), 10);
    }

    #[test]
    fn rings_of_removed_models_are_forgotten() {
        let logs = ModelLogs::new(10);
        logs.ring(&Arc::from("a")).push(0, LogStream::Stdout, "a");
        logs.ring(&Arc::from("b")).push(0, LogStream::Stdout, "b");
        logs.retain(&HashSet::from(["b"]));
        assert!(logs.lines("a").is_empty());
        assert_eq!(logs.lines("b").len(), 1);
    }
}
