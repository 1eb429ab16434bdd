//! claracore's own control and read endpoints, all under `/admin/`: loaded
//! models, stop, load, request history, per-model figures, a live backup
//! and each model's output lines (a snapshot, or followed over SSE).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::cut;
use super::{json_response, resolve, ApiError, AppState, Ctx};
use crate::events::{AuditAction, ModelState};
use crate::history::{self, store, Outcome};
use crate::proxy::{self, BoxBody};
use crate::scheduler::ModelStatus;
use crate::supervisor::logs::{Follow, LogLine};
use crate::wire::query::{self, Flag, QueryError};

/// `GET /admin/ps`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PsAnswer {
    pub models: Vec<ModelStatus>,
}

/// `GET /admin/history`: a page of rows, newest first; `next_cursor` is
/// where the next page starts, when this one is full.
#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryAnswer {
    pub requests: Vec<store::RequestRow>,
    pub next_cursor: Option<i64>,
}

/// `GET /admin/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsAnswer {
    pub window_s: u64,
    pub models: Vec<store::ModelStats>,
    pub history_rows_dropped: u64,
}

/// `GET /admin/audit`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditAnswer {
    pub audit: Vec<store::AuditRow>,
    pub next_cursor: Option<i64>,
}

/// `POST /admin/models/{name}/stop`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StopAnswer {
    pub model: String,
    /// It was running and is now draining; false: it was not running.
    pub stopping: bool,
}

/// `POST /admin/models/{name}/load`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoadAnswer {
    pub model: String,
    pub state: ModelState,
    pub load_ms: u64,
}

/// How long one write to a log follower may take before it is dropped.
const FOLLOW_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A comment line this often keeps idle proxies from closing a follower.
const FOLLOW_KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) async fn ps(ctx: &Ctx<'_>) -> Response<BoxBody> {
    let mut models = ctx.state.scheduler.status().await;
    models.retain(|m| ctx.principal.may_use(&m.name));
    json_response(StatusCode::OK, &json!(PsAnswer { models }))
}

pub(super) async fn stop_model(
    ctx: &Ctx<'_>,
    requested: &str,
) -> Result<Response<BoxBody>, ApiError> {
    let model = match resolve(ctx, requested) {
        Ok(m) => m,
        Err(e) => {
            ctx.audit(AuditAction::Stop, Some(requested), "unknown model");
            return Err(e);
        }
    };
    let was_running = ctx.state.scheduler.stop(&model).await.unwrap_or(false);
    let result = if was_running {
        "stopping"
    } else {
        "not running"
    };
    ctx.audit(AuditAction::Stop, Some(&model), result);
    Ok(json_response(
        StatusCode::OK,
        &json!(StopAnswer {
            model,
            stopping: was_running,
        }),
    ))
}

/// Starts a model if needed and answers once it is ready, with how long
/// that took; it holds no lease afterwards. A failed start is the
/// scheduler's error in the usual shape.
pub(super) async fn load_model(
    ctx: &Ctx<'_>,
    requested: &str,
) -> Result<Response<BoxBody>, ApiError> {
    let model = match resolve(ctx, requested) {
        Ok(m) => m,
        Err(e) => {
            ctx.audit(AuditAction::Load, Some(requested), "unknown model");
            return Err(e);
        }
    };
    match ctx.state.scheduler.load(&model).await {
        Ok(took) => {
            let load_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
            ctx.audit(AuditAction::Load, Some(&model), "ready");
            Ok(json_response(
                StatusCode::OK,
                &json!(LoadAnswer {
                    model,
                    state: ModelState::Ready,
                    load_ms,
                }),
            ))
        }
        Err(e) => {
            ctx.audit(AuditAction::Load, Some(&model), &e.to_string());
            Err(ApiError::Unavailable(e))
        }
    }
}

