//! The `claracore` binary: argv → [`Cli`] → one call into the library →
//! exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use claracore::cli::{self, fetch, generate, render, Cli, Command};
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
        Command::Ps(d) => report(fetch(&d.target(), get, "/admin/ps", render::format_ps)),
        Command::List(d) => report(fetch(&d.target(), get, "/v1/models", render::format_list)),
        Command::Stop { daemon: d, model } => {
            let path = format!("/admin/models/{model}/stop");
            report(fetch(&d.target(), Method::POST, &path, render::format_stop))
        }
        Command::History(h) => {
            let render = render::json_or(h.json, render::format_history);
            report(fetch(&h.daemon.target(), get, &h.path(), render))
        }
        Command::Stats(s) => {
            let render = render::json_or(s.json, render::format_stats);
            report(fetch(&s.daemon.target(), get, &s.path(), render))
        }
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
        Command::Generate(what) => report(generate::run(&what)),
    }
}

/// clap's exit codes: 0 after --help and --version, 2 for usage errors.
fn clap_exit(e: &clap::Error) -> ExitCode {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // A bare `claracore` has always printed its usage and succeeded.
        return report(Ok(Cli::command().render_help().to_string()));
    }
    if e.use_stderr() {
        // The lowercase heading predates clap; scripts look for `usage: claracore`.
        eprint!("{}", e.render().to_string().replacen("Usage:", "usage:", 1));
    } else {
        let _ = e.print();
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claracore: {e}");
            ExitCode::FAILURE
        }
    }
}
