//! Configuration: the TOML file's raw shape, its validation, and the typed
//! [`Config`] the rest of the daemon reads.
//!
//! Two stages: serde reads the file into `Raw*` structs (`raw.rs`) that
//! reject unknown keys and keep source spans; [`Config::from_toml`] turns
//! those into typed values, one function per section, each in the file of
//! its concern. Every error names the file, line, column and key involved.
//! This file owns the validated [`Config`], the error type, and every
//! default value (the `DEFAULT_*` constants below); bounds live with the
//! section they bound.

mod auth;
mod dashboard;
mod gpu;
mod history;
mod limits;
mod listen;
mod logging;
mod model;
mod raw;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use auth::{parse_key_hash, AuthConfig, KeyConfig, Scope};
pub use dashboard::{check_password_hash, DashboardConfig};
pub use gpu::{GpuConfig, MAX_GPU_SAMPLE_INTERVAL, MIN_GPU_SAMPLE_INTERVAL, NIXOS_NVML_LIBRARY};
pub use history::{ContentPolicy, HistoryConfig};
pub use limits::{
    default_max_open_connections, default_worker_threads, HttpConfig, SchedulerConfig,
    FD_PER_MODEL, FD_PER_UNLIMITED_MODEL, FD_RESERVE, MAX_OPEN_CONNECTIONS_LIMIT, MIB,
};
pub use listen::ListenAddr;
pub use logging::{LogFormat, MAX_MODEL_LOG_LINES};
pub use model::{
    fill_placeholders, found_model, llama_http_threads, uses_socket, ChildAddr, FoundModel,
    ModelConfig, ModelDefaults, ModelSource, CUDA_VISIBLE_DEVICES, PORT_PLACEHOLDER,
    SOCKET_PLACEHOLDER,
};
pub use raw::{parse_duration, PRIORITY_RANGE};

use raw::Source;

// Defaults: the value of each key the file leaves out. Switches not listed
// here are off unless set.

/// Default TCP listener when the file names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5800";
/// Default `socket_mode`.
const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Default `llama_server`: found on `PATH`.
const DEFAULT_LLAMA_SERVER: &str = "llama-server";
/// Default `state_dir`.
const DEFAULT_STATE_DIR: &str = "/var/lib/claracore";
/// Default `log_format`.
const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Auto;
/// Default `log_level`.
const DEFAULT_LOG_LEVEL: &str = "info";

/// Default `http.max_body_bytes`.
const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Default `http.header_read_timeout`.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `http.body_memory_bytes` (raised to `max_body_bytes` if that
/// is larger).
pub const DEFAULT_BODY_MEMORY_BYTES: u64 = 256 * 1024 * 1024;
/// Default `http.body_read_timeout`.
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `scheduler.max_loaded`.
const DEFAULT_MAX_LOADED: usize = 1;
/// Default `scheduler.idle_ttl`.
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// Default `scheduler.start_timeout`.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `scheduler.stop_grace`.
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default `scheduler.shutdown_timeout`.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `scheduler.health_interval`.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Default [`SchedulerConfig::max_queue`].
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default [`SchedulerConfig::max_wait_before_swap`].
pub const DEFAULT_MAX_WAIT_BEFORE_SWAP: Duration = Duration::from_secs(5);
/// Default `scheduler.vram_reserve_mb`.
pub const DEFAULT_VRAM_RESERVE_MB: u64 = 512;

/// Default `history.enabled`.
const DEFAULT_HISTORY_ENABLED: bool = true;
/// The history database in `state_dir` when `history.path` is not set.
const DEFAULT_HISTORY_FILE: &str = "history.db";
/// Default `history.content`.
const DEFAULT_CONTENT_POLICY: ContentPolicy = ContentPolicy::Truncated;
/// Default `history.retention`, and of `history.events_retention` through
/// it.
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86400);
/// Default `history.samples_retention`.
const DEFAULT_SAMPLES_RETENTION: Duration = Duration::from_secs(7 * 86400);
/// Default `history.queue`.
const DEFAULT_HISTORY_QUEUE: usize = 16384;
/// Default `history.batch_window`.
const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(50);

/// `[logging] model_log_lines` when not set: lines of each model's output
/// kept for `/admin/logs/{model}`.
pub const DEFAULT_MODEL_LOG_LINES: usize = 1000;

/// Default [`ModelConfig::max_connections`] of `model` entries, unless
/// their `--parallel` asks for more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// Default `health` of a model.
const DEFAULT_HEALTH_PATH: &str = "/health";

/// Default of `dashboard.session_lifetime`.
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Default `gpu.enabled`.
const DEFAULT_GPU_ENABLED: bool = true;
/// Default `gpu.sample_interval`.
const DEFAULT_GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

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
    /// `models_dir`: folders whose every GGUF is a model.
    pub models_dirs: Vec<PathBuf>,
    /// `ollama_models`: an Ollama store served in place.
    pub ollama_models: Option<PathBuf>,
    /// `[models_defaults]`, for the models those two hold.
    pub models_defaults: ModelDefaults,
    /// The private (0700) directory for the children's unix sockets. Not a
    /// key of the file: the daemon's bootstrap creates the directory and
    /// sets this; `None` (a config only parsed) starts no socket child.
    pub runtime_dir: Option<PathBuf>,
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

    /// One function per section, in the order the first error of a file
    /// with several is reported.
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
        let raw = src.read()?;
        let listen = listen::validate_listen(&src, raw.listen.as_deref())?;
        let socket_mode = listen::validate_socket_mode(&src, raw.socket_mode.as_ref())?;
        let log_level = logging::validate_log_level(&src, raw.log_level.as_ref())?;
        let http = limits::validate_http(&src, &raw.http)?;
        let scheduler = limits::validate_scheduler(&src, &raw.scheduler)?;
        let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
        let history = history::validate_history(&src, &raw.history, &state_dir)?;
        let model_log_lines = logging::validate_model_log_lines(&src, &raw.logging)?;
        let llama_server =
            PathBuf::from(raw.llama_server.as_deref().unwrap_or(DEFAULT_LLAMA_SERVER));
        let models = model::validate_models(&src, &raw.models, &llama_server, &scheduler)?;
        let auth = auth::validate_auth(&src, &raw.auth, &listen, &models)?;
        let dashboard = dashboard::validate_dashboard(&src, &raw.dashboard)?;
        let gpu = gpu::validate_gpu(&src, &raw.gpu)?;
        let models_defaults = model::validate_defaults(&src, &raw.models_defaults)?;
        let models_dirs = match &raw.models_dir {
            None => Vec::new(),
            Some(dirs) => {
                let paths = dirs.get_ref().paths();
                if let Some(bad) = paths.iter().find(|d| !d.starts_with('/')) {
                    let msg = format!("models_dir: {bad:?} must be an absolute path");
                    return Err(src.error(dirs, msg));
                }
                paths
            }
        };
        let ollama_models = raw.ollama_models.as_ref().map(PathBuf::from);
        Ok(Config {
            source: path.to_path_buf(),
            listen,
            socket_mode,
            llama_server,
            state_dir,
            log_format: raw.log_format.unwrap_or(DEFAULT_LOG_FORMAT),
            log_level,
            http,
            scheduler,
            history,
            model_log_lines,
            auth,
            dashboard,
            gpu,
            models,
            models_dirs: models_dirs.into_iter().map(PathBuf::from).collect(),
            ollama_models,
            models_defaults,
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

#[cfg(test)]
mod tests;
