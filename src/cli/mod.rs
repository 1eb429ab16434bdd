//! The command line, declared for clap: [`Cli`] holds one [`Command`], and
//! each command takes only its own flags. What can be checked without a
//! daemon (hosts, log targets, durations, outcomes, limits) is checked at
//! parse time, so a mistake is a usage error (exit 2) naming the flag.
//!
//! The client commands talk to a running daemon through [`client`] and
//! print with [`render`]; [`run`] is the chat (`claracore run MODEL`); [`restore`] is the offline half of backup and
//! restore; [`generate`] writes completions and man pages from these same
//! definitions.

use std::path::{Path, PathBuf};

use clap::builder::PossibleValuesParser;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::history::Outcome;
use crate::logging::LogTarget;

pub mod client;
pub mod generate;
pub mod pull;
pub mod render;
pub mod restore;
pub mod run;

pub use client::{backup, block_on, call, call_raw, fetch, ClientError, Host, Key};
pub use render::{format_history, format_list, format_ps, format_stats};
pub use restore::restore;

/// Where `serve` and `restore` look when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/claracore/config.toml";
/// Where client commands connect when neither `--host` nor
/// `CLARACORE_HOST` says otherwise and [`LOCAL_SOCKET`] does not exist.
pub const DEFAULT_HOST: &str = "http://127.0.0.1:5800";
/// The units' local socket: tried first, since it needs no key.
pub const LOCAL_SOCKET: &str = "/run/claracore/claracore.sock";

const AFTER_HELP: &str = "\
Client commands (run, ps, list, stop, load, history, stats, backup) talk to
a running daemon at --host or CLARACORE_HOST: an http://HOST:PORT URL or
unix:/path, default the local socket /run/claracore/claracore.sock if it
exists (no key needed), else http://127.0.0.1:5800. Over TCP, --key or
CLARACORE_KEY is sent as the API key. `claracore COMMAND --help` shows a command's flags.";

#[derive(Debug, Parser)]
#[command(
    name = "claracore",
    version,
    about,
    arg_required_else_help = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the daemon
    Serve {
        /// The config file
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where logs go; auto: the journal when stderr is connected to it, else stderr
        #[arg(long, value_name = "TARGET", value_enum, default_value_t = LogTarget::Auto)]
        log_target: LogTarget,
    },
    /// Validate a config file; --strict also checks model files exist
    CheckConfig(CheckConfig),
    /// Print the version
    Version,
    /// Fetch a model from a Hugging Face hub (or a URL) into a models folder
    Pull(pull::Pull),
    /// Chat with a model: PROMPT (or stdin) gets one answer; with neither,
    /// an interactive chat
    Run(run::Run),
    /// Loaded models with pid, port, idle time and uptime
    Ps(Daemon),
    /// Configured models and their state
    List(Daemon),
    /// Drain and stop a model
    Stop {
        #[command(flatten)]
        daemon: Daemon,
        /// The model's name or alias
        model: String,
    },
    /// Start a model and wait until it is ready
    Load {
        #[command(flatten)]
        daemon: Daemon,
        /// The model's name or alias
        model: String,
    },
    /// Recent requests, newest first
    History(History),
    /// Per-model requests, errors, latency, tokens/s, loads
    Stats(Stats),
    /// Admin actions and rejected keys, newest first
    Audit(Audit),
    /// A consistent copy of the history database, taken live
    Backup {
        #[command(flatten)]
        daemon: Daemon,
        /// Where the copy goes; must not exist yet
        file: PathBuf,
    },
    /// Verify FILE and make it the history database (the daemon must be stopped)
    Restore {
        /// A copy made by `claracore backup`
        file: PathBuf,
        /// The config file, which names the history database
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// API keys: `key new NAME --scope …` makes one
    #[command(subcommand)]
    Key(KeyCommand),
    /// The dashboard's login: `dashboard hash-password` makes a password hash
    #[command(subcommand)]
    Dashboard(DashboardCommand),
    /// Shell completions and man pages, for packages to install
    #[command(subcommand, hide = true)]
    Generate(generate::Generate),
}

/// `claracore key …`.
#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum KeyCommand {
    /// A new key: prints the token once, and the config lines that hold
    /// only its hash
    New(NewKey),
}

