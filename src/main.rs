//! The `claracore` binary: parse arguments, dispatch, map results to exit
//! codes. Everything else lives in the library.

use std::process::ExitCode;

use claracore::cli::{self, Command, Host};
use claracore::config::Config;
use claracore::daemon;
use claracore::EXIT_CONFIG;
use hyper::Method;

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
        Command::CheckConfig { file, strict } => daemon::check_config(&file, strict),
        Command::Serve { config, log_target } => daemon::serve(&config, log_target),
        Command::Ps { host } => client(&host, Method::GET, "/admin/ps", cli::format_ps),
        Command::List { host } => client(&host, Method::GET, "/v1/models", cli::format_list),
        Command::History { host, query, json } => client(
            &host,
            Method::GET,
            &format!("/admin/history?{query}"),
            |v| {
                if json {
                    format!("{v:#}\n")
                } else {
                    cli::format_history(v)
                }
            },
        ),
        Command::Stats { host, window, json } => client(
            &host,
            Method::GET,
            &format!("/admin/stats?window={window}"),
            |v| {
                if json {
                    format!("{v:#}\n")
                } else {
                    cli::format_stats(v)
                }
            },
        ),
        Command::Backup { host, file } => {
            let result = runtime()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(cli::backup(&host, &file)));
            report(result, ExitCode::FAILURE)
        }
        Command::Restore { file, config } => match Config::load(&config) {
            Ok(c) => report(cli::restore(&c, &file), ExitCode::FAILURE),
            Err(e) => {
                eprintln!("claracore: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Stop { host, model } => client(
            &host,
            Method::POST,
            &format!("/admin/models/{model}/stop"),
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

fn report(result: Result<String, String>, failure: ExitCode) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claracore: {e}");
            failure
        }
    }
}

/// The runtime of the client commands.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
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
    report(result.map(|v| render(&v)), ExitCode::FAILURE)
}
