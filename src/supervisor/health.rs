//! The health probe: `GET <health path>` on a child through hyper's HTTP/1
//! client, over its unix socket ([`UnixConnector`]) or loopback TCP. A
//! child is healthy when the path (llama-server's `/health`) answers 200
//! within the timeout; anything else, a failed connection included, is not.
//!
//! Each probe opens its own connection and closes it when it returns
//! (`Connection: close`, nothing pooled, the connection owned by the
//! probe's future so a timeout drops it at once): llama-server gives every
//! open connection one of its HTTP threads, and a lingering probe
//! connection would hold one back from requests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper::header::{CONNECTION, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::config::ChildAddr;
use crate::connector::UnixConnector;

/// The `Host` of a probe over a unix socket: any name will do, llama-server
/// does not check it.
const UNIX_HOST: &str = "localhost";

/// `GET path` on the child; true on a 200 within `timeout`.
pub async fn probe(addr: &ChildAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        match addr {
            ChildAddr::Tcp(a) => status(HttpConnector::new(), &a.to_string(), path).await,
            ChildAddr::Unix(p) => status(UnixConnector::new(p), UNIX_HOST, path).await,
        }
    };
    matches!(
        tokio::time::timeout(timeout, attempt).await,
        Ok(Some(StatusCode::OK))
    )
}

/// The status `GET path` answers on a new connection from `connector` to
/// `host`; none when connecting, sending or reading the answer's head
/// fails. The body is not read.
async fn status<C>(mut connector: C, host: &str, path: &str) -> Option<StatusCode>
where
    C: Service<Uri>,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let target: Uri = path.parse().ok()?;
    let destination = Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query("/")
        .build()
        .ok()?;
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .ok()?;
    let io = connector.call(destination).await.ok()?;
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(io).await.ok()?;
    let request = Request::get(target)
        .header(HOST, host)
        .header(CONNECTION, "close")
        .body(Empty::new())
        .ok()?;
    let response = sender.send_request(request);
    tokio::pin!(conn, response);
    let response = tokio::select! {
        response = &mut response => response,
        // The connection ended first: the answer, if it came, has been
        // handed over; otherwise the request fails.
        _ = &mut conn => response.await,
    };
    response.ok().map(|r| r.status())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one request head from `s`, answers `reply` (if any) and
    /// returns the head.
    async fn answer(mut s: impl AsyncRead + AsyncWrite + Unpin, reply: Option<&str>) -> String {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        match reply {
            Some(reply) => s.write_all(reply.as_bytes()).await.unwrap(),
            // Holds the connection open without answering.
            None => std::future::pending::<()>().await,
        }
        String::from_utf8(seen).unwrap()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
    const LOADING: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";

    #[tokio::test]
    async fn a_200_on_the_unix_socket_is_healthy_and_anything_else_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-1.sock");
        let addr = ChildAddr::Unix(path.clone());
        let timeout = Duration::from_secs(5);
        assert!(
            !probe(&addr, "/health", timeout).await,
            "nothing listens yet"
        );
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        for (reply, healthy) in [(OK, true), (LOADING, false), ("garbage\r\n\r\n", false)] {
            let server = async { answer(listener.accept().await.unwrap().0, Some(reply)).await };
            let (seen, got) = tokio::join!(server, probe(&addr, "/health", timeout));
            assert_eq!(got, healthy, "{reply}");
            let seen = seen.to_ascii_lowercase();
            assert!(seen.starts_with("get /health http/1.1\r\n"), "{seen}");
            assert!(seen.contains("host: localhost\r\n"), "{seen}");
            assert!(seen.contains("connection: close\r\n"), "{seen}");
        }
    }

    #[tokio::test]
    async fn a_child_that_does_not_answer_is_unhealthy_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-1.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            answer(s, None).await
        });
        let started = std::time::Instant::now();
        let healthy = probe(
            &ChildAddr::Unix(path),
            "/health",
            Duration::from_millis(200),
        )
        .await;
        assert!(!healthy);
        assert!(started.elapsed() < Duration::from_secs(5));
        server.abort();
    }

    #[tokio::test]
    async fn a_tcp_child_is_probed_with_its_address_as_host() {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let local = listener.local_addr().unwrap();
        let server = async { answer(listener.accept().await.unwrap().0, Some(OK)).await };
        let addr = ChildAddr::Tcp(local);
        let (seen, healthy) = tokio::join!(server, probe(&addr, "/health", Duration::from_secs(5)));
        assert!(healthy);
        let seen = seen.to_ascii_lowercase();
        assert!(seen.contains(&format!("host: {local}\r\n")), "{seen}");
    }
}