/// `claracore dashboard …`.
#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum DashboardCommand {
    /// Reads a password from stdin (without echo on a terminal) and prints
    /// its argon2id hash for `[dashboard] password_hash` or a credential
    /// file
    HashPassword,
}

impl DashboardCommand {
    pub fn run(&self) -> Result<String, String> {
        match self {
            DashboardCommand::HashPassword => {
                let password = read_password()?;
                let phc = crate::auth::session::hash_password(&password)?;
                Ok(format!("{phc}\n"))
            }
        }
    }
}

/// A password from stdin: on a terminal asked twice with echo off, else
/// the first line.
fn read_password() -> Result<String, String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let line = |prompt: Option<&str>| -> Result<String, String> {
        if let Some(p) = prompt {
            eprint!("{p}");
        }
        let mut text = String::new();
        stdin
            .lock()
            .read_line(&mut text)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        if prompt.is_some() {
            eprintln!();
        }
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    };
    let password = if stdin.is_terminal() {
        let echo_off = EchoOff::new(&stdin);
        let first = line(Some("Dashboard password: "))?;
        let again = line(Some("Again: "))?;
        drop(echo_off);
        if first != again {
            return Err("the two passwords differ".into());
        }
        first
    } else {
        line(None)?
    };
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(password)
}

/// The terminal's echo, off while this lives.
struct EchoOff<'a> {
    fd: std::os::fd::BorrowedFd<'a>,
    saved: Option<nix::sys::termios::Termios>,
}

impl<'a> EchoOff<'a> {
    fn new(stdin: &'a std::io::Stdin) -> EchoOff<'a> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        use std::os::fd::AsFd;
        let fd = stdin.as_fd();
        let saved = tcgetattr(fd).ok();
        if let Some(t) = &saved {
            let mut quiet = t.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(fd, SetArg::TCSANOW, &quiet);
        }
        EchoOff { fd, saved }
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(self.fd, nix::sys::termios::SetArg::TCSANOW, t);
        }
    }
}

/// `key new`'s arguments.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct NewKey {
    /// The key's name (history rows and logs carry it)
    #[arg(value_parser = key_name)]
    pub name: String,
    /// What it may do: inference, read, admin (admin includes read); repeat
    /// for several
    #[arg(long = "scope", value_name = "SCOPE", required = true,
          value_parser = PossibleValuesParser::new(["inference", "read", "admin"]))]
    pub scopes: Vec<String>,
    /// A model (name or alias) it may use; repeat for several; default all
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Requests per minute it may make
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// When it stops working: a date (2027-01-31) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
}

impl NewKey {
    /// The token (shown once) and the TOML to add to the config.
    pub fn run(&self) -> Result<String, String> {
        let (token, hash) =
            crate::auth::new_token().map_err(|e| format!("no randomness from the OS: {e}"))?;
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut toml = format!(
            "[auth.keys.{}]\nhash = \"{hash}\"\nscopes = [{}]\n",
            self.name,
            list(&self.scopes)
        );
        if !self.models.is_empty() {
            toml.push_str(&format!("models = [{}]\n", list(&self.models)));
        }
        if let Some(rate) = self.rate {
            toml.push_str(&format!("rate = {rate}\n"));
        }
        if let Some(expires) = &self.expires {
            toml.push_str(&format!("expires = {expires:?}\n"));
        }
        Ok(format!(
            "The key (shown only now; claracore keeps only its hash):\n\n  {token}\n\n\
             Clients send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.\n\
             Add this to the config and reload (systemctl reload claracore):\n\n{toml}"
        ))
    }
}

/// A key's name: a TOML bare key, so the printed lines parse as they are.
fn key_name(text: &str) -> Result<String, String> {
    if !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?}: a key name is 1 to 64 letters, digits, '-' or '_'"
        ))
    }
}

/// `check-config`'s arguments.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct CheckConfig {
    /// Also check that every model file exists
    #[arg(long)]
    pub strict: bool,
    /// The config file to validate
    #[arg(value_name = "FILE", required_unless_present = "config")]
    pub file: Option<PathBuf>,
    /// The config file, spelled as for serve (instead of FILE)
    #[arg(short, long, value_name = "FILE", conflicts_with = "file")]
    pub config: Option<PathBuf>,
}

