//! Capacity and timing limits: `[http]`, the front end's bodies, timeouts,
//! threads and connections (with the fd arithmetic behind the default
//! connection cap), and `[scheduler]`, how many models are resident, how
//! long children get to start and stop, and how long requests queue.

use std::time::Duration;

use toml::Spanned;

use super::raw::{RawHttp, RawScheduler, Source};
use super::{
    Config, ConfigError, DEFAULT_BODY_MEMORY_BYTES, DEFAULT_BODY_READ_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HEALTH_INTERVAL, DEFAULT_IDLE_TTL, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_LOADED, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_BEFORE_SWAP, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_TIMEOUT, DEFAULT_STOP_GRACE, DEFAULT_VRAM_RESERVE_MB,
};

/// HTTP front-end limits.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Request-body bytes the whole daemon holds in memory at once while
    /// inference requests are read for their model; beyond it new bodies
    /// wait briefly, then get 503.
    pub body_memory_bytes: u64,
    /// Time a client has to send a complete request body once its head is
    /// in; then 408.
    pub body_read_timeout: Duration,
    /// Threads of the async runtime (HTTP, proxying, scheduling); `None`:
    /// [`default_worker_threads`].
    pub worker_threads: Option<usize>,
    /// Client connections open at once (TCP and unix together); `None`:
    /// [`default_max_open_connections`] of the fd limit.
    pub max_open_connections: Option<usize>,
}

/// Largest `http.max_open_connections`: Linux's default `fs.nr_open`, the
/// most fds one process can be allowed.
pub const MAX_OPEN_CONNECTIONS_LIMIT: usize = 1 << 20;
/// File descriptors kept back from client connections for the daemon
/// itself: stdio, the journal, epoll and the runtime's wake-ups, the
/// listeners, the history database (file, WAL, shared memory, a backup),
/// /proc reads and the blocking pool's files.
pub const FD_RESERVE: u64 = 64;
/// File descriptors kept back per resident model: its stdout and stderr
/// pipes, a health-check connection and spare, plus its connection pool
/// (`max_connections`, or [`FD_PER_UNLIMITED_MODEL`] when unlimited).
pub const FD_PER_MODEL: u64 = 4;
/// Pool allowance of a model without `max_connections` (the idle
/// connections its pool keeps).
pub const FD_PER_UNLIMITED_MODEL: u64 = 64;

/// The default connection cap for an fd limit (`RLIMIT_NOFILE`): the limit
/// less [`FD_RESERVE`] and, for the `max_loaded` models with the largest
/// pools, [`FD_PER_MODEL`] plus each pool; never below a quarter of the
/// limit, so a small limit still leaves clients room.
pub fn default_max_open_connections(nofile: u64, config: &Config) -> usize {
    let mut pools: Vec<u64> = config
        .models
        .iter()
        .map(|m| {
            FD_PER_MODEL
                + m.max_connections
                    .map_or(FD_PER_UNLIMITED_MODEL, |n| n as u64)
        })
        .collect();
    pools.sort_unstable_by(|a, b| b.cmp(a));
    let children: u64 = pools.iter().take(config.scheduler.max_loaded).sum();
    let cap = nofile
        .saturating_sub(FD_RESERVE + children)
        .max(nofile / 4)
        .max(1);
    usize::try_from(cap)
        .unwrap_or(MAX_OPEN_CONNECTIONS_LIMIT)
        .min(MAX_OPEN_CONNECTIONS_LIMIT)
}

/// Half the CPUs this process may use, 1 to 4. Proxying is light next to
/// inference: on a small machine the model processes need the cores, and
/// one thread saves the cross-thread wake-ups of every request.
pub fn default_worker_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus / 2).clamp(1, 4)
}

/// Scheduler and supervisor limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Models resident (starting, ready or stopping) at once.
    pub max_loaded: usize,
    /// Default idle unload time; `None` = never.
    pub idle_ttl: Option<Duration>,
    /// Spawn to `/health` 200 deadline.
    pub start_timeout: Duration,
    /// SIGTERM to SIGKILL grace for a child's process group.
    pub stop_grace: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Period of health pings to ready children; `None` = off.
    pub health_interval: Option<Duration>,
    /// Requests waiting for a model (one that is not ready) at once, over
    /// all models; more are refused with 503 and `Retry-After`.
    pub max_queue: usize,
    /// How long the oldest request for a model that is not loaded waits
    /// while a loaded model it would evict is still in use, before that
    /// model is drained for it (the fairness bound of grouping requests
    /// by model). Zero: swap at once.
    pub max_wait_before_swap: Duration,
    /// GPU memory kept free on every GPU when placing a model.
    pub vram_reserve_bytes: u64,
}

/// The largest `vram_mb` or `vram_reserve_mb` taken (1 TiB).
pub(super) const MAX_VRAM_MB: u64 = 1 << 20;
/// Bytes in a MiB, the unit of the `*_mb` keys.
pub const MIB: u64 = 1 << 20;

/// `[http]`; the body budget is checked against the largest body.
pub(super) fn validate_http(src: &Source<'_>, raw: &RawHttp) -> Result<HttpConfig, ConfigError> {
    let max_body_bytes = max_body_bytes(src, raw.max_body_bytes.as_ref())?;
    Ok(HttpConfig {
        max_body_bytes,
        header_read_timeout: match &raw.header_read_timeout {
            None => DEFAULT_HEADER_READ_TIMEOUT,
            Some(v) => src.nonzero("http.header_read_timeout", v)?,
        },
        body_read_timeout: match &raw.body_read_timeout {
            None => DEFAULT_BODY_READ_TIMEOUT,
            Some(v) => src.nonzero("http.body_read_timeout", v)?,
        },
        worker_threads: worker_threads(src, raw.worker_threads.as_ref())?,
        max_open_connections: max_open_connections(src, raw.max_open_connections.as_ref())?,
        // Checked after the other keys, so a file with several errors
        // still reports the same one first.
        body_memory_bytes: body_memory_bytes(src, raw.body_memory_bytes.as_ref(), max_body_bytes)?,
    })
}

