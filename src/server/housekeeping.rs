//! Background duties of a running daemon: the systemd watchdog ping,
//! the history-drops event, resource samples for history, and giving
//! freed heap memory back to the system once idle.

use std::sync::Arc;
use std::time::Duration;

use super::connections::Connections;
use crate::api::AppState;
use crate::events::Event;
use crate::history::{now_ms, Sample};
use crate::procfs::{pid_figures, process_figures};
use crate::systemd::{Notifier, NotifyState};

/// How often resource samples go into history.
const SAMPLE_PERIOD: Duration = Duration::from_secs(30);

/// How often the history drop count is compared for the events stream.
const DROPS_PERIOD: Duration = Duration::from_secs(1);

/// Emits [`Event::HistoryDrops`] when the count of dropped history rows
/// grew: rows are dropped on the request path, where a bus event per row
/// would add to the very load that drops them.
pub(super) async fn report_history_drops(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(DROPS_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = 0;
    loop {
        ticker.tick().await;
        let dropped = state.recorder.dropped();
        if dropped > seen {
            seen = dropped;
            state.bus.emit(Event::HistoryDrops { dropped });
        }
    }
}

/// Pings the watchdog only while the runtime runs tasks, the scheduler
/// actor answers and the history writer goes round its loop: a wedged
/// daemon stops pinging and systemd restarts it.
pub(super) async fn watchdog(state: Arc<AppState>, notifier: Arc<Notifier>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if tokio::time::timeout(interval, state.scheduler.status())
            .await
            .is_err()
        {
            tracing::error!("scheduler did not answer within the watchdog interval");
            continue;
        }
        if !state.recorder.alive(interval * 2) {
            tracing::error!("history writer is stuck");
            continue;
        }
        notifier.notify(&[NotifyState::Watchdog]);
    }
}

/// How often the daemon looks whether it went idle with memory to return.
const TRIM_PERIOD: Duration = Duration::from_secs(2);
/// Growth of the resident set since the last trim that makes one worth it.
const TRIM_GROWTH_BYTES: i64 = 1 << 20;
/// Connections gone since the peak that make a trim worth it: about 1 MiB
/// of their buffers (some 13 KiB each) lies free.
const TRIM_CONNECTIONS_GONE: usize = 64;

/// Gives freed heap memory back to the system once the daemon is idle: a
/// burst of requests leaves glibc holding megabytes of free chunks in its
/// per-thread arenas, which an operator would read as a leak. Runs only when
/// no model request is in flight (idle connections do not count), and only
/// when the resident set grew since the last trim or many connections
/// closed since the most were open: their memory is freed without the
/// resident set growing, so growth alone misses a burst of idle
/// connections that came and went, and trimming on every close would run
/// it all the time under connection churn.
pub(super) async fn trim_when_idle(state: Arc<AppState>, conns: Arc<Connections>) {
    let mut ticker = tokio::time::interval(TRIM_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut floor = process_figures().map_or(0, |f| f.0);
    loop {
        ticker.tick().await;
        let Some((rss, _)) = process_figures() else {
            return;
        };
        let (open, peak) = conns.open_and_peak();
        if rss < floor + TRIM_GROWTH_BYTES && open + TRIM_CONNECTIONS_GONE > peak {
            floor = floor.min(rss);
            continue;
        }
        if state.scheduler.inflight() == 0 {
            // Before the trim: connections that close while it runs leave
            // the peak above the count, so the next look trims again.
            conns.reset_peak();
            let released = tokio::task::spawn_blocking(release_free_heap).await;
            floor = process_figures().map_or(rss, |f| f.0);
            tracing::debug!(before = rss, after = floor, trimmed = ?released.ok(), "returned free heap memory");
        }
    }
}

/// `malloc_trim(0)`: returns free memory at the top of every glibc arena
/// and free whole pages inside them to the kernel. True if any was.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim takes the arena locks itself and may be called
    // from any thread at any time; it has no preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn release_free_heap() -> bool {
    false
}

/// Low-rate resource figures for dashboards: the daemon's and each loaded
/// model's memory and CPU time.
pub(super) async fn sample(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        ticker.tick().await;
        let at_ms = now_ms();
        let models = state.scheduler.status().await;
        let daemon = process_figures();
        state.recorder.sample(Sample {
            at_ms,
            model: String::new(),
            rss_bytes: daemon.map(|d| d.0),
            cpu_seconds: daemon.map(|d| d.1),
            inflight: Some(models.iter().map(|m| m.inflight as i64).sum()),
            vram_bytes: None,
        });
        for m in models {
            let Some(pid) = m.pid else { continue };
            let figures = pid_figures(pid);
            state.recorder.sample(Sample {
                at_ms,
                model: m.name,
                rss_bytes: figures.map(|f| f.0),
                cpu_seconds: figures.map(|f| f.1),
                inflight: Some(m.inflight as i64),
                vram_bytes: m.vram_bytes,
            });
        }
    }
}
