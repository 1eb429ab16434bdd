//! The HTTP surface: one entry point ([`handle`]) that parses the route
//! ([`routes`]), takes one snapshot of the config for the whole request,
//! and dispatches to the handlers of each family:
//!
//! - [`openai`]: `/v1/*` and `/infill` (routed by the body's `model`;
//!   errors in the route's shape, Anthropic's on `/v1/messages*`) and
//!   `/upstream/*`.
//! - [`admin`]: claracore's own control and read endpoints, `/admin/*`.
//! - [`health`]: `/health`, `/live`, `/ready`, `/metrics`.
//! - [`ollama`]: Ollama's API, `/api/*` and `GET /`, translated.
//! - [`ui`]: the dashboard under `/ui/`, its login and sessions.
//!
//! A request without a key but with a dashboard session cookie is that
//! session's principal; if it changes state (POST, PUT, PATCH, DELETE) it
//! must also carry the session's `x-csrf-token`, else 403.
//! - [`error`]: error → status, outcome and body.
//! - [`events`]: `/admin/events`, the bus as Server-Sent Events.
//!
//! Every request on an inference route gets an `x-request-id` and a history
//! row, whether it was answered, refused or cut short.

mod admin;
pub mod body;
pub mod error;
pub mod event_stream;
mod health;
pub mod ollama;
mod openai;
pub mod routes;
pub mod ui;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::auth::session::Sessions;
use crate::auth::{Auth, Peer, Principal};
use crate::config::Config;
use crate::events::{AuditAction, AuditRecord, Bus, Event, GpuUse, RequestRecord};
use crate::gpu::Gpus;
use crate::history::tap::Pending;
use crate::history::Recorder;
use crate::metrics::Metrics;
use crate::proxy::BoxBody;
use crate::scheduler::{Lease, Scheduler};
pub use admin::{AuditAnswer, HistoryAnswer, LoadAnswer, PsAnswer, StatsAnswer, StopAnswer};
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
    /// The events stream's replay ring and client hub (also a sink of
    /// `bus`).
    pub events: Arc<event_stream::EventLog>,
    /// Request-body bytes all requests together may hold in memory.
    pub body_budget: body::BodyBudget,
    /// Keys and throttling state; replaced with the config on reload.
    pub auth: std::sync::RwLock<Arc<Auth>>,
    /// Counter part of generated request ids.
    pub next_request: std::sync::atomic::AtomicU64,
    /// What the Ollama routes keep between requests.
    pub ollama: ollama::Shared,
    /// Dashboard sessions and login throttling; outlive reloads (which
    /// end the sessions whose login no longer holds).
    pub sessions: Sessions,
    /// GPU readings (metrics read the latest at each scrape); started once
    /// by the bootstrap, kept across reloads.
    pub gpus: Gpus,
}

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn auth(&self) -> Arc<Auth> {
        match self.auth.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies a reloaded config; its keys take effect at once (rates and
    /// failure counts start over).
    pub fn set_config(&self, config: Arc<Config>) {
        let auth = Arc::new(Auth::new(&config.auth));
        let ended = self.sessions.reconfigure(&self.config(), &config);
        if ended > 0 {
            tracing::info!(
                sessions = ended,
                "dashboard sessions ended: their password or key changed"
            );
        }
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        match self.auth.write() {
            Ok(mut a) => *a = auth,
            Err(poisoned) => *poisoned.into_inner() = auth,
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

pub(crate) fn full(data: impl Into<Bytes>) -> BoxBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What one request's handlers know about it.
pub struct Ctx<'a> {
    pub state: &'a Arc<AppState>,
    /// The client's address (`ip:port`, or the unix socket).
    pub peer: &'a Peer,
    /// The config as it was when the request arrived, for all of it.
    pub config: Arc<Config>,
    /// Who is asking (authenticated; authorized for the route).
    pub principal: Principal,
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<AppState>,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = dispatch(&state, &peer, req).await;
    let mut resp = result.unwrap_or_else(|e| {
        tracing::info!(peer = %peer.addr, method = %method, path = %path, error = %e, "request failed");
        e.into_response_shaped(error::ErrorShape::for_path(&path))
    });
    if path == "/ui" || path.starts_with("/ui/") {
        ui::secure(&mut resp);
    }
    tracing::debug!(peer = %peer.addr, method = %method, path = %path, status = resp.status().as_u16(),
        head_ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    Ok(resp)
}

async fn dispatch(
    state: &Arc<AppState>,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let route = parse_route(&req)?;
    let config = state.config();
    let principal = match check_credentials(state, peer, &route, &req, &config) {
        Checked::Principal(p) => p,
        Checked::Answered(answer) => return answer,
    };
    let ctx = &Ctx {
        state,
        peer,
        config,
        principal,
    };
    route_to(ctx, route, req).await
}

/// The request's [`Route`], or the 404/405 that says why there is none.
fn parse_route(req: &Request<Incoming>) -> Result<Route, ApiError> {
    match routes::parse(req.method(), req.uri().path()) {
        Ok(route) => Ok(route),
        Err(NoRoute::NotFound) => Err(ApiError::NotFound {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
        }),
        Err(NoRoute::WrongMethod { allow }) => Err(ApiError::MethodNotAllowed {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            allow,
        }),
    }
}

/// What the credentials check decided.
enum Checked {
    /// Go on as this principal.
    Principal(Principal),
    /// Refused: the answer to send instead.
    Answered(Result<Response<BoxBody>, ApiError>),
}

/// Who is asking (a key, a session, the local socket, or nobody on an
/// open route), and whether they may take this route.
fn check_credentials(
    state: &AppState,
    peer: &Peer,
    route: &Route,
    req: &Request<Incoming>,
    config: &Config,
) -> Checked {
    let auth = state.auth();
    let scopes = route.scopes(config.auth.metrics_public);
    let now_ms = crate::events::now_ms();
    // A key in the headers wins; without one, a live session cookie is
    // the principal (its login must still hold under the current keys).
    let session = if scopes.is_empty() || crate::auth::presented(req.headers()).is_some() {
        None
    } else {
        ui::current(state, req.headers()).and_then(|(_, s)| {
            let p = state.sessions.principal(&s, &auth, config, now_ms)?;
            Some((p, s))
        })
    };
    let checked = if scopes.is_empty() {
        // Open routes ignore credentials: a probe with a stale key still
        // works, and is no failed attempt.
        Ok(Principal::Anonymous)
    } else if let Some((principal, s)) = &session {
        let changes_state = !matches!(
            *req.method(),
            hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
        );
        if changes_state && !s.csrf_matches(ui::presented_csrf(req.headers())) {
            return Checked::Answered(Ok(ui::csrf_refused()));
        }
        auth.authorize(principal, scopes)
            .map(|()| principal.clone())
    } else {
        auth.authenticate(peer, req.headers(), now_ms)
            .and_then(|principal| auth.authorize(&principal, scopes).map(|()| principal))
    };
    match checked {
        Ok(p) => Checked::Principal(p),
        Err(denied) => Checked::Answered(refuse(state, peer, route, req, denied)),
    }
}

/// Audits a rejected key and answers the refusal; a refused inference
/// request keeps its history row.
fn refuse(
    state: &AppState,
    peer: &Peer,
    route: &Route,
    req: &Request<Incoming>,
    denied: crate::auth::Denied,
) -> Result<Response<BoxBody>, ApiError> {
    if let crate::auth::Denied::Rejected(why) = &denied {
        audit(
            state,
            format!("ip:{}", peer.addr),
            AuditAction::KeyRejected,
            Some(req.uri().path()),
            why,
        );
    }
    let e = ApiError::Denied(denied);
    // Refused inference requests keep their history row.
    let endpoint = match route {
        Route::Inference(endpoint) => Some(endpoint.path()),
        Route::Ollama(o) => o.endpoint(),
        _ => None,
    };
    let Some(endpoint) = endpoint else {
        return Err(e);
    };
    let id = openai::refused(state, peer, endpoint, req, &e);
    let mut resp = e.into_response_shaped(error::ErrorShape::for_path(req.uri().path()));
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

/// Hands an admitted request to its route's handler.
async fn route_to(
    ctx: &Ctx<'_>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let (state, peer) = (ctx.state, ctx.peer);
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    match route {
        Route::Inference(endpoint) => Ok(openai::model_request(ctx, endpoint, req).await),
        Route::Upstream { model, tail } => openai::passthrough(ctx, &model, &tail, req).await,
        Route::Models => Ok(openai::list_models(ctx).await),
        Route::OllamaRoot => Ok(ollama::root(req.method())),
        Route::Ollama(o) => Ok(ollama_route(ctx, o, req).await),
        Route::Model { id } => openai::get_model(ctx, &id).await,
        Route::Health => Ok(health::health(ctx).await),
        Route::Live => Ok(health::live()),
        Route::Ready => Ok(health::ready(ctx)),
        Route::Metrics => Ok(health::metrics(ctx)),
        Route::AdminPs => Ok(admin::ps(ctx).await),
        Route::AdminStop { model } => admin::stop_model(ctx, &model).await,
        Route::AdminLoad { model } => admin::load_model(ctx, &model).await,
        Route::AdminHistory => admin::history_list(ctx, query).await,
        Route::AdminHistoryEntry { id } => admin::history_get(ctx, &id).await,
        Route::AdminStats => admin::stats(ctx, query).await,
        Route::AdminBackup => admin::backup(ctx).await,
        Route::AdminAudit => admin::audit_list(ctx, query).await,
        Route::AdminLogs { model } => admin::logs(ctx, &model, query).await,
        Route::UiRoot => Ok(ui::root()),
        Route::UiAsset(a) => Ok(ui::serve_asset(a, req.headers())),
        Route::UiLogin if req.method() == hyper::Method::POST => ui::login(state, peer, req).await,
        Route::UiLogin => Ok(ui::serve_asset(routes::UiAsset::Login, req.headers())),
        Route::UiSession => ui::get_session(state, peer, req.headers()),
        Route::UiLogout => ui::logout(state, peer, req.headers()),
        Route::AdminEvents => event_stream::stream(ctx, &req).await,
    }
}

async fn ollama_route(
    ctx: &Ctx<'_>,
    route: routes::Ollama,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    use ollama::Endpoint;
    use routes::Ollama;
    match route {
        Ollama::Version => ollama::version(),
        Ollama::Tags => ollama::meta::tags(ctx).await,
        Ollama::Ps => ollama::meta::ps(ctx).await,
        Ollama::Show => ollama::meta::show(ctx, req).await,
        Ollama::Chat => ollama::inference(ctx, Endpoint::Chat, req).await,
        Ollama::Generate => ollama::inference(ctx, Endpoint::Generate, req).await,
        Ollama::Embed => ollama::inference(ctx, Endpoint::Embed, req).await,
        Ollama::Embeddings => ollama::inference(ctx, Endpoint::Embeddings, req).await,
        Ollama::Unsupported(what) => ollama::declared_in_config(what),
    }
}

/// Records an admin action (or a rejected key) in the audit trail.
pub fn audit(
    state: &AppState,
    principal: String,
    action: AuditAction,
    target: Option<&str>,
    result: &str,
) {
    state.bus.emit(Event::Audit(Arc::new(AuditRecord {
        at_ms: crate::events::now_ms(),
        principal,
        action,
        target: target.map(str::to_string),
        result: result.to_string(),
    })));
}

impl Ctx<'_> {
    /// Waits for `model` with the principal's priority and leases it; the
    /// row (if any) gets how long that took and the GPU's figures around
    /// the request, read from the last GPU readings (no NVML call here).
    async fn acquire(&self, model: &str, pending: &mut Option<Pending>) -> Result<Lease, ApiError> {
        let began = Instant::now();
        let lease = self
            .state
            .scheduler
            .acquire(model, self.principal.priority())
            .await
            .map_err(ApiError::Unavailable)?;
        if let Some(p) = pending.as_mut() {
            p.record.queue_wait_ms = Some(began.elapsed().as_secs_f64() * 1000.0);
            if let Some(index) = lease.gpu() {
                let gpus = self.state.gpus.clone();
                let used = move |gpus: &Gpus| {
                    let snap = gpus.latest()?;
                    snap.gpu(index).map(|g| (g.used_bytes, g.utilization))
                };
                let before = used(&gpus).map(|(b, _)| b);
                p.seal = Some(Box::new(move |record: &mut RequestRecord| {
                    let after = used(&gpus);
                    record.gpu = Some(GpuUse {
                        index,
                        mem_before_bytes: before,
                        mem_after_bytes: after.map(|(b, _)| b),
                        utilization: after.and_then(|(_, u)| u),
                    });
                }));
            }
        }
        Ok(lease)
    }

    /// Who this is, for the audit trail.
    fn who(&self) -> String {
        self.principal
            .name()
            .unwrap_or_else(|| format!("anonymous:{}", self.peer.addr))
    }

    fn audit(&self, action: AuditAction, target: Option<&str>, result: &str) {
        audit(self.state, self.who(), action, target, result);
    }
}

/// The canonical name of a configured model or alias that `ctx`'s
/// principal may use; any other is unknown, and the list of valid names
/// holds only those it may use (a key cannot probe for names).
fn resolve(ctx: &Ctx<'_>, requested: &str) -> Result<String, ApiError> {
    let config = &ctx.config;
    let p = &ctx.principal;
    match config.model(requested) {
        Some(m) if p.may_use(&m.name) => Ok(m.name.clone()),
        _ => Err(ApiError::UnknownModel {
            requested: requested.to_string(),
            available: config
                .models
                .iter()
                .filter(|m| p.may_use(&m.name))
                .map(|m| m.name.clone())
                .collect(),
        }),
    }
}

/// Everything a request controls, thrown at the pure parsers: none may
/// panic, and what they accept must be what was asked for.
#[cfg(test)]
mod props {
    use super::*;
    use hyper::Method;
    use proptest::prelude::*;

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE),
            "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)),
        ]
    }

    /// Paths built from the route table's own pieces, plus noise.
    fn path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("v1".to_string()),
            Just("admin".to_string()),
            Just("api".to_string()),
            Just("models".to_string()),
            Just("stop".to_string()),
            Just("history".to_string()),
            Just("upstream".to_string()),
            Just("chat".to_string()),
            Just("completions".to_string()),
            Just(String::new()),
            "\\PC{0,12}",
        ];
        prop_oneof![
            proptest::collection::vec(piece, 0..6).prop_map(|p| format!("/{}", p.join("/"))),
            "\\PC{0,64}",
        ]
    }

    /// JSON-shaped bytes: a top level that may or may not be an object,
    /// `model` keys of every type, and cut-off or garbage tails.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            "\\PC{0,16}".prop_map(|s| serde_json::Value::String(s).to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("null".to_string()),
            Just("[\"tiny\"]".to_string()),
            Just("{\"model\":\"x\"}".to_string()),
        ];
        let member = (
            prop_oneof![Just("model".to_string()), "[a-z]{1,6}"],
            value.clone(),
        )
            .prop_map(|(k, v)| format!("{}:{v}", serde_json::Value::String(k)));
        prop_oneof![
            proptest::collection::vec(member, 0..5)
                .prop_map(|m| format!("{{{}}}", m.join(",")).into_bytes()),
            value.prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..64),
            ("\\PC{0,40}", 0usize..40).prop_map(|(s, cut)| {
                let text = format!("{{\"model\":\"{s}\"");
                text.as_bytes()[..cut.min(text.len())].to_vec()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn route_parsing_is_total(m in method(), p in path()) {
            match routes::parse(&m, &p) {
                Ok(routes::Route::Upstream { .. }) => prop_assert!(p.starts_with("/upstream/")),
                Ok(routes::Route::Ollama(_)) => prop_assert!(p.starts_with("/api/")),
                Ok(routes::Route::OllamaRoot) => prop_assert_eq!(p.as_str(), "/"),
                Ok(_) => prop_assert!(p.starts_with('/') && !p.starts_with("/api/")),
                Err(routes::NoRoute::WrongMethod { allow }) => prop_assert!(!allow.contains(&m)),
                Err(routes::NoRoute::NotFound) => {}
            }
        }

        #[test]
        fn model_sniffing_is_total_and_takes_only_a_top_level_string(b in body()) {
            if let Ok(name) = openai::requested_model(&b) {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                prop_assert_eq!(v["model"].as_str(), Some(name.as_str()));
            }
        }

        #[test]
        fn content_length_values_never_panic(v in "\\PC{0,24}") {
            if let Ok(h) = hyper::header::HeaderValue::from_str(&v) {
                let n = openai::declared_length(Some(&h));
                prop_assert_eq!(n, v.parse::<u64>().ok());
            }
        }

        #[test]
        fn query_strings_never_panic(q in "[a-z=&%+0-9A-Fa-f.~_-]{0,48}|\\PC{0,48}") {
            let _ = admin::history_query(Some(&q));
            let _ = admin::stats_window(Some(&q));
        }

        #[test]
        fn durations_and_times_of_any_size_are_answered(n in any::<u64>(), unit in "s|m|h|d|y|ms") {
            let q = format!("since={n}{unit}&until={n}&limit=5");
            let _ = admin::history_query(Some(&q));
            let _ = admin::stats_window(Some(&format!("window={n}{unit}")));
        }
    }
}
