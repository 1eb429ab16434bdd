//! The inference routes (`/v1/*` and `/infill`, OpenAI's and Anthropic's,
//! routed by the body's `model` and forwarded unchanged), the model list
//! and the raw `/upstream/{model}/…` pass-through.
//!
//! The model comes from a JSON body's top-level `model`, or for the one
//! multipart route (`/v1/audio/transcriptions`) from the form's `model`
//! field, found by [`form_model`] in the body already held in memory.
//! Errors on a route are answered in its
//! [`ErrorShape`](super::routes::ErrorShape).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::routes::Inference;
use super::{body, json_response, resolve, ApiError, AppState, Ctx};
use crate::auth::Peer;
use crate::events::{AuditAction, Bus, Event, RequestStart};
use crate::history::tap::{Pending, Tap};
use crate::history::{self, Outcome};
use crate::proxy::{self, BoxBody, Outgoing};
use crate::scheduler::ModelState;

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    declared_length(req.headers().get(header::CONTENT_LENGTH))
}

/// A `Content-Length` value as a number, if it is one (hyper has already
/// refused a request whose value is not).
pub(super) fn declared_length(value: Option<&HeaderValue>) -> Option<u64> {
    value.and_then(|v| v.to_str().ok())?.parse().ok()
}

/// What the top level of a request body says about `model`.
#[derive(Debug, PartialEq, Eq)]
enum Requested {
    Missing,
    NotString,
    Twice,
    Name(String),
}

/// A JSON object's keys, read only to know which one is `model`.
struct IsModel(bool);

impl<'de> Deserialize<'de> for IsModel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IsModel, D::Error> {
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = IsModel;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<IsModel, E> {
                Ok(IsModel(v == "model"))
            }
        }
        d.deserialize_str(Key)
    }
}

/// The body's top-level `model`; every other value is skipped unparsed.
/// Only a JSON object is accepted (a derived struct would also take an
/// array such as `["tiny"]` as its fields in order).
struct TopLevel(Requested);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TopLevel, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopLevel, A::Error> {
                let mut found = Requested::Missing;
                while let Some(IsModel(is_model)) = map.next_key()? {
                    if !is_model {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let value: serde_json::Value = map.next_value()?;
                    found = match (found, value) {
                        (Requested::Missing, serde_json::Value::String(s)) => Requested::Name(s),
                        (Requested::Missing, _) => Requested::NotString,
                        _ => Requested::Twice,
                    };
                }
                Ok(TopLevel(found))
            }
        }
        d.deserialize_map(Object)
    }
}

