//! The HTTP surface: routing, handlers, and the one place where an error
//! becomes a status code.
//!
//! | route                               | what                                 |
//! |-------------------------------------|--------------------------------------|
//! | POST /v1/{chat/completions, completions, embeddings, rerank} | proxied by the body's `model` |
//! | GET  /v1/models                     | configured models with their state   |
//! | GET  /health, /live, /ready         | daemon health                        |
//! | GET  /api/ps                        | loaded models (pid, port, idle…)     |
//! | POST /api/models/{name}/stop        | drain and stop a model               |
//! | ANY  /upstream/{model}/{path…}      | raw pass-through to a model's child  |
//!
//! Every error body has OpenAI's `{"error":{"message","type","code"}}`
//! shape and never carries a path or an OS error string.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::config::Config;
use crate::proxy::{self, BoxBody, UpstreamClient};
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
    pub client: UpstreamClient,
    pub started: Instant,
    /// False once shutdown began: `/ready` turns 503.
    pub accepting: AtomicBool,
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
    let result = route(&state, req).await;
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
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let path = req.uri().path().to_string();
    let not_found = || ApiError::NotFound {
        method: req.method().clone(),
        path: path.clone(),
    };
    match (req.method(), path.as_str()) {
        (&Method::POST, p) if MODEL_ROUTES.contains(&p) => model_request(state, req).await,
        (&Method::GET, "/v1/models") => Ok(list_models(state).await),
        (&Method::GET, "/health") => Ok(health(state).await),
        (&Method::GET, "/live") => Ok(json_response(StatusCode::OK, &json!({"status": "live"}))),
        (&Method::GET, "/ready") => Ok(ready(state)),
        (&Method::GET, "/api/ps") => Ok(ps(state).await),
        (&Method::POST, p) if p.starts_with("/api/models/") && p.ends_with("/stop") => {
            let name = &p["/api/models/".len()..p.len() - "/stop".len()];
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

/// The `/v1/*` inference routes: read the body to learn the model, then
/// forward it unchanged.
async fn model_request(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let declared = content_length(&req);
    let (parts, body) = req.into_parts();
    let bytes = read_body(state, body, declared).await?;
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
    let lease = state
        .scheduler
        .acquire(&model)
        .await
        .map_err(ApiError::Unavailable)?;
    let path_and_query = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let req = Request::from_parts(parts, full(bytes));
    proxy::forward(&state.client, lease, &path_and_query, req)
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
    proxy::forward(&state.client, lease, &path_and_query, req)
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
