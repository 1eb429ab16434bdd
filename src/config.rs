//! Configuration: the TOML file's raw shape, its validation, and the typed
//! [`Config`] the rest of the daemon reads.
//!
//! Two stages: serde reads the file into `Raw*` structs that reject unknown
//! keys and keep source spans; [`Config::from_toml`] turns those into typed
//! values. Every error names the file, line, column and key involved.
//! Defaults live in this module only.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Default TCP listener when the file names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5800";
/// Placeholder replaced by the child's port in `cmd` argv entries.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// Placeholder replaced by the child's unix socket path in argv entries: a
/// child whose argv has it is reached over that socket, one with only
/// [`PORT_PLACEHOLDER`] over loopback TCP.
pub const SOCKET_PLACEHOLDER: &str = "{socket}";
/// The `--port` of a llama-server on a unix socket: it ignores the port
/// for a `--host` ending in `.sock` but refuses to start with none.
const UNIX_LLAMA_PORT: &str = "8080";

/// An error in a config file, positioned where possible.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Unpositioned { path: PathBuf, message: String },
}

/// Where a child listens: a unix socket in the daemon's private runtime
/// directory, or (a `cmd` with only [`PORT_PLACEHOLDER`]) a loopback port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ChildAddr {
    /// The loopback port of a TCP child.
    pub fn port(&self) -> Option<u16> {
        match self {
            ChildAddr::Tcp(a) => Some(a.port()),
            ChildAddr::Unix(_) => None,
        }
    }

    /// The socket path of a unix child.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            ChildAddr::Tcp(_) => None,
            ChildAddr::Unix(p) => Some(p),
        }
    }
}

impl fmt::Display for ChildAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildAddr::Tcp(addr) => write!(f, "{addr}"),
            ChildAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where the daemon accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Reachable only from this machine: a loopback address or a unix
    /// socket.
    pub fn is_loopback(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }

    /// Parses `host:port`, `[v6]:port` or `unix:/absolute/path`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err(format!(
                    "unix socket path {:?} must be absolute",
                    path.display().to_string()
                ));
            }
            return Ok(ListenAddr::Unix(path.to_path_buf()));
        }
        text.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("{text:?} is not a listen address (expected host:port, [v6]:port or unix:/path)")
        })
    }
}

/// What request and response text is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ContentPolicy {
    None,
    /// The first `history::tap::TRUNCATE_CHARS` characters of each, marked as
    /// truncated when cut.
    Truncated,
    Full,
}

/// `[history]` in the config.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub enabled: bool,
    pub path: PathBuf,
    pub content: ContentPolicy,
    pub retention: Duration,
    pub events_retention: Duration,
    pub samples_retention: Duration,
    /// Rows that may wait for the writer before new ones are dropped.
    pub queue: usize,
    pub batch_window: Duration,
}

/// How log lines are written when not under journald.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    Human,
    Json,
}

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

/// Default of `http.body_memory_bytes` (raised to `max_body_bytes` if that
/// is larger).
pub const DEFAULT_BODY_MEMORY_BYTES: u64 = 256 * 1024 * 1024;

/// `[logging] model_log_lines` when not set: lines of each model's output
/// kept for `/admin/logs/{model}`.
pub const DEFAULT_MODEL_LOG_LINES: usize = 1000;
/// The most `model_log_lines` may be: at the 4 KiB line cap, 64 MiB a model.
pub const MAX_MODEL_LOG_LINES: usize = 16384;

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

/// `[gpu]`: NVIDIA GPU readings through NVML, loaded at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Use NVML if it loads; `false` never tries.
    pub enabled: bool,
    /// Time between two samples of every GPU.
    pub sample_interval: Duration,
    /// The NVML library to load; `None`: `libnvidia-ml.so.1` by the
    /// dynamic loader's search, then NixOS's driver directory
    /// ([`NIXOS_NVML_LIBRARY`]).
    pub nvml_library: Option<PathBuf>,
}

/// Shortest `gpu.sample_interval`: NVML queries take milliseconds per GPU.
pub const MIN_GPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `gpu.sample_interval`.
pub const MAX_GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(3600);
/// Where NixOS puts the driver's libraries (`hardware.graphics`), outside
/// the loader's search path of a Nix-built binary.
pub const NIXOS_NVML_LIBRARY: &str = "/run/opengl-driver/lib/libnvidia-ml.so.1";

/// One configured model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    /// argv with [`SOCKET_PLACEHOLDER`] where the unix socket's path goes
    /// and/or [`PORT_PLACEHOLDER`] where a loopback port goes.
    pub argv: Vec<String>,
    /// The GGUF file, for models given by `model` (checked by `--strict`).
    pub model_path: Option<PathBuf>,
    pub aliases: Vec<String>,
    /// Idle unload time; `None` = never.
    pub ttl: Option<Duration>,
    pub group: Option<String>,
    /// Started when the daemon starts (after READY=1), and when a reload
    /// turns it on, without waiting for a request.
    pub preload: bool,
    /// Never evicted to make room for another model; it still stops on an
    /// admin stop, its TTL, a reload that removes or changes it, and
    /// shutdown.
    pub pin: bool,
    /// Readiness and liveness path on the child.
    pub health: String,
    pub env: Vec<(String, String)>,
    /// Requests forwarded to the child at once; more wait in claracore.
    /// `None`: no limit (the default for `cmd` models).
    pub max_connections: Option<usize>,
    /// `vram_mb`: the GPU memory it needs, as declared; `None`: learned
    /// from its last runs, else estimated from its GGUF.
    pub vram_bytes: Option<u64>,
    /// `gpus`: the GPU indices (NVML's, in PCI bus order) it may be
    /// placed on; `None`: any.
    pub gpus: Option<Vec<u32>>,
    /// Added to the priority of every request for it (a key's own
    /// `priority` is the rest); higher is served first.
    pub priority: i32,
}

/// Default [`SchedulerConfig::max_queue`].
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default [`SchedulerConfig::max_wait_before_swap`].
pub const DEFAULT_MAX_WAIT_BEFORE_SWAP: Duration = Duration::from_secs(5);
/// Default `scheduler.vram_reserve_mb`.
pub const DEFAULT_VRAM_RESERVE_MB: u64 = 512;
/// The largest `vram_mb` or `vram_reserve_mb` taken (1 TiB).
const MAX_VRAM_MB: u64 = 1 << 20;
/// A GPU index beyond this is a typo.
const MAX_GPU_INDEX: i64 = 63;
/// Bounds of a model's or a key's `priority`.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;
/// Bytes in a MiB, the unit of the `*_mb` keys.
pub const MIB: u64 = 1 << 20;

/// Default [`ModelConfig::max_connections`] of `model` entries, unless
/// their `--parallel` asks for more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// llama-server's HTTP threads for a connection limit: each open
/// connection, busy or idle in claracore's pool (at most the limit each),
/// holds one thread of its thread-per-connection server, and health pings
/// need one more. With fewer threads a burst of requests leaves some
/// connections unserved until an idle one times out (5 s).
pub fn llama_http_threads(max_connections: usize) -> usize {
    2 * max_connections + 2
}

/// The `--parallel`/`-np` value in llama-server arguments, if any.
fn parallel_arg(args: &[String]) -> Option<usize> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--parallel=") {
            return v.parse().ok();
        }
        if a == "-np" || a == "--parallel" {
            return it.next()?.parse().ok();
        }
    }
    None
}

impl ModelConfig {
    /// Whether a running child of `self` must restart to match `other`
    /// (aliases, TTL and group apply without a restart).
    pub fn launch_differs(&self, other: &ModelConfig) -> bool {
        self.argv != other.argv
            || self.env != other.env
            || self.health != other.health
            || self.max_connections != other.max_connections
            || self.gpus != other.gpus
    }