/// The model a request body names: only a JSON object's top-level string
/// `model` counts.
pub(super) fn requested_model(body: &[u8]) -> Result<String, ApiError> {
    let expected = "the request body must be a JSON object with a string `model` field";
    match serde_json::from_slice::<TopLevel>(body) {
        Ok(TopLevel(Requested::Name(name))) => Ok(name),
        Ok(TopLevel(Requested::Missing)) => Err(ApiError::BadRequest(format!(
            "request body has no `model` field; {expected}"
        ))),
        Ok(TopLevel(Requested::NotString)) => Err(ApiError::BadRequest(format!(
            "`model` must be a string; {expected}"
        ))),
        Ok(TopLevel(Requested::Twice)) => Err(ApiError::BadRequest(
            "`model` appears more than once in the request body".into(),
        )),
        Err(e) if e.is_data() => Err(ApiError::BadRequest(format!("{expected} ({e})"))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// A request id: the client's `x-request-id` when it is short and plain,
/// else a new one.
pub(super) fn request_id(state: &AppState, req: &Request<Incoming>) -> String {
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
    let mut pending = Pending::new(id.clone(), &ctx.peer.addr, endpoint.path(), Instant::now());
    pending.record.key_name = ctx.principal.name();
    let mut row = Row {
        pending: Some(pending),
        bus: &ctx.state.bus,
    };
    let mut resp = match forward_model_request(ctx, endpoint, req, &mut row.pending).await {
        Ok(resp) => resp,
        Err(e) => {
            row.finish(e.status().as_u16(), e.outcome(), e.to_string());
            e.into_response_shaped(endpoint.error_shape())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Tells the live events stream that a request's model is known, before
/// it waits for it: ids and names only, never content.
pub(super) fn announce(bus: &Bus, pending: &Option<Pending>) {
    if let Some(p) = pending {
        let r = &p.record;
        bus.emit(Event::RequestStarted(std::sync::Arc::new(RequestStart {
            request_id: r.request_id.clone(),
            model: r.model.clone(),
            endpoint: r.endpoint.clone(),
            key_name: r.key_name.clone(),
            client: r.client.clone(),
        })));
    }
}

/// Records an inference request refused before it was read
/// (authentication, scope, rate) with `e`; returns its request id.
pub(super) fn refused(
    state: &AppState,
    peer: &Peer,
    endpoint: &str,
    req: &Request<Incoming>,
    e: &ApiError,
) -> String {
    let id = request_id(state, req);
    Pending::new(id.clone(), &peer.addr, endpoint, Instant::now()).finish(
        &state.bus,
        e.status().as_u16(),
        e.outcome(),
        Some(e.to_string()),
    );
    id
}

/// A request's history row until a response body's tap takes it. hyper
/// drops the handler when the client closes the connection while the
/// request waits for a model or for its first byte; the row is then
/// recorded as cancelled (status 499, nginx's "client closed request").
pub(super) struct Row<'a> {
    pub(super) pending: Option<Pending>,
    pub(super) bus: &'a Bus,
}

impl Row<'_> {
    pub(super) fn finish(&mut self, status: u16, outcome: Outcome, error: String) {
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
    endpoint: Inference,
    req: Request<Incoming>,
    pending: &mut Option<Pending>,
) -> Result<Response<BoxBody>, ApiError> {
    let declared = content_length(&req);
    let (parts, body) = req.into_parts();
    let state = ctx.state;
    let held = body::read(body, declared, &ctx.config.http, &state.body_budget).await?;
    if let Some(p) = pending.as_mut() {
        p.set_request_content(state.recorder.content, &held.bytes);
    }
    let requested = if endpoint.is_form() {
        form_model(parts.headers.get(header::CONTENT_TYPE), &held.bytes)?
    } else {
        requested_model(&held.bytes)?
    };
    let model = resolve(ctx, &requested)?;
    if let Some(p) = pending.as_mut() {
        p.record.model = Some(model.clone());
    }
    announce(&state.bus, pending);
    let lease = ctx.acquire(&model, pending).await?;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // The budget comes back once the answer's head is in: until then the
    // body may be sent again (see `Outgoing::Whole`).
    let outgoing = Outgoing::Whole {
        head: Request::from_parts(parts, ()),
        bytes: held.bytes,
        held: Some(held.permit),
    };
    let (bus, content) = (state.bus.clone(), state.recorder.content);
    // The row stays with the caller until a response head arrives, so a
    // request that fails or is cancelled before that is still recorded.
    let tap = |status: u16, sse: bool| {
        pending
            .take()
            .map(|p| Tap::new(p, bus, content, status, sse))
    };
    proxy::forward(lease, path_and_query, outgoing, tap)
        .await
        .map_err(|e| {
            tracing::warn!(model = %model, error = %e, "forwarding failed");
            ApiError::Upstream
        })
}

/// `/upstream/{model}/{tail}`: the body streams through unread. It reaches
/// every llama-server endpoint, so each call is an audit row.
pub(super) async fn passthrough(
    ctx: &Ctx<'_>,
    requested: &str,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let target = format!("{} {requested}/{tail}", req.method());
    let result = forward_raw(ctx, requested, tail, req).await;
    let outcome = match &result {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(e) => e.status().as_u16().to_string(),
    };
    ctx.audit(AuditAction::Upstream, Some(&target), &outcome);
    result
}

async fn forward_raw(
    ctx: &Ctx<'_>,
    requested: &str,
    tail: &str,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let model = resolve(ctx, requested)?;
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
    let lease = ctx.acquire(&model, &mut None).await?;
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let req = req.map(|b| Limited::new(b, limit_usize).boxed_unsync());
    proxy::forward(lease, path_and_query, Outgoing::Streaming(req), |_, _| None)
        .await
        .map_err(|e| {
            tracing::warn!(model = %model, error = %e, "pass-through failed");
            ApiError::Upstream
        })
}

/// One model as `GET /v1/models` lists it: while starting, its state is
/// `loading` (as llama.cpp's router says) with its `progress`; `load_ms`
/// once it has loaded.
fn model_object(
    m: &crate::config::ModelConfig,
    status: Option<&crate::scheduler::ModelStatus>,
) -> serde_json::Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let state = status.map_or(ModelState::Stopped, |s| s.state);
    let mut object = json!({
        "id": m.name,
        "object": "model",
        "created": created,
        "owned_by": "claracore",
        "aliases": m.aliases,
        "source": m.source,
        "state": if state == ModelState::Starting { "loading" } else { state.as_str() },
    });
    if let Some(status) = status {
        if let Some(progress) = status
            .progress
            .as_ref()
            .filter(|_| state == ModelState::Starting)
        {
            object["progress"] = json!(progress);
        }
        if let Some(load_ms) = status.load_ms {
            object["load_ms"] = json!(load_ms);
        }
    }
    object
}

pub(super) async fn list_models(ctx: &Ctx<'_>) -> Response<BoxBody> {
    // The config says what is offered; a model removed by a reload may
    // still be stopping, but it is no longer offered.
    let status = ctx.state.scheduler.status().await;
    let data: Vec<serde_json::Value> = ctx
        .config
        .models
        .iter()
        .filter(|m| ctx.principal.may_use(&m.name))
        .map(|m| model_object(m, status.iter().find(|s| s.name == m.name)))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: the model named `id` (a name or an alias) as the
/// list shows it, under its configured name; unknown, or not for this
/// key: 404 in OpenAI's shape.
pub(super) async fn get_model(ctx: &Ctx<'_>, id: &str) -> Result<Response<BoxBody>, ApiError> {
    let name = resolve(ctx, id)?;
    let Some(m) = ctx.config.models.iter().find(|m| m.name == name) else {
        return Err(ApiError::UnknownModel {
            requested: id.to_string(),
            available: Vec::new(),
        });
    };
    let status = ctx.state.scheduler.status().await;
    let object = model_object(m, status.iter().find(|s| s.name == m.name));
    Ok(json_response(StatusCode::OK, &object))
}

/// The `boundary` parameter of a `multipart/form-data` content type.
fn form_boundary(content_type: Option<&HeaderValue>) -> Result<String, ApiError> {
    let expected = "this route takes a multipart/form-data body with a `model` field";
    let value = content_type
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("no Content-Type; {expected}")))?;
    let mut params = value.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(ApiError::BadRequest(format!(
            "Content-Type is {:?}; {expected}",
            super::error::cut(mime, 64)
        )));
    }
    let boundary = params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .unwrap_or_default();
    // RFC 2046 §5.1.1: 1 to 70 characters.
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(ApiError::BadRequest(format!(
            "the multipart Content-Type has no valid boundary; {expected}"
        )));
    }
    Ok(boundary)
}

/// The `model` field of a multipart/form-data `body` (RFC 7578): the part
/// whose Content-Disposition names it, its value up to the next delimiter.
/// Other parts (the audio file) are skipped, not copied.
pub(super) fn form_model(
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Result<String, ApiError> {
    let boundary = form_boundary(content_type)?;
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut found: Option<String> = None;
    // Each part starts after a delimiter line and ends at "\r\n--boundary".
    let Some(mut at) = find(body, delimiter, 0) else {
        return Err(ApiError::BadRequest(
            "the multipart body has no part with the Content-Type's boundary".into(),
        ));
    };
    loop {
        let after = at + delimiter.len();
        if body.get(after..after + 2) == Some(b"--") {
            break; // the close delimiter
        }
        let Some(head_start) = find(body, b"\r\n", after).map(|i| i + 2) else {
            break;
        };
        let Some(head_end) = find(body, b"\r\n\r\n", head_start) else {
            return Err(ApiError::BadRequest(
                "a multipart part's headers do not end".into(),
            ));
        };
        let mut close = b"\r\n".to_vec();
        close.extend_from_slice(delimiter);
        let value_start = head_end + 4;
        let Some(value_end) = find(body, &close, value_start) else {
            return Err(ApiError::BadRequest(
                "the multipart body ends inside a part (no closing boundary)".into(),
            ));
        };
        let head = &body[head_start..head_end];
        if part_name(head).as_deref() == Some("model") {
            if found.is_some() {
                return Err(ApiError::BadRequest(
                    "the form has more than one `model` field".into(),
                ));
            }
            let value = std::str::from_utf8(&body[value_start..value_end]).map_err(|_| {
                ApiError::BadRequest("the form's `model` field is not UTF-8 text".into())
            })?;
            found = Some(value.to_string());
        }
        at = value_end + 2;
    }
    found.ok_or_else(|| {
        ApiError::BadRequest(
            "the multipart form has no `model` field; this route takes a multipart/form-data \
             body with a `model` field"
                .into(),
        )
    })
}

/// The `name` of a part whose headers are `head`, from its
/// `Content-Disposition: form-data; name="…"`.
fn part_name(head: &[u8]) -> Option<String> {
    let head = std::str::from_utf8(head).ok()?;
    let disposition = head.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(v)
    })?;
    let mut params = disposition.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("name"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

/// The first index of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(content_type: &str, body: &str) -> Result<String, String> {
        let ct = HeaderValue::from_str(content_type).unwrap();
        form_model(Some(&ct), body.as_bytes()).map_err(|e| e.to_string())
    }

    /// What the openai client (httpx) sends for `audio.transcriptions.create`.
    const CT: &str = "multipart/form-data; boundary=0f1e2d";
    const BODY: &str =
        "--0f1e2d\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
        Content-Type: audio/wav\r\n\r\nRIFF\r\n--0f1e2\x00data\r\n--0f1e2d\r\n\
        Content-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n--0f1e2d--\r\n";

    #[test]
    fn the_forms_model_field_is_found_past_a_file_part() {
        assert_eq!(form(CT, BODY).unwrap(), "tiny");
        assert_eq!(
            form(
                "Multipart/Form-Data; charset=utf-8; boundary=\"0f1e2d\"",
                BODY
            )
            .unwrap(),
            "tiny"
        );
    }

    #[test]
    fn bad_forms_are_clear_400s_and_never_panic() {
        let no_model = "--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b--\r\n";
        let twice = "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--b\r\n\
                     Content-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--b--\r\n";
        for (ct, body, says) in [
            (
                "multipart/form-data; boundary=b",
                no_model,
                "no `model` field",
            ),
            ("multipart/form-data; boundary=b", twice, "more than one"),
            (
                "application/json",
                "{\"model\":\"tiny\"}",
                "multipart/form-data",
            ),
            ("multipart/form-data", no_model, "no valid boundary"),
            ("multipart/form-data; boundary=zz", no_model, "no part with"),
            (
                "multipart/form-data; boundary=b",
                "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny",
                "ends inside a part",
            ),
            (
                "multipart/form-data; boundary=b",
                "--b\r\nContent-Disposition: form-data",
                "do not end",
            ),
            ("multipart/form-data; boundary=b", "", "no part with"),
            ("multipart/form-data; boundary=b", "--b", "no `model` field"),
        ] {
            let e = form(ct, body).unwrap_err();
            assert!(e.contains(says), "{ct} {body:?}: {e}");
        }
        assert!(form_model(None, BODY.as_bytes()).is_err());
        // Every prefix of a good body: an answer, never a panic.
        for cut in 0..BODY.len() {
            let _ = form(CT, &BODY[..cut]);
        }
    }

    fn model(body: &str) -> Result<String, String> {
        requested_model(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn only_an_objects_top_level_string_model_counts() {
        assert_eq!(model(r#"{"model":"tiny","messages":[]}"#).unwrap(), "tiny");
        assert_eq!(
            model(r#"{"x":{"model":"no"},"model":"t\u0069ny"}"#).unwrap(),
            "tiny"
        );
        for (body, says) in [
            (r#"["tiny"]"#, "must be a JSON object"),
            (r#""tiny""#, "must be a JSON object"),
            ("42", "must be a JSON object"),
            ("null", "must be a JSON object"),
            (r#"{"model":["tiny"]}"#, "`model` must be a string"),
            (r#"{"model":null}"#, "`model` must be a string"),
            (r#"{"messages":[{"model":"tiny"}]}"#, "no `model` field"),
            (r#"{"model":"a","model":"b"}"#, "more than once"),
            ("{not json", "not valid JSON"),
            ("", "not valid JSON"),
            (r#"{"model":"tiny"} trailing"#, "not valid JSON"),
        ] {
            let e = model(body).unwrap_err();
            assert!(e.contains(says), "{body:?}: {e}");
        }
    }
}
