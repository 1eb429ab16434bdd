//! The HTTP surface: routing, handlers, and the one place where an error
//! becomes a status code.
//!
//! | route                               | what                                 |
//! |-------------------------------------|--------------------------------------|
//! | POST /v1/{chat/completions, completions, embeddings, rerank} | proxied by the body's `model` |
//! | GET  /v1/models                     | configured models with their state   |
//! | GET  /health, /live, /ready         | daemon health                        |
//! | GET  /admin/ps                        | loaded models (pid, port, idle…)     |
//! | POST /admin/models/{name}/stop        | drain and stop a model               |
//! | ANY  /upstream/{model}/{path…}      | raw pass-through to a model's child  |
//! | GET  /metrics                       | Prometheus text format               |
//! | GET  /admin/history[/{id}], /admin/stats | request history and per-model stats |
//! | POST /admin/backup                    | a consistent copy of the history DB  |
//!
//! Every request on an inference route gets an `x-request-id` and a history
//! row, whether it was answered, refused or cut short.
//!
//! Every error body has OpenAI's `{"error":{"message","type","code"}}`
//! shape and never carries a path or an OS error string.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::config::Config;
use crate::history::tap::{Pending, Tap};
use crate::history::{self, store, Outcome, Recorder};
use crate::metrics::Metrics;
use crate::proxy::{self, BoxBody};
use crate::scheduler::{AcquireError, Scheduler};

/// Endpoints whose JSON body names the model.
const MODEL_ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
];

/// What the handlers share.
pub struct AppState {
    /// Swapped whole on reload; readers clone the Arc and never hold the
    /// lock across an await.
    pub config: std::sync::RwLock<Arc<Config>>,
    pub scheduler: Scheduler,
    pub started: Instant,
    /// False once shutdown began: `/ready` turns 503.
    pub accepting: AtomicBool,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Counter part of generated request ids.
    pub next_request: std::sync::atomic::AtomicU64,
}