    /// Whether the child listens on a unix socket (its argv names one).
    pub fn uses_socket(&self) -> bool {
        uses_socket(&self.argv)
    }

    /// The child's argv with the port and socket path filled in.
    pub fn command(&self, port: u16, socket: &Path) -> Vec<String> {
        fill_placeholders(&self.argv, port, socket)
    }
}

/// Whether an argv has [`SOCKET_PLACEHOLDER`].
pub fn uses_socket(argv: &[String]) -> bool {
    argv.iter().any(|a| a.contains(SOCKET_PLACEHOLDER))
}

/// Whether llama-server arguments set the model's alias themselves.
fn alias_arg(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "-a" || a == "--alias" || a.starts_with("--alias="))
}

/// `argv` with [`PORT_PLACEHOLDER`] and [`SOCKET_PLACEHOLDER`] replaced.
pub fn fill_placeholders(argv: &[String], port: u16, socket: &Path) -> Vec<String> {
    let port = port.to_string();
    let socket = socket.display().to_string();
    argv.iter()
        .map(|arg| {
            arg.replace(PORT_PLACEHOLDER, &port)
                .replace(SOCKET_PLACEHOLDER, &socket)
        })
        .collect()
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    pub listen: Vec<ListenAddr>,
    /// Permission bits of unix listener sockets.
    pub socket_mode: u32,
    pub llama_server: PathBuf,
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `info,claracore::child=warn`;
    /// `CLARACORE_LOG` overrides it.
    pub log_level: String,
    pub http: HttpConfig,
    pub scheduler: SchedulerConfig,
    pub history: HistoryConfig,
    /// `[logging] model_log_lines`: the last lines of each model's output
    /// kept in memory for `/admin/logs/{model}`; 0 keeps none.
    pub model_log_lines: usize,
    /// Sorted by name.
    pub auth: AuthConfig,
    pub dashboard: DashboardConfig,
    pub gpu: GpuConfig,
    pub models: Vec<ModelConfig>,
    /// The private (0700) directory for the children's unix sockets. Not a
    /// key of the file: the daemon's bootstrap creates the directory and
    /// sets this; `None` (a config only parsed) starts no socket child.
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<Spanned<String>>>,
    llama_server: Option<String>,
    state_dir: Option<String>,
    socket_mode: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    history: RawHistory,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    dashboard: RawDashboard,
    #[serde(default)]
    gpu: RawGpu,
    #[serde(default)]
    models: BTreeMap<Spanned<String>, Spanned<RawModel>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    enabled: Option<bool>,
    path: Option<String>,
    content: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    events_retention: Option<Spanned<String>>,
    samples_retention: Option<Spanned<String>>,
    queue: Option<Spanned<i64>>,
    batch_window: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    model_log_lines: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_body_bytes: Option<Spanned<u64>>,
    header_read_timeout: Option<Spanned<String>>,
    body_memory_bytes: Option<Spanned<u64>>,
    body_read_timeout: Option<Spanned<String>>,
    worker_threads: Option<Spanned<i64>>,
    max_open_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    max_loaded: Option<Spanned<i64>>,
    idle_ttl: Option<Spanned<String>>,
    start_timeout: Option<Spanned<String>>,
    stop_grace: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
    max_queue: Option<Spanned<i64>>,
    max_wait_before_swap: Option<Spanned<String>>,
    vram_reserve_mb: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    enabled: Option<bool>,
    sample_interval: Option<Spanned<String>>,
    nvml_library: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: Option<String>,
    cmd: Option<Vec<String>>,
    args: Option<Vec<String>>,
    #[serde(default)]
    aliases: Vec<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    group: Option<String>,
    #[serde(default)]
    preload: bool,
    #[serde(default)]
    pin: bool,
    health: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    max_connections: Option<Spanned<i64>>,
    vram_mb: Option<Spanned<i64>>,
    gpus: Option<Spanned<Vec<Spanned<i64>>>>,
    priority: Option<Spanned<i64>>,
}

/// Positions byte offsets in the source as 1-based line and column.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Whether files the config names only for the running system
    /// (`dashboard.password_hash_file`, often a systemd credential) are
    /// read now; `check-config` without `--strict` (the Nix module's
    /// build-time check) leaves them to the daemon.
    read_runtime_files: bool,
}

impl Source<'_> {
    fn error_at(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn error<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error_at(spanned.span().start, message)
    }

    fn duration(&self, key: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
        parse_duration(value.get_ref()).map_err(|e| self.error(value, format!("{key}: {e}")))
    }

    /// A duration where "0" means "never".
    fn optional_duration(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<Option<Duration>, ConfigError> {
        let d = self.duration(key, value)?;
        Ok((!d.is_zero()).then_some(d))
    }
}

/// Parses a humantime duration such as `10m`, `1h 30s` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"10m\" ({e})"))
}