impl CheckConfig {
    /// FILE or `--config`; clap has already made sure there is exactly one.
    pub fn file(&self) -> Result<&Path, clap::Error> {
        self.file
            .as_deref()
            .or(self.config.as_deref())
            .ok_or_else(|| {
                Cli::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "check-config needs a FILE",
                )
            })
    }
}

/// The daemon a client command talks to.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct Daemon {
    /// The daemon: an http://HOST:PORT URL or unix:/path [default: the local
    /// socket if it exists, else http://127.0.0.1:5800]
    #[arg(long, value_name = "URL", env = "CLARACORE_HOST", value_parser = Host::parse)]
    pub host: Option<Host>,
    /// The API key to send over TCP
    #[arg(
        long,
        value_name = "KEY",
        env = "CLARACORE_KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,
}

impl Daemon {
    /// Where to connect, with the key.
    pub fn target(&self) -> Host {
        let host = self.host.clone().unwrap_or_else(|| {
            if Path::new(LOCAL_SOCKET).exists() {
                Host::Unix(LOCAL_SOCKET.into())
            } else {
                Host::Tcp {
                    authority: DEFAULT_HOST.trim_start_matches("http://").into(),
                    key: None,
                }
            }
        });
        host.with_key(self.key.clone())
    }
}

/// `history`'s arguments.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct History {
    #[command(flatten)]
    pub daemon: Daemon,
    /// Only requests for this model
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Only requests since T: unix milliseconds, or a duration ago like 1h
    #[arg(long, value_name = "T", value_parser = time)]
    pub since: Option<String>,
    /// Only requests until T: unix milliseconds, or a duration ago like 10m
    #[arg(long, value_name = "T", value_parser = time)]
    pub until: Option<String>,
    /// Only requests with this outcome
    #[arg(long, value_name = "O", value_parser = outcome())]
    pub outcome: Option<String>,
    /// At most N rows, 1 to 1000 [daemon's default: 100]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: Option<u16>,
    /// The daemon's JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl History {
    /// The `/admin/history` request for these filters.
    pub fn path(&self) -> String {
        let limit = self.limit.map(|n| n.to_string());
        let query: Vec<String> = [
            ("model", &self.model),
            ("since", &self.since),
            ("until", &self.until),
            ("outcome", &self.outcome),
            ("limit", &limit),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
        format!("/admin/history?{}", query.join("&"))
    }
}

/// `audit`'s arguments.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct Audit {
    #[command(flatten)]
    pub daemon: Daemon,
    /// How many rows
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// The daemon's JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl Audit {
    /// The `/admin/audit` request.
    pub fn path(&self) -> String {
        format!("/admin/audit?limit={}", self.limit)
    }
}

/// `stats`' arguments.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct Stats {
    #[command(flatten)]
    pub daemon: Daemon,
    /// How far back to look, e.g. 1h, 24h, 7d
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub window: String,
    /// The daemon's JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl Stats {
    /// The `/admin/stats` request for this window.
    pub fn path(&self) -> String {
        format!("/admin/stats?window={}", encode(&self.window))
    }
}

fn outcome() -> PossibleValuesParser {
    PossibleValuesParser::new(
        [
            Outcome::Ok,
            Outcome::Cancelled,
            Outcome::UpstreamError,
            Outcome::Timeout,
            Outcome::Rejected,
        ]
        .map(Outcome::as_str),
    )
}

/// A duration as the daemon reads it; kept as text, which it is sent as.
fn duration(text: &str) -> Result<String, String> {
    crate::config::parse_duration(text).map(|_| text.to_string())
}

/// A point in time as `/admin/history` reads it: unix milliseconds, or a
/// duration before the daemon's now.
fn time(text: &str) -> Result<String, String> {
    if text.parse::<i64>().is_ok() || crate::config::parse_duration(text).is_ok() {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is neither unix milliseconds nor a duration ago like 1h"
        ))
    }
}

