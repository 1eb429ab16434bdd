//! The `claracore` binary: argv → [`Cli`] → one call into the library →
//! exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use claracore::cli::{self, clap_exit, fetch, generate, render, report, Cli, Command};
use claracore::config::Config;
use claracore::{daemon, EXIT_CONFIG};
use hyper::Method;

fn main() -> ExitCode {
    let command = match Cli::try_parse() {
        Ok(cli) => cli.command,
        Err(e) => return clap_exit(&e),
    };
    let get = Method::GET;
    match command {
        Command::Serve { config, log_target } => daemon::serve(&config, log_target),
        Command::CheckConfig(args) => match args.file() {
            Ok(file) => daemon::check_config(file, args.strict),
            Err(e) => clap_exit(&e),
        },
        Command::Version => report(Ok(format!("claracore {}\n", env!("CARGO_PKG_VERSION")))),
        Command::Pull(p) => report(cli::pull::run(&p)),
        Command::Run(r) => report(cli::run::run(&r).map(|()| String::new())),
        Command::Ps(d) => report(fetch(&d.target(), get, "/admin/ps", render::format_ps)),
        Command::List(d) => report(fetch(&d.target(), get, "/v1/models", render::format_list)),
        Command::Stop { daemon: d, model } => {
            let path = format!("/admin/models/{model}/stop");
            report(fetch(&d.target(), Method::POST, &path, render::format_stop))
        }
        Command::Load { daemon: d, model } => {
            report(cli::block_on(cli::client::load(&d.target(), &model)))
        }
        Command::History(h) => listing(&h.daemon, &h.path(), h.json, render::format_history),
        Command::Stats(s) => listing(&s.daemon, &s.path(), s.json, render::format_stats),
        Command::Audit(a) => listing(&a.daemon, &a.path(), a.json, render::format_audit),
        Command::Backup { daemon, file } => {
            report(cli::block_on(cli::backup(&daemon.target(), &file)))
        }
        Command::Restore { file, config } => match Config::load(&config) {
            Ok(c) => report(cli::restore(&c, &file)),
            Err(e) => {
                eprintln!("claracore: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Key(cli::KeyCommand::New(key)) => report(key.run()),
        Command::Dashboard(d) => report(d.run()),
        Command::Generate(what) => report(generate::run(&what)),
    }
}

/// A read command: the daemon's JSON, or a table of it.
fn listing(d: &cli::Daemon, path: &str, json: bool, table: render::Table) -> ExitCode {
    report(fetch(
        &d.target(),
        Method::GET,
        path,
        render::json_or(json, table),
    ))
}
