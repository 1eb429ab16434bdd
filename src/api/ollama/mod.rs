//! Ollama's API (`/api/*`, and the `GET /` probe), translated to the
//! child's OpenAI endpoints and back, so that a client written for Ollama
//! works by changing one URL. Shapes follow Ollama's docs/api.md.
//!
//! | route                    | child endpoint                 | answer                      |
//! |--------------------------|--------------------------------|-----------------------------|
//! | POST /api/chat           | /v1/chat/completions           | NDJSON stream or one object |
//! | POST /api/generate       | /v1/chat/completions (templated), /v1/completions (`raw`), /infill (`suffix`) | same |
//! | POST /api/embed          | /v1/embeddings                 | `embeddings: [[…]]`         |
//! | POST /api/embeddings     | /v1/embeddings                 | `embedding: […]`            |
//! | GET  /api/tags, /api/ps, POST /api/show | (config, GGUF header, scheduler) | model lists and details |
//! | pull, push, create, copy, delete, blobs | —                 | an Ollama-shaped error: models are declared in the config |
//!
//! Every inference request gets a history row under its Ollama endpoint,
//! with the tap reading the child's OpenAI stream before translation.
//! Errors on these routes are `{"error": "…"}` with the usual statuses.
//!
//! - [`convert`]: the pure field-by-field mappings.
//! - [`stream`]: SSE → NDJSON as the bytes pass.
//! - [`meta`]: tags, ps and show.

pub mod convert;
pub mod meta;
pub mod stream;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::openai::{self, Row};
use super::{body, full, json_response, resolve, ApiError, Ctx};
use crate::history::tap::{Pending, Tap};
use crate::history::Outcome;
use crate::proxy::{self, BoxBody, Outgoing};
use crate::wire::openai::{Embeddings, Reply};
use convert::{KeepAlive, Shape, Times};

/// The Ollama version claracore answers `/api/version` with: clients gate
/// features on it, and this is the API level the translation follows.
pub const OLLAMA_VERSION: &str = "0.12.6";

/// A non-streamed child answer larger than this is refused (embeddings of
/// many long inputs are the largest).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// `GET /` and `HEAD /`: the text Ollama answers, which clients probe for.
pub fn root(method: &Method) -> Response<BoxBody> {
    let text = if method == Method::HEAD {
        ""
    } else {
        "Ollama is running"
    };
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `GET /api/version`.
pub fn version() -> Response<BoxBody> {
    json_response(
        StatusCode::OK,
        &json!({"version": OLLAMA_VERSION, "claracore": env!("CARGO_PKG_VERSION")}),
    )
}

/// An error in Ollama's shape, with the status and headers (Retry-After,
/// Allow, WWW-Authenticate) of the usual response.
pub fn error(e: ApiError) -> Response<BoxBody> {
    e.into_response_shaped(crate::api::error::ErrorShape::Ollama)
}

/// pull, push, create, copy, delete and blobs: models come from the
/// config, so these say so instead of a 404.
pub fn declared_in_config(what: &str) -> Response<BoxBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": format!(
            "{what} is not supported: claracore serves the models declared in its config file; \
             add or change a [models.NAME] table and reload (systemctl reload claracore)"
        )}),
    )
}

/// Ollama's time format (RFC 3339, nanoseconds, UTC).
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_nanos(at).to_string()
}

fn now() -> String {
    timestamp(SystemTime::now())
}

/// A model name as Ollama clients send it: `NAME:latest` is `NAME`.
pub(super) fn resolve_tagged(ctx: &Ctx<'_>, requested: &str) -> Result<String, ApiError> {
    match resolve(ctx, requested) {
        Ok(name) => Ok(name),
        Err(e) => match requested.strip_suffix(":latest") {
            Some(base) if !base.is_empty() => resolve(ctx, base).map_err(|_| e),
            _ => Err(e),
        },
    }
}

