//! `GET /admin/events` against the real daemon: order and completeness
//! against history, `Last-Event-ID` resume, a stalled client cut off
//! without slowing anyone, no content on the wire, and the `read` scope.
//!
//! The volume tests use the fake upstream (fast, deterministic); one test
//! starts the real llama-server to see model states with their reasons.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::*;

/// One SSE message as a client parses it.
#[derive(Debug, Clone)]
struct Ev {
    id: u64,
    kind: String,
    data: Value,
    /// The message as sent, for byte-exact comparisons.
    raw: String,
}

/// A client of the stream, parsing messages as they arrive.
struct Sse {
    body: Incoming,
    buf: String,
    /// Keep-alive comments seen.
    comments: usize,
}

fn events_request(
    path: &str,
    last_event_id: Option<&str>,
    key: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "localhost")
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> hyper::Response<Incoming>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

impl Sse {
    /// Opens the stream on the local socket (admin); once the head is
    /// here, the daemon has registered the client.
    async fn open(socket: &Path, path: &str, last_event_id: Option<&str>) -> Sse {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let resp = exchange(stream, events_request(path, last_event_id, None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse {
            body: resp.into_body(),
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next message, None at the end of the stream; panics after
    /// `within`.
    async fn next(&mut self, within: Duration) -> Option<Ev> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if block.lines().all(|l| l.is_empty() || l.starts_with(':')) {
                    self.comments += 1;
                    continue;
                }
                return Some(parse(&block));
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no event within {within:?}; have {:?}", self.buf));
            match frame {
                None => return None,
                Some(Err(e)) => panic!("stream broke: {e}"),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.push_str(std::str::from_utf8(&data).unwrap());
                    }
                }
            }
        }
    }

    /// Messages until `done` says so (given all so far).
    async fn until(&mut self, within: Duration, done: impl Fn(&[Ev]) -> bool) -> Vec<Ev> {
        let deadline = Instant::now() + within;
        let mut all = Vec::new();
        while !done(&all) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left.max(Duration::from_millis(1))).await {
                Some(e) => all.push(e),
                None => panic!("stream ended after {} events", all.len()),
            }
        }
        all
    }

    /// Every message to the end of the stream.
    async fn rest(&mut self, within: Duration) -> Vec<Ev> {
        let mut all = Vec::new();
        while let Some(e) = self.next(within).await {
            all.push(e);
        }
        all
    }
}

fn parse(block: &str) -> Ev {
    let (mut id, mut kind, mut data) = (None, None, None);
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.parse().unwrap());
        } else if let Some(v) = line.strip_prefix("event: ") {
            kind = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            assert!(data.is_none(), "one data line per message: {block:?}");
            data = Some(serde_json::from_str(v).unwrap());
        } else {
            panic!("unexpected line {line:?} in {block:?}");
        }
    }
    Ev {
        id: id.unwrap_or_else(|| panic!("no id in {block:?}")),
        kind: kind.unwrap_or_else(|| panic!("no event type in {block:?}")),
        data: data.unwrap_or_else(|| panic!("no data in {block:?}")),
        raw: block.to_string(),
    }
}

fn count(evs: &[Ev], kind: &str) -> usize {
    evs.iter().filter(|e| e.kind == kind).count()
}

