//! The `GET /admin/events` handler: where a request asks to start (the
//! `Last-Event-ID` header or the query), joining the hub, and the
//! response head.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::body::EventBody;
use super::log::{Join, Resume};
use super::{Disconnect, CLIENT_QUEUE};
use crate::api::{ApiError, Ctx};
use crate::proxy::BoxBody;
use crate::scheduler::AcquireError;
use crate::wire::query::{self, Flag, QueryError};

/// `/admin/events`' query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    last_event_id: Option<String>,
    #[serde(default)]
    replay_only: Flag,
}

/// Where a request asks to start, and whether it wants the replay only.
pub(super) fn parse_request(
    last_event_id: Option<&HeaderValue>,
    query: Option<&str>,
) -> Result<(Resume, bool), ApiError> {
    let EventsQuery {
        last_event_id: from_query,
        replay_only: Flag(replay_only),
    } = query::parse(query).map_err(|e| match e {
        QueryError::Unknown(other) => ApiError::BadRequest(format!(
            "unknown query parameter {:?}; /admin/events takes last_event_id and replay_only",
            crate::api::error::cut(&other, 32)
        )),
        QueryError::Invalid(message) => ApiError::BadRequest(message),
    })?;
    // The header wins: a browser's EventSource sends it on reconnect,
    // with the URL (and its query) unchanged.
    let given = match last_event_id {
        Some(h) => Some(h.to_str().unwrap_or("").trim().to_string()),
        None => from_query,
    };
    let resume = match given {
        None => Resume::Now,
        Some(s) => s.parse().map_or(Resume::Invalid, Resume::After),
    };
    Ok((resume, replay_only))
}

/// `GET /admin/events`.
pub(in crate::api) async fn stream(
    ctx: &Ctx<'_>,
    req: &Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let (resume, replay_only) =
        parse_request(req.headers().get("last-event-id"), req.uri().query())?;
    let log = &ctx.state.events;
    let (reply, replay) = oneshot::channel();
    let (live, rx) = if replay_only {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let cut = req
            .extensions()
            .get::<Disconnect>()
            .cloned()
            .unwrap_or_default();
        (Some((tx, cut)), Some(rx))
    };
    let shutting_down = || ApiError::Unavailable(AcquireError::ShuttingDown);
    log.joins
        .send(Join {
            resume,
            live,
            reply,
        })
        .map_err(|_| shutting_down())?;
    // Answered once the hub has taken the client in: from the response
    // head on, nothing emitted is missed.
    let replay = replay.await.map_err(|_| shutting_down())?;
    let body = EventBody::new(replay, rx, log.metrics.clone());
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies such as nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_wins_over_the_query_and_bad_parameters_are_named() {
        let h = HeaderValue::from_static("12");
        assert_eq!(
            parse_request(Some(&h), Some("last_event_id=3")).unwrap(),
            (Resume::After(12), false)
        );
        assert_eq!(
            parse_request(None, Some("last_event_id=3&replay_only=1")).unwrap(),
            (Resume::After(3), true)
        );
        assert_eq!(parse_request(None, None).unwrap(), (Resume::Now, false));
        let junk = HeaderValue::from_static("abc");
        assert_eq!(parse_request(Some(&junk), None).unwrap().0, Resume::Invalid);
        let e = parse_request(None, Some("since=1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("since"), "{e}");
    }
}