/// The name Ollama lists a model under.
pub fn tagged(name: &str) -> String {
    if name.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// What the Ollama routes keep between requests.
#[derive(Default)]
pub struct Shared {
    /// Model files' headers and digests.
    pub files: meta::ModelFiles,
    /// `model option` pairs already logged as not applicable to a running
    /// child, so the journal says it once, not per request.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Shared {
    /// Logs, once per model and option, options a request gave that only
    /// apply when a child starts.
    fn warn_ignored(&self, model: &str, ignored: &[String]) {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for option in ignored {
            if warned.len() < 4096 && warned.insert(format!("{model} {option}")) {
                tracing::info!(model = %model, option = %option,
                    "an Ollama option that only applies when a model starts was ignored;                      set it in the model's args (it is also named in x-claracore-ignored-options)");
            }
        }
    }
}

/// What an inference route asks the child, worked out from the body.
struct Plan {
    /// As the client named it; echoed in every answer object.
    requested: String,
    model: String,
    action: Action,
    keep_alive: Option<KeepAlive>,
    /// Options a running child cannot apply (`num_ctx`, …).
    ignored: Vec<String>,
}

enum Action {
    /// A request to the child and the shape of its answer.
    Call {
        path: &'static str,
        body: Value,
        stream: bool,
        out: Out,
    },
    /// An empty chat/generate: load the model (or unload it with
    /// `keep_alive: 0`) and answer when done.
    Load { shape: Shape },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    Answer(Shape),
    Embed,
    /// The older `/api/embeddings`: one vector.
    Embedding,
}

/// The inference routes, as the history row names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Generate,
    Embed,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/api/chat",
            Endpoint::Generate => "/api/generate",
            Endpoint::Embed => "/api/embed",
            Endpoint::Embeddings => "/api/embeddings",
        }
    }
}

/// Whether a model's child can take images (it was given a projector).
fn has_projector(ctx: &Ctx<'_>, model: &str) -> bool {
    ctx.config.model(model).is_some_and(|m| {
        m.argv
            .iter()
            .any(|a| a == "--mmproj" || a == "-mm" || a.starts_with("--mmproj="))
    })
}

/// What chat and generate requests share: the model, `keep_alive`, and
/// the sampling fields of the child's request.
struct Common {
    model: String,
    keep_alive: Option<KeepAlive>,
    body: Map<String, Value>,
    ignored: Vec<String>,
}

fn common(
    ctx: &Ctx<'_>,
    requested: &str,
    keep_alive: &Option<Value>,
    options: &Option<Map<String, Value>>,
    format: &Option<Value>,
    think: &Option<Value>,
) -> Result<Common, ApiError> {
    let model = resolve_tagged(ctx, requested)?;
    let keep_alive = keep(keep_alive.as_ref()).map_err(ApiError::BadRequest)?;
    let mut body = Map::new();
    let ignored = convert::apply_options(options.as_ref(), &mut body)
        .and_then(|ignored| {
            convert::apply_format(format.as_ref(), &mut body)?;
            convert::apply_think(think.as_ref(), &mut body)?;
            Ok(ignored)
        })
        .map_err(ApiError::BadRequest)?;
    Ok(Common {
        model,
        keep_alive,
        body,
        ignored,
    })
}

fn keep(value: Option<&Value>) -> Result<Option<KeepAlive>, String> {
    value
        .filter(|v| !v.is_null())
        .map(convert::keep_alive)
        .transpose()
}

fn plan_chat(ctx: &Ctx<'_>, bytes: &[u8]) -> Result<Plan, ApiError> {
    let r: convert::ChatRequest = convert::parse(bytes).map_err(ApiError::BadRequest)?;
    let Common {
        model,
        keep_alive,
        mut body,
        ignored,
    } = common(
        ctx,
        &r.model,
        &r.keep_alive,
        &r.options,
        &r.format,
        &r.think,
    )?;
    if r.messages.is_empty() {
        return Ok(Plan {
            requested: r.model,
            model,
            action: Action::Load { shape: Shape::Chat },
            keep_alive,
            ignored,
        });
    }
    let messages =
        convert::messages(&r.messages, has_projector(ctx, &model)).map_err(ApiError::BadRequest)?;
    let stream = r.stream.unwrap_or(true);
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), json!(stream));
    if let Some(tools) = r.tools.filter(|t| !t.is_empty()) {
        body.insert("tools".into(), Value::Array(tools));
    }
    Ok(Plan {
        requested: r.model,
        model,
        action: Action::Call {
            path: "/v1/chat/completions",
            body: Value::Object(body),
            stream,
            out: Out::Answer(Shape::Chat),
        },
        keep_alive,
        ignored,
    })
}