/// `GET /admin/logs/{model}[?follow=1]`: the model's kept output lines,
/// oldest first; with `follow`, the same lines as SSE `line` events, then
/// new ones as they come. A follower that falls behind gets a last
/// `dropped` event and the stream ends; so does one whose writes stall.
pub(super) async fn logs(
    ctx: &Ctx<'_>,
    requested: &str,
    query: Option<&str>,
) -> Result<Response<BoxBody>, ApiError> {
    let LogsQuery {
        follow: Flag(follow),
    } = read_query(query)?;
    let model = resolve(ctx, requested)?;
    let logs = ctx.state.scheduler.logs();
    if !follow {
        let lines = logs.lines(&model);
        let lines: Vec<&LogLine> = lines.iter().map(|l| &**l).collect();
        return Ok(json_response(
            StatusCode::OK,
            &json!({"model": model, "lines": lines}),
        ));
    }
    let (tx, body) = http_body_util::channel::Channel::<Bytes, proxy::BoxError>::new(16);
    tokio::spawn(follow_lines(logs.follow(&model), tx));
    let mut resp = Response::new(body.boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// One SSE message.
fn sse(event: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Writes a follower's backlog, then its live lines, until it lags, its
/// client stops reading or leaves, or the daemon shuts down.
async fn follow_lines(
    follow: Follow,
    mut tx: http_body_util::channel::Sender<Bytes, proxy::BoxError>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let Follow {
        backlog,
        mut live,
        mut closed,
    } = follow;
    let mut send = async |chunk: Bytes| {
        matches!(
            tokio::time::timeout(FOLLOW_WRITE_TIMEOUT, tx.send_data(chunk)).await,
            Ok(Ok(()))
        )
    };
    for line in backlog {
        if !send(sse("line", &json!(*line))).await {
            return;
        }
    }
    if *closed.borrow_and_update() {
        return;
    }
    let mut keep_alive = tokio::time::interval_at(
        tokio::time::Instant::now() + FOLLOW_KEEP_ALIVE,
        FOLLOW_KEEP_ALIVE,
    );
    loop {
        let chunk = tokio::select! {
            received = live.recv() => match received {
                Ok(line) => sse("line", &json!(*line)),
                Err(RecvError::Lagged(missed)) => {
                    let _ = send(sse("dropped", &json!({
                        "missed": missed,
                        "reason": "this follower fell behind the model's output and was dropped; reconnect to follow again",
                    })))
                    .await;
                    return;
                }
                Err(RecvError::Closed) => return,
            },
            _ = closed.changed() => return,
            _ = keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
        };
        if !send(chunk).await {
            return;
        }
    }
}

/// `/admin/logs/{model}`' query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: Flag,
}

/// `/admin/history`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    model: Option<String>,
    #[serde(default, deserialize_with = "outcome_param")]
    outcome: Option<Outcome>,
    #[serde(default, deserialize_with = "time_param")]
    since: Option<i64>,
    #[serde(default, deserialize_with = "time_param")]
    until: Option<i64>,
    #[serde(default, deserialize_with = "page_limit")]
    limit: Option<usize>,
    #[serde(default, deserialize_with = "page_cursor")]
    cursor: Option<i64>,
}

/// `/admin/stats`' query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    #[serde(default, deserialize_with = "window_param")]
    window: Option<Duration>,
}

/// `/admin/audit`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default, deserialize_with = "page_limit")]
    limit: Option<usize>,
    #[serde(default, deserialize_with = "page_cursor")]
    cursor: Option<i64>,
}

/// A query string (`application/x-www-form-urlencoded`, what the CLI and
/// curl send) as `T`, or a 400 saying which parameter is wrong.
fn read_query<T: serde::de::DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    query::parse(query).map_err(|e| match e {
        QueryError::Unknown(name) => unknown_parameter(&name),
        QueryError::Invalid(message) => ApiError::BadRequest(message),
    })
}

/// A parameter read by `parse`, whose error the reader prefixes with the
/// parameter's name.
fn param<'de, D, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = query::text(d)?;
    parse(&text).map(Some).map_err(serde::de::Error::custom)
}

