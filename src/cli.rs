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
        other => return Err(format!("unknown command {other:?}")),
    })
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
    let connect_err = |source| ClientError::Connect {
        host: host.describe(),
        source,
    };
    let timeout = Duration::from_secs(30);
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
            message: "no answer within 30s".into(),
        })?
}

async fn exchange<S>(
    stream: S,
    host: &Host,
    method: Method,
    path: &str,
) -> Result<serde_json::Value, ClientError>
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
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| proto(format!("answer is not JSON (status {status})")))?;
    if !status.is_success() {
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        return Err(ClientError::Status { status, message });
    }
    Ok(value)
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

/// Renders `/api/ps`: only models that hold a process.
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
