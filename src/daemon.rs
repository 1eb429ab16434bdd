//! The daemon's bootstrap: read the environment once, load the config, set
//! up logging, bind (or inherit) the listeners, drop privileges, open the
//! history database, build the runtime, install signal handlers, then hand
//! over to [`server::serve`]. Returns the process's exit status. The
//! children's private socket directory lives as long as `serve`.
//!
//! Order matters: LISTEN_* are read and capabilities dropped while the
//! process is still single-threaded (listenfd unsets the variables and
//! capabilities are per thread).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::Config;
use crate::gpu::Gpus;
use crate::history::{Recorder, Writer};
use crate::listen::{Bound, ListenError};
use crate::logging::{self, LogTarget};
use crate::server::{self, Control, Systemd};
use crate::supervisor::RuntimeDir;
use crate::systemd::{self, Notifier};
use crate::EXIT_CONFIG;

/// How long a forced exit (the second SIGTERM/SIGINT) waits for the history
/// writer to commit what is queued.
const FORCED_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// `claracore check-config`: validates a file without starting anything.
pub fn check_config(file: &Path, strict: bool) -> ExitCode {
    let result = if strict {
        Config::load(file).and_then(|c| c.check_files().map(|()| c))
    } else {
        Config::load_syntax(file)
    };
    match result {
        Ok(c) => {
            println!(
                "{}: ok ({} models, {} listeners)",
                file.display(),
                c.models.len(),
                c.listen.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claracore: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// What `serve` reads from its environment, read once, before any thread
/// exists.
struct ServeEnv {
    notify_socket: Option<std::ffi::OsString>,
    watchdog_usec: Option<String>,
    watchdog_pid: Option<String>,
    journal_stream: Option<String>,
    log_filter: Option<String>,
    fd_names: Option<String>,
    /// systemd's `RuntimeDirectory=` (the first, if several).
    runtime_directory: Option<PathBuf>,
    xdg_runtime_dir: Option<PathBuf>,
}

impl ServeEnv {
    fn read() -> ServeEnv {
        let var = |name| std::env::var(name).ok();
        ServeEnv {
            notify_socket: std::env::var_os("NOTIFY_SOCKET"),
            watchdog_usec: var("WATCHDOG_USEC"),
            watchdog_pid: var("WATCHDOG_PID"),
            journal_stream: var("JOURNAL_STREAM"),
            log_filter: var("CLARACORE_LOG"),
            fd_names: var("LISTEN_FDNAMES"),
            runtime_directory: var("RUNTIME_DIRECTORY")
                .and_then(|v| v.split(':').next().map(PathBuf::from))
                .filter(|p| p.is_absolute()),
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute()),
        }
    }

    /// Where the children's socket directory may go, best first.
    fn runtime_bases(&self, config: &Config) -> Vec<PathBuf> {
        let mut bases: Vec<PathBuf> = self
            .runtime_directory
            .iter()
            .chain(&self.xdg_runtime_dir)
            .cloned()
            .collect();
        bases.push(config.state_dir.clone());
        bases.push(PathBuf::from("/tmp"));
        bases
    }
}

/// `claracore serve`: runs the daemon until SIGTERM/SIGINT.
pub fn serve(path: &Path, log_target: LogTarget) -> ExitCode {
    match start_and_serve(path, log_target) {
        Ok(code) | Err(code) => code,
    }
}

/// The bootstrap in its order; `Err` carries the exit status of a start
/// that failed (already logged).
fn start_and_serve(path: &Path, log_target: LogTarget) -> Result<ExitCode, ExitCode> {
    let env = ServeEnv::read();
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("claracore: {e}");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    init_logging(&env, &config, log_target);
    let notifier = Notifier::new(env.notify_socket.as_deref());

    // Single-threaded until the runtime is built: listenfd unsets LISTEN_*
    // and capabilities are per thread, so both happen here.
    let listeners = open_listeners(path, &config, &env, &notifier)?;
    drop_privileges()?;
    // As the daemon's own user, which must be able to read them.
    crate::sources::apply(&mut config);

    // After the drop, so the writer thread holds no capabilities either.
    let (recorder, writer) = open_history(&config, &notifier)?;

    // After the drop, so the sampling thread holds no capabilities; before
    // the runtime, so it is no tokio worker (NVML calls block).
    let gpus = Gpus::start(&config.gpu);

    let runtime_dir = match RuntimeDir::create(&env.runtime_bases(&config)) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::error!("{e}");
            notifier.status(&format!("failed to start: {e}"));
            return Err(ExitCode::FAILURE);
        }
    };
    tracing::debug!(path = %runtime_dir.path().display(), "models' socket directory");
    config.runtime_dir = Some(runtime_dir.path().to_path_buf());

    let rt = build_runtime(config.worker_threads())?;
    let watchdog = systemd::watchdog_interval(
        env.watchdog_usec.as_deref(),
        env.watchdog_pid.as_deref(),
        std::process::id(),
    );
    let systemd = Systemd {
        notifier,
        watchdog,
        config_path: path.to_path_buf(),
    };
    let forced_dir = runtime_dir.path().to_path_buf();
    let code = rt.block_on(run(config, listeners, systemd, recorder, gpus, forced_dir));
    if let Some(writer) = writer {
        writer.close();
        tracing::info!("history flushed");
    }
    // The children are gone: their sockets with them.
    drop(runtime_dir);
    tracing::info!("claracore stopped");
    Ok(code)
}

/// Logging as the environment and the config ask, and the panic hook.
fn init_logging(env: &ServeEnv, config: &Config, log_target: LogTarget) {
    let filter = env
        .log_filter
        .clone()
        .unwrap_or_else(|| config.log_level.clone());
    let note = logging::init(
        log_target,
        config.log_format,
        &filter,
        systemd::stderr_is_journal(env.journal_stream.as_deref()),
    );
    logging::install_panic_hook();
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
}

/// Binds (or inherits) the listeners, refuses one reachable beyond this
/// machine with no API key, and says who may do what.
fn open_listeners(
    path: &Path,
    config: &Config,
    env: &ServeEnv,
    notifier: &Notifier,
) -> Result<Vec<Bound>, ExitCode> {
    let mut fds = listenfd::ListenFd::from_env();
    let listeners = match bind(config, &mut fds, env.fd_names.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            notifier.status(&format!("failed to start: {e}"));
            return Err(ExitCode::FAILURE);
        }
    };
    // The config checks its own `listen`; sockets passed in by systemd are
    // only known now.
    let keys = config.auth.keys.len();
    if keys == 0 && !config.auth.open {
        if let Some(exposed) = listeners.iter().find(|b| !b.is_loopback()) {
            let e = format!(
                "{}: the listener {} is reachable beyond this machine and no API key is configured; add an [auth.keys.NAME] (claracore key new) or set auth.open = true",
                path.display(),
                exposed.describe()
            );
            eprintln!("claracore: {e}");
            tracing::error!("{e}");
            notifier.status(&format!("failed to start: {e}"));
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    }
    tracing::info!("{}", access_notice(keys, &config.auth, &listeners));
    Ok(listeners)
}

/// Drops every capability and sets no_new_privs, saying what was held.
fn drop_privileges() -> Result<(), ExitCode> {
    match systemd::drop_privileges() {
        Ok(d) if d.capabilities.is_empty() => {
            tracing::debug!("no capabilities held; no_new_privs set")
        }
        Ok(d) => tracing::info!(dropped = ?d.capabilities,
            "dropped all capabilities (bounding and ambient sets too); no_new_privs set"),
        Err(e) => {
            tracing::error!(error = %e, "cannot drop privileges");
            return Err(ExitCode::FAILURE);
        }
    }
    Ok(())
}

/// The history recorder and its writer (none when history is off).
fn open_history(
    config: &Config,
    notifier: &Notifier,
) -> Result<(Recorder, Option<Writer>), ExitCode> {
    if !config.history.enabled {
        return Ok((Recorder::disabled(), None));
    }
    match Recorder::start(&config.history) {
        Ok((recorder, writer, note)) => {
            if let Some(note) = note {
                tracing::error!("{note}");
            }
            if !recorder.disk_failing() {
                tracing::info!(path = %config.history.path.display(), "history database open");
            }
            Ok((recorder, Some(writer)))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot open the history database");
            notifier.status(&format!("failed to start: {e}"));
            Err(ExitCode::FAILURE)
        }
    }
}

/// The multi-threaded tokio runtime with `threads` workers.
fn build_runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    tracing::debug!(worker_threads = threads, "starting the async runtime");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| {
            tracing::error!(error = %e, "cannot start the async runtime");
            ExitCode::FAILURE
        })
}