impl Config {
    /// Reads and validates a config file, and the files it names that
    /// the daemon reads at start (the dashboard's password hash file).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, true)
    }

    /// [`Config::load`] without reading the files that only the running
    /// system has (`check-config` without `--strict`, run at build time
    /// by the Nix module, where a systemd credential does not exist yet).
    pub fn load_syntax(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, false)
    }

    fn load_with(path: &Path, read_runtime_files: bool) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse_toml(path, &text, read_runtime_files)
    }

    /// Validates config text; `path` is only used in messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_toml(path, text, true)
    }

    fn parse_toml(
        path: &Path,
        text: &str,
        read_runtime_files: bool,
    ) -> Result<Config, ConfigError> {
        let src = Source {
            path,
            text,
            read_runtime_files,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => src.error_at(span.start, e.message().trim_end().to_string()),
            None => ConfigError::Unpositioned {
                path: path.to_path_buf(),
                message: e.message().trim_end().to_string(),
            },
        })?;

        let listen = match &raw.listen {
            None => vec![ListenAddr::Tcp(DEFAULT_LISTEN.parse().map_err(|_| {
                ConfigError::Unpositioned {
                    path: path.to_path_buf(),
                    message: "default listen address is invalid".into(),
                }
            })?)],
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for item in list {
                    let addr = ListenAddr::parse(item.get_ref())
                        .map_err(|e| src.error(item, format!("listen: {e}")))?;
                    if out.contains(&addr) {
                        return Err(src.error(item, format!("listen: {addr} is listed twice")));
                    }
                    out.push(addr);
                }
                out
            }
        };

        let socket_mode = match &raw.socket_mode {
            None => 0o660,
            Some(mode) => u32::from_str_radix(mode.get_ref().trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    src.error(
                        mode,
                        format!(
                            "socket_mode: {:?} is not an octal mode like \"0660\"",
                            mode.get_ref()
                        ),
                    )
                })?,
        };

        let log_format = match raw.log_format.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "auto")) => LogFormat::Auto,
            Some((_, "human")) => LogFormat::Human,
            Some((_, "json")) => LogFormat::Json,
            Some((f, other)) => {
                return Err(src.error(
                    f,
                    format!("log_format: {other:?} is not one of \"auto\", \"human\", \"json\""),
                ))
            }
        };
        let log_level = match &raw.log_level {
            None => "info".to_string(),
            Some(l) => {
                tracing_subscriber::EnvFilter::try_new(l.get_ref()).map_err(|e| {
                    src.error(
                        l,
                        format!("log_level: {:?} is not a log filter ({e})", l.get_ref()),
                    )
                })?;
                l.get_ref().clone()
            }
        };

        let http = HttpConfig {
            max_body_bytes: match &raw.http.max_body_bytes {
                None => 32 * 1024 * 1024,
                Some(v) if *v.get_ref() == 0 => {
                    return Err(src.error(v, "http.max_body_bytes: must be greater than 0"))
                }
                Some(v) if *v.get_ref() > u64::from(u32::MAX) => {
                    return Err(src.error(
                        v,
                        "http.max_body_bytes: must be at most 4294967295 (4 GiB)",
                    ))
                }
                Some(v) => *v.get_ref(),
            },
            header_read_timeout: match &raw.http.header_read_timeout {
                None => Duration::from_secs(30),
                Some(v) => nonzero(&src, "http.header_read_timeout", v)?,
            },
            body_memory_bytes: 0, // below: it depends on max_body_bytes
            body_read_timeout: match &raw.http.body_read_timeout {
                None => Duration::from_secs(30),
                Some(v) => nonzero(&src, "http.body_read_timeout", v)?,
            },
            worker_threads: match &raw.http.worker_threads {
                None => None,
                Some(v) => match usize::try_from(*v.get_ref()) {
                    Ok(n @ 1..=256) => Some(n),
                    _ => {
                        return Err(src.error(
                            v,
                            "http.worker_threads: must be between 1 and 256 (leave it out for half the CPUs, at most 4)",
                        ))
                    }
                },
            },
            max_open_connections: match &raw.http.max_open_connections {
                None => None,
                Some(v) => Some(
                    usize::try_from(*v.get_ref())
                        .ok()
                        .filter(|n| (1..=MAX_OPEN_CONNECTIONS_LIMIT).contains(n))
                        .ok_or_else(|| {
                            src.error(
                                v,
                                format!("http.max_open_connections: must be between 1 and {MAX_OPEN_CONNECTIONS_LIMIT} (leave it out to derive it from the fd limit)"),
                            )
                        })?,
                ),
            },
        };

        let mut http = http;
        http.body_memory_bytes = match &raw.http.body_memory_bytes {
            None => DEFAULT_BODY_MEMORY_BYTES.max(http.max_body_bytes),
            Some(v) if *v.get_ref() < http.max_body_bytes => {
                return Err(src.error(
                    v,
                    format!(
                        "http.body_memory_bytes: must be at least http.max_body_bytes ({}), or a body of the largest allowed size could never be read",
                        http.max_body_bytes
                    ),
                ))
            }
            Some(v) => *v.get_ref(),
        };

        let s = &raw.scheduler;
        let scheduler = SchedulerConfig {
            max_loaded: match &s.max_loaded {
                None => 1,
                Some(v) => usize::try_from(*v.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| src.error(v, "scheduler.max_loaded: must be 1 or more"))?,
            },
            idle_ttl: match &s.idle_ttl {
                None => Some(Duration::from_secs(600)),
                Some(v) => src.optional_duration("scheduler.idle_ttl", v)?,
            },
            start_timeout: match &s.start_timeout {
                None => Duration::from_secs(300),
                Some(v) => nonzero(&src, "scheduler.start_timeout", v)?,
            },
            stop_grace: match &s.stop_grace {
                None => Duration::from_secs(10),
                Some(v) => src.duration("scheduler.stop_grace", v)?,
            },
            shutdown_timeout: match &s.shutdown_timeout {
                None => Duration::from_secs(30),
                Some(v) => src.duration("scheduler.shutdown_timeout", v)?,
            },
            health_interval: match &s.health_interval {
                None => Some(Duration::from_secs(10)),
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
            vram_reserve_bytes: match &s.vram_reserve_mb {
                None => DEFAULT_VRAM_RESERVE_MB * MIB,
                Some(v) => u64::try_from(*v.get_ref())
                    .ok()
                    .filter(|n| *n <= MAX_VRAM_MB)
                    .map(|n| n * MIB)
                    .ok_or_else(|| {
                        src.error(
                            v,
                            format!(
                                "scheduler.vram_reserve_mb: must be between 0 and {MAX_VRAM_MB}"
                            ),
                        )
                    })?,
            },
        };

        let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or("/var/lib/claracore"));
        let h = &raw.history;
        let retention = match &h.retention {
            None => Duration::from_secs(30 * 86400),
            Some(v) => nonzero(&src, "history.retention", v)?,
        };
        let history = HistoryConfig {
            enabled: h.enabled.unwrap_or(true),
            path: h.path.as_ref().map_or_else(|| state_dir.join("history.db"), PathBuf::from),
            content: match h.content.as_ref().map(|c| (c, c.get_ref().as_str())) {
                None | Some((_, "truncated")) => ContentPolicy::Truncated,
                Some((_, "none")) => ContentPolicy::None,
                Some((_, "full")) => ContentPolicy::Full,
                Some((c, other)) => {
                    return Err(src.error(c, format!("history.content: {other:?} is not one of \"none\", \"truncated\", \"full\"")))
                }
            },
            retention,
            events_retention: match &h.events_retention {
                None => retention,
                Some(v) => nonzero(&src, "history.events_retention", v)?,
            },
            samples_retention: match &h.samples_retention {
                None => Duration::from_secs(7 * 86400),
                Some(v) => nonzero(&src, "history.samples_retention", v)?,
            },
            queue: match &h.queue {
                None => 16384,
                Some(v) => usize::try_from(*v.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| src.error(v, "history.queue: must be 1 or more"))?,
            },
            batch_window: match &h.batch_window {
                None => Duration::from_millis(50),
                Some(v) => src.duration("history.batch_window", v)?,
            },
        };

        let model_log_lines = match &raw.logging.model_log_lines {
            None => DEFAULT_MODEL_LOG_LINES,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n <= MAX_MODEL_LOG_LINES)
                .ok_or_else(|| {
                    src.error(
                        v,
                        format!("logging.model_log_lines: must be between 0 (keep none) and {MAX_MODEL_LOG_LINES}"),
                    )
                })?,
        };

        let llama_server = PathBuf::from(raw.llama_server.as_deref().unwrap_or("llama-server"));
        let mut models = Vec::with_capacity(raw.models.len());
        // name or alias -> the model that owns it, for duplicate detection.
        let mut names: HashMap<String, String> = HashMap::new();
        for (name, model) in &raw.models {
            let config = validate_model(&src, name, model, &llama_server, &scheduler)?;
            if let Some(owner) = names.insert(name.get_ref().clone(), name.get_ref().clone()) {
                return Err(src.error(
                    name,
                    format!("models.{}: name already used by {owner}", name.get_ref()),
                ));
            }
            for alias in &model.get_ref().aliases {
                if let Some(owner) = names.insert(alias.get_ref().clone(), name.get_ref().clone()) {
                    return Err(src.error(
                        alias,
                        format!(
                            "models.{}.aliases: {:?} is already a name or alias of models.{owner}",
                            name.get_ref(),
                            alias.get_ref()
                        ),
                    ));
                }
            }
            models.push(config);
        }

        let auth = validate_auth(&src, &raw.auth, &listen, &models)?;
        let dashboard = validate_dashboard(&src, &raw.dashboard)?;
        let gpu = validate_gpu(&src, &raw.gpu)?;

        Ok(Config {
            source: path.to_path_buf(),
            listen,
            socket_mode,
            llama_server,
            state_dir,
            log_format,
            log_level,
            http,
            scheduler,
            history,
            model_log_lines,
            auth,
            dashboard,
            gpu,
            models,
            runtime_dir: None,
        })
    }

    /// Listener settings that only a restart can change, for reload.
    pub fn listeners_differ(&self, other: &Config) -> bool {
        self.listen != other.listen || self.socket_mode != other.socket_mode
    }

    /// The number of runtime threads to start with.
    pub fn worker_threads(&self) -> usize {
        self.http
            .worker_threads
            .unwrap_or_else(default_worker_threads)
    }

    /// The connection cap under an fd limit of `nofile`.
    pub fn max_open_connections(&self, nofile: u64) -> usize {
        self.http
            .max_open_connections
            .unwrap_or_else(|| default_max_open_connections(nofile, self))
    }

    /// Resolves a model name or alias.
    pub fn model(&self, name_or_alias: &str) -> Option<&ModelConfig> {
        self.models
            .iter()
            .find(|m| m.name == name_or_alias || m.aliases.iter().any(|a| a == name_or_alias))
    }

    /// Checks what only the running system can tell: model files exist.
    /// Used by `check-config --strict`.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for model in &self.models {
            if let Some(path) = &model.model_path {
                if !path.is_file() {
                    return Err(ConfigError::Unpositioned {
                        path: self.source.clone(),
                        message: format!(
                            "models.{}.model: {} does not exist or is not a file",
                            model.name,
                            path.display()
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What a principal may do. `Admin` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The model routes (`/v1/*`, later Ollama's).
    Inference,
    /// History, stats, ps, metrics.
    Read,
    /// Stop, backup, the raw `/upstream/` pass-through.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Inference, Scope::Read, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// `[auth.keys.NAME]`: one API key, by the SHA-256 of its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    /// As configured; `admin` also grants `read` (see [`KeyConfig::allows`]).
    pub scopes: Vec<Scope>,
    /// Canonical names of the models it may use; `None`: all.
    pub models: Option<Vec<String>>,
    /// Requests per minute (a token bucket of that size); `None`: unlimited.
    pub rate_per_minute: Option<u32>,
    /// Unix milliseconds after which it is refused.
    pub expires_at_ms: Option<i64>,
    /// Added to the priority of its requests while they wait for a model:
    /// higher is served first and may swap a busy model out before the
    /// fairness bound.
    pub priority: i32,
}

impl KeyConfig {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
            || (scope == Scope::Read && self.scopes.contains(&Scope::Admin))
    }

    /// Whether it may use the model of this canonical name.
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == model))
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// A listener beyond loopback without any key is meant (else a config
    /// error).
    pub open: bool,
    /// `/metrics` without a key (Prometheus scrapers often have none).
    pub metrics_public: bool,
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    open: Option<bool>,
    metrics_public: Option<bool>,
    #[serde(default)]
    keys: BTreeMap<Spanned<String>, Spanned<RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    hash: Spanned<String>,
    scopes: Spanned<Vec<Spanned<String>>>,
    models: Option<Vec<Spanned<String>>>,
    rate: Option<Spanned<i64>>,
    expires: Option<Spanned<String>>,
    priority: Option<Spanned<i64>>,
}

/// The `hash` of a key: `sha256:` and 64 hex digits.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An expiry: an RFC 3339 time, or a date (midnight UTC).
fn parse_expiry(text: &str) -> Option<i64> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

fn validate_auth(
    src: &Source<'_>,
    raw: &RawAuth,
    listen: &[ListenAddr],
    models: &[ModelConfig],
) -> Result<AuthConfig, ConfigError> {
    let mut keys: Vec<KeyConfig> = Vec::with_capacity(raw.keys.len());
    for (name, key) in &raw.keys {
        let k = key.get_ref();
        let at = |what: &str| format!("auth.keys.{}.{what}", name.get_ref());
        let sha256 = parse_key_hash(k.hash.get_ref()).ok_or_else(|| {
            src.error(
                &k.hash,
                format!(
                    "{}: must be \"sha256:\" and 64 hex digits (claracore key new prints it)",
                    at("hash")
                ),
            )
        })?;
        if let Some(other) = keys.iter().find(|o| o.sha256 == sha256) {
            return Err(src.error(
                &k.hash,
                format!("{}: the same key as auth.keys.{}", at("hash"), other.name),
            ));
        }
        let mut scopes = Vec::new();
        for s in k.scopes.get_ref() {
            let scope = Scope::parse(s.get_ref()).ok_or_else(|| {
                src.error(
                    s,
                    format!(
                        "{}: {:?} is not one of inference, read, admin",
                        at("scopes"),
                        s.get_ref()
                    ),
                )
            })?;
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        if scopes.is_empty() {
            return Err(src.error(
                &k.scopes,
                format!("{}: give at least one scope", at("scopes")),
            ));
        }
        let allowed = match &k.models {
            None => None,
            Some(list) => {
                let mut names = Vec::with_capacity(list.len());
                for m in list {
                    let Some(found) = models
                        .iter()
                        .find(|c| &c.name == m.get_ref() || c.aliases.contains(m.get_ref()))
                    else {
                        return Err(src.error(
                            m,
                            format!(
                                "{}: no model or alias {:?} is configured",
                                at("models"),
                                m.get_ref()
                            ),
                        ));
                    };
                    names.push(found.name.clone());
                }
                Some(names)
            }
        };
        let rate_per_minute = match &k.rate {
            None => None,
            Some(r) => Some(
                u32::try_from(*r.get_ref())
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        src.error(r, format!("{}: requests per minute, 1 or more", at("rate")))
                    })?,
            ),
        };
        let expires_at_ms = match &k.expires {
            None => None,
            Some(e) => Some(parse_expiry(e.get_ref()).ok_or_else(|| {
                src.error(
                    e,
                    format!(
                        "{}: {:?} is not a date (2027-01-31) or an RFC 3339 time",
                        at("expires"),
                        e.get_ref()
                    ),
                )
            })?),
        };
        let priority = priority(src, &at("priority"), k.priority.as_ref())?;
        keys.push(KeyConfig {
            name: name.get_ref().clone(),
            sha256,
            scopes,
            models: allowed,
            rate_per_minute,
            expires_at_ms,
            priority,
        });
    }
    let open = raw.open.unwrap_or(false);
    if keys.is_empty() && !open {
        if let Some(exposed) = listen.iter().find(|l| !l.is_loopback()) {
            return Err(ConfigError::Unpositioned {
                path: src.path.to_path_buf(),
                message: format!(
                    "listen: {exposed} is reachable beyond this machine and no API key is configured; add an [auth.keys.NAME] (claracore key new) or set auth.open = true if every client on the network may run inference"
                ),
            });
        }
    }
    Ok(AuthConfig {
        open,
        metrics_public: raw.metrics_public.unwrap_or(false),
        keys,
    })
}

/// `[dashboard]`: the web UI's login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardConfig {
    /// The argon2id PHC string a password login is checked against (from
    /// `password_hash` or the file `password_hash_file` names); `None`: no
    /// password login.
    pub password_hash: Option<String>,
    /// How long a session lasts after its login.
    pub session_lifetime: Duration,
    /// Peers whose `X-Forwarded-Proto` is believed (a TLS-terminating
    /// reverse proxy), for the cookie's `Secure` flag.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            password_hash: None,
            session_lifetime: DEFAULT_SESSION_LIFETIME,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Default of `dashboard.session_lifetime`.
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// What a leading `$CREDENTIALS_DIRECTORY/` in `password_hash_file` stands
/// for: systemd's `LoadCredential=` directory of the service.
const CREDENTIALS_VAR: &str = "$CREDENTIALS_DIRECTORY/";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDashboard {
    password_hash: Option<Spanned<String>>,
    password_hash_file: Option<Spanned<String>>,
    session_lifetime: Option<Spanned<String>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
}

/// Checks that `text` is an argon2id PHC string; the message says what is
/// wrong with it.
pub fn check_password_hash(text: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(text).map_err(|e| {
        format!("not a PHC string like \"$argon2id$v=19$m=19456,t=2,p=1$…\" ({e}); `claracore dashboard hash-password` prints one")
    })?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "the hash is {}, not argon2id; `claracore dashboard hash-password` prints an argon2id one",
            parsed.algorithm
        ));
    }
    argon2::Params::try_from(&parsed)
        .map_err(|e| format!("argon2id parameters are invalid ({e})"))?;
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the PHC string has no salt or no hash".into());
    }
    Ok(())
}