/// Everything a request can fail with. Adding a variant forces a decision
/// on its status in [`ApiError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("model '{requested}' not found; available models: {}", available.join(", "))]
    UnknownModel {
        requested: String,
        available: Vec<String>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("no route for {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("{0}")]
    Unavailable(AcquireError),
    #[error("the model process did not answer the request")]
    Upstream,
    #[error("history is not recorded on this server")]
    HistoryDisabled,
    #[error("the history database could not be read")]
    History,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel { .. } | ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(AcquireError::Unknown(_)) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream => StatusCode::BAD_GATEWAY,
            ApiError::HistoryDisabled => StatusCode::NOT_FOUND,
            ApiError::History => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// How a request refused with this error is recorded.
    fn outcome(&self) -> Outcome {
        match self {
            ApiError::BadRequest(_)
            | ApiError::UnknownModel { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::NotFound { .. }
            | ApiError::HistoryDisabled
            | ApiError::Unavailable(AcquireError::ShuttingDown | AcquireError::Unknown(_)) => {
                Outcome::Rejected
            }
            ApiError::Unavailable(AcquireError::StartFailed { reason, .. })
                if reason.contains("did not become healthy") =>
            {
                Outcome::Timeout
            }
            ApiError::Unavailable(_) | ApiError::Upstream | ApiError::History => {
                Outcome::UpstreamError
            }
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            ApiError::UnknownModel { .. } | ApiError::Unavailable(AcquireError::Unknown(_)) => {
                ("invalid_request_error", "model_not_found")
            }
            ApiError::PayloadTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            ApiError::NotFound { .. } => ("invalid_request_error", "not_found"),
            ApiError::Unavailable(AcquireError::ShuttingDown) => ("server_error", "shutting_down"),
            ApiError::Unavailable(_) => ("server_error", "model_unavailable"),
            ApiError::Upstream => ("server_error", "upstream_error"),
            ApiError::HistoryDisabled => ("invalid_request_error", "history_disabled"),
            ApiError::History => ("server_error", "history_error"),
        }
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let status = self.status();
        let (kind, code) = self.kind();
        let mut body = json!({"error": {"message": self.to_string(), "type": kind, "code": code}});
        if let ApiError::UnknownModel { available, .. } = &self {
            body["error"]["available_models"] = json!(available);
        }
        let mut resp = json_response(status, &body);
        if let ApiError::Unavailable(AcquireError::BackingOff { retry_after, .. }) = &self {
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_config(&self, config: Arc<Config>) {
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<BoxBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(data: impl Into<Bytes>) -> BoxBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<AppState>,
    peer: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = route(&state, &peer, req).await;
    let resp = result.unwrap_or_else(|e| {
        tracing::info!(peer = %peer, method = %method, path = %path, error = %e, "request failed");
        e.into_response()
    });
    tracing::debug!(peer = %peer, method = %method, path = %path, status = resp.status().as_u16(),
        head_ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    Ok(resp)
}

async fn route(
    state: &Arc<AppState>,
    peer: &str,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let path = req.uri().path().to_string();
    let not_found = || ApiError::NotFound {
        method: req.method().clone(),
        path: path.clone(),
    };
    match (req.method(), path.as_str()) {
        (&Method::POST, p) if MODEL_ROUTES.contains(&p) => {
            Ok(model_request(state, peer, req).await)
        }
        (&Method::GET, "/metrics") => Ok(metrics(state).await),
        (&Method::GET, "/admin/history") => history_list(state, req.uri().query()).await,
        (&Method::GET, p) if p.starts_with("/admin/history/") => {
            history_get(state, &p["/admin/history/".len()..]).await
        }
        (&Method::GET, "/admin/stats") => stats(state, req.uri().query()).await,
        (&Method::POST, "/admin/backup") => backup(state).await,
        (&Method::GET, "/v1/models") => Ok(list_models(state).await),
        (&Method::GET, "/health") => Ok(health(state).await),
        (&Method::GET, "/live") => Ok(json_response(StatusCode::OK, &json!({"status": "live"}))),
        (&Method::GET, "/ready") => Ok(ready(state)),
        (&Method::GET, "/admin/ps") => Ok(ps(state).await),
        (&Method::POST, p) if p.starts_with("/admin/models/") && p.ends_with("/stop") => {
            let name = &p["/admin/models/".len()..p.len() - "/stop".len()];
            stop_model(state, name).await
        }
        (_, p) if p.starts_with("/upstream/") => passthrough(state, req).await,
        _ => Err(not_found()),
    }
}

fn resolve(state: &AppState, requested: &str) -> Result<String, ApiError> {
    let config = state.config();
    config
        .model(requested)
        .map(|m| m.name.clone())
        .ok_or_else(|| ApiError::UnknownModel {
            requested: requested.to_string(),
            available: config.models.iter().map(|m| m.name.clone()).collect(),
        })
}

/// Reads a whole request body, refusing more than the configured limit.
async fn read_body(
    state: &AppState,
    body: Incoming,
    declared: Option<u64>,
) -> Result<Bytes, ApiError> {
    let limit = state.config().http.max_body_bytes;
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
async fn model_request(
    state: &Arc<AppState>,
    peer: &str,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let id = request_id(state, &req);
    let mut row = Row {
        pending: Some(Pending::new(
            id.clone(),
            peer,
            req.uri().path(),
            Instant::now(),
        )),
        state,
    };
    let mut resp = match forward_model_request(state, req, &mut row.pending).await {
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
    state: &'a AppState,
}

impl Row<'_> {
    fn finish(&mut self, status: u16, outcome: Outcome, error: String) {
        if let Some(p) = self.pending.take() {
            let record = p.finish(&self.state.recorder, status, outcome, Some(error));
            self.state.metrics.observe_request(&record);
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
    state: &Arc<AppState>,
    req: Request<Incoming>,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let declared = content_length(&req);
    let (parts, body) = req.into_parts();
    let bytes = read_body(state, body, declared).await?;
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
    let model = resolve(state, &requested)?;
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
    let recorder = state.recorder.clone();
    let metrics = state.metrics.clone();
    // The row stays with the caller until a response head arrives, so a
    // request that fails or is cancelled before that is still recorded.
    let tap = |status: u16, sse: bool| {
        pending.take().map(|p| {
            Tap::new(
                p,
                recorder,
                status,
                sse,
                Box::new(move |r: &history::RequestRecord| metrics.observe_request(r)),
            )
        })
    };
    proxy::forward(lease, path_and_query, req, tap)
        .await
        .map_err(|e| {
            tracing::warn!(model = %model, error = %e, "forwarding failed");
            ApiError::Upstream
        })
}

/// `/upstream/{model}/{rest}`: the body streams through unread.
async fn passthrough(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let rest = &req.uri().path()["/upstream/".len()..];
    let (requested, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let model = resolve(state, requested)?;
    let mut path_and_query = format!("/{tail}");
    if let Some(q) = req.uri().query() {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let path_and_query = PathAndQuery::try_from(path_and_query)
        .map_err(|e| ApiError::BadRequest(format!("bad upstream path: {e}")))?;
    let limit = state.config().http.max_body_bytes;
    if content_length(&req).is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let lease = state
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

async fn list_models(state: &AppState) -> Response<BoxBody> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    // The config says what is offered; a model removed by a reload may
    // still be stopping, but it is no longer offered.
    let status = state.scheduler.status().await;
    let data: Vec<serde_json::Value> = state
        .config()
        .models
        .iter()
        .map(|m| {
            let st = status
                .iter()
                .find(|s| s.name == m.name)
                .map_or("stopped", |s| s.state);
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

async fn health(state: &AppState) -> Response<BoxBody> {
    let models = state.scheduler.status().await;
    let loaded = models.iter().filter(|m| m.pid.is_some()).count();
    let states: serde_json::Map<String, serde_json::Value> = models
        .iter()
        .map(|m| (m.name.clone(), json!(m.state)))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "status": if state.accepting.load(Ordering::Relaxed) { "ok" } else { "stopping" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": state.started.elapsed().as_secs_f64(),
            "models_total": models.len(),
            "models_loaded": loaded,
            "models": states,
        }),
    )
}

fn ready(state: &AppState) -> Response<BoxBody> {
    if state.accepting.load(Ordering::Relaxed) {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "stopping"}),
        )
    }
}

async fn ps(state: &AppState) -> Response<BoxBody> {
    let models = state.scheduler.status().await;
    json_response(StatusCode::OK, &json!({ "models": models }))
}

async fn stop_model(state: &AppState, requested: &str) -> Result<Response<BoxBody>, ApiError> {
    let model = resolve(state, requested)?;
    let was_running = state.scheduler.stop(&model).await.unwrap_or(false);
    Ok(json_response(
        StatusCode::OK,
        &json!({"model": model, "stopping": was_running}),
    ))
}

async fn metrics(state: &AppState) -> Response<BoxBody> {
    let text = state
        .metrics
        .render(&state.scheduler.status().await, &state.recorder);
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// Query-string pairs, percent-decoding what the CLI and curl send.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A point in time given as unix milliseconds or as a duration ago ("1h").
fn time_param(key: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    crate::config::parse_duration(v)
        .map(|d| history::now_ms() - d.as_millis() as i64)
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "{key}: {e}; give unix milliseconds or a duration ago like 1h"
            ))
        })
}

/// Runs `f` on a read connection to the history file (and its path), off
/// the async threads, once the queue is flushed (waiting up to `flush`):
/// rows of requests already answered belong in the answer, even if the
/// writer's batch window has not closed yet. `what` names it in the log.
async fn on_history<T: Send + 'static>(
    state: &AppState,
    flush: Duration,
    what: &'static str,
    f: impl FnOnce(&Path, &rusqlite::Connection) -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    let path = state
        .recorder
        .path()
        .ok_or(ApiError::HistoryDisabled)?
        .to_path_buf();
    let recorder = state.recorder.clone();
    tokio::task::spawn_blocking(move || {
        recorder.flush_blocking(flush);
        let conn = store::open_for_reading(&path).map_err(|e| e.to_string())?;
        f(&path, &conn)
    })
    .await
    .map_err(|_| ApiError::History)?
    .map_err(|e| {
        tracing::error!(error = %e, "{what} failed");
        ApiError::History
    })
}

/// Runs a read on the history file.
async fn read_history<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    on_history(state, Duration::from_secs(5), "history read", |_, conn| {
        f(conn).map_err(|e| e.to_string())
    })
    .await
}

async fn history_list(
    state: &AppState,
    query: Option<&str>,
) -> Result<Response<BoxBody>, ApiError> {
    let mut q = store::RequestQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "model" => q.model = Some(v),
            "outcome" => {
                Outcome::parse(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!("outcome: {v:?} is not one of ok, cancelled, upstream_error, timeout, rejected"))
                })?;
                q.outcome = Some(v);
            }
            "since" => q.since_ms = Some(time_param("since", &v)?),
            "until" => q.until_ms = Some(time_param("until", &v)?),
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::BadRequest("limit: must be 1 to 1000".into()))?
            }
            "cursor" => {
                q.cursor = Some(v.parse().map_err(|_| {
                    ApiError::BadRequest("cursor: must be an id from next_cursor".into())
                })?)
            }
            other => return Err(ApiError::BadRequest(format!("unknown parameter {other:?}"))),
        }
    }
    let limit = q.limit;
    let rows = read_history(state, move |c| store::list_requests(c, &q)).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(json_response(
        StatusCode::OK,
        &json!({"requests": rows, "next_cursor": next}),
    ))
}