/// Inside the runtime: installs the signal handlers, then serves until
/// shutdown.
async fn run(
    config: Config,
    listeners: Vec<Bound>,
    systemd: Systemd,
    recorder: Recorder,
    gpus: Gpus,
    forced_dir: PathBuf,
) -> ExitCode {
    let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (term, int, hup) = match signals {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(on_signals(
        Signals { term, int, hup },
        control_tx,
        recorder.clone(),
        forced_dir,
    ));
    tracing::info!(config = %systemd.config_path.display(), models = config.models.len(),
        version = env!("CARGO_PKG_VERSION"), "claracore starting");
    server::serve(config, listeners, control_rx, systemd, recorder, gpus).await;
    ExitCode::SUCCESS
}

/// The signals the daemon answers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// SIGHUP reloads; the first SIGTERM/SIGINT shuts down; a second one
/// forces the exit, which still commits the rows already queued (within
/// [`FORCED_FLUSH`]) and removes the models' socket directory.
async fn on_signals(
    mut signals: Signals,
    control_tx: tokio::sync::mpsc::UnboundedSender<Control>,
    forced_flush: Recorder,
    forced_dir: PathBuf,
) {
    let Signals { term, int, hup } = &mut signals;
    let name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => { let _ = control_tx.send(Control::Reload); }
        }
    };
    tracing::info!(signal = name, "shutting down; a second signal forces exit");
    let _ = control_tx.send(Control::Shutdown);
    let code = tokio::select! { _ = term.recv() => 143, _ = int.recv() => 130 };
    tracing::warn!(
        code,
        "second signal: committing queued history rows, then exiting"
    );
    let committed = tokio::task::spawn_blocking(move || forced_flush.flush_blocking(FORCED_FLUSH))
        .await
        .unwrap_or(false);
    if !committed {
        tracing::error!(
            within_s = FORCED_FLUSH.as_secs(),
            "history rows still queued were not committed"
        );
    }
    let _ = std::fs::remove_dir_all(&forced_dir);
    // Children die with us through PR_SET_PDEATHSIG.
    std::process::exit(code);
}

