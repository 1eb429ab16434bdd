//! Talking to a running daemon: where it is ([`Host`]), one request over
//! TCP or a unix socket ([`call`], [`call_raw`]), a request whose answer is
//! read as it arrives ([`post_stream`], for `run`), and `backup`, which
//! fetches a copy of the history database.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::openai::ErrorReply;

/// A daemon address for client commands. Over TCP it may carry an API key;
/// the local socket needs none (its file mode is the authorization).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp { authority: String, key: Option<Key> },
    Unix(PathBuf),
}

/// An API key on its way to the daemon; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub String);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
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
        Ok(Host::Tcp {
            authority: authority.to_string(),
            key: None,
        })
    }

    /// The same daemon, sending `key` (over TCP; the socket needs none).
    pub fn with_key(self, key: Option<String>) -> Host {
        match self {
            Host::Tcp { authority, .. } => Host::Tcp {
                authority,
                key: key.map(Key),
            },
            unix @ Host::Unix(_) => unix,
        }
    }
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
    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            host: self.describe(),
            message,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Host::Tcp { authority, .. } => format!("http://{authority}"),
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
    call_within(host, method, path, Duration::from_secs(30)).await
}

/// How long `claracore load` waits: a start is bounded by the daemon's
/// `start_timeout` (default 5 min), plus an eviction's drain before it.
pub const LOAD_WAIT: Duration = Duration::from_secs(30 * 60);

/// `claracore load MODEL`: starts the model and waits until it is ready.
pub async fn load(host: &Host, model: &str) -> Result<String, String> {
    let path = format!("/admin/models/{model}/load");
    call_within(host, Method::POST, &path, LOAD_WAIT)
        .await
        .map_err(|e| e.to_string())
        .and_then(|v| super::render::format_load(&v))
}