fn validate_dashboard(
    src: &Source<'_>,
    raw: &RawDashboard,
) -> Result<DashboardConfig, ConfigError> {
    let password_hash =
        match (&raw.password_hash, &raw.password_hash_file) {
            (Some(_), Some(file)) => return Err(src.error(
                file,
                "dashboard.password_hash_file: give password_hash or password_hash_file, not both",
            )),
            (Some(h), None) => {
                let text = h.get_ref().trim();
                check_password_hash(text)
                    .map_err(|e| src.error(h, format!("dashboard.password_hash: {e}")))?;
                Some(text.to_string())
            }
            (None, Some(file)) if !src.read_runtime_files => {
                if file.get_ref().trim().is_empty() {
                    return Err(src.error(file, "dashboard.password_hash_file: must not be empty"));
                }
                None
            }
            (None, Some(file)) => {
                let path = credential_path(file.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    src.error(
                        file,
                        format!(
                            "dashboard.password_hash_file: cannot read {}: {e}",
                            path.display()
                        ),
                    )
                })?;
                let text = text.trim();
                check_password_hash(text).map_err(|e| {
                    src.error(
                        file,
                        format!("dashboard.password_hash_file: {}: {e}", path.display()),
                    )
                })?;
                Some(text.to_string())
            }
            (None, None) => None,
        };
    let session_lifetime = match &raw.session_lifetime {
        None => DEFAULT_SESSION_LIFETIME,
        Some(v) => nonzero(src, "dashboard.session_lifetime", v)?,
    };
    let mut trusted_proxies = Vec::with_capacity(raw.trusted_proxies.len());
    for p in &raw.trusted_proxies {
        let ip = p.get_ref().trim().parse().map_err(|_| {
            src.error(
                p,
                format!(
                    "dashboard.trusted_proxies: {:?} is not an IP address",
                    p.get_ref()
                ),
            )
        })?;
        trusted_proxies.push(ip);
    }
    Ok(DashboardConfig {
        password_hash,
        session_lifetime,
        trusted_proxies,
    })
}