fn plan_generate(ctx: &Ctx<'_>, bytes: &[u8]) -> Result<Plan, ApiError> {
    let r: convert::GenerateRequest = convert::parse(bytes).map_err(ApiError::BadRequest)?;
    let Common {
        model,
        keep_alive,
        mut body,
        ignored,
    } = common(
        ctx,
        &r.model,
        &r.keep_alive,
        &r.options,
        &r.format,
        &r.think,
    )?;
    let prompt = r.prompt.unwrap_or_default();
    let images = r.images.unwrap_or_default();
    if prompt.is_empty() && images.is_empty() && r.suffix.is_none() {
        return Ok(Plan {
            requested: r.model,
            model,
            action: Action::Load {
                shape: Shape::Generate,
            },
            keep_alive,
            ignored,
        });
    }
    if r.template.is_some() {
        return Err(ApiError::BadRequest(
            "template is not supported: the child applies the model's own chat template; \
             use raw: true with a fully templated prompt instead"
                .into(),
        ));
    }
    let stream = r.stream.unwrap_or(true);
    body.insert("stream".into(), json!(stream));
    let raw = r.raw.unwrap_or(false);
    let path = if let Some(suffix) = r.suffix {
        // llama-server's code infill: prompt before, suffix after.
        body.insert("input_prefix".into(), json!(prompt));
        body.insert("input_suffix".into(), json!(suffix));
        if let Some(n) = body.remove("max_tokens") {
            body.insert("n_predict".into(), n);
        }
        "/infill"
    } else if raw {
        if !images.is_empty() {
            return Err(ApiError::BadRequest(
                "images cannot be used with raw: true".into(),
            ));
        }
        body.insert("model".into(), json!(model));
        body.insert("prompt".into(), json!(prompt));
        "/v1/completions"
    } else {
        let mut msgs = Vec::new();
        if let Some(system) = r.system.filter(|s| !s.is_empty()) {
            msgs.push(convert::Message {
                role: "system".into(),
                content: Some(system),
                images: None,
                tool_calls: None,
                thinking: None,
                tool_name: None,
            });
        }
        msgs.push(convert::Message {
            role: "user".into(),
            content: Some(prompt),
            images: Some(images),
            tool_calls: None,
            thinking: None,
            tool_name: None,
        });
        let messages = convert::messages(&msgs, has_projector(ctx, &model)).map_err(|e| {
            // Generate's images are top-level: `images[0]`, not a message's.
            let e = e
                .replace("messages[0].", "")
                .replace("messages[0]", "the request");
            ApiError::BadRequest(e)
        })?;
        body.insert("model".into(), json!(model));
        body.insert("messages".into(), Value::Array(messages));
        "/v1/chat/completions"
    };
    Ok(Plan {
        requested: r.model,
        model,
        action: Action::Call {
            path,
            body: Value::Object(body),
            stream,
            out: Out::Answer(Shape::Generate),
        },
        keep_alive,
        ignored,
    })
}

fn plan_embed(ctx: &Ctx<'_>, bytes: &[u8], old: bool) -> Result<Plan, ApiError> {
    let mut unapplied = Vec::new();
    let (requested, input, options, keep_alive) = if old {
        let r: convert::EmbeddingsRequest = convert::parse(bytes).map_err(ApiError::BadRequest)?;
        let input = json!([r.prompt.unwrap_or_default()]);
        (r.model, input, r.options, r.keep_alive)
    } else {
        let r: convert::EmbedRequest = convert::parse(bytes).map_err(ApiError::BadRequest)?;
        let input = convert::embed_input(r.input.as_ref()).map_err(ApiError::BadRequest)?;
        // llama-server embeds whole inputs at the model's own size.
        if r.dimensions.is_some() {
            unapplied.push("dimensions".to_string());
        }
        if r.truncate == Some(false) {
            unapplied.push("truncate".to_string());
        }
        (r.model, input, r.options, r.keep_alive)
    };
    let model = resolve_tagged(ctx, &requested)?;
    let keep_alive = keep(keep_alive.as_ref()).map_err(ApiError::BadRequest)?;
    // Sampling options mean nothing to an embedding; checked all the same.
    let ignored =
        convert::apply_options(options.as_ref(), &mut Map::new()).map_err(ApiError::BadRequest)?;
    Ok(Plan {
        requested,
        model: model.clone(),
        action: Action::Call {
            path: "/v1/embeddings",
            body: json!({"model": model, "input": input}),
            stream: false,
            out: if old { Out::Embedding } else { Out::Embed },
        },
        keep_alive,
        ignored,
    })
}