async fn history_get(state: &AppState, id: &str) -> Result<Response<BoxBody>, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a history id")))?;
    match read_history(state, move |c| store::get_request(c, id)).await? {
        Some(row) => Ok(json_response(StatusCode::OK, &json!(row))),
        None => Err(ApiError::NotFound {
            method: Method::GET,
            path: format!("/admin/history/{id}"),
        }),
    }
}

async fn stats(state: &AppState, query: Option<&str>) -> Result<Response<BoxBody>, ApiError> {
    let mut window = Duration::from_secs(3600);
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "window" => {
                window = crate::config::parse_duration(&v)
                    .map_err(|e| ApiError::BadRequest(format!("window: {e}")))?
            }
            other => return Err(ApiError::BadRequest(format!("unknown parameter {other:?}"))),
        }
    }
    let since = history::now_ms() - window.as_millis() as i64;
    let models = read_history(state, move |c| store::stats(c, since)).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"window_s": window.as_secs(), "models": models, "history_rows_dropped": state.recorder.dropped()}),
    ))
}

/// A consistent copy of the live history database, streamed back.
async fn backup(state: &AppState) -> Result<Response<BoxBody>, ApiError> {
    let copy = |path: &Path, conn: &rusqlite::Connection| {
        let dest = path.with_file_name(format!(
            ".backup-{}-{}.db",
            std::process::id(),
            history::now_ms()
        ));
        store::backup(conn, &dest).map_err(|e| e.to_string())?;
        let file = std::fs::File::open(&dest).map_err(|e| e.to_string())?;
        // Unlinked now, readable until closed: nothing is left behind.
        let _ = std::fs::remove_file(&dest);
        Ok(file)
    };
    let file = on_history(state, Duration::from_secs(10), "history backup", copy).await?;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, proxy::BoxError>::new(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::from_std(file);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .send_data(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    tx.abort(e.into());
                    break;
                }
            }
        }
    });
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_pairs(Some("model=tiny%2Dchat&since=1h&x")),
            [
                ("model".to_string(), "tiny-chat".to_string()),
                ("since".into(), "1h".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(decode("a+b%20c%zz%4"), "a b c%zz%4");
    }
}