/// A `password_hash_file` path: a leading `$CREDENTIALS_DIRECTORY/` is the
/// directory systemd's `LoadCredential=` fills (read here, once per load,
/// since only this key uses it); anything else as written.
fn credential_path(text: &str) -> PathBuf {
    match text.strip_prefix(CREDENTIALS_VAR) {
        Some(rest) => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join(rest),
            None => PathBuf::from(text),
        },
        None => PathBuf::from(text),
    }
}

/// The child environment variable that names the GPUs it may use;
/// claracore sets it from the placement unless the model's `env` does.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// A `priority` key: an integer in [`PRIORITY_RANGE`], 0 when absent.
fn priority(src: &Source<'_>, key: &str, v: Option<&Spanned<i64>>) -> Result<i32, ConfigError> {
    let Some(v) = v else { return Ok(0) };
    i32::try_from(*v.get_ref())
        .ok()
        .filter(|p| PRIORITY_RANGE.contains(&i64::from(*p)))
        .ok_or_else(|| {
            src.error(
                v,
                format!(
                    "{key}: must be between {} and {}",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ),
            )
        })
}

fn validate_gpu(src: &Source<'_>, raw: &RawGpu) -> Result<GpuConfig, ConfigError> {
    let sample_interval = match &raw.sample_interval {
        None => Duration::from_secs(2),
        Some(v) => {
            let d = src.duration("gpu.sample_interval", v)?;
            if !(MIN_GPU_SAMPLE_INTERVAL..=MAX_GPU_SAMPLE_INTERVAL).contains(&d) {
                return Err(src.error(v, "gpu.sample_interval: must be between 100ms and 1h"));
            }
            d
        }
    };
    let nvml_library = match &raw.nvml_library {
        None => None,
        Some(v) => {
            let path = PathBuf::from(v.get_ref());
            if !path.is_absolute() {
                return Err(src.error(
                    v,
                    format!(
                        "gpu.nvml_library: {:?} must be an absolute path (leave it out to let the dynamic loader find libnvidia-ml.so.1)",
                        v.get_ref()
                    ),
                ));
            }
            Some(path)
        }
    };
    Ok(GpuConfig {
        enabled: raw.enabled.unwrap_or(true),
        sample_interval,
        nvml_library,
    })
}

fn nonzero(src: &Source<'_>, key: &str, v: &Spanned<String>) -> Result<Duration, ConfigError> {
    let d = src.duration(key, v)?;
    if d.is_zero() {
        return Err(src.error(v, format!("{key}: must be greater than 0")));
    }
    Ok(d)
}