/// [`call`] with its own limit on the whole exchange.
pub async fn call_within(
    host: &Host,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let (status, body) = call_raw(host, method, path, timeout).await?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| ClientError::Protocol {
            host: host.describe(),
            message: format!("answer is not JSON (status {status})"),
        })?;
    if !status.is_success() {
        let reply = ErrorReply::deserialize(&value).ok();
        let message = reply
            .as_ref()
            .and_then(|r| r.error.as_ref()?.message())
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
    let exchange = async {
        let mut answer = open(host, method, path, None).await?;
        let mut body = Vec::new();
        while let Some(frame) = answer.frame().await {
            let frame = frame.map_err(|e| host.protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                body.extend_from_slice(&data);
            }
        }
        Ok((answer.status(), Bytes::from(body)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| host.protocol(format!("no answer within {}s", timeout.as_secs())))?
}

/// The task of one HTTP/1.1 connection: reads and writes its socket.
type Connection = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// A response whose body is still arriving, and its connection, which is
/// driven only while [`Streaming::frame`] is awaited and is not spawned:
/// dropping this mid-body closes the socket there and then, which is how
/// the daemon learns the client left (and cancels the generation).
pub struct Streaming {
    status: StatusCode,
    body: Incoming,
    /// None once the connection has finished its work.
    conn: Option<Connection>,
}

impl Streaming {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body's next frame; None at its end.
    pub async fn frame(&mut self) -> Option<Result<Frame<Bytes>, hyper::Error>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return self.body.frame().await;
            };
            tokio::select! {
                frame = self.body.frame() => return frame,
                done = conn => {
                    self.conn = None;
                    if let Err(e) = done {
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}

/// POSTs a JSON `body` and returns as soon as the response head is in; the
/// body is for the caller to read frame by frame. Only the connect is
/// bounded (by `connect_timeout`): the head may wait on a model load.
pub async fn post_stream(
    host: &Host,
    path: &str,
    body: Vec<u8>,
    connect_timeout: Duration,
) -> Result<Streaming, ClientError> {
    open(host, Method::POST, path, Some((body, connect_timeout))).await
}

/// Connects, sends one request (an empty body, or JSON with a bounded
/// connect) and returns once the response head is in.
async fn open(
    host: &Host,
    method: Method,
    path: &str,
    json: Option<(Vec<u8>, Duration)>,
) -> Result<Streaming, ClientError> {
    let connect_err = |source| ClientError::Connect {
        host: host.describe(),
        source,
    };
    let (body, connect_timeout) = match json {
        Some((body, t)) => (Some(body), Some(t)),
        None => (None, None),
    };
    let connect = async {
        match host {
            Host::Tcp { authority, .. } => tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map(Io::Tcp),
            Host::Unix(p) => tokio::net::UnixStream::connect(p).await.map(Io::Unix),
        }
    };
    let stream = match connect_timeout {
        Some(t) => tokio::time::timeout(t, connect)
            .await
            .map_err(|_| host.protocol(format!("no connection within {}s", t.as_secs())))?,
        None => connect.await,
    }
    .map_err(connect_err)?;
    match stream {
        Io::Tcp(s) => exchange(s, host, method, path, body).await,
        Io::Unix(s) => exchange(s, host, method, path, body).await,
    }
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn exchange<S>(
    stream: S,
    host: &Host,
    method: Method,
    path: &str,
    json: Option<Vec<u8>>,
) -> Result<Streaming, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| host.protocol(e.to_string()))?;
    let mut conn: Connection = Box::pin(conn);
    let (authority, key) = match host {
        Host::Tcp { authority, key } => (authority.clone(), key.as_ref()),
        Host::Unix(_) => ("localhost".into(), None),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    if let Some(Key(key)) = key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if json.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(json.unwrap_or_default())))
        .map_err(|e| host.protocol(e.to_string()))?;
    let sent = sender.send_request(req);
    tokio::pin!(sent);
    let resp = tokio::select! {
        resp = &mut sent => resp,
        done = &mut conn => match done {
            // The connection gave up; the request's own error says why.
            Err(_) => sent.await,
            Ok(()) => return Err(host.protocol("the connection closed before an answer".into())),
        },
    }
    .map_err(|e| host.protocol(e.to_string()))?;
    let status = resp.status();
    Ok(Streaming {
        status,
        body: resp.into_body(),
        conn: Some(conn),
    })
}

/// Runs a client command's future on a runtime of its own: the binary has
/// no other async work.
pub fn block_on<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?
        .block_on(f)
}

/// [`call`] from synchronous code, the answer rendered with `render`.
pub fn fetch(
    host: &Host,
    method: Method,
    path: &str,
    render: impl Fn(&serde_json::Value) -> Result<String, String>,
) -> Result<String, String> {
    block_on(async {
        let value = call(host, method, path).await.map_err(|e| e.to_string())?;
        render(&value)
    })
}

/// `claracore backup FILE`: asks the daemon for a consistent copy, checks
/// it, and only then puts it at `file` (never over an existing file).
pub async fn backup(host: &Host, file: &Path) -> Result<String, String> {
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
        let message = serde_json::from_slice::<ErrorReply<'_>>(&body)
            .ok()
            .and_then(|r| r.error?.message().map(str::to_string))
            .unwrap_or_default();
        return Err(format!("claracore answered {status}: {message}"));
    }
    let tmp = file.with_extension("partial");
    write_private(&tmp, &body)?;
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

/// Writes `body` to a new file at `path`, 0600 whatever the umask: a
/// backup holds every recorded prompt. The file must not exist, so a stale
/// or planted name (a symlink, say) is never written through.
fn write_private(path: &Path, body: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::history::store::FILE_MODE)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} exists (left by an interrupted backup?); remove it and try again",
                path.display()
            ),
            _ => format!("creating {}: {e}", path.display()),
        })?;
    if let Err(e) = out.write_all(body).and_then(|()| out.sync_all()) {
        let _ = std::fs::remove_file(path);
        return Err(format!("writing {}: {e}", path.display()));
    }
    Ok(())
}