/// Encodes a query value (`application/x-www-form-urlencoded`).
fn encode(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// clap's exit codes: 0 after --help and --version, 2 for usage errors.
pub fn clap_exit(e: &clap::Error) -> std::process::ExitCode {
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
    std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

pub fn report(result: Result<String, String>) -> std::process::ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claracore: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Command, String> {
        Cli::try_parse_from(std::iter::once("claracore").chain(s.split_whitespace()))
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    // The environment's CLARACORE_HOST is covered by tests/cli.rs, which
    // can set it on a child instead of on this process.
    #[test]
    fn parses_commands_and_hosts() {
        assert_eq!(
            parse("serve").unwrap(),
            Command::Serve {
                config: DEFAULT_CONFIG.into(),
                log_target: LogTarget::Auto,
            }
        );
        assert_eq!(
            parse("serve --config /x.toml --log-target journald").unwrap(),
            Command::Serve {
                config: "/x.toml".into(),
                log_target: LogTarget::Journald,
            }
        );
        assert!(parse("serve --log-target syslog")
            .unwrap_err()
            .contains("--log-target"));
        assert_eq!(
            parse("check-config --strict a.toml").unwrap(),
            Command::CheckConfig(CheckConfig {
                strict: true,
                file: Some("a.toml".into()),
                config: None,
            })
        );
        assert_eq!(
            parse("ps --host unix:/run/c.sock").unwrap(),
            Command::Ps(Daemon {
                host: Some(Host::Unix("/run/c.sock".into())),
                key: None
            })
        );
        assert_eq!(
            parse("stop tiny --host http://127.0.0.1:9").unwrap(),
            Command::Stop {
                daemon: Daemon {
                    host: Some(Host::Tcp {
                        authority: "127.0.0.1:9".into(),
                        key: None
                    }),
                    key: None
                },
                model: "tiny".into()
            }
        );
        assert!(parse("stop").unwrap_err().contains("MODEL"));
        assert_eq!(
            parse("load tiny --host unix:/run/c.sock").unwrap(),
            Command::Load {
                daemon: Daemon {
                    host: Some(Host::Unix("/run/c.sock".into())),
                    key: None
                },
                model: "tiny".into()
            }
        );
        assert!(parse("load").unwrap_err().contains("MODEL"));
        assert!(parse("ps --host ftp://x").unwrap_err().contains("--host"));
        assert!(parse("serve --bogus").unwrap_err().contains("--bogus"));
        assert!(parse("frobnicate").is_err());
    }

    #[test]
    fn check_config_takes_file_or_config_but_not_both() {
        let Command::CheckConfig(args) = parse("check-config -c b.toml").unwrap() else {
            panic!("not check-config");
        };
        assert_eq!(args.file().unwrap(), Path::new("b.toml"));
        assert!(parse("check-config").unwrap_err().contains("FILE"));
        assert!(parse("check-config a.toml --config b.toml").is_err());
    }

    // Before clap every command took every flag: `ps --strict` ran ps.
    #[test]
    fn commands_refuse_flags_that_are_not_theirs() {
        for args in [
            "ps --strict",
            "list --json",
            "serve --host http://127.0.0.1:9",
            "stats --limit 5",
            "backup --config c.toml f.db",
            "restore --host http://127.0.0.1:9 f.db",
        ] {
            let flag = args.split_whitespace().nth(1).unwrap();
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args}: {err}");
        }
    }

    #[test]
    fn history_flags_are_checked_and_become_a_query() {
        let Command::History(h) = parse(
            "history --model tiny-chat --since 1h --until 1700000000000 --outcome upstream_error --limit 5",
        )
        .unwrap() else {
            panic!("not history");
        };
        assert_eq!(
            h.path(),
            "/admin/history?model=tiny-chat&since=1h&until=1700000000000&outcome=upstream_error&limit=5"
        );
        let Command::History(h) = parse("history --model a/b").unwrap() else {
            panic!("not history");
        };
        assert_eq!(h.path(), "/admin/history?model=a%2Fb");
        for (args, flag) in [
            ("history --limit 0", "--limit"),
            ("history --limit 1001", "--limit"),
            ("history --outcome fine", "--outcome"),
            ("history --since yesterday", "--since"),
            ("stats --window soon", "--window"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args}: {err}");
        }
        let Command::Stats(s) = parse("stats").unwrap() else {
            panic!("not stats");
        };
        assert_eq!(s.path(), "/admin/stats?window=1h");
    }
}