fn outcome_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Outcome>, D::Error> {
    param(d, |v| match Outcome::parse(v) {
        Some(outcome) => Ok(outcome),
        None => Err(format!(
            "{:?} is not one of ok, cancelled, upstream_error, timeout, rejected",
            cut(v, 64)
        )),
    })
}

/// A point in time given as unix milliseconds or as a duration ago ("1h").
fn time_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    param(d, |v| {
        if let Ok(ms) = v.parse::<i64>() {
            return Ok(ms);
        }
        crate::config::parse_duration(v)
            .map(ago)
            .map_err(|e| format!("{e}; give unix milliseconds or a duration ago like 1h"))
    })
}

fn window_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    param(d, |v| {
        crate::config::parse_duration(v).map_err(|e| e.to_string())
    })
}

/// A page size: 1 to 1000 rows.
fn page_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    param(d, |v| {
        v.parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| "must be 1 to 1000".to_string())
    })
}

/// Where the next page starts: an id from `next_cursor`.
fn page_cursor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    param(d, |v| {
        v.parse()
            .map_err(|_| "must be an id from next_cursor".to_string())
    })
}

/// Unix milliseconds `d` before now; a longer time ago than i64 holds is
/// the earliest time there is.
fn ago(d: Duration) -> i64 {
    history::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `/admin/history`'s query string as a store query.
pub(super) fn history_query(query: Option<&str>) -> Result<store::RequestQuery, ApiError> {
    let q: HistoryQuery = read_query(query)?;
    Ok(store::RequestQuery {
        model: q.model,
        outcome: q.outcome,
        since_ms: q.since,
        until_ms: q.until,
        limit: q.limit.unwrap_or(100),
        cursor: q.cursor,
    })
}

/// `/admin/stats`' window, and when it began (unix ms).
pub(super) fn stats_window(query: Option<&str>) -> Result<(Duration, i64), ApiError> {
    let q: StatsQuery = read_query(query)?;
    let window = q.window.unwrap_or(Duration::from_secs(3600));
    Ok((window, ago(window)))
}

fn unknown_parameter(name: &str) -> ApiError {
    ApiError::BadRequest(format!("unknown parameter {:?}", cut(name, 64)))
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

pub(super) async fn history_list(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
    let q = history_query(query)?;
    let limit = q.limit;
    let rows = read_history(state, move |c| store::list_requests(c, &q)).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(json_response(
        StatusCode::OK,
        &json!(HistoryAnswer {
            requests: rows,
            next_cursor: next,
        }),
    ))
}

pub(super) async fn history_get(ctx: &Ctx<'_>, id: &str) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
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

pub(super) async fn stats(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
    let (window, since) = stats_window(query)?;
    let models = read_history(state, move |c| store::stats(c, since)).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!(StatsAnswer {
            window_s: window.as_secs(),
            models,
            history_rows_dropped: state.recorder.dropped(),
        }),
    ))
}

/// `/admin/audit?limit=&cursor=`: the audit trail, newest first.
pub(super) async fn audit_list(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<Response<BoxBody>, ApiError> {
    let q: AuditQuery = read_query(query)?;
    let (limit, cursor) = (q.limit.unwrap_or(100), q.cursor);
    let rows = read_history(ctx.state, move |c| store::list_audit(c, limit, cursor)).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(json_response(
        StatusCode::OK,
        &json!(AuditAnswer {
            audit: rows,
            next_cursor: next,
        }),
    ))
}

/// A consistent copy of the live history database, streamed back.
pub(super) async fn backup(ctx: &Ctx<'_>) -> Result<Response<BoxBody>, ApiError> {
    let state = ctx.state;
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
    let file = on_history(state, Duration::from_secs(10), "history backup", copy).await;
    ctx.audit(
        AuditAction::Backup,
        None,
        if file.is_ok() { "ok" } else { "failed" },
    );
    let file = file?;
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
