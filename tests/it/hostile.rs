//! Hostile input, each test named after what it pins: bodies that would
//! hold memory or time, malformed requests, wrong methods, oversized
//! names. Every refused request still leaves its history row.

use std::time::{Duration, Instant};

use crate::common::*;
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// The newest history row.
async fn last_row(d: &Daemon) -> serde_json::Value {
    let (status, page) = d.get("/admin/history?limit=1").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["requests"][0].clone()
}

/// Waits until the newest history row has `status`.
async fn wait_row(d: &Daemon, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = last_row(d).await;
        if row["status"] == status || Instant::now() > deadline {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn head(len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// Reads whatever the daemon answers first on `r`, up to `within`.
async fn first_answer(r: &mut tokio::net::tcp::OwnedReadHalf, within: Duration) -> String {
    let mut buf = vec![0u8; 8192];
    match tokio::time::timeout(within, r.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Ok(Err(e)) => format!("read error: {e}"),
        Err(_) => "no answer".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twelve_held_32_mib_bodies_stay_within_the_body_budget_and_the_memory_returns() {
    let budget = 64 * MIB;
    let d = Daemon::start(&format!(
        "[http]\nmax_body_bytes = {}\nbody_memory_bytes = {budget}\nbody_read_timeout = \"4s\"\n{}",
        33 * MIB,
        fake_model_table("f", &[], "")
    ));
    let before = rss_bytes(d.pid());
    let size = 32 * MIB;
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let addr = d.addr.clone();
            tokio::spawn(async move {
                let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    w.write_all(head(size).as_bytes()).await.ok()?;
                    let chunk = vec![b' '; MIB];
                    for _ in 0..31 {
                        w.write_all(&chunk).await.ok()?;
                    }
                    // All but the last byte, then hold (a slow client:
                    // the behaviour under test).
                    w.write_all(&chunk[..MIB - 1]).await.ok()?;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Some(w)
                });
                let answer = first_answer(&mut r, Duration::from_secs(15)).await;
                writer.abort();
                answer
            })
        })
        .collect();
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_bytes(d.pid()));
        // Stays: the sampling interval of the peak, not a wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 2 * budget,
        "RSS grew by {} MiB holding bodies (budget {} MiB)",
        grew / MIB,
        budget / MIB
    );
    let busy = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    let timed_out = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 408"))
        .count();
    assert!(busy >= 8, "those without budget are refused: {answers:?}");
    assert!(
        answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 503"))
            .all(|a| a.to_ascii_lowercase().contains("retry-after: 1")),
        "{answers:?}"
    );
    assert_eq!(
        busy + timed_out,
        12,
        "the held ones are cut at the read deadline: {answers:?}"
    );
    // Once they are gone the memory goes back to the system (idle trim).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = rss_bytes(d.pid());
    while now > before + 16 * MIB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = rss_bytes(d.pid());
    }
    assert!(
        now <= before + 16 * MIB,
        "RSS {} MiB after the burst, {} MiB before",
        now / MIB,
        before / MIB
    );
    let row = last_row(&d).await;
    assert!(
        row["outcome"] == "timeout" || row["outcome"] == "rejected",
        "{row}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_trickling_a_byte_every_half_second_is_cut_at_the_deadline_as_timeout() {
    let d = Daemon::start(&format!(
        "[http]\nbody_read_timeout = \"2s\"\n{}",
        fake_model_table("f", &[], "")
    ));
    let s = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        w.write_all(head(100).as_bytes()).await.unwrap();
        for _ in 0..100 {
            if w.write_all(b" ").await.is_err() {
                break;
            }
            // Stays: the trickle's pace is the behaviour under test.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let answer = first_answer(&mut r, Duration::from_secs(10)).await;
    writer.abort();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut, not waited out"
    );
    let row = wait_row(&d, 408).await;
    assert_eq!(row["outcome"], "timeout", "{row}");
    assert_eq!(d.model("f").await["starts"], 0, "no model started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_closing_mid_body_is_recorded_as_cancelled_499() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let mut s = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    s.write_all(head(1000).as_bytes()).await.unwrap();
    s.write_all(b"{\"model\":\"f\",").await.unwrap();
    // Stays: the client pauses mid-body before it leaves; the daemon shows
    // no state for a body it has begun to read.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    let row = wait_row(&d, 499).await;
    assert_eq!(row["status"], 499, "{row}");
    assert_eq!(row["outcome"], "cancelled", "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_array_is_not_taken_as_a_model() {
    let d = Daemon::start(&fake_model_table("tiny", &[], ""));
    let (status, body) = d.post("/v1/chat/completions", &json!(["tiny"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON object with a string `model`"),
        "{body}"
    );
    assert_eq!(d.model("tiny").await["starts"], 0);
    let row = wait_row(&d, 400).await;
    assert_eq!(row["outcome"], "rejected", "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn near_miss_admin_paths_get_a_json_404_not_a_panic() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    for path in [
        "/api/models/stop",
        "/admin/models/stop",
        "/admin/models//stop",
        "/admin/history/",
    ] {
        let (status, body) = request(&d.addr, hyper::Method::POST, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        if path.starts_with("/api/") {
            // Ollama's shape under /api.
            assert!(
                body["error"].as_str().unwrap().contains("no route"),
                "{body}"
            );
        } else {
            assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
        }
    }
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    assert_eq!(d.get("/live").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_negative_content_length_is_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let s = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n{}")
        .await
        .unwrap();
    let answer = first_answer(&mut r, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(d.get("/health").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_known_path_with_the_wrong_method_is_405_with_allow() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let resp = send(&d.addr, hyper::Method::GET, "/v1/chat/completions", None).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "POST");
    let resp = send(&d.addr, hyper::Method::POST, "/admin/ps", None).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_kb_model_name_is_not_echoed_whole() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let name = "x".repeat(100_000);
    let (status, body) = d
        .post("/v1/chat/completions", &json!({"model": name}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.len() < 300, "{} bytes echoed", message.len());
    assert!(message.contains("(100000 bytes)"), "{message}");
    let row = wait_row(&d, 404).await;
    assert!(row["error"].as_str().unwrap().len() < 300, "{row}");
}
