//! The HTTP surface: one entry point ([`handle`]) that parses the route
//! ([`routes`]), takes one snapshot of the config for the whole request,
//! and dispatches to the handlers of each family:
//!
//! - [`openai`]: `/v1/*` (routed by the body's `model`) and `/upstream/*`.
//! - [`admin`]: claracore's own control and read endpoints, `/admin/*`.
//! - [`health`]: `/health`, `/live`, `/ready`, `/metrics`.
//! - [`error`]: error → status, outcome and body.
//!
//! Every request on an inference route gets an `x-request-id` and a history
//! row, whether it was answered, refused or cut short.

mod admin;
pub mod error;
mod health;
mod openai;
pub mod routes;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::config::Config;
use crate::events::Bus;
use crate::history::Recorder;
use crate::metrics::Metrics;
use crate::proxy::BoxBody;
use crate::scheduler::Scheduler;
pub use error::ApiError;
use routes::{NoRoute, Route};

/// What the handlers share.
pub struct AppState {
    /// Swapped whole on reload; readers clone the Arc and never hold the
    /// lock across an await.
    pub config: std::sync::RwLock<Arc<Config>>,
    pub scheduler: Scheduler,
    pub started: Instant,
    /// False once shutdown began: `/ready` turns 503.
    pub accepting: AtomicBool,
    /// History's reading side (the database path, queue figures); rows
    /// reach it through `bus`.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Where finished requests are reported.
    pub bus: Bus,
    /// Counter part of generated request ids.
    pub next_request: std::sync::atomic::AtomicU64,
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

/// What one request's handlers know about it.
pub struct Ctx<'a> {
    pub state: &'a Arc<AppState>,
    /// The client's address (`ip:port`, or the unix socket).
    pub peer: &'a str,
    /// The config as it was when the request arrived, for all of it.
    pub config: Arc<Config>,
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
    let ctx = Ctx {
        state: &state,
        peer: &peer,
        config: state.config(),
    };
    let result = dispatch(&ctx, req).await;
    let resp = result.unwrap_or_else(|e| {
        tracing::info!(peer = %peer, method = %method, path = %path, error = %e, "request failed");
        e.into_response()
    });
    tracing::debug!(peer = %peer, method = %method, path = %path, status = resp.status().as_u16(),
        head_ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    Ok(resp)
}

async fn dispatch(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<BoxBody>, ApiError> {
    let route = match routes::parse(req.method(), req.uri().path()) {
        Ok(route) => route,
        // A known path with the wrong method is still answered 404 here,
        // as before the route table existed.
        Err(NoRoute::NotFound | NoRoute::WrongMethod { .. }) => {
            return Err(ApiError::NotFound {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
            })
        }
    };
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    match route {
        Route::Inference(endpoint) => Ok(openai::model_request(ctx, endpoint, req).await),
        Route::Upstream { model, tail } => openai::passthrough(ctx, &model, &tail, req).await,
        Route::Models => Ok(openai::list_models(ctx).await),
        Route::Health => Ok(health::health(ctx).await),
        Route::Live => Ok(health::live()),
        Route::Ready => Ok(health::ready(ctx)),
        Route::Metrics => Ok(health::metrics(ctx)),
        Route::AdminPs => Ok(admin::ps(ctx).await),
        Route::AdminStop { model } => admin::stop_model(ctx, &model).await,
        Route::AdminHistory => admin::history_list(ctx, query).await,
        Route::AdminHistoryEntry { id } => admin::history_get(ctx, &id).await,
        Route::AdminStats => admin::stats(ctx, query).await,
        Route::AdminBackup => admin::backup(ctx).await,
    }
}

/// The canonical name of a configured model or alias.
fn resolve(config: &Config, requested: &str) -> Result<String, ApiError> {
    config
        .model(requested)
        .map(|m| m.name.clone())
        .ok_or_else(|| ApiError::UnknownModel {
            requested: requested.to_string(),
            available: config.models.iter().map(|m| m.name.clone()).collect(),
        })
}
