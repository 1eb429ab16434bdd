//! Listening sockets: binding TCP and unix addresses or taking the ones
//! systemd passed (socket activation), and accepting from either behind one
//! type.
//!
//! Binding happens before the async runtime exists ([`Bound`], std types),
//! so privileges can be dropped while the process still has one thread;
//! [`Bound::into_listener`] hands the socket to tokio inside the runtime.
//!
//! A unix socket path that holds a stale socket is replaced; any other kind
//! of file there is an error, never deleted. Socket permissions are set
//! before the listener is handed out, so no client can connect through a
//! wider mode in between.

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The name systemd gives sockets without `FileDescriptorName=`, treated as
/// HTTP listeners.
const UNNAMED_FD: &str = "unknown";

use crate::config::ListenAddr;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot listen on unix:{}: a file that is not a socket is in the way", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on unix:{}: {what}: {source}", path.display())]
    Unix {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("socket activation: fd #{index} (name {name:?}) is not a TCP or unix stream listening socket")]
    Activation { index: usize, name: String },
    #[error("socket activation: LISTEN_FDNAMES has {names} names for {fds} sockets")]
    FdNames { names: usize, fds: usize },
}

/// A socket bound (or inherited) but not yet registered with tokio.
#[derive(Debug)]
pub struct Bound {
    socket: BoundSocket,
    /// `FileDescriptorName=` of an activated socket; "config" for ours.
    pub name: String,
}

#[derive(Debug)]
enum BoundSocket {
    Tcp(std::net::TcpListener),
    /// `owned_path`: a socket file we created and remove at exit; None for
    /// inherited ones, whose file belongs to the socket unit.
    Unix {
        listener: std::os::unix::net::UnixListener,
        owned_path: Option<PathBuf>,
    },
}

impl Bound {
    /// Binds one configured address.
    pub fn bind(addr: &ListenAddr, socket_mode: u32) -> Result<Bound, ListenError> {
        let socket = match addr {
            ListenAddr::Tcp(sock) => std::net::TcpListener::bind(sock)
                .map(BoundSocket::Tcp)
                .map_err(|source| ListenError::Bind {
                    addr: sock.to_string(),
                    source,
                })?,
            ListenAddr::Unix(path) => bind_unix(path, socket_mode)?,
        };
        Ok(Bound {
            socket,
            name: "config".into(),
        })
    }

    /// Takes the sockets systemd passed. `fds` comes from the environment
    /// (read by `main` before any thread exists); `names` is
    /// `LISTEN_FDNAMES`. Empty when the process was not socket-activated.
    pub fn from_activation(
        fds: &mut listenfd::ListenFd,
        names: Option<&str>,
    ) -> Result<Vec<Bound>, ListenError> {
        let count = fds.len();
        let names: Vec<String> = match names {
            Some(n) => n.split(':').map(str::to_string).collect(),
            None => vec![UNNAMED_FD.to_string(); count],
        };
        if names.len() != count {
            return Err(ListenError::FdNames {
                names: names.len(),
                fds: count,
            });
        }
        let mut out = Vec::with_capacity(count);
        for (index, name) in names.into_iter().enumerate() {
            let bad = || ListenError::Activation {
                index,
                name: name.clone(),
            };
            // The fd stays in place when it is not of the asked type.
            let socket = match fds.take_tcp_listener(index) {
                Ok(Some(l)) => BoundSocket::Tcp(l),
                _ => match fds.take_unix_listener(index) {
                    Ok(Some(listener)) => BoundSocket::Unix {
                        listener,
                        owned_path: None,
                    },
                    _ => return Err(bad()),
                },
            };
            let name = if name == UNNAMED_FD {
                "http".to_string()
            } else {
                name
            };
            out.push(Bound { socket, name });
        }
        Ok(out)
    }

