//! Where the daemon accepts connections: the top-level `listen` list and
//! `socket_mode`, the permission bits of its unix listener sockets.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::Source;
use super::{ConfigError, DEFAULT_LISTEN, DEFAULT_SOCKET_MODE};

/// Where the daemon accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Reachable only from this machine: a loopback address or a unix
    /// socket.
    pub fn is_loopback(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }

    /// Parses `host:port`, `[v6]:port` or `unix:/absolute/path`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err(format!(
                    "unix socket path {:?} must be absolute",
                    path.display().to_string()
                ));
            }
            return Ok(ListenAddr::Unix(path.to_path_buf()));
        }
        text.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("{text:?} is not a listen address (expected host:port, [v6]:port or unix:/path)")
        })
    }
}

/// `listen`: each address once; [`DEFAULT_LISTEN`] when absent.
pub(super) fn validate_listen(
    src: &Source<'_>,
    raw: Option<&[Spanned<String>]>,
) -> Result<Vec<ListenAddr>, ConfigError> {
    let Some(list) = raw else {
        let addr = DEFAULT_LISTEN
            .parse()
            .map_err(|_| src.unpositioned("default listen address is invalid"))?;
        return Ok(vec![ListenAddr::Tcp(addr)]);
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let addr = ListenAddr::parse(item.get_ref())
            .map_err(|e| src.error(item, format!("listen: {e}")))?;
        if out.contains(&addr) {
            return Err(src.error(item, format!("listen: {addr} is listed twice")));
        }
        out.push(addr);
    }
    Ok(out)
}

/// `socket_mode`: octal permission bits, at most `0777`.
pub(super) fn validate_socket_mode(
    src: &Source<'_>,
    raw: Option<&Spanned<String>>,
) -> Result<u32, ConfigError> {
    let Some(mode) = raw else {
        return Ok(DEFAULT_SOCKET_MODE);
    };
    u32::from_str_radix(mode.get_ref().trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            src.error(
                mode,
                format!(
                    "socket_mode: {:?} is not an octal mode like \"0660\"",
                    mode.get_ref()
                ),
            )
        })
}
