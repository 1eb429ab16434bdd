//! The HTTP side of one ready child: its address, a connection pool to it,
//! and the limit on requests forwarded at once.
//!
//! The scheduler makes an [`Upstream`] when a child becomes ready and keeps
//! it in the child's gate; the proxy reaches it through a lease. Nothing
//! here knows about models' lifecycles or about the API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used for requests and responses in both directions.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
pub type UpstreamClient = Client<HttpConnector, BoxBody>;

/// Idle connections kept per child when its requests are not limited.
const MAX_IDLE_UNLIMITED: usize = 64;
/// How long an idle pooled connection to a child is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One ready child as an HTTP peer.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    /// `addr` for the request URI and `Host`, made once.
    authority: Authority,
    host: HeaderValue,
    client: UpstreamClient,
    /// Requests that may be forwarded at once (the model's
    /// `max_connections`), if limited.
    connections: Option<Arc<Semaphore>>,
}

impl Upstream {
    pub fn new(addr: SocketAddr, max_connections: Option<usize>) -> Upstream {
        let text = addr.to_string();
        Upstream {
            addr,
            authority: Authority::try_from(text.as_str())
                .unwrap_or_else(|_| Authority::from_static("127.0.0.1")),
            host: HeaderValue::try_from(text)
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            client: client(max_connections),
            connections: max_connections.map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The child's `host:port` for a request URI.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The child's `host:port` as a `Host` header.
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

/// An HTTP/1 client with a connection pool to one child. With a connection
/// limit the pool keeps at most that many idle connections, so the child
/// never sees more than twice the limit open (busy plus idle).
fn client(max_connections: Option<usize>) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_connections.unwrap_or(MAX_IDLE_UNLIMITED))
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_formatted_once_for_uri_and_host() {
        let u = Upstream::new(SocketAddr::from(([127, 0, 0, 1], 4321)), Some(2));
        assert_eq!(u.authority().as_str(), "127.0.0.1:4321");
        assert_eq!(u.host(), "127.0.0.1:4321");
        assert_eq!(u.addr().port(), 4321);
    }
}