/// `http.max_body_bytes`: 1 byte to 4 GiB.
fn max_body_bytes(src: &Source<'_>, v: Option<&Spanned<u64>>) -> Result<u64, ConfigError> {
    match v {
        None => Ok(DEFAULT_MAX_BODY_BYTES),
        Some(v) if *v.get_ref() == 0 => {
            Err(src.error(v, "http.max_body_bytes: must be greater than 0"))
        }
        Some(v) if *v.get_ref() > u64::from(u32::MAX) => {
            Err(src.error(v, "http.max_body_bytes: must be at most 4294967295 (4 GiB)"))
        }
        Some(v) => Ok(*v.get_ref()),
    }
}

/// `http.body_memory_bytes`: at least the largest body, which also raises
/// the default.
fn body_memory_bytes(
    src: &Source<'_>,
    v: Option<&Spanned<u64>>,
    max_body_bytes: u64,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(DEFAULT_BODY_MEMORY_BYTES.max(max_body_bytes)),
        Some(v) if *v.get_ref() < max_body_bytes => Err(src.error(
            v,
            format!(
                "http.body_memory_bytes: must be at least http.max_body_bytes ({max_body_bytes}), or a body of the largest allowed size could never be read"
            ),
        )),
        Some(v) => Ok(*v.get_ref()),
    }
}

/// `http.worker_threads`: 1 to 256.
fn worker_threads(
    src: &Source<'_>,
    v: Option<&Spanned<i64>>,
) -> Result<Option<usize>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    match usize::try_from(*v.get_ref()) {
        Ok(n @ 1..=256) => Ok(Some(n)),
        _ => Err(src.error(
            v,
            "http.worker_threads: must be between 1 and 256 (leave it out for half the CPUs, at most 4)",
        )),
    }
}

/// `http.max_open_connections`: 1 to [`MAX_OPEN_CONNECTIONS_LIMIT`].
fn max_open_connections(
    src: &Source<'_>,
    v: Option<&Spanned<i64>>,
) -> Result<Option<usize>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    usize::try_from(*v.get_ref())
        .ok()
        .filter(|n| (1..=MAX_OPEN_CONNECTIONS_LIMIT).contains(n))
        .map(Some)
        .ok_or_else(|| {
            src.error(
                v,
                format!("http.max_open_connections: must be between 1 and {MAX_OPEN_CONNECTIONS_LIMIT} (leave it out to derive it from the fd limit)"),
            )
        })
}

/// `[scheduler]`.
pub(super) fn validate_scheduler(
    src: &Source<'_>,
    s: &RawScheduler,
) -> Result<SchedulerConfig, ConfigError> {
    Ok(SchedulerConfig {
        max_loaded: match &s.max_loaded {
            None => DEFAULT_MAX_LOADED,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| src.error(v, "scheduler.max_loaded: must be 1 or more"))?,
        },
        idle_ttl: match &s.idle_ttl {
            None => Some(DEFAULT_IDLE_TTL),
            Some(v) => src.optional_duration("scheduler.idle_ttl", v)?,
        },
        start_timeout: match &s.start_timeout {
            None => DEFAULT_START_TIMEOUT,
            Some(v) => src.nonzero("scheduler.start_timeout", v)?,
        },
        stop_grace: match &s.stop_grace {
            None => DEFAULT_STOP_GRACE,
            Some(v) => src.duration("scheduler.stop_grace", v)?,
        },
        shutdown_timeout: match &s.shutdown_timeout {
            None => DEFAULT_SHUTDOWN_TIMEOUT,
            Some(v) => src.duration("scheduler.shutdown_timeout", v)?,
        },
        health_interval: match &s.health_interval {
            None => Some(DEFAULT_HEALTH_INTERVAL),
            Some(v) => src.optional_duration("scheduler.health_interval", v)?,
        },
        max_queue: match &s.max_queue {
            None => DEFAULT_MAX_QUEUE,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| {
                    src.error(v, "scheduler.max_queue: must be between 1 and 1000000")
                })?,
        },
        max_wait_before_swap: match &s.max_wait_before_swap {
            None => DEFAULT_MAX_WAIT_BEFORE_SWAP,
            Some(v) => src.duration("scheduler.max_wait_before_swap", v)?,
        },
        vram_reserve_bytes: vram_reserve_bytes(src, s.vram_reserve_mb.as_ref())?,
    })
}

/// `scheduler.vram_reserve_mb`: 0 to [`MAX_VRAM_MB`], in bytes.
fn vram_reserve_bytes(src: &Source<'_>, v: Option<&Spanned<i64>>) -> Result<u64, ConfigError> {
    let Some(v) = v else {
        return Ok(DEFAULT_VRAM_RESERVE_MB * MIB);
    };
    u64::try_from(*v.get_ref())
        .ok()
        .filter(|n| *n <= MAX_VRAM_MB)
        .map(|n| n * MIB)
        .ok_or_else(|| {
            src.error(
                v,
                format!("scheduler.vram_reserve_mb: must be between 0 and {MAX_VRAM_MB}"),
            )
        })
}
