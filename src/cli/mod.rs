//! The command line: raw arguments → a validated [`Command`]. The client
//! commands talk to a running daemon through [`client`] and print with
//! [`render`]; [`restore`] is the offline half of backup and restore.

use std::path::PathBuf;

use crate::logging::LogTarget;

pub mod client;
pub mod render;
pub mod restore;

pub use client::{backup, call, call_raw, ClientError, Host};
pub use render::{format_history, format_list, format_ps, format_stats};
pub use restore::restore;

/// Where `serve` looks when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/claracore/config.toml";
/// Where client commands connect when neither `--host` nor
/// `CLARACORE_HOST` says otherwise.
pub const DEFAULT_HOST: &str = "http://127.0.0.1:5800";

pub const USAGE: &str = "\
usage: claracore <command> [options]

daemon:
  serve [--config FILE] [--log-target auto|journald|stderr]
                                   run the daemon (default config /etc/claracore/config.toml)
  check-config [--strict] FILE     validate a config file; --strict also checks model files exist
  version                          print the version

client (talks to a running daemon; --host URL or CLARACORE_HOST,
        an http:// URL or unix:/path, default http://127.0.0.1:5800):
  ps                               loaded models with pid, port, idle time and uptime
  list                             configured models and their state
  stop MODEL                       drain and stop a model
  history [--model M] [--since 1h] [--outcome O] [--limit N] [--json]
                                   recent requests, newest first
  stats [--window 1h] [--json]     per-model requests, errors, latency, tokens/s, loads
  backup FILE                      a consistent copy of the history database, taken live

offline:
  restore FILE [--config F]        verify FILE and make it the history database
                                   (the daemon must be stopped)
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Serve {
        config: PathBuf,
        log_target: LogTarget,
    },
    CheckConfig {
        file: PathBuf,
        strict: bool,
    },
    Version,
    Help,
    Ps {
        host: Host,
    },
    List {
        host: Host,
    },
    Stop {
        host: Host,
        model: String,
    },
    History {
        host: Host,
        query: String,
        json: bool,
    },
    Stats {
        host: Host,
        window: String,
        json: bool,
    },
    Backup {
        host: Host,
        file: PathBuf,
    },
    Restore {
        file: PathBuf,
        config: PathBuf,
    },
}

/// Parses arguments (without the program name). `env_host` is
/// `CLARACORE_HOST`, read by the caller.
pub fn parse(args: &[String], env_host: Option<&str>) -> Result<Command, String> {
    let mut rest: Vec<&str> = Vec::new();
    let mut config = None;
    let mut host = None;
    let mut log_target = None;
    let mut strict = false;
    let mut json = false;
    let mut query: Vec<(&str, String)> = Vec::new();
    let mut window = None;
    let mut it = args.iter().map(String::as_str);
    let Some(command) = it.next() else {
        return Ok(Command::Help);
    };
    while let Some(arg) = it.next() {
        match arg {
            "--config" | "-c" => config = Some(it.next().ok_or("--config needs a file")?),
            "--host" => host = Some(it.next().ok_or("--host needs a URL")?),
            "--log-target" => log_target = Some(it.next().ok_or("--log-target needs a value")?),
            "--strict" => strict = true,
            "--json" => json = true,
            "--window" => window = Some(it.next().ok_or("--window needs a duration")?),
            "--model" | "--since" | "--until" | "--outcome" | "--limit" => {
                let value = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
                query.push((&arg[2..], value.to_string()));
            }
            "-h" | "--help" => return Ok(Command::Help),
            flag if flag.starts_with("--") => {
                if let Some((name, value)) = flag.split_once('=') {
                    match name {
                        "--config" => config = Some(value),
                        "--host" => host = Some(value),
                        "--log-target" => log_target = Some(value),
                        _ => return Err(format!("unknown option {name}")),
                    }
                } else {
                    return Err(format!("unknown option {flag}"));
                }
            }
            other => rest.push(other),
        }
    }
    let host = || Host::parse(host.or(env_host).unwrap_or(DEFAULT_HOST));
    let no_extra = |n: usize| {
        if rest.len() > n {
            Err(format!("unexpected argument {:?}", rest[n]))
        } else {
            Ok(())
        }
    };
    Ok(match command {
        "serve" => {
            no_extra(0)?;
            Command::Serve {
                config: PathBuf::from(config.unwrap_or(DEFAULT_CONFIG)),
                log_target: log_target.map_or(Ok(LogTarget::Auto), LogTarget::parse)?,
            }
        }
        "check-config" => {
            no_extra(1)?;
            let file = rest
                .first()
                .copied()
                .or(config)
                .ok_or("check-config needs a FILE")?;
            Command::CheckConfig {
                file: PathBuf::from(file),
                strict,
            }
        }
        "version" | "--version" | "-V" => Command::Version,
        "help" | "--help" | "-h" => Command::Help,
        "ps" => {
            no_extra(0)?;
            Command::Ps { host: host()? }
        }
        "list" => {
            no_extra(0)?;
            Command::List { host: host()? }
        }
        "stop" => {
            no_extra(1)?;
            let model = rest.first().ok_or("stop needs a MODEL")?.to_string();
            Command::Stop {
                host: host()?,
                model,
            }
        }
        "history" => {
            no_extra(0)?;
            let query = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            Command::History {
                host: host()?,
                query,
                json,
            }
        }
        "stats" => {
            no_extra(0)?;
            Command::Stats {
                host: host()?,
                window: window.unwrap_or("1h").to_string(),
                json,
            }
        }
        "backup" => {
            no_extra(1)?;
            let file = rest.first().ok_or("backup needs a FILE")?;
            Command::Backup {
                host: host()?,
                file: PathBuf::from(file),
            }
        }
        "restore" => {
            no_extra(1)?;
            let file = rest.first().ok_or("restore needs a FILE")?;
            Command::Restore {
                file: PathBuf::from(file),
                config: PathBuf::from(config.unwrap_or(DEFAULT_CONFIG)),
            }
        }
        other => return Err(format!("unknown command {other:?}")),
    })
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands_and_hosts() {
        assert_eq!(
            parse(&args("serve"), None).unwrap(),
            Command::Serve {
                config: DEFAULT_CONFIG.into(),
                log_target: LogTarget::Auto,
            }
        );
        assert_eq!(
            parse(&args("serve --config /x.toml --log-target journald"), None).unwrap(),
            Command::Serve {
                config: "/x.toml".into(),
                log_target: LogTarget::Journald,
            }
        );
        assert!(parse(&args("serve --log-target syslog"), None).is_err());
        assert_eq!(
            parse(&args("check-config --strict a.toml"), None).unwrap(),
            Command::CheckConfig {
                file: "a.toml".into(),
                strict: true
            }
        );
        assert_eq!(
            parse(&args("ps"), Some("unix:/run/c.sock")).unwrap(),
            Command::Ps {
                host: Host::Unix("/run/c.sock".into())
            }
        );
        assert_eq!(
            parse(
                &args("stop tiny --host http://127.0.0.1:9"),
                Some("unix:/x")
            )
            .unwrap(),
            Command::Stop {
                host: Host::Tcp("127.0.0.1:9".into()),
                model: "tiny".into()
            }
        );
        assert!(parse(&args("stop"), None).unwrap_err().contains("MODEL"));
        assert!(parse(&args("ps --host ftp://x"), None).is_err());
        assert!(parse(&args("serve --bogus"), None)
            .unwrap_err()
            .contains("--bogus"));
        assert!(parse(&args("frobnicate"), None).is_err());
    }
}
