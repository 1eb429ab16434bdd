//! `[models.NAME]`: the configured models — how each child is launched
//! (a GGUF `model` run by llama-server, or a full `cmd`), where it listens
//! (the port and socket placeholders of its argv), its names and aliases
//! (unique over all models), and what it may use (connections, GPU memory,
//! GPUs, priority).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::limits::{MAX_VRAM_MB, MIB};
use super::raw::{RawModel, Source};
use super::{ConfigError, SchedulerConfig, DEFAULT_HEALTH_PATH, DEFAULT_MAX_CONNECTIONS};

/// Placeholder replaced by the child's port in `cmd` argv entries.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// Placeholder replaced by the child's unix socket path in argv entries: a
/// child whose argv has it is reached over that socket, one with only
/// [`PORT_PLACEHOLDER`] over loopback TCP.
pub const SOCKET_PLACEHOLDER: &str = "{socket}";
/// The `--port` of a llama-server on a unix socket: it ignores the port
/// for a `--host` ending in `.sock` but refuses to start with none.
const UNIX_LLAMA_PORT: &str = "8080";
/// A GPU index beyond this is a typo.
const MAX_GPU_INDEX: i64 = 63;
/// The child environment variable that names the GPUs it may use;
/// claracore sets it from the placement unless the model's `env` does.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

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

/// Where a model's definition came from, shown by `list`, `/v1/models`,
/// `/api/tags` and the dashboard. The server's paths are never serialised:
/// clients see the kind, and a pulled model's repository, revision and
/// file, not where files live on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A `[models.NAME]` table.
    #[default]
    Config,
    /// A GGUF file found in a models folder.
    Folder {
        #[serde(skip)]
        dir: PathBuf,
    },
    /// A file `claracore pull` placed in a models folder, with what it was
    /// pulled from.
    Pulled {
        #[serde(skip)]
        dir: PathBuf,
        repo: String,
        revision: String,
        file: String,
    },
    /// A model in an Ollama store, served read-only in place.
    #[serde(rename = "ollama")]
    OllamaStore {
        #[serde(skip)]
        manifest: PathBuf,
    },
}

impl ModelSource {
    /// One word for tables: `config`, `folder`, `pulled`, `ollama`.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSource::Config => "config",
            ModelSource::Folder { .. } => "folder",
            ModelSource::Pulled { .. } => "pulled",
            ModelSource::OllamaStore { .. } => "ollama",
        }
    }

    /// Whether `claracore rm` may delete the model's file: only files in a
    /// models folder are ours to remove.
    pub fn removable(&self) -> bool {
        matches!(
            self,
            ModelSource::Folder { .. } | ModelSource::Pulled { .. }
        )
    }
}

/// `[models_defaults]`: what models found in a models folder or an Ollama
/// store get, since they have no table of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDefaults {
    /// llama-server arguments, after the source's own (an Ollama store's
    /// `num_ctx`, say), so these win.
    pub args: Vec<String>,
    /// `None`: the scheduler's `idle_ttl`.
    pub ttl: Option<Option<Duration>>,
    pub group: Option<String>,
}

/// A model found on disk, as the config takes it.
#[derive(Debug, Clone)]
pub struct FoundModel {
    pub name: String,
    pub model: PathBuf,
    pub mmproj: Option<PathBuf>,
    /// Arguments its source asks for.
    pub args: Vec<String>,
    pub source: ModelSource,
}

/// One configured model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    /// Where it was defined.
    pub source: ModelSource,
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

/// llama-server's HTTP threads for a connection limit: each open
/// connection, busy or idle in claracore's pool (at most the limit each),
/// holds one thread of its thread-per-connection server, and health pings
/// need one more. With fewer threads a burst of requests leaves some
/// connections unserved until an idle one times out (5 s).
pub fn llama_http_threads(max_connections: usize) -> usize {
    2 * max_connections + 2
}

