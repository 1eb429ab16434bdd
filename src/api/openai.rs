//! The OpenAI-shaped inference routes (`/v1/*`, routed by the body's
//! `model` and forwarded unchanged) and the raw `/upstream/{model}/…`
//! pass-through.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::routes::Inference;
use super::{full, json_response, resolve, ApiError, AppState, Ctx};
use crate::events::Bus;
use crate::history::tap::{Pending, Tap};
use crate::history::{self, Outcome};
use crate::proxy::{self, BoxBody};
use crate::scheduler::ModelState;

/// Reads a whole request body, refusing more than the configured limit.
async fn read_body(
    ctx: &Ctx<'_>,
    body: Incoming,
    declared: Option<u64>,
) -> Result<Bytes, ApiError> {
    let limit = ctx.config.http.max_body_bytes;
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(_) => Err(ApiError::BadRequest(
            "could not read the request body".into(),
        )),
    }
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[derive(Deserialize)]
struct ModelField {
    model: Option<serde_json::Value>,
}

/// A request id: the client's `x-request-id` when it is short and plain,
/// else a new one.
fn request_id(state: &AppState, req: &Request<Incoming>) -> String {
    if let Some(id) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        if !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return id.to_string();
        }
    }
    let n = state.next_request.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{n:x}", history::now_ms())
}

/// The `/v1/*` inference routes: read the body to learn the model, then
/// forward it unchanged. Every outcome becomes a history row.
pub(super) async fn model_request(
    ctx: &Ctx<'_>,
    endpoint: Inference,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let id = request_id(ctx.state, &req);
    let mut row = Row {
        pending: Some(Pending::new(
            id.clone(),
            ctx.peer,
            endpoint.path(),
            Instant::now(),
        )),
        bus: &ctx.state.bus,
    };
    let mut resp = match forward_model_request(ctx, req, &mut row.pending).await {
        Ok(resp) => resp,
        Err(e) => {
            row.finish(e.status().as_u16(), e.outcome(), e.to_string());
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A request's history row until a response body's tap takes it. hyper
/// drops the handler when the client closes the connection while the
/// request waits for a model or for its first byte; the row is then
/// recorded as cancelled (status 499, nginx's "client closed request").
struct Row<'a> {
    pending: Option<Pending>,
    bus: &'a Bus,
}

impl Row<'_> {
    fn finish(&mut self, status: u16, outcome: Outcome, error: String) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bus, status, outcome, Some(error));
        }
    }
}

impl Drop for Row<'_> {
    fn drop(&mut self) {
        self.finish(
            499,
            Outcome::Cancelled,
            "client closed the connection before the response".into(),
        );
    }
}

async fn forward_model_request(
    ctx: &Ctx<'_>,
    req: Request<Incoming>,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let declared = content_length(&req);
    let (parts, body) = req.into_parts();
    let state = ctx.state;
    let bytes = read_body(ctx, body, declared).await?;
    if let Some(p) = pending.as_mut() {
        p.set_request_content(state.recorder.content, &bytes);
    }
    let field: ModelField = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let requested = match field.model {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(ApiError::BadRequest("`model` must be a string".into())),
        None => {
            return Err(ApiError::BadRequest(
                "request body has no `model` field".into(),
            ))
        }
    };
    let model = resolve(&ctx.config, &requested)?;
    if let Some(p) = pending.as_mut() {
        p.record.model = Some(model.clone());
    }
    let lease = state
        .scheduler
        .acquire(&model)
        .await
        .map_err(ApiError::Unavailable)?;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let req = Request::from_parts(parts, full(bytes));
    let (bus, content) = (state.bus.clone(), state.recorder.content);
    // The row stays with the caller until a response head arrives, so a
    // request that fails or is cancelled before that is still recorded.
    let tap = |status: u16, sse: bool| {
        pending
            .take()
            .map(|p| Tap::new(p, bus, content, status, sse))
    };
    proxy::forward(lease, path_and_query, req, tap)
        .await
        .map_err(|e| {
            tracing::warn!(model = %model, error = %e, "forwarding failed");
            ApiError::Upstream
        })
}

/// `/upstream/{model}/{rest}`: the body streams through unread.
pub(super) async fn passthrough(
    ctx: &Ctx<'_>,
    requested: &str,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let model = resolve(&ctx.config, requested)?;
    let mut path_and_query = format!("/{tail}");
    if let Some(q) = req.uri().query() {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let path_and_query = PathAndQuery::try_from(path_and_query)
        .map_err(|e| ApiError::BadRequest(format!("bad upstream path: {e}")))?;
    let limit = ctx.config.http.max_body_bytes;
    if content_length(&req).is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let lease = ctx
        .state
        .scheduler
        .acquire(&model)
        .await
        .map_err(ApiError::Unavailable)?;
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let req = req.map(|b| Limited::new(b, limit_usize).boxed_unsync());
    proxy::forward(lease, path_and_query, req, |_, _| None)
        .await
        .map_err(|e| {
            tracing::warn!(model = %model, error = %e, "pass-through failed");
            ApiError::Upstream
        })
}

pub(super) async fn list_models(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    // The config says what is offered; a model removed by a reload may
    // still be stopping, but it is no longer offered.
    let status = ctx.state.scheduler.status().await;
    let data: Vec<serde_json::Value> = ctx
        .config
        .models
        .iter()
        .map(|m| {
            let st = status
                .iter()
                .find(|s| s.name == m.name)
                .map_or(ModelState::Stopped, |s| s.state);
            json!({
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "claracore",
                "aliases": m.aliases,
                "state": st,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}
