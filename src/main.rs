//! The `claracore` binary: parse arguments, dispatch, map results to exit
//! codes. Everything else lives in the library.

use std::process::ExitCode;

use claracore::cli::{self, Command, Host};
use claracore::config::Config;
use claracore::listen::Listener;
use claracore::{server, EXIT_CONFIG};
use hyper::Method;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env_host = std::env::var("CLARACORE_HOST").ok();
    let command = match cli::parse(&args, env_host.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("claracore: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("claracore {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file, strict } => check_config(&file, strict),
        Command::Serve { config } => serve(&config),
        Command::Ps { host } => client(&host, Method::GET, "/api/ps", cli::format_ps),
        Command::List { host } => client(&host, Method::GET, "/v1/models", cli::format_list),
        Command::Stop { host, model } => client(
            &host,
            Method::POST,
            &format!("/api/models/{model}/stop"),
            |v| {
                format!(
                    "{}: {}\n",
                    v["model"].as_str().unwrap_or("?"),
                    if v["stopping"].as_bool() == Some(true) {
                        "stopping"
                    } else {
                        "not running"
                    }
                )
            },
        ),
    }
}

fn check_config(file: &std::path::Path, strict: bool) -> ExitCode {
    let result = Config::load(file).and_then(|c| {
        if strict {
            c.check_files().map(|()| c)
        } else {
            Ok(c)
        }
    });
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

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn client(
    host: &Host,
    method: Method,
    path: &str,
    render: impl Fn(&serde_json::Value) -> String,
) -> ExitCode {
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(cli::call(host, method, path))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(v) => {
            print!("{}", render(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claracore: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLARACORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("claracore: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let mut listeners = Vec::with_capacity(config.listen.len());
        for addr in &config.listen {
            match Listener::bind(addr, config.socket_mode).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::FAILURE;
                }
            }
        }
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                tracing::error!("cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::info!(signal = name, "shutting down; a second signal forces exit");
            let _ = first_tx.send(());
            let code = tokio::select! { _ = term.recv() => 143, _ = int.recv() => 130 };
            tracing::warn!(code, "second signal: exiting now");
            // Children die with us through PR_SET_PDEATHSIG.
            std::process::exit(code);
        });
        tracing::info!(config = %path.display(), models = config.models.len(),
            version = env!("CARGO_PKG_VERSION"), "claracore starting");
        server::serve(config, listeners, async {
            let _ = first_rx.await;
        })
        .await;
        tracing::info!("claracore stopped");
        ExitCode::SUCCESS
    })
}
