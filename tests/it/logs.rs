//! Per-model log rings and load progress, against real children: the real
//! llama-server on the tiny model, a child that floods its output, and a
//! start slowed by a shell wrapper.

use std::time::{Duration, Instant};

use crate::common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Reads `body` until `done(text so far)` holds, the body ends, or
/// `within` passes; returns the text and whether the body ended.
async fn read_until(
    body: &mut Incoming,
    text: &mut String,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done(text) {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Ok(Some(Err(_))) | Ok(None) => return true,
            Err(_) => return false,
        }
    }
    false
}

/// The `data` of every `event: line` message in an SSE text.
fn line_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|m| m.strip_prefix("event: line\ndata: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

async fn ring(d: &Daemon, model: &str) -> Vec<Value> {
    let (status, v) = d.get(&format!("/admin/logs/{model}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], model);
    v["lines"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_ring_holds_llama_servers_lines_and_follow_streams_them_across_a_restart() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    assert!(ring(&d, "tiny").await.is_empty(), "nothing before a start");
    let (status, v) = d.get("/admin/logs/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v.to_string().contains("tiny"), "lists the valid names: {v}");
    let (status, v) = d.get("/admin/logs/tiny?follow=maybe").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, _) = d.get("/admin/logs/tiny?lines=5").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert_eq!(chat_status(&d.addr, "tiny").await, StatusCode::OK);
    let lines = ring(&d, "tiny").await;
    let loaded: Vec<&Value> = lines
        .iter()
        .filter(|l| l["text"].as_str().unwrap().contains("model loaded"))
        .collect();
    assert_eq!(loaded.len(), 1, "{lines:?}");
    assert_eq!(loaded[0]["stream"], "stderr");
    assert!(
        lines
            .iter()
            .any(|l| l["text"].as_str().unwrap().contains("listening")),
        "{lines:?}"
    );
    let times: Vec<i64> = lines.iter().map(|l| l["at_ms"].as_i64().unwrap()).collect();
    assert!(times[0] > 1_600_000_000_000, "unix ms: {times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    let resp = send_unix(&d.socket(), Method::GET, "/admin/logs/tiny?follow=1", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, Duration::from_secs(10), |t| {
        line_events(t).len() >= lines.len()
    })
    .await;
    let backlog: Vec<Value> = line_events(&text).into_iter().take(lines.len()).collect();
    assert_eq!(backlog, lines, "the ring first, all of it, in order");

    // A restart: its lines arrive live and land in the same ring.
    let (status, v) =
        request_unix(&d.socket(), Method::POST, "/admin/models/tiny/stop", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    d.wait_state("tiny", "stopped", Duration::from_secs(20))
        .await;
    assert_eq!(chat_status(&d.addr, "tiny").await, StatusCode::OK);
    let ended = read_until(&mut body, &mut text, Duration::from_secs(20), |t| {
        count(t, "model loaded") >= 2
    })
    .await;
    assert!(!ended, "the follower stays open");
    assert_eq!(count(&text, "model loaded"), 2, "{text}");
    for line in line_events(&text) {
        assert!(line["at_ms"].is_i64() && line["text"].is_string(), "{line}");
        assert!(line["stream"] == "stderr" || line["stream"] == "stdout");
    }
    let lines = ring(&d, "tiny").await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["text"].as_str().unwrap().contains("model loaded"))
            .count(),
        2,
        "one ring across both children"
    );
    // Journald forwarding (here: the daemon's log) is unchanged.
    assert!(d.log_text().contains("model loaded"));
}

/// A `cmd` that prints `n` numbered lines to stderr, then becomes the fake
/// upstream.
fn flooding_table(name: &str, n: u32, extra: &str) -> String {
    let argv = [
        "/bin/sh".to_string(),
        "-c".into(),
        format!("seq 1 {n} | sed 's/^/flood /' >&2; exec \"$@\""),
        "sh".into(),
        python(),
        fake_upstream(),
        "--port".into(),
        "{port}".into(),
    ];
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!("[models.{name}]\ncmd = [{}]\n{extra}\n", argv.join(", "))
}

#[tokio::test]
async fn a_flood_of_100k_lines_keeps_n_and_a_follower_that_stops_reading_is_dropped() {
    const N: usize = 50;
    let d = Daemon::start(&format!(
        "[logging]\nmodel_log_lines = {N}\n{}",
        flooding_table("f", 100_000, "")
    ));
    // Connected before the flood, then never read until it is over.
    let slow = send_unix(&d.socket(), Method::GET, "/admin/logs/f?follow=1", None).await;
    assert_eq!(slow.status(), StatusCode::OK);

    let socket = d.socket();
    let load = tokio::spawn(async move {
        request_unix(&socket, Method::POST, "/admin/models/f/load", None).await
    });
    let mut most = 0;
    while !load.is_finished() {
        most = most.max(ring(&d, "f").await.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = load.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the stalled follower held nothing up: {v}"
    );
    assert!(most <= N, "held {most} lines at one point");

    let lines = ring(&d, "f").await;
    assert_eq!(lines.len(), N);
    let flood: Vec<u32> = lines
        .iter()
        .filter_map(|l| l["text"].as_str().unwrap().strip_prefix("flood "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(flood.last(), Some(&100_000), "the newest lines");
    assert!(
        flood.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {flood:?}"
    );

    let mut body = slow.into_body();
    let mut text = String::new();
    let ended = read_until(&mut body, &mut text, Duration::from_secs(30), |_| false).await;
    assert!(ended, "the slow follower's stream was closed");
    let got = line_events(&text).len();
    assert!(got < 100_000, "it lost lines, got {got}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: dropped\ndata: "), "{last}");
    let why: Value = serde_json::from_str(last.split("data: ").nth(1).unwrap()).unwrap();
    assert!(why["missed"].as_u64().unwrap() > 0, "{why}");
    assert!(
        why["reason"].as_str().unwrap().contains("fell behind"),
        "{why}"
    );

    // A new follower still works and gets the ring.
    let resp = send_unix(&d.socket(), Method::GET, "/admin/logs/f?follow=1", None).await;
    let mut body = resp.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, Duration::from_secs(10), |t| {
        line_events(t).len() >= N
    })
    .await;
    assert_eq!(line_events(&text).len(), N);
}

fn sha256_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[tokio::test]
async fn logs_need_the_admin_scope_over_tcp() {
    const READER: &str = "ccsk_logreader000000000000000000000000000000000000000000000000000000";
    const ADMIN: &str = "ccsk_logadmin0000000000000000000000000000000000000000000000000000000";
    let d = Daemon::start(&format!(
        "[auth.keys.reader]\nhash = \"{}\"\nscopes = [\"read\"]\n\
         [auth.keys.admin]\nhash = \"{}\"\nscopes = [\"admin\"]\n{}",
        sha256_hash(READER),
        sha256_hash(ADMIN),
        tiny_model_table("tiny", "")
    ));
    let get = |key: &'static str, path: &'static str| {
        let addr = d.addr.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get(path)
                .header("host", &addr)
                .header("authorization", format!("Bearer {key}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            sender.send_request(req).await.unwrap().status()
        }
    };
    assert_eq!(get(READER, "/admin/logs/tiny").await, StatusCode::FORBIDDEN);
    assert_eq!(
        get(READER, "/admin/logs/tiny?follow=1").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(READER, "/admin/ps").await, StatusCode::OK);
    assert_eq!(get(ADMIN, "/admin/logs/tiny").await, StatusCode::OK);
}

/// `/v1/models`' entry for `name`.
async fn listed(d: &Daemon, name: &str) -> Value {
    let (status, v) = d.get_tcp("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == name)
        .cloned()
        .unwrap()
}

/// Loads `name` through the admin route, checking on the way that
/// `/admin/ps` shows it starting with growing `elapsed_ms` and
/// `/v1/models` shows it `loading`; returns the progress seen first and
/// the `load_ms` that `ps` shows after.
async fn load_watching(d: &Daemon, name: &str) -> (Value, u64) {
    let socket = d.socket();
    let path = format!("/admin/models/{name}/load");
    let load = tokio::spawn(async move { request_unix(&socket, Method::POST, &path, None).await });
    let m = d
        .wait_state(name, "starting", Duration::from_secs(10))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut m = m;
    while m["progress"].is_null() {
        assert!(Instant::now() < deadline, "no progress while starting: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = d.model(name).await;
    }
    let first = m["progress"].clone();
    let listed_now = listed(d, name).await;
    assert_eq!(listed_now["state"], "loading", "{listed_now}");
    assert!(
        listed_now["progress"]["elapsed_ms"].is_u64(),
        "{listed_now}"
    );
    // Stays: the elapsed time growing while the start is slow is what
    // this checks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = d.model(name).await;
    assert_eq!(later["state"], "starting", "still sleeping: {later}");
    assert!(
        later["progress"]["elapsed_ms"].as_u64().unwrap()
            >= first["elapsed_ms"].as_u64().unwrap() + 250,
        "elapsed grows: {first} then {later}"
    );
    let (status, v) = load.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    let m = d.model(name).await;
    assert_eq!(m["state"], "ready");
    assert!(m["progress"].is_null(), "no progress once ready: {m}");
    let listed_after = listed(d, name).await;
    assert_eq!(listed_after["state"], "ready");
    assert_eq!(listed_after["load_ms"], m["load_ms"]);
    (first, m["load_ms"].as_u64().unwrap())
}

async fn stop(d: &Daemon, name: &str) {
    let (status, v) = request_unix(
        &d.socket(),
        Method::POST,
        &format!("/admin/models/{name}/stop"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    d.wait_state(name, "stopped", Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_slow_start_shows_progress_and_later_starts_expect_past_load_times() {
    let shared = tempfile::tempdir().unwrap();
    let body = format!(
        "[history]\npath = \"{}\"\n{}",
        shared.path().join("history.db").display(),
        delayed_tiny_table("slow", 1200, "")
    );
    let mut d = Daemon::start(&body);
    assert!(d.model("slow").await["load_ms"].is_null(), "never loaded");
    let (first, load_1) = load_watching(&d, "slow").await;
    assert!(
        first["expected_ms"].is_null() && first["fraction"].is_null(),
        "nothing to expect on a first load: {first}"
    );
    assert!(load_1 >= 1200, "{load_1}");

    stop(&d, "slow").await;
    assert_eq!(
        d.model("slow").await["load_ms"],
        load_1,
        "kept while stopped"
    );
    let (second, load_2) = load_watching(&d, "slow").await;
    assert_eq!(second["expected_ms"], load_1, "{second}");
    let fraction = second["fraction"].as_f64().unwrap();
    assert!((0.0..0.99 + f64::EPSILON).contains(&fraction), "{second}");
    assert_eq!(listed(&d, "slow").await["load_ms"], load_2);

    // A restarted daemon reads them back from history.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let d = Daemon::start(&body);
    let m = d.model("slow").await;
    assert_eq!(m["load_ms"], load_2, "the newest from history: {m}");
    let (third, _) = load_watching(&d, "slow").await;
    let expected = third["expected_ms"].as_u64().unwrap();
    let median = (load_1 + load_2) / 2;
    assert!(
        expected.abs_diff(median) <= 1,
        "median of {load_1} and {load_2}: {third}"
    );
}