/// `n` requests with `body` over `workers` keep-alive TCP connections;
/// each one's status and latency.
async fn fire(addr: &str, n: usize, workers: usize, body: Value) -> Vec<(StatusCode, Duration)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (addr, body, next) = (addr.to_string(), body.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                sender.ready().await.unwrap();
                let req = Request::builder()
                    .method(Method::POST)
                    .uri("/v1/chat/completions")
                    .header("host", &addr)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                let start = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                out.push((status, start.elapsed()));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A metric's value from `/metrics` (over the local socket).
async fn metric(d: &Daemon, name: &str) -> f64 {
    let (_, text) = d.get("/metrics").await;
    let text = text.as_str().unwrap_or_default().to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_started_then_finished_in_order_and_matches_history_one_to_one() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let mut sse = Sse::open(&d.socket(), "/admin/events", None).await;
    let n = 200;
    let results = fire(&d.addr, n, 8, chat("f", 2, false)).await;
    assert!(
        results.iter().all(|(s, _)| *s == StatusCode::OK),
        "{results:?}"
    );
    let evs = sse
        .until(Duration::from_secs(30), |e| count(e, "request") == n)
        .await;

    // Ids are global: one more for each message, none skipped.
    for pair in evs.windows(2) {
        assert_eq!(
            pair[1].id,
            pair[0].id + 1,
            "{} then {}",
            pair[0].raw,
            pair[1].raw
        );
    }
    let states: Vec<(String, Option<String>)> = evs
        .iter()
        .filter(|e| e.kind == "state" && e.data["model"] == "f")
        .map(|e| {
            (
                e.data["state"].as_str().unwrap().to_string(),
                e.data["reason"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("starting".to_string(), Some("requested".to_string())),
            ("ready".to_string(), None)
        ]
    );

    // Each request: started once, then finished once, with the same id.
    let mut started: HashMap<String, usize> = HashMap::new();
    let mut finished: HashMap<String, (usize, Value)> = HashMap::new();
    for (i, e) in evs.iter().enumerate() {
        let id = e.data["id"].as_str().map(str::to_string);
        match e.kind.as_str() {
            "request_started" => {
                let id = id.unwrap();
                assert_eq!(e.data["model"], "f");
                assert_eq!(e.data["endpoint"], "/v1/chat/completions");
                assert!(e.data["client"].as_str().unwrap().starts_with("127.0.0.1:"));
                assert!(started.insert(id, i).is_none(), "started twice: {}", e.raw);
            }
            "request" => {
                let id = id.unwrap();
                assert!(
                    started.get(&id).is_some_and(|s| *s < i),
                    "finished before it started: {}",
                    e.raw
                );
                assert!(finished.insert(id, (i, e.data.clone())).is_none());
            }
            "state" | "queue" | "progress" => {}
            other => panic!("unexpected {other}: {}", e.raw),
        }
    }
    assert_eq!(started.len(), n);
    assert_eq!(finished.len(), n);

    // History holds the same requests, with the same figures.
    let rows = d.wait_rows(n, Duration::from_secs(10)).await;
    assert_eq!(rows.len(), n);
    for row in &rows {
        let id = row["request_id"].as_str().unwrap();
        let (_, e) = finished
            .get(id)
            .unwrap_or_else(|| panic!("history row {id} has no event"));
        assert_eq!(e["status"], row["status"], "{id}");
        assert_eq!(e["outcome"], row["outcome"], "{id}");
        assert_eq!(e["prompt_tokens"], row["prompt_tokens"], "{id}");
        assert_eq!(e["completion_tokens"], row["completion_tokens"], "{id}");
        assert_eq!(e["completion_tokens"], 2, "{id}");
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_llama_server_shows_starting_then_ready_and_an_admin_stop_with_its_reason() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let mut sse = Sse::open(&d.socket(), "/admin/events", None).await;
    assert_eq!(chat_status(&d.addr, "tiny").await, StatusCode::OK);
    let (status, body) =
        request_unix(&d.socket(), Method::POST, "/admin/models/tiny/stop", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let evs = sse
        .until(Duration::from_secs(60), |e| {
            e.iter()
                .any(|e| e.kind == "state" && e.data["state"] == "stopped")
        })
        .await;
    let states: Vec<Value> = evs
        .iter()
        .filter(|e| e.kind == "state")
        .map(|e| e.data.clone())
        .collect();
    assert_eq!(
        states,
        [
            json!({"model": "tiny", "state": "starting", "reason": "requested"}),
            json!({"model": "tiny", "state": "ready"}),
            json!({"model": "tiny", "state": "stopping"}),
            json!({"model": "tiny", "state": "stopped", "reason": "admin"}),
        ]
    );
    // Load progress reaches the stream: at least the one sent at Ready.
    let progress: Vec<&Value> = evs
        .iter()
        .filter(|e| e.kind == "progress")
        .map(|e| &e.data)
        .collect();
    let last = progress.last().expect("a progress event");
    assert_eq!(
        (last["model"].as_str(), last["fraction"].as_f64()),
        (Some("tiny"), Some(1.0)),
        "{last}"
    );
    assert!(last["elapsed_ms"].is_u64(), "{last}");
    let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    let started = kinds.iter().position(|k| *k == "request_started").unwrap();
    let ready = evs
        .iter()
        .position(|e| e.kind == "state" && e.data["state"] == "ready")
        .unwrap();
    let done = kinds.iter().position(|k| *k == "request").unwrap();
    assert!(started < ready && ready < done, "{kinds:?}");
    // The request waited for the start: the queue went to one and back.
    let queue: Vec<u64> = evs
        .iter()
        .filter(|e| e.kind == "queue")
        .map(|e| e.data["waiting"].as_u64().unwrap())
        .collect();
    assert_eq!(queue, [1, 0]);
    let audit = evs
        .iter()
        .find(|e| e.kind == "audit")
        .expect("the stop is audited");
    assert_eq!(audit.data["action"], "stop");
    assert_eq!(audit.data["target"], "tiny");
}

#[tokio::test(flavor = "multi_thread")]
async fn last_event_id_gets_exactly_the_missed_events_and_a_stale_one_a_reset() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let mut sse = Sse::open(&d.socket(), "/admin/events", None).await;
    fire(&d.addr, 20, 2, chat("f", 1, false)).await;
    let evs = sse
        .until(Duration::from_secs(30), |e| count(e, "request") == 20)
        .await;
    drop(sse);
    let mid = &evs[evs.len() / 2];
    let newest = evs.last().unwrap().id;

    // Resume from the middle: exactly what came after, byte for byte.
    let mut resumed = Sse::open(
        &d.socket(),
        "/admin/events?replay_only=1",
        Some(&mid.id.to_string()),
    )
    .await;
    let got: Vec<String> = resumed
        .rest(Duration::from_secs(5))
        .await
        .into_iter()
        .map(|e| e.raw)
        .collect();
    let want: Vec<String> = evs[evs.len() / 2 + 1..]
        .iter()
        .map(|e| e.raw.clone())
        .collect();
    assert_eq!(got, want);

    // Resumed, then live: the live ones continue the ids without a gap.
    let mut live = Sse::open(&d.socket(), "/admin/events", Some(&newest.to_string())).await;
    fire(&d.addr, 1, 1, chat("f", 1, false)).await;
    let next = live
        .until(Duration::from_secs(10), |e| count(e, "request") == 1)
        .await;
    assert_eq!(next[0].id, newest + 1, "{}", next[0].raw);
    assert_eq!(next[0].kind, "request_started");

    // An id from the future or no number at all: reset, carrying the
    // newest id to resume from.
    for stale in ["999999999", "abc"] {
        let mut s = Sse::open(&d.socket(), "/admin/events?replay_only=1", Some(stale)).await;
        let got = s.rest(Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{stale}: {got:?}");
        assert_eq!(got[0].kind, "reset");
        assert_eq!(got[0].data, json!({}));
        assert!(got[0].id > newest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_id_older_than_the_buffer_gets_a_reset() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    // Refused requests are cheap events (a `request` each, no model): more
    // than the buffer holds.
    let results = fire(&d.addr, 4200, 8, chat("nosuch", 1, false)).await;
    assert!(results.iter().all(|(s, _)| *s == StatusCode::NOT_FOUND));
    let mut s = Sse::open(&d.socket(), "/admin/events?replay_only=1", Some("1")).await;
    let got = s.rest(Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{:?}", got.first());
    assert_eq!(got[0].kind, "reset");
    assert!(got[0].id >= 4200, "{}", got[0].raw);
    // From the oldest kept id on, the replay is whole.
    let oldest = got[0].id - 4096;
    let mut s = Sse::open(
        &d.socket(),
        "/admin/events?replay_only=1",
        Some(&oldest.to_string()),
    )
    .await;
    let got = s.rest(Duration::from_secs(5)).await;
    assert_eq!(got.len(), 4096);
    assert_eq!(got[0].id, oldest + 1);
    assert_eq!(got[0].kind, "request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_client_is_dropped_and_nobody_else_is_slowed() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    // Warm: the model is up and the baseline latency known.
    let warm = fire(&d.addr, 100, 4, chat("f", 1, false)).await;
    let base_p99 = percentile(warm.iter().map(|r| r.1).collect(), 0.99);

    // The stalled client: sends its request, reads the head, then never
    // reads again.
    let stalled = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let stalled_resp = exchange(stalled, events_request("/admin/events", None, None)).await;
    assert_eq!(stalled_resp.status(), StatusCode::OK);
    let mut reader = Sse::open(&d.socket(), "/admin/events", None).await;
    assert_eq!(metric(&d, "claracore_event_clients").await, 2.0);

    let n = 1500;
    // The reader reads all along.
    let reading = tokio::spawn(async move {
        let evs = reader
            .until(Duration::from_secs(60), |e| count(e, "request") == n)
            .await;
        (reader, evs)
    });
    let results = fire(&d.addr, n, 4, chat("f", 1, false)).await;
    assert!(results.iter().all(|(s, _)| *s == StatusCode::OK));
    let (mut reader, evs) = reading.await.unwrap();
    for pair in evs.windows(2) {
        assert_eq!(pair[1].id, pair[0].id + 1, "the reader missed nothing");
    }
    assert_eq!(count(&evs, "request_started"), n);

    // Dropped and counted; the reader is still connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&d, "claracore_event_clients_dropped_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled client was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&d, "claracore_event_clients_dropped_total").await,
        1.0
    );
    assert_eq!(metric(&d, "claracore_event_clients").await, 1.0);
    // Its connection was closed: what it had not read ends in an error or
    // an end, never a hang.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut body = stalled_resp.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection stayed open");

    // Requests stayed fast: p99 within a generous bound of the warm one.
    let p99 = percentile(results.iter().map(|r| r.1).collect(), 0.99);
    assert!(
        p99 < base_p99 * 10 + Duration::from_millis(250),
        "p99 {p99:?} against {base_p99:?} before"
    );
    // And the reader keeps getting events.
    fire(&d.addr, 1, 1, chat("f", 1, false)).await;
    reader
        .until(Duration::from_secs(10), |e| count(e, "request") == 1)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recorded_content_never_reaches_the_stream() {
    let d = Daemon::start(&format!(
        "[history]\ncontent = \"full\"\n{}",
        fake_model_table("f", &[], "")
    ));
    let mut sse = Sse::open(&d.socket(), "/admin/events", None).await;
    let marker = format!(
        "MARKER-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let body = json!({"model": "f", "max_tokens": 1,
        "messages": [{"role": "user", "content": format!("say {marker}")}]});
    let (status, _) = d.post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    let evs = sse
        .until(Duration::from_secs(30), |e| count(e, "request") == 1)
        .await;
    // History has it (so the check below can fail)...
    let rows = d.wait_rows(1, Duration::from_secs(10)).await;
    let (_, row) = d.get(&format!("/admin/history/{}", rows[0]["id"])).await;
    assert!(row.to_string().contains(&marker), "{row}");
    // ...the stream never.
    for e in &evs {
        assert!(!e.raw.contains(&marker), "{}", e.raw);
    }
}

fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_needs_the_read_scope() {
    const READER: &str = "ccsk_evreader0000000000000000000000000000000000000000000000000000000";
    const INF: &str = "ccsk_evinf000000000000000000000000000000000000000000000000000000000000";
    let d = Daemon::start(&format!(
        "[auth.keys.reader]\nhash = \"{}\"\nscopes = [\"read\"]\n\
         [auth.keys.inf]\nhash = \"{}\"\nscopes = [\"inference\"]\n{}",
        hash(READER),
        hash(INF),
        fake_model_table("f", &[], "")
    ));
    let tcp = |key: Option<&'static str>| {
        let addr = d.addr.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            exchange(stream, events_request("/admin/events", None, key)).await
        }
    };
    assert_eq!(tcp(None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(tcp(Some(INF)).await.status(), StatusCode::FORBIDDEN);
    let ok = tcp(Some(READER)).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["content-type"], "text/event-stream");
    // The reader sees live events over TCP too.
    let mut sse = Sse {
        body: ok.into_body(),
        buf: String::new(),
        comments: 0,
    };
    let (status, _) = request_unix(&d.socket(), Method::POST, "/admin/models/f/load", None).await;
    assert_eq!(status, StatusCode::OK);
    let evs = sse
        .until(Duration::from_secs(30), |e| {
            e.iter()
                .any(|e| e.kind == "audit" && e.data["action"] == "load")
        })
        .await;
    assert!(evs
        .iter()
        .any(|e| e.kind == "state" && e.data["state"] == "ready"));
}