/// `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`: read,
/// translate, forward, translate back. Every outcome is a history row.
pub(super) async fn inference(
    ctx: &Ctx<'_>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let started = Instant::now();
    let id = openai::request_id(ctx.state, &req);
    let mut pending = Pending::new(id.clone(), &ctx.peer.addr, endpoint.path(), started);
    pending.record.key_name = ctx.principal.name();
    let mut row = Row {
        pending: Some(pending),
        bus: &ctx.state.bus,
    };
    let mut resp = match run(ctx, endpoint, req, started, &mut row.pending).await {
        Ok(resp) => resp,
        Err(e) => {
            row.finish(e.status().as_u16(), e.outcome(), e.to_string());
            error(e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn run(
    ctx: &Ctx<'_>,
    endpoint: Endpoint,
    req: Request<Incoming>,
    started: Instant,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
    let declared = openai::declared_length(req.headers().get(header::CONTENT_LENGTH));
    let held = body::read(
        req.into_body(),
        declared,
        &ctx.config.http,
        &state.body_budget,
    )
    .await?;
    if let Some(p) = pending.as_mut() {
        p.set_request_content(state.recorder.content, &held.bytes);
    }
    let plan = match endpoint {
        Endpoint::Chat => plan_chat(ctx, &held.bytes)?,
        Endpoint::Generate => plan_generate(ctx, &held.bytes)?,
        Endpoint::Embed => plan_embed(ctx, &held.bytes, false)?,
        Endpoint::Embeddings => plan_embed(ctx, &held.bytes, true)?,
    };
    drop(held);
    if let Some(p) = pending.as_mut() {
        p.record.model = Some(plan.model.clone());
    }
    openai::announce(&state.bus, pending);
    state.ollama.warn_ignored(&plan.model, &plan.ignored);
    let ignored = plan.ignored.join(",");
    let mut resp = match plan.action {
        Action::Load { shape } => load_or_unload(ctx, &plan, shape, started, pending).await?,
        Action::Call {
            path,
            ref body,
            stream,
            out,
        } => {
            let bytes = Bytes::from(body.to_string());
            call(ctx, &plan, path, bytes, stream, out, started, pending).await?
        }
    };
    if !ignored.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&ignored) {
            resp.headers_mut().insert("x-claracore-ignored-options", v);
        }
    }
    Ok(resp)
}

/// Applies a request's `keep_alive` to its model.
async fn apply_keep_alive(ctx: &Ctx<'_>, model: &str, keep: Option<KeepAlive>) {
    if let Some(keep) = keep {
        ctx.state.scheduler.set_keep_alive(model, keep).await;
    }
}

async fn load_or_unload(
    ctx: &Ctx<'_>,
    plan: &Plan,
    shape: Shape,
    started: Instant,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let scheduler = &ctx.state.scheduler;
    let (reason, load) = if plan.keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        apply_keep_alive(ctx, &plan.model, plan.keep_alive).await;
        scheduler.stop(&plan.model).await;
        ("unload", Duration::ZERO)
    } else {
        apply_keep_alive(ctx, &plan.model, plan.keep_alive).await;
        let load = scheduler
            .load(&plan.model)
            .await
            .map_err(ApiError::Unavailable)?;
        ("load", load)
    };
    if let Some(p) = pending.take() {
        p.finish(&ctx.state.bus, 200, Outcome::Ok, None);
    }
    let mut out = convert::head(&plan.requested, &now(), true);
    convert::body_fields(&mut out, shape, "", None, None);
    out.insert("done_reason".into(), json!(reason));
    if reason == "load" {
        out.insert("load_duration".into(), json!(load.as_nanos() as u64));
        out.insert(
            "total_duration".into(),
            json!(started.elapsed().as_nanos() as u64),
        );
    }
    Ok(json_response(StatusCode::OK, &Value::Object(out)))
}

#[allow(clippy::too_many_arguments)]
async fn call(
    ctx: &Ctx<'_>,
    plan: &Plan,
    path: &'static str,
    body: Bytes,
    stream: bool,
    out: Out,
    started: Instant,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
    let waited = Instant::now();
    let lease = ctx.acquire(&plan.model, pending).await?;
    let load = waited.elapsed();
    // keep_alive counts from this use on; set once the model is up, so a
    // zero unloads it after this request, not before.
    apply_keep_alive(ctx, &plan.model, plan.keep_alive).await;
    // A fresh request: the client's headers (its API key among them) stay
    // with claracore.
    let mut head = Request::new(());
    *head.method_mut() = Method::POST;
    head.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let outgoing = Outgoing::Whole {
        head,
        bytes: body,
        held: None,
    };
    let (bus, content) = (state.bus.clone(), state.recorder.content);
    let tap = |status: u16, sse: bool| {
        pending
            .take()
            .map(|p| Tap::new(p, bus, content, status, sse))
    };
    let resp = proxy::forward(lease, PathAndQuery::from_static(path), outgoing, tap)
        .await
        .map_err(|e| {
            tracing::warn!(model = %plan.model, error = %e, "forwarding failed");
            ApiError::Upstream
        })?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = collect(resp.into_body()).await?;
        return Ok(json_response(
            status,
            &json!({"error": convert::child_error(&bytes)}),
        ));
    }
    if stream {
        if let Out::Answer(shape) = out {
            let translator =
                stream::Translator::new(shape, plan.requested.clone(), started, load, now);
            let body = stream::Ndjson::new(resp.into_body(), translator);
            let mut resp = Response::new(BodyExt::boxed_unsync(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            return Ok(resp);
        }
    }
    let bytes = collect(resp.into_body()).await?;
    let times = Times {
        total: started.elapsed(),
        load,
    };
    let value = answer(plan, out, &bytes, times)?;
    Ok(json_response(StatusCode::OK, &value))
}

/// A child's whole (non-streamed) answer as the Ollama route's object.
fn answer(plan: &Plan, out: Out, bytes: &[u8], times: Times) -> Result<Value, ApiError> {
    let not_json = |e: serde_json::Error| {
        tracing::warn!(model = %plan.model, error = %e, "the child's answer is not JSON");
        ApiError::Upstream
    };
    let shape = match out {
        Out::Answer(shape) => shape,
        Out::Embed | Out::Embedding => {
            let answer: Embeddings = serde_json::from_slice(bytes).map_err(not_json)?;
            return embed_answer(plan, out, &answer, times);
        }
    };
    let answer: Reply<'_> = serde_json::from_slice(bytes).map_err(not_json)?;
    Ok(convert::complete_answer(
        shape,
        &plan.requested,
        &now(),
        &answer,
        times,
    ))
}

/// `/api/embed`'s or `/api/embeddings`' object.
fn embed_answer(
    plan: &Plan,
    out: Out,
    answer: &Embeddings,
    times: Times,
) -> Result<Value, ApiError> {
    let vectors = convert::embeddings(answer).ok_or(ApiError::Upstream)?;
    if out == Out::Embedding {
        return Ok(json!({"embedding": vectors.into_iter().next().unwrap_or(json!([]))}));
    }
    let mut m = Map::new();
    m.insert("model".into(), json!(plan.requested));
    m.insert("embeddings".into(), Value::Array(vectors));
    m.insert(
        "total_duration".into(),
        json!(times.total.as_nanos() as u64),
    );
    m.insert("load_duration".into(), json!(times.load.as_nanos() as u64));
    let prompt = answer.usage.as_ref().and_then(|u| u.prompt_tokens);
    if let Some(n) = prompt.and_then(|n| u64::try_from(n).ok()) {
        m.insert("prompt_eval_count".into(), json!(n));
    }
    Ok(Value::Object(m))
}

/// A child's whole answer, bounded.
async fn collect(mut body: BoxBody) -> Result<Bytes, ApiError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            tracing::warn!(error = %e, "reading the child's answer failed");
            ApiError::Upstream
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_ANSWER {
                tracing::warn!(
                    limit = MAX_ANSWER,
                    "the child's answer is too large to translate"
                );
                return Err(ApiError::Upstream);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}
