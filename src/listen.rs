//! Listening sockets: binding TCP and unix addresses, and accepting from
//! either behind one type.
//!
//! A unix socket path that holds a stale socket is replaced; any other kind
//! of file there is an error, never deleted. Socket permissions are set
//! before the listener is handed out, so no client can connect through a
//! wider mode in between.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

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
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// An accepted connection.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// Binds one configured address.
    pub async fn bind(addr: &ListenAddr, socket_mode: u32) -> Result<Listener, ListenError> {
        match addr {
            ListenAddr::Tcp(sock) => {
                TcpListener::bind(sock)
                    .await
                    .map(Listener::Tcp)
                    .map_err(|source| ListenError::Bind {
                        addr: sock.to_string(),
                        source,
                    })
            }
            ListenAddr::Unix(path) => bind_unix(path, socket_mode),
        }
    }

    /// The address as an operator would write it (with the real port for
    /// `:0` binds).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".to_string(), |a| a.to_string()),
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// Accepts one connection and names its peer for logs and history.
    pub async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                // Small request/response exchanges and SSE chunks must not
                // wait for Nagle.
                stream.set_nodelay(true)?;
                Ok((Conn::Tcp(stream), peer.to_string()))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let peer = stream
                    .peer_cred()
                    .map_or_else(|_| "unix".to_string(), |c| format!("unix:uid={}", c.uid()));
                Ok((Conn::Unix(stream), peer))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            // Only our own socket is removed; a failure leaves a stale socket
            // that the next bind replaces.
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<Listener, ListenError> {
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
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| unix_err("setting its mode", e))?;
    Ok(Listener::Unix {
        listener,
        path: path.to_path_buf(),
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

        let l = Listener::bind(&ListenAddr::Unix(path.clone()), 0o660)
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);

        // While it lives, a second bind must refuse rather than steal.
        let e = Listener::bind(&ListenAddr::Unix(path.clone()), 0o660)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        drop(l);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[tokio::test]
    async fn regular_file_in_the_way_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        std::fs::write(&path, "data").unwrap();
        let e = Listener::bind(&ListenAddr::Unix(path.clone()), 0o660)
            .await
            .unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
