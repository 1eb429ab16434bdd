//! The HTTP side of one ready child: its address, a connection pool to it,
//! and the limit on requests forwarded at once.
//!
//! The scheduler makes an [`Upstream`] when a child becomes ready and keeps
//! it in the child's gate; the proxy reaches it through a lease. Nothing
//! here knows about models' lifecycles or about the API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ChildAddr;
/// Re-exported: the connector lives in a leaf so the supervisor's health
/// probe can use it too.
pub use crate::connector::UnixConnector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used for requests and responses in both directions.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle connections kept per child when its requests are not limited.
const MAX_IDLE_UNLIMITED: usize = 64;
/// How long an idle pooled connection to a child is kept: less than
/// llama-server's own keep-alive timeout (cpp-httplib's 5 s, measured: it
/// closes an idle connection 5.0 s after its last answer). With a longer
/// one, a request sent on a connection the child is closing at that moment
/// is lost ("did not answer", a 502) — the bench's streams hit it after
/// 5–11 s idle, and so did nginx's pool to the same child.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The request URI's authority and `Host` for a child on a unix socket:
/// the socket is the address, and llama-server does not check the name.
const UNIX_AUTHORITY: &str = "localhost";

/// One ready child as an HTTP peer.
#[derive(Debug)]
pub struct Upstream {
    addr: ChildAddr,
    /// `addr` for the request URI and `Host`, made once.
    authority: Authority,
    host: HeaderValue,
    client: UpstreamClient,
    /// Requests that may be forwarded at once (the model's
    /// `max_connections`), if limited.
    connections: Option<Arc<Semaphore>>,
}

impl Upstream {
    pub fn new(addr: ChildAddr, max_connections: Option<usize>) -> Upstream {
        let text = match &addr {
            ChildAddr::Tcp(a) => a.to_string(),
            ChildAddr::Unix(_) => UNIX_AUTHORITY.to_string(),
        };
        Upstream {
            authority: Authority::try_from(text.as_str())
                .unwrap_or_else(|_| Authority::from_static(UNIX_AUTHORITY)),
            host: HeaderValue::try_from(text)
                .unwrap_or_else(|_| HeaderValue::from_static(UNIX_AUTHORITY)),
            client: UpstreamClient::new(&addr, max_connections),
            connections: max_connections.map(|n| Arc::new(Semaphore::new(n))),
            addr,
        }
    }

    pub fn addr(&self) -> &ChildAddr {
        &self.addr
    }

    /// The child's `host:port` for a request URI (a fixed name for a unix
    /// socket).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The child's `host:port` as a `Host` header (likewise).
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The child's connection pool.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Waits for one of the child's connection slots if it has a limit;
    /// hold the permit until the response is complete.
    pub async fn connection_permit(&self) -> Option<OwnedSemaphorePermit> {
        let slots = self.connections.clone()?;
        slots.acquire_owned().await.ok()
    }
}

/// An HTTP/1 client with a connection pool to one child, over TCP or its
/// unix socket. With a connection limit the pool keeps at most that many
/// idle connections, so the child never sees more than twice the limit
/// open (busy plus idle).
#[derive(Debug)]
pub enum UpstreamClient {
    Tcp(Client<HttpConnector, BoxBody>),
    Unix(Client<UnixConnector, BoxBody>),
}

impl UpstreamClient {
    fn new(addr: &ChildAddr, max_connections: Option<usize>) -> UpstreamClient {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_connections.unwrap_or(MAX_IDLE_UNLIMITED));
        match addr {
            ChildAddr::Tcp(_) => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                UpstreamClient::Tcp(builder.build(connector))
            }
            ChildAddr::Unix(path) => UpstreamClient::Unix(builder.build(UnixConnector::new(path))),
        }
    }

    /// Sends a request on a pooled (or new) connection.
    pub fn request(&self, req: Request<BoxBody>) -> ResponseFuture {
        match self {
            UpstreamClient::Tcp(c) => c.request(req),
            UpstreamClient::Unix(c) => c.request(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn the_address_is_formatted_once_for_uri_and_host() {
        let u = Upstream::new(
            ChildAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 4321))),
            Some(2),
        );
        assert_eq!(u.authority().as_str(), "127.0.0.1:4321");
        assert_eq!(u.host(), "127.0.0.1:4321");
        assert!(matches!(u.client(), UpstreamClient::Tcp(_)));
    }

    #[test]
    fn a_unix_child_gets_a_fixed_authority_and_its_own_connector() {
        let u = Upstream::new(ChildAddr::Unix("/run/x/tiny-1.sock".into()), None);
        assert_eq!(u.authority().as_str(), "localhost");
        assert_eq!(u.host(), "localhost");
        assert!(matches!(u.client(), UpstreamClient::Unix(_)));
        assert_eq!(u.addr(), &ChildAddr::Unix("/run/x/tiny-1.sock".into()));
    }

    #[tokio::test]
    async fn requests_reach_a_unix_socket_through_the_pool() {
        use http_body_util::{BodyExt, Empty};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("child-1.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            // One connection serving two requests: the pool reuses it.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while seen.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(4).filter(|w| w == b"\r\n\r\n").count() == 1 {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let u = Upstream::new(ChildAddr::Unix(path), Some(1));
        for _ in 0..2 {
            let req = Request::builder()
                .uri(format!("http://{}/health", u.authority()))
                .header(hyper::header::HOST, u.host().clone())
                .body(BoxBody::new(Empty::new().map_err(|e| match e {})))
                .unwrap();
            let resp = u.client().request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        let seen = server.await.unwrap();
        assert!(seen.contains("GET /health HTTP/1.1"), "{seen}");
        assert!(
            seen.to_ascii_lowercase().contains("host: localhost"),
            "{seen}"
        );
    }
}