/// Sockets from systemd when socket-activated (they replace `listen`),
/// else the config's addresses.
fn bind(
    config: &Config,
    fds: &mut listenfd::ListenFd,
    names: Option<&str>,
) -> Result<Vec<Bound>, ListenError> {
    let activated = Bound::from_activation(fds, names)?;
    if !activated.is_empty() {
        for b in &activated {
            tracing::info!(listen = %b.describe(), fd_name = %b.name, "socket-activated listener");
        }
        return Ok(activated);
    }
    config
        .listen
        .iter()
        .map(|addr| Bound::bind(addr, config.socket_mode))
        .collect()
}

/// One line at start saying who may do what.
fn access_notice(keys: usize, auth: &crate::config::AuthConfig, listeners: &[Bound]) -> String {
    let socket = listeners.iter().find(|b| b.is_unix()).map_or_else(
        || "no local socket is configured".to_string(),
        |b| format!("the local socket {} is admin", b.describe()),
    );
    let metrics = if auth.metrics_public {
        ", /metrics"
    } else {
        ""
    };
    if keys == 0 {
        format!(
            "access: no API key configured: inference is open to every client that reaches a TCP listener{}; read and admin routes only through the local socket ({socket}); /health, /live, /ready{metrics} are open",
            if auth.open { " (auth.open: beyond loopback too)" } else { "" },
        )
    } else {
        format!(
            "access: {keys} API key{} configured: every TCP request needs one, except /health, /live, /ready{metrics}; {socket}",
            if keys == 1 { "" } else { "s" }
        )
    }
}
