//! Probes and metrics: `/health` (what runs), `/live` (the process
//! answers), `/ready` (accepting requests), `/metrics` (Prometheus).

use std::sync::atomic::Ordering;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{full, json_response, Ctx};
use crate::proxy::BoxBody;

pub(super) async fn health(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let state = ctx.state;
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

pub(super) fn live() -> Response<BoxBody> {
    json_response(StatusCode::OK, &json!({"status": "live"}))
}

pub(super) fn ready(ctx: &Ctx<'_>) -> Response<BoxBody> {
    if ctx.state.accepting.load(Ordering::Relaxed) {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "stopping"}),
        )
    }
}

/// Model states and counters come from the event bus; only the figures
/// read at scrape (in-flight requests, queue, process, GPU readings) are
/// read here.
pub(super) fn metrics(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let state = ctx.state;
    let text = state.metrics.render(
        state.scheduler.inflight(),
        &state.recorder,
        state.gpus.latest().as_deref(),
    );
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