/// The `--parallel`/`-np` value in llama-server arguments, if any.
pub(super) fn parallel_arg(args: &[String]) -> Option<usize> {
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

/// Every `[models.NAME]`, sorted by name; no name or alias may belong to
/// two models.
pub(super) fn validate_models(
    src: &Source<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawModel>>,
    llama_server: &Path,
    scheduler: &SchedulerConfig,
) -> Result<Vec<ModelConfig>, ConfigError> {
    let mut models = Vec::with_capacity(raw.len());
    // name or alias -> the model that owns it, for duplicate detection.
    let mut names: HashMap<String, String> = HashMap::new();
    for (name, model) in raw {
        let config = validate_model(src, name, model.get_ref(), llama_server, scheduler)?;
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
    Ok(models)
}

/// One `[models.NAME]`; `models.NAME` is the key its messages name.
fn validate_model(
    src: &Source<'_>,
    name: &Spanned<String>,
    raw: &RawModel,
    llama_server: &Path,
    scheduler: &SchedulerConfig,
) -> Result<ModelConfig, ConfigError> {
    let key = format!("models.{}", name.get_ref());
    check_name(src, name, &key)?;
    let max_connections = max_connections(src, raw.max_connections.as_ref(), &key)?;
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
            let limit = max_connections.unwrap_or_else(|| default_max_connections(&args));
            let argv = llama_argv(llama_server, path, name.get_ref(), limit, args);
            (argv, Some(PathBuf::from(path)), Some(limit))
        }
        (None, Some(cmd)) => (cmd_argv(src, name, raw, cmd, &key)?, None, max_connections),
    };
    let ttl = match &raw.ttl {
        None => scheduler.idle_ttl,
        Some(v) => src.optional_duration(&format!("{key}.ttl"), v)?,
    };
    let health = match &raw.health {
        None => DEFAULT_HEALTH_PATH.to_string(),
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
    let vram_bytes = vram_bytes(src, raw.vram_mb.as_ref(), &key)?;
    let gpus = match &raw.gpus {
        None => None,
        Some(list) => Some(gpus(src, list, raw, &key)?),
    };
    let priority = src.priority(&format!("{key}.priority"), raw.priority.as_ref())?;
    Ok(ModelConfig {
        name: name.get_ref().clone(),
        source: ModelSource::Config,
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

/// The model for a file found on disk: launched as a `model` table with
/// the defaults' arguments would be.
pub fn found_model(
    found: FoundModel,
    defaults: &ModelDefaults,
    llama_server: &Path,
    scheduler: &SchedulerConfig,
) -> ModelConfig {
    let mut args = found.args;
    if let Some(mmproj) = &found.mmproj {
        args.extend(["--mmproj".to_string(), mmproj.display().to_string()]);
    }
    args.extend(defaults.args.iter().cloned());
    let limit = default_max_connections(&args);
    let path = found.model.display().to_string();
    ModelConfig {
        argv: llama_argv(llama_server, &path, &found.name, limit, args),
        name: found.name,
        source: found.source,
        model_path: Some(found.model),
        aliases: Vec::new(),
        ttl: defaults.ttl.unwrap_or(scheduler.idle_ttl),
        group: defaults.group.clone(),
        preload: false,
        pin: false,
        health: DEFAULT_HEALTH_PATH.to_string(),
        env: Vec::new(),
        max_connections: Some(limit),
        vram_bytes: None,
        gpus: None,
        priority: 0,
    }
}

/// `[models_defaults]`.
pub(super) fn validate_defaults(
    src: &Source<'_>,
    raw: &super::raw::RawModelsDefaults,
) -> Result<ModelDefaults, ConfigError> {
    let ttl = match &raw.ttl {
        None => None,
        Some(v) => Some(src.optional_duration("models_defaults.ttl", v)?),
    };
    Ok(ModelDefaults {
        args: raw.args.clone(),
        ttl,
        group: raw.group.clone(),
    })
}

/// A model name: letters, digits, '-', '_', '.' and ':', not empty.
fn check_name(src: &Source<'_>, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let valid = !name.get_ref().is_empty()
        && name
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if valid {
        return Ok(());
    }
    Err(src.error(
        name,
        format!("{key}: model names may contain only letters, digits, '-', '_', '.' and ':'"),
    ))
}

/// `max_connections`: 1 to 1024.
fn max_connections(
    src: &Source<'_>,
    v: Option<&Spanned<i64>>,
    key: &str,
) -> Result<Option<usize>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    match usize::try_from(*v.get_ref()) {
        Ok(n @ 1..=1024) => Ok(Some(n)),
        _ => Err(src.error(
            v,
            format!("{key}.max_connections: must be between 1 and 1024"),
        )),
    }
}

/// The connection limit of a `model` entry without `max_connections`:
/// [`DEFAULT_MAX_CONNECTIONS`], or more when its `--parallel` asks for
/// more slots.
fn default_max_connections(args: &[String]) -> usize {
    parallel_arg(args).map_or(DEFAULT_MAX_CONNECTIONS, |np| {
        DEFAULT_MAX_CONNECTIONS.max(np.saturating_add(4))
    })
}

/// The llama-server argv of a `model` entry: ours first, so an explicit
/// `--threads-http` in the user's `args` wins.
fn llama_argv(
    llama_server: &Path,
    path: &str,
    name: &str,
    limit: usize,
    args: Vec<String>,
) -> Vec<String> {
    let mut argv = vec![
        llama_server.display().to_string(),
        "-m".into(),
        path.to_string(),
        // A unix socket in the daemon's 0700 runtime directory: no other
        // local user can reach the child, and no port can clash.
        "--host".into(),
        SOCKET_PLACEHOLDER.into(),
        "--port".into(),
        UNIX_LLAMA_PORT.into(),
        "--threads-http".into(),
        llama_http_threads(limit).to_string(),
    ];
    // Without an alias llama-server names its GGUF path in every
    // response's `model`; with the configured name, clients see the name
    // they asked for. llama-server takes every `--alias` it is given as
    // one more alias (a set), so a user's own is not merely appended after
    // ours: ours is left out.
    if !alias_arg(&args) {
        argv.extend(["--alias".into(), name.to_string()]);
    }
    argv.extend(args);
    argv
}

/// The argv of a `cmd` entry: a program, and a placeholder telling it
/// where to listen.
fn cmd_argv(
    src: &Source<'_>,
    name: &Spanned<String>,
    raw: &RawModel,
    cmd: &[String],
    key: &str,
) -> Result<Vec<String>, ConfigError> {
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
    Ok(cmd.to_vec())
}

/// `vram_mb`: 1 to [`MAX_VRAM_MB`], in bytes.
fn vram_bytes(
    src: &Source<'_>,
    v: Option<&Spanned<i64>>,
    key: &str,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    u64::try_from(*v.get_ref())
        .ok()
        .filter(|n| (1..=MAX_VRAM_MB).contains(n))
        .map(|n| Some(n * MIB))
        .ok_or_else(|| {
            src.error(
                v,
                format!("{key}.vram_mb: must be between 1 and {MAX_VRAM_MB}"),
            )
        })
}

/// `gpus`: at least one index, each once and at most [`MAX_GPU_INDEX`],
/// and not together with an `env` that sets [`CUDA_VISIBLE_DEVICES`].
fn gpus(
    src: &Source<'_>,
    list: &Spanned<Vec<Spanned<i64>>>,
    raw: &RawModel,
    key: &str,
) -> Result<Vec<u32>, ConfigError> {
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
    Ok(gpus)
}
