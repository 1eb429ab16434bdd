//! The command line: raw arguments → a validated [`Command`], and the client
//! commands that talk to a running daemon over TCP or a unix socket.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::logging::LogTarget;

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

/// A daemon address for client commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    Unix(PathBuf),
}

impl Host {
    pub fn parse(text: &str) -> Result<Host, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Host::Unix(PathBuf::from(path)));
        }
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("host {text:?} must be an http:// URL or unix:/path"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!(
                "host {text:?} must be http://HOST:PORT with no path"
            ));
        }
        Ok(Host::Tcp(authority.to_string()))
    }
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

/// A client command's failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach claracore at {host}: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("talking to claracore at {host}: {message}")]
    Protocol { host: String, message: String },
    #[error("claracore answered {status}: {message}")]
    Status { status: StatusCode, message: String },
}

impl Host {
    fn describe(&self) -> String {
        match self {
            Host::Tcp(a) => format!("http://{a}"),
            Host::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// One request to the daemon; returns its JSON body on a 2xx.
pub async fn call(
    host: &Host,
    method: Method,
    path: &str,
) -> Result<serde_json::Value, ClientError> {
    let (status, body) = call_raw(host, method, path, Duration::from_secs(30)).await?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| ClientError::Protocol {
            host: host.describe(),
            message: format!("answer is not JSON (status {status})"),
        })?;
    if !status.is_success() {
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        return Err(ClientError::Status { status, message });
    }
    Ok(value)
}

/// One request to the daemon; the status and raw body.
pub async fn call_raw(
    host: &Host,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    let connect_err = |source| ClientError::Connect {
        host: host.describe(),
        source,
    };
    let exchange = async {
        match host {
            Host::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(connect_err)?;
                exchange(s, host, method, path).await
            }
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                exchange(s, host, method, path).await
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Protocol {
            host: host.describe(),
            message: format!("no answer within {}s", timeout.as_secs()),
        })?
}

async fn exchange<S>(
    stream: S,
    host: &Host,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proto = |message: String| ClientError::Protocol {
        host: host.describe(),
        message,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::spawn(conn);
    let authority = match host {
        Host::Tcp(a) => a.clone(),
        Host::Unix(_) => "localhost".into(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| proto(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| proto(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| proto(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

fn secs(v: &serde_json::Value) -> String {
    v.as_f64().map_or_else(
        || "-".into(),
        |s| humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
    )
}

fn opt(v: &serde_json::Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

/// Renders `/admin/ps`: only models that hold a process.
pub fn format_ps(value: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:>8} {:>6} {:>8} {:>10} {:>10}\n",
        "NAME", "STATE", "PID", "PORT", "INFLIGHT", "IDLE", "UPTIME"
    );
    for m in value["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !m["pid"].is_null())
    {
        out.push_str(&format!(
            "{:<24} {:<10} {:>8} {:>6} {:>8} {:>10} {:>10}\n",
            m["name"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            opt(&m["pid"]),
            opt(&m["port"]),
            m["inflight"].as_u64().unwrap_or(0),
            secs(&m["idle_s"]),
            secs(&m["uptime_s"]),
        ));
    }
    out
}

/// Renders `/v1/models`.
pub fn format_list(value: &serde_json::Value) -> String {
    let mut out = format!("{:<24} {:<10} {}\n", "NAME", "STATE", "ALIASES");
    for m in value["data"].as_array().into_iter().flatten() {
        let aliases: Vec<&str> = m["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        out.push_str(&format!(
            "{:<24} {:<10} {}\n",
            m["id"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            aliases.join(", ")
        ));
    }
    out
}

fn ms(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |m| format!("{m:.0}ms"))
}

fn rate(v: &serde_json::Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |r| format!("{r:.0}"))
}

/// Renders `/admin/history` as a table, newest first.
pub fn format_history(value: &serde_json::Value) -> String {
    let mut out = format!(
        "{:>7} {:<19} {:<16} {:<22} {:>6} {:<14} {:>9} {:>8} {:>11}\n",
        "ID",
        "STARTED (UTC)",
        "MODEL",
        "ENDPOINT",
        "STATUS",
        "OUTCOME",
        "LATENCY",
        "TTFT",
        "TOKENS IN/OUT"
    );
    for r in value["requests"].as_array().into_iter().flatten() {
        let started = r["started_at_ms"]
            .as_u64()
            .map(|t| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t))
                    .to_string()
            })
            .map(|t| t.trim_end_matches('Z').replace('T', " "))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:>7} {:<19} {:<16} {:<22} {:>6} {:<14} {:>9} {:>8} {:>11}\n",
            r["id"].to_string(),
            started,
            r["model"].as_str().unwrap_or("-"),
            r["endpoint"].as_str().unwrap_or("?"),
            r["status"].to_string(),
            r["outcome"].as_str().unwrap_or("?"),
            ms(&r["latency_ms"]),
            ms(&r["ttft_ms"]),
            format!(
                "{}/{}",
                opt(&r["prompt_tokens"]),
                opt(&r["completion_tokens"])
            ),
        ));
        if let Some(e) = r["error"].as_str() {
            out.push_str(&format!("{:>7} error: {e}\n", ""));
        }
    }
    out
}

/// Renders `/admin/stats`.
pub fn format_stats(value: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>9}\n",
        "MODEL",
        "REQUESTS",
        "ERRORS",
        "LAT P50",
        "LAT P95",
        "TTFT P50",
        "TTFT P95",
        "PROMPT t/s",
        "GEN t/s",
        "LOADS",
        "LOAD P50"
    );
    for m in value["models"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>9}\n",
            m["model"].as_str().unwrap_or("?"),
            m["requests"].to_string(),
            m["errors"].to_string(),
            ms(&m["latency_p50_ms"]),
            ms(&m["latency_p95_ms"]),
            ms(&m["ttft_p50_ms"]),
            ms(&m["ttft_p95_ms"]),
            rate(&m["prompt_tokens_per_second"]),
            rate(&m["generation_tokens_per_second"]),
            m["loads"].to_string(),
            ms(&m["load_p50_ms"]),
        ));
    }
    if let Some(d) = value["history_rows_dropped"].as_u64().filter(|d| *d > 0) {
        out.push_str(&format!("({d} history rows were dropped)\n"));
    }
    out
}