fn validate_model(
    src: &Source<'_>,
    name: &Spanned<String>,
    model: &Spanned<RawModel>,
    llama_server: &Path,
    scheduler: &SchedulerConfig,
) -> Result<ModelConfig, ConfigError> {
    let key = format!("models.{}", name.get_ref());
    let raw = model.get_ref();
    let valid_name = !name.get_ref().is_empty()
        && name
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if !valid_name {
        return Err(src.error(
            name,
            format!("{key}: model names may contain only letters, digits, '-', '_', '.' and ':'"),
        ));
    }
    let max_connections = match &raw.max_connections {
        None => None,
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n @ 1..=1024) => Some(n),
            _ => {
                return Err(src.error(
                    v,
                    format!("{key}.max_connections: must be between 1 and 1024"),
                ))
            }
        },
    };
    let (argv, model_path, max_connections) = match (&raw.model, &raw.cmd) {
        (Some(_), Some(_)) => {
            return Err(src.error(
                name,
                format!("{key}: give either `model` or `cmd`, not both"),
            ))
        }
        (None, None) => {
            return Err(src.error(
                name,
                format!("{key}: needs `model` (a GGUF path) or `cmd` (a full argv)"),
            ))
        }
        (Some(path), None) => {
            if path.is_empty() {
                return Err(src.error(name, format!("{key}.model: must not be empty")));
            }
            let args = raw.args.clone().unwrap_or_default();
            let limit = max_connections.unwrap_or_else(|| {
                parallel_arg(&args).map_or(DEFAULT_MAX_CONNECTIONS, |np| {
                    DEFAULT_MAX_CONNECTIONS.max(np.saturating_add(4))
                })
            });
            // Before the user's arguments, so an explicit --threads-http wins.
            let mut argv = vec![
                llama_server.display().to_string(),
                "-m".into(),
                path.clone(),
                // A unix socket in the daemon's 0700 runtime directory:
                // no other local user can reach the child, and no port
                // can clash.
                "--host".into(),
                SOCKET_PLACEHOLDER.into(),
                "--port".into(),
                UNIX_LLAMA_PORT.into(),
                "--threads-http".into(),
                llama_http_threads(limit).to_string(),
            ];
            // Without an alias llama-server names its GGUF path in every
            // response's `model`; with the configured name, clients see
            // the name they asked for. llama-server takes every `--alias`
            // it is given as one more alias (a set), so a user's own is
            // not merely appended after ours: ours is left out.
            if !alias_arg(&args) {
                argv.extend(["--alias".into(), name.get_ref().clone()]);
            }
            argv.extend(args);
            (argv, Some(PathBuf::from(path)), Some(limit))
        }
        (None, Some(cmd)) => {
            if raw.args.is_some() {
                return Err(src.error(
                    name,
                    format!("{key}: `args` goes with `model`; put arguments in `cmd`"),
                ));
            }
            if cmd.is_empty() || cmd[0].is_empty() {
                return Err(src.error(name, format!("{key}.cmd: must name a program")));
            }
            if !cmd
                .iter()
                .any(|a| a.contains(PORT_PLACEHOLDER) || a.contains(SOCKET_PLACEHOLDER))
            {
                return Err(src.error(
                    name,
                    format!("{key}.cmd: must contain {SOCKET_PLACEHOLDER} (a unix socket path, preferred) or {PORT_PLACEHOLDER} (a loopback port) so the child listens where claracore expects"),
                ));
            }
            (cmd.clone(), None, max_connections)
        }
    };
    let ttl = match &raw.ttl {
        None => scheduler.idle_ttl,
        Some(v) => src.optional_duration(&format!("{key}.ttl"), v)?,
    };
    let health = match &raw.health {
        None => "/health".to_string(),
        Some(h) if h.get_ref().starts_with('/') => h.get_ref().clone(),
        Some(h) => {
            return Err(src.error(h, format!("{key}.health: must be a path starting with '/'")))
        }
    };
    for alias in &raw.aliases {
        if alias.get_ref().is_empty() {
            return Err(src.error(alias, format!("{key}.aliases: an alias must not be empty")));
        }
    }
    let vram_bytes = match &raw.vram_mb {
        None => None,
        Some(v) => Some(
            u64::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=MAX_VRAM_MB).contains(n))
                .map(|n| n * MIB)
                .ok_or_else(|| {
                    src.error(
                        v,
                        format!("{key}.vram_mb: must be between 1 and {MAX_VRAM_MB}"),
                    )
                })?,
        ),
    };
    let gpus = match &raw.gpus {
        None => None,
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(src.error(
                    list,
                    format!("{key}.gpus: name at least one GPU index, or leave `gpus` out for any"),
                ));
            }
            let mut gpus: Vec<u32> = Vec::new();
            for g in list.get_ref() {
                let index = u32::try_from(*g.get_ref())
                    .ok()
                    .filter(|i| i64::from(*i) <= MAX_GPU_INDEX)
                    .ok_or_else(|| {
                        src.error(
                            g,
                            format!(
                                "{key}.gpus: {} is not a GPU index (0 to {MAX_GPU_INDEX})",
                                g.get_ref()
                            ),
                        )
                    })?;
                if gpus.contains(&index) {
                    return Err(src.error(g, format!("{key}.gpus: GPU {index} is listed twice")));
                }
                gpus.push(index);
            }
            if raw.env.contains_key(CUDA_VISIBLE_DEVICES) {
                return Err(src.error(
                    list,
                    format!("{key}: give either `gpus` or env {CUDA_VISIBLE_DEVICES}, not both"),
                ));
            }
            Some(gpus)
        }
    };
    let priority = priority(src, &format!("{key}.priority"), raw.priority.as_ref())?;
    Ok(ModelConfig {
        name: name.get_ref().clone(),
        argv,
        model_path,
        aliases: raw.aliases.iter().map(|a| a.get_ref().clone()).collect(),
        ttl,
        group: raw.group.clone(),
        preload: raw.preload,
        pin: raw.pin,
        health,
        max_connections,
        vram_bytes,
        gpus,
        priority,
        env: raw
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn queue_priority_and_gpu_keys_have_defaults_and_bounds() {
        let cfg = parse("[models.a]\nmodel = \"/a\"\n").unwrap();
        assert_eq!(cfg.scheduler.max_queue, DEFAULT_MAX_QUEUE);
        assert_eq!(
            cfg.scheduler.max_wait_before_swap,
            DEFAULT_MAX_WAIT_BEFORE_SWAP
        );
        assert_eq!(
            cfg.scheduler.vram_reserve_bytes,
            DEFAULT_VRAM_RESERVE_MB * MIB
        );
        let a = cfg.model("a").unwrap();
        assert_eq!((a.vram_bytes, &a.gpus, a.priority), (None, &None, 0));

        let cfg = parse(
            "[scheduler]\nmax_queue = 10\nmax_wait_before_swap = \"0s\"\nvram_reserve_mb = 0\n\
             [models.a]\nmodel = \"/a\"\nvram_mb = 6000\ngpus = [1, 0]\npriority = -5\n\
             [auth.keys.k]\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\"\n\
             scopes = [\"inference\"]\npriority = 100\n",
        )
        .unwrap();
        assert_eq!(cfg.scheduler.max_queue, 10);
        assert_eq!(cfg.scheduler.max_wait_before_swap, Duration::ZERO);
        assert_eq!(cfg.scheduler.vram_reserve_bytes, 0);
        let a = cfg.model("a").unwrap();
        assert_eq!(a.vram_bytes, Some(6000 * MIB));
        assert_eq!(a.gpus, Some(vec![1, 0]));
        assert_eq!(a.priority, -5);
        assert_eq!(cfg.auth.keys[0].priority, 100);

        for (text, says) in [
            (
                "[scheduler]\nmax_queue = 0\n",
                "2:13: scheduler.max_queue: must be between 1 and 1000000",
            ),
            (
                "[scheduler]\nvram_reserve_mb = -1\n",
                "2:19: scheduler.vram_reserve_mb: must be between 0 and",
            ),
            (
                "[scheduler]\nmax_wait_before_swap = \"soon\"\n",
                "scheduler.max_wait_before_swap",
            ),
            (
                "[models.a]\nmodel = \"/a\"\nvram_mb = 0\n",
                "3:11: models.a.vram_mb: must be between 1 and",
            ),
            (
                "[models.a]\nmodel = \"/a\"\ngpus = []\n",
                "3:8: models.a.gpus: name at least one GPU index",
            ),
            (
                "[models.a]\nmodel = \"/a\"\ngpus = [0, 64]\n",
                "3:12: models.a.gpus: 64 is not a GPU index (0 to 63)",
            ),
            (
                "[models.a]\nmodel = \"/a\"\ngpus = [1, 1]\n",
                "models.a.gpus: GPU 1 is listed twice",
            ),
            (
                "[models.a]\nmodel = \"/a\"\ngpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }\n",
                "models.a: give either `gpus` or env CUDA_VISIBLE_DEVICES, not both",
            ),
            (
                "[models.a]\nmodel = \"/a\"\npriority = 1001\n",
                "3:12: models.a.priority: must be between -1000 and 1000",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn issue_example_shape_parses() {
        let cfg = parse(
            r#"
listen = ["127.0.0.1:5800", "unix:/run/claracore/claracore.sock"]
llama_server = "llama-server"
state_dir = "/var/lib/claracore"

[scheduler]
max_loaded = 1
idle_ttl = "10m"
start_timeout = "5m"
stop_grace = "10s"
shutdown_timeout = "30s"

[models.tiny]
model = "/models/tiny.gguf"
args = ["-c", "512"]
aliases = ["tiny-chat"]
ttl = "5m"
group = "small"

[models.custom]
cmd = ["/opt/bin/server", "--port", "{port}"]
health = "/health"
"#,
        )
        .unwrap();
        assert_eq!(cfg.listen.len(), 2);
        assert_eq!(
            cfg.listen[1],
            ListenAddr::Unix("/run/claracore/claracore.sock".into())
        );
        let tiny = cfg.model("tiny-chat").unwrap();
        assert_eq!(tiny.name, "tiny");
        assert_eq!(tiny.ttl, Some(Duration::from_secs(300)));
        assert!(
            tiny.uses_socket(),
            "llama-server children listen on a unix socket"
        );
        assert_eq!(
            tiny.command(4242, Path::new("/run/cc/models.x/tiny-1.sock")),
            [
                "llama-server",
                "-m",
                "/models/tiny.gguf",
                "--host",
                "/run/cc/models.x/tiny-1.sock",
                "--port",
                "8080",
                "--threads-http",
                "34",
                "--alias",
                "tiny",
                "-c",
                "512"
            ]
        );
        let custom = cfg.model("custom").unwrap();
        assert!(!custom.uses_socket(), "only {{port}}: loopback TCP");
        assert_eq!(
            custom.command(7, Path::new("/unused.sock")),
            ["/opt/bin/server", "--port", "7"]
        );
        assert_eq!(
            custom.ttl,
            Some(Duration::from_secs(600)),
            "inherits idle_ttl"
        );
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let cfg = parse("").unwrap();
        assert_eq!(
            cfg.listen,
            [ListenAddr::Tcp("127.0.0.1:5800".parse().unwrap())]
        );
        assert_eq!(cfg.socket_mode, 0o660);
        assert_eq!(cfg.scheduler.max_loaded, 1);
        assert_eq!(cfg.http.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(cfg.http.body_memory_bytes, 256 * 1024 * 1024);
        assert_eq!(cfg.http.body_read_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_body_budget_must_hold_the_largest_body() {
        let cfg = parse(
            "[http]\nmax_body_bytes = 1000\nbody_memory_bytes = 5000\nbody_read_timeout = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(cfg.http.body_memory_bytes, 5000);
        assert_eq!(cfg.http.body_read_timeout, Duration::from_secs(5));
        let big = parse("[http]\nmax_body_bytes = 300000000\n").unwrap();
        assert_eq!(
            big.http.body_memory_bytes, 300_000_000,
            "raised to the largest body"
        );
        let e = err("[http]\nmax_body_bytes = 1000\nbody_memory_bytes = 999\n");
        assert!(
            e.starts_with("test.toml:3:21: http.body_memory_bytes: must be at least"),
            "{e}"
        );
        let e = err("[http]\nbody_read_timeout = \"0\"\n");
        assert!(
            e.contains("http.body_read_timeout: must be greater than 0"),
            "{e}"
        );
        let e = err("[http]\nmax_body_bytes = 5000000000\n");
        assert!(e.contains("at most 4294967295"), "{e}");
    }

    /// A real argon2id PHC string (of "pw"), as `claracore dashboard
    /// hash-password` prints.
    const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$1sGHDcE6HaFBFQe6mgoYJA$8ApO4nFsT8+C+d1YBN1syU6JPL0sdqmNaN71jRnHvGU";

    #[test]
    fn the_dashboard_table_reads_a_hash_or_a_credential_file_and_says_what_is_wrong() {
        let c = parse("").unwrap();
        assert_eq!(c.dashboard, DashboardConfig::default());
        assert_eq!(c.dashboard.session_lifetime, Duration::from_secs(86400));
        let c = parse(&format!(
            "[dashboard]\npassword_hash = \"{PHC}\"\nsession_lifetime = \"8h\"\ntrusted_proxies = [\"10.0.0.1\", \"::1\"]\n"
        ))
        .unwrap();
        assert_eq!(c.dashboard.password_hash.as_deref(), Some(PHC));
        assert_eq!(c.dashboard.session_lifetime, Duration::from_secs(8 * 3600));
        assert_eq!(c.dashboard.trusted_proxies.len(), 2);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dashboard-password");
        std::fs::write(&file, format!("{PHC}\n")).unwrap();
        let c = parse(&format!(
            "[dashboard]\npassword_hash_file = {:?}\n",
            file.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.dashboard.password_hash.as_deref(), Some(PHC), "trimmed");

        for (text, want) in [
            ("[dashboard]\npassword_hash = \"hunter2\"", "test.toml:2:17: dashboard.password_hash: not a PHC string"),
            ("[dashboard]\npassword_hash = \"$argon2i$v=19$m=19456,t=2,p=1$1sGHDcE6HaFBFQe6mgoYJA$8ApO4nFsT8+C+d1YBN1syU6JPL0sdqmNaN71jRnHvGU\"", "is argon2i, not argon2id"),
            ("[dashboard]\npassword_hash_file = \"/nonexistent/pw\"", "test.toml:2:22: dashboard.password_hash_file: cannot read /nonexistent/pw"),
            ("[dashboard]\npassword_hash = \"x\"\npassword_hash_file = \"/y\"", "not both"),
            ("[dashboard]\nsession_lifetime = \"0\"", "dashboard.session_lifetime: must be greater than 0"),
            ("[dashboard]\nsession_lifetime = \"soon\"", "dashboard.session_lifetime"),
            ("[dashboard]\ntrusted_proxies = [\"proxy.lan\"]", "test.toml:2:20: dashboard.trusted_proxies: \"proxy.lan\" is not an IP address"),
            ("[dashboard]\npasword_hash = \"x\"", "unknown field `pasword_hash`"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let e = err("listen = []\n\n[scheduler]\nmax_loadd = 2\n");
        assert!(e.starts_with("test.toml:4:1: "), "{e}");
        assert!(e.contains("max_loadd"), "{e}");
    }

    #[test]
    fn model_with_both_or_neither_is_rejected() {
        let e = err("[models.a]\nmodel = \"/m.gguf\"\ncmd = [\"x\", \"{port}\"]\n");
        assert!(e.contains("models.a: give either `model` or `cmd`"), "{e}");
        assert!(e.starts_with("test.toml:1:"), "{e}");
        let e = err("[models.b]\nttl = \"1m\"\n");
        assert!(e.contains("models.b: needs `model`"), "{e}");
    }

    #[test]
    fn duplicate_alias_is_rejected_with_its_position() {
        let e = err(
            "[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\naliases = [\"x\", \"a\"]\n",
        );
        assert!(e.starts_with("test.toml:5:17: "), "{e}");
        assert!(e.contains("already a name or alias of models.a"), "{e}");
    }

    #[test]
    fn model_log_lines_defaults_validates_and_zero_keeps_none() {
        let c = Config::from_toml(Path::new("test.toml"), "").unwrap();
        assert_eq!(c.model_log_lines, DEFAULT_MODEL_LOG_LINES);
        let c =
            Config::from_toml(Path::new("test.toml"), "[logging]\nmodel_log_lines = 0\n").unwrap();
        assert_eq!(c.model_log_lines, 0);
        let e = err("[logging]\nmodel_log_lines = -1\n");
        assert!(
            e.starts_with("test.toml:2:19: logging.model_log_lines: must be between 0"),
            "{e}"
        );
        let e = err("[logging]\nmodel_log_lines = 99999999\n");
        assert!(e.contains("logging.model_log_lines"), "{e}");
        let e = err("[logging]\nlines = 5\n");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_positioned() {
        let e = err("listen = [\"127.0.0.1:5800\", \"localhost\"]\n");
        assert!(e.starts_with("test.toml:1:29: listen: "), "{e}");
        let e = err("listen = [\"unix:relative.sock\"]\n");
        assert!(e.contains("must be absolute"), "{e}");
    }

    #[test]
    fn bad_duration_and_limits_are_positioned() {
        let e = err("[scheduler]\nidle_ttl = \"ten minutes\"\n");
        assert!(e.starts_with("test.toml:2:12: scheduler.idle_ttl: "), "{e}");
        let e = err("[scheduler]\nmax_loaded = 0\n");
        assert!(e.contains("scheduler.max_loaded: must be 1 or more"), "{e}");
        let e = err("socket_mode = \"0999\"\n");
        assert!(e.contains("socket_mode"), "{e}");
        let e = err("log_format = \"xml\"\n");
        assert!(e.starts_with("test.toml:1:14: log_format"), "{e}");
        let e = err("[http]\nworker_threads = 0\n");
        assert!(
            e.starts_with("test.toml:2:18: http.worker_threads: must be between 1 and 256"),
            "{e}"
        );
    }

    #[test]
    fn gpu_table_defaults_bounds_and_positioned_errors() {
        let cfg = parse("").unwrap();
        assert_eq!(
            cfg.gpu,
            GpuConfig {
                enabled: true,
                sample_interval: Duration::from_secs(2),
                nvml_library: None,
            }
        );
        let cfg = parse(
            "[gpu]\nenabled = false\nsample_interval = \"100ms\"\nnvml_library = \"/opt/nvml/libnvidia-ml.so.1\"\n",
        )
        .unwrap();
        assert!(!cfg.gpu.enabled);
        assert_eq!(cfg.gpu.sample_interval, Duration::from_millis(100));
        assert_eq!(
            cfg.gpu.nvml_library.as_deref(),
            Some(Path::new("/opt/nvml/libnvidia-ml.so.1"))
        );
        assert_eq!(
            parse("[gpu]\nsample_interval = \"1h\"\n")
                .unwrap()
                .gpu
                .sample_interval,
            Duration::from_secs(3600)
        );
        for bad in ["99ms", "0", "1h 1s"] {
            let e = err(&format!("[gpu]\nsample_interval = \"{bad}\"\n"));
            assert!(
                e.starts_with("test.toml:2:19: gpu.sample_interval: must be between 100ms and 1h"),
                "{bad}: {e}"
            );
        }
        let e = err("[gpu]\nsample_interval = \"often\"\n");
        assert!(
            e.starts_with("test.toml:2:19: gpu.sample_interval: "),
            "{e}"
        );
        let e = err("[gpu]\nnvml_library = \"libnvidia-ml.so.1\"\n");
        assert!(
            e.starts_with(
                "test.toml:2:16: gpu.nvml_library: \"libnvidia-ml.so.1\" must be an absolute path"
            ),
            "{e}"
        );
        let e = err("[gpu]\nenabled = \"yes\"\n");
        assert!(e.starts_with("test.toml:2:11: "), "{e}");
        let e = err("[gpu]\nindex = 0\n");
        assert!(
            e.starts_with("test.toml:2:1: ") && e.contains("index"),
            "{e}"
        );
    }

    #[test]
    fn llama_models_are_named_by_alias_unless_their_args_name_one() {
        let cfg = parse(
            "[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\nargs = [\"-a\", \"mine\"]\n\
             [models.c]\nmodel = \"/c\"\nargs = [\"--alias=x,y\"]\n\
             [models.d]\ncmd = [\"x\", \"{port}\"]\n",
        )
        .unwrap();
        let aliases = |n: &str| {
            let argv = &cfg.model(n).unwrap().argv;
            argv.iter()
                .enumerate()
                .filter(|(_, a)| *a == "-a" || a.starts_with("--alias"))
                .map(|(i, a)| match a.as_str() {
                    "-a" | "--alias" => format!("{a} {}", argv[i + 1]),
                    _ => a.clone(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(aliases("a"), ["--alias a"]);
        assert_eq!(aliases("b"), ["-a mine"], "the user's own wins");
        assert_eq!(aliases("c"), ["--alias=x,y"]);
        assert!(aliases("d").is_empty(), "cmd argv is the user's alone");
    }

    #[test]
    fn llama_models_get_a_connection_limit_and_enough_http_threads() {
        let cfg = parse(
            "[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\nargs = [\"-np\", \"30\"]\n\
             [models.c]\nmodel = \"/c\"\nmax_connections = 3\n\
             [models.d]\ncmd = [\"x\", \"{port}\"]\n[models.e]\ncmd = [\"x\", \"{port}\"]\nmax_connections = 5\n",
        )
        .unwrap();
        let limit = |n: &str| cfg.model(n).unwrap().max_connections;
        let threads = |n: &str| {
            let argv = &cfg.model(n).unwrap().argv;
            let at = argv.iter().position(|a| a == "--threads-http").unwrap();
            argv[at + 1].clone()
        };
        assert_eq!((limit("a"), threads("a")), (Some(16), "34".to_string()));
        assert_eq!(
            (limit("b"), threads("b")),
            (Some(34), "70".to_string()),
            "--parallel 30 + 4"
        );
        assert_eq!((limit("c"), threads("c")), (Some(3), "8".to_string()));
        assert_eq!(limit("d"), None, "cmd models are not limited by default");
        assert_eq!(limit("e"), Some(5));
        assert_eq!(parallel_arg(&["--parallel=6".to_string()]), Some(6));
        let e = err("[models.a]\nmodel = \"/a\"\nmax_connections = 0\n");
        assert!(
            e.starts_with("test.toml:3:19: models.a.max_connections: must be between 1 and 1024"),
            "{e}"
        );
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus_up_to_four() {
        let cfg = parse("[http]\nworker_threads = 3\n").unwrap();
        assert_eq!(cfg.worker_threads(), 3);
        let cfg = parse("").unwrap();
        assert_eq!(cfg.http.worker_threads, None);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(cfg.worker_threads(), (cpus / 2).clamp(1, 4));
        assert!((1..=4).contains(&cfg.worker_threads()));
    }

    #[test]
    fn max_open_connections_defaults_to_the_fd_limit_less_a_reserve() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.http.max_open_connections, None);
        assert_eq!(cfg.max_open_connections(65536), 65536 - 64);
        assert_eq!(cfg.max_open_connections(256), 192);
        assert_eq!(cfg.max_open_connections(64), 16, "a quarter at least");
        // Only the max_loaded largest pools are reserved: c (16 + 4) and
        // the unlimited cmd model (64 + 4).
        let cfg = parse(
            "[scheduler]\nmax_loaded = 2\n[models.a]\nmodel = \"/a\"\nmax_connections = 2\n\
             [models.c]\nmodel = \"/c\"\n[models.d]\ncmd = [\"x\", \"{port}\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.max_open_connections(1024), 1024 - 64 - 20 - 68);
        let cfg = parse("[http]\nmax_open_connections = 300\n").unwrap();
        assert_eq!(cfg.max_open_connections(256), 300, "explicit wins");
        for bad in ["0", "-1", "1048577"] {
            let e = err(&format!("[http]\nmax_open_connections = {bad}\n"));
            assert!(
                e.starts_with(
                    "test.toml:2:24: http.max_open_connections: must be between 1 and 1048576"
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn history_defaults_and_errors() {
        let cfg = parse("state_dir = \"/srv/cc\"\n").unwrap();
        assert_eq!(cfg.history.path, PathBuf::from("/srv/cc/history.db"));
        assert_eq!(cfg.history.content, ContentPolicy::Truncated);
        assert_eq!(cfg.history.retention, Duration::from_secs(30 * 86400));
        let e = err("[history]\ncontent = \"some\"\n");
        assert!(e.starts_with("test.toml:2:11: history.content"), "{e}");
        let e = err("[history]\nretention = \"0\"\n");
        assert!(
            e.contains("history.retention: must be greater than 0"),
            "{e}"
        );
    }

    #[test]
    fn preload_and_pin_are_booleans_off_by_default() {
        let cfg = parse(
            "[models.a]\nmodel = \"/a\"\npreload = true\npin = true\n[models.b]\nmodel = \"/b\"\n",
        )
        .unwrap();
        let (a, b) = (cfg.model("a").unwrap(), cfg.model("b").unwrap());
        assert!(a.preload && a.pin);
        assert!(!b.preload && !b.pin);
        let e = err("[models.a]\nmodel = \"/a\"\npin = \"yes\"\n");
        assert!(e.starts_with("test.toml:3:7: "), "{e}");
        assert!(e.contains("boolean"), "{e}");
        let e = err("[models.a]\nmodel = \"/a\"\npinned = true\n");
        assert!(
            e.starts_with("test.toml:3:1: ") && e.contains("pinned"),
            "{e}"
        );
    }

    #[test]
    fn ttl_zero_means_never() {
        let cfg = parse("[scheduler]\nidle_ttl = \"0\"\n[models.a]\nmodel = \"/a\"\n").unwrap();
        assert_eq!(cfg.models[0].ttl, None);
    }

    #[test]
    fn cmd_must_carry_the_port_or_socket_placeholder() {
        let e = err("[models.a]\ncmd = [\"/bin/server\", \"--port\", \"8080\"]\n");
        assert!(e.contains("{port}") && e.contains("{socket}"), "{e}");
        let cfg = parse("[models.a]\ncmd = [\"/bin/server\", \"--unix={socket}\"]\n").unwrap();
        assert!(cfg.models[0].uses_socket());
        assert_eq!(
            cfg.models[0].command(1, Path::new("/d/a-3.sock")),
            ["/bin/server", "--unix=/d/a-3.sock"]
        );
    }
}
