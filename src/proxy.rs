//! Streaming pass-through to a model's child.
//!
//! The upstream response body is handed to the client frame by frame as the
//! child produces it: nothing is buffered beyond one frame. The body holds
//! the request's [`Lease`], so the child is not stopped (TTL, eviction) until
//! the client has the last byte or has gone away. A client that disconnects
//! drops the body, which drops the upstream connection, which makes
//! llama-server cancel the generation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Request, Response, Uri};
use tokio::sync::OwnedSemaphorePermit;

use crate::history::tap::Tap;
use crate::scheduler::Lease;
pub use crate::upstream::{BoxBody, BoxError};

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including any the `Connection` header names.
/// `Transfer-Encoding` is left to hyper, which re-frames the body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Whether a request failed because the connection closed before any of
/// the answer came (not a refused connect, a timeout or a bad answer).
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message() || h.is_canceled() || h.is_closed();
        }
        source = s.source();
    }
    false
}

/// Why forwarding failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
#[error("model process did not answer: {0}")]
pub struct ForwardError(#[source] hyper_util::client::legacy::Error);

/// What goes to the child.
pub enum Outgoing {
    /// A body claracore has read whole (`held`: its share of the body
    /// budget, kept until the answer's head is in): sent again, at most
    /// [`RESENDS`] times, when a pooled connection fails before any answer
    /// because the child had closed it (llama-server closes idle keep-alive
    /// connections; one that goes as a request is written on it loses the
    /// request, not the child's work).
    Whole {
        head: Request<()>,
        bytes: Bytes,
        held: Option<OwnedSemaphorePermit>,
    },
    /// A body that streams through unread: sent once.
    Streaming(Request<BoxBody>),
}

/// How many times a whole request is sent again after a closed connection.
pub const RESENDS: usize = 2;

/// Sends the request (with its path and query) to the leased child and
/// returns the child's response with a streaming body that keeps the
/// lease. `tap` is asked, with the response status and whether it is a
/// stream, for an observer of the body (history).
pub async fn forward(
    lease: Lease,
    path_and_query: PathAndQuery,
    outgoing: Outgoing,
    tap: impl FnOnce(u16, bool) -> Option<Tap>,
) -> Result<Response<BoxBody>, ForwardError> {
    let upstream = lease.upstream();
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(upstream.authority().clone())
        .path_and_query(path_and_query)
        .build()
        .ok();
    let address = |head: &mut HeaderMap, target: &mut Uri| {
        if let Some(uri) = &uri {
            *target = uri.clone();
        }
        strip_hop_by_hop(head);
        head.insert(header::HOST, upstream.host().clone());
    };
    // Waits here while the child has its limit of requests in flight.
    let permit = upstream.connection_permit().await;
    let resp = match outgoing {
        Outgoing::Streaming(mut req) => {
            let (mut parts, body) = req.into_parts();
            address(&mut parts.headers, &mut parts.uri);
            req = Request::from_parts(parts, body);
            upstream.client().request(req).await.map_err(ForwardError)?
        }
        Outgoing::Whole { head, bytes, held } => {
            let (mut head, ()) = head.into_parts();
            address(&mut head.headers, &mut head.uri);
            let mut resends = 0;
            let resp = loop {
                let mut req = Request::new(
                    http_body_util::Full::new(bytes.clone())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *req.method_mut() = head.method.clone();
                *req.uri_mut() = head.uri.clone();
                *req.version_mut() = head.version;
                *req.headers_mut() = head.headers.clone();
                match upstream.client().request(req).await {
                    Err(e) if resends < RESENDS && closed_unanswered(&e) => {
                        resends += 1;
                        tracing::debug!(model = %lease.model(), error = %e, resends,
                            "the child closed the connection the request went out on; sending it again");
                    }
                    other => break other.map_err(ForwardError)?,
                }
            };
            drop(held);
            resp
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let is_sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = LeasedBody {
        inner: body,
        lease: Some((lease, permit)),
        tap: tap(parts.status.as_u16(), is_sse),
        is_sse,
        failure: Failure::None,
    };
    Ok(Response::from_parts(parts, UnsyncBoxBody::new(body)))
}

pin_project_lite::pin_project! {
    /// The upstream body, plus the lease that keeps its child alive. When the
    /// child dies mid-stream, an SSE client gets an error event before the
    /// response is aborted, so it can tell a failure from a finished answer.
    struct LeasedBody {
        #[pin]
        inner: hyper::body::Incoming,
        // With the child's connection permit, if it has a limit.
        lease: Option<(Lease, Option<OwnedSemaphorePermit>)>,
        tap: Option<Tap>,
        is_sse: bool,
        failure: Failure,
    }
}

/// How far the mid-stream failure path has got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    None,
    /// The SSE error event went out; yield once so hyper flushes it.
    EventSent,
    /// Flushed; now abort the response.
    Abort,
}

const SSE_ERROR_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the model process failed while streaming the response\",\"type\":\"upstream_error\",\"code\":502}}\n\n";

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match *this.failure {
            Failure::None => {}
            Failure::EventSent => {
                // hyper writes out what it has buffered when the body is
                // not ready; without this the event would be discarded
                // with the aborted connection.
                *this.failure = Failure::Abort;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Failure::Abort => return Poll::Ready(Some(Err("upstream failed mid-response".into()))),
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                // Released as soon as the last byte is out, not when hyper
                // gets round to dropping the body.
                this.lease.take();
                if let Some(mut tap) = this.tap.take() {
                    tap.on_end(None);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(tap), Some(data)) = (this.tap.as_mut(), frame.data_ref()) {
                    tap.on_data(data);
                }
                // hyper stops polling a sized body once all its bytes are
                // written, so its end is seen here, not as a None.
                if this.inner.is_end_stream() {
                    this.lease.take();
                    if let Some(mut tap) = this.tap.take() {
                        tap.on_end(None);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let model = this
                    .lease
                    .as_ref()
                    .map(|(l, _)| l.model().to_string())
                    .unwrap_or_default();
                tracing::warn!(model = %model, error = %e, "upstream body failed mid-response");
                this.lease.take();
                if let Some(mut tap) = this.tap.take() {
                    tap.on_end(Some(
                        "the model process failed while sending the response".into(),
                    ));
                }
                if *this.is_sse {
                    *this.failure = Failure::EventSent;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(SSE_ERROR_EVENT)))))
                } else {
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failure == Failure::None && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