/// `claracore backup FILE`: asks the daemon for a consistent copy, checks
/// it, and only then puts it at `file` (never over an existing file).
pub async fn backup(host: &Host, file: &std::path::Path) -> Result<String, String> {
    if file.exists() {
        return Err(format!("{} exists; choose a new file", file.display()));
    }
    let (status, body) = call_raw(
        host,
        Method::POST,
        "/admin/backup",
        Duration::from_secs(600),
    )
    .await
    .map_err(|e| e.to_string())?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_default();
        return Err(format!("claracore answered {status}: {message}"));
    }
    let tmp = file.with_extension("partial");
    std::fs::write(&tmp, &body).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    match crate::history::store::verify(&tmp) {
        Ok(version) => {
            std::fs::rename(&tmp, file)
                .map_err(|e| format!("renaming to {}: {e}", file.display()))?;
            Ok(format!(
                "{}: {} bytes, schema version {version}, integrity ok\n",
                file.display(),
                body.len()
            ))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(format!("the copy failed its check: {e}"))
        }
    }
}

/// `claracore restore FILE`: with the daemon stopped, checks `file` and
/// makes it the history database; the current one is kept beside it.
pub fn restore(config: &crate::config::Config, file: &std::path::Path) -> Result<String, String> {
    use crate::config::ListenAddr;
    for addr in &config.listen {
        let live = match addr {
            ListenAddr::Tcp(a) => {
                std::net::TcpStream::connect_timeout(a, Duration::from_millis(300)).is_ok()
            }
            ListenAddr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
        };
        if live {
            return Err(format!(
                "claracore is answering on {addr}; stop it first (systemctl stop claracore)"
            ));
        }
    }
    let version = crate::history::store::verify(file).map_err(|e| e.to_string())?;
    let db = &config.history.path;
    let tmp = db.with_extension("restoring");
    std::fs::copy(file, &tmp).map_err(|e| format!("copying to {}: {e}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    let mut note = String::new();
    if db.exists() {
        let aside = db.with_extension(format!(
            "db.before-restore-{}",
            crate::history::now_ms() / 1000
        ));
        std::fs::rename(db, &aside).map_err(|e| format!("moving {} aside: {e}", db.display()))?;
        for suffix in ["-wal", "-shm"] {
            let side = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
        note = format!(" (the previous database is at {})", aside.display());
    }
    std::fs::rename(&tmp, db).map_err(|e| format!("renaming to {}: {e}", db.display()))?;
    Ok(format!(
        "restored {} as {} (schema version {version}){note}\n",
        file.display(),
        db.display()
    ))
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

    #[test]
    fn ps_table_lists_only_models_with_a_process() {
        let v = serde_json::json!({"models": [
            {"name": "a", "state": "ready", "pid": 12, "port": 3456, "inflight": 1, "idle_s": null, "uptime_s": 75.0},
            {"name": "b", "state": "stopped", "pid": null, "port": null, "inflight": 0, "idle_s": null, "uptime_s": null}
        ]});
        let t = format_ps(&v);
        assert!(
            t.contains("a ") && t.contains("3456") && t.contains("1m 15s"),
            "{t}"
        );
        assert!(!t.contains("\nb "), "{t}");
    }
}