    /// Reachable only from this machine: a unix socket, or TCP on a
    /// loopback address.
    pub fn is_loopback(&self) -> bool {
        match &self.socket {
            BoundSocket::Tcp(l) => l.local_addr().is_ok_and(|a| a.ip().is_loopback()),
            BoundSocket::Unix { .. } => true,
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self.socket, BoundSocket::Unix { .. })
    }

    /// The address as an operator would write it.
    pub fn describe(&self) -> String {
        match &self.socket {
            BoundSocket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| a.to_string()),
            BoundSocket::Unix { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    /// Registers the socket with tokio; call inside the runtime.
    pub fn into_listener(self) -> io::Result<Listener> {
        let name = self.name;
        let describe = |l: &Listener| l.describe();
        let listener = match self.socket {
            BoundSocket::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            BoundSocket::Unix {
                listener,
                owned_path,
            } => {
                listener.set_nonblocking(true)?;
                Listener::Unix {
                    listener: UnixListener::from_std(listener)?,
                    owned_path,
                }
            }
        };
        tracing::debug!(listen = %describe(&listener), name, "listener registered");
        Ok(listener)
    }
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// `owned_path`: see [`Bound`]; removed on drop when set.
    Unix {
        listener: UnixListener,
        owned_path: Option<PathBuf>,
    },
}

/// An accepted connection.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// How a connection reached the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { ip: IpAddr },
    Unix { uid: Option<u32> },
}

/// A connection's peer, as the server accepted it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// For logs and history: `ip:port` or the socket's description.
    pub addr: Arc<str>,
    pub transport: Transport,
}

impl Listener {
    /// The address as an operator would write it (with the real port for
    /// `:0` binds).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".to_string(), |a| a.to_string()),
            Listener::Unix { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Listener::Unix { .. })
    }

    /// Accepts one connection and names its peer (for logs, history and
    /// authentication: a unix peer's uid comes from SO_PEERCRED).
    pub async fn accept(&self) -> io::Result<(Conn, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Small request/response exchanges and SSE chunks must not
                // wait for Nagle.
                stream.set_nodelay(true)?;
                let addr = peer.to_string().into();
                Ok((
                    Conn::Tcp(stream),
                    Peer {
                        addr,
                        transport: Transport::Tcp { ip: peer.ip() },
                    },
                ))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                let addr = uid.map_or_else(|| "unix".to_string(), |u| format!("unix:uid={u}"));
                Ok((
                    Conn::Unix(stream),
                    Peer {
                        addr: addr.into(),
                        transport: Transport::Unix { uid },
                    },
                ))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            owned_path: Some(path),
            ..
        } = self
        {
            // Only a socket we created is removed; a failure leaves a stale
            // socket that the next bind replaces.
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<BoundSocket, ListenError> {
    let unix_err = |what, source| ListenError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live daemon on this path would answer; refuse to steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(unix_err(
                    "another process is listening there",
                    io::Error::from(io::ErrorKind::AddrInUse),
                ));
            }
            std::fs::remove_file(path).map_err(|e| unix_err("removing the stale socket", e))?;
        }
        Ok(_) => {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(unix_err("inspecting the path", e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| unix_err("creating its directory", e))?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| ListenError::Bind {
            addr: format!("unix:{}", path.display()),
            source,
        })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| unix_err("setting its mode", e))?;
    Ok(BoundSocket::Unix {
        listener,
        owned_path: Some(path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_gets_mode_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.sock");
        // A stale socket: bound, then its listener dropped without unlinking.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let l = Bound::bind(&ListenAddr::Unix(path.clone()), 0o660)
            .unwrap()
            .into_listener()
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);

        // While it lives, a second bind must refuse rather than steal.
        let e = Bound::bind(&ListenAddr::Unix(path.clone()), 0o660).unwrap_err();
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        drop(l);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn regular_file_in_the_way_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        std::fs::write(&path, "data").unwrap();
        let e = Bound::bind(&ListenAddr::Unix(path.clone()), 0o660).unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
