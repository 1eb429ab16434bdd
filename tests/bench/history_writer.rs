//! History writer throughput: rows per second committed by the real writer
//! thread into a real SQLite file (WAL, synchronous=NORMAL), fed through
//! the same bounded queue the proxy uses.
//!
//! `cargo bench --bench history_writer` (ROWS=n to change the count).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::time::{Duration, Instant};

use claracore::history::{ContentPolicy, HistoryConfig, Outcome, Recorder, RequestRecord, Usage};

fn row(i: u64) -> RequestRecord {
    RequestRecord {
        request_id: format!("bench-{i}"),
        started_at_ms: 1_800_000_000_000 + i as i64,
        finished_at_ms: 1_800_000_000_010 + i as i64,
        client: "127.0.0.1:40000".into(),
        key_name: None,
        endpoint: "/v1/chat/completions".into(),
        model: Some("tiny".into()),
        status: 200,
        outcome: Outcome::Ok,
        error: None,
        latency_ms: 12.5,
        ttfb_ms: Some(3.0),
        ttft_ms: Some(4.0),
        usage: Usage {
            prompt_tokens: Some(29),
            completion_tokens: Some(64),
            cached_tokens: Some(28),
            prompt_ms: Some(1.2),
            predicted_ms: Some(30.0),
            prompt_per_second: Some(24000.0),
            predicted_per_second: Some(2100.0),
        },
        streamed: i % 2 == 0,
        request_content: Some(
            r#"{"model":"tiny","messages":[{"role":"user","content":"hello there"}]}"#.into(),
        ),
        response_content: Some("a short answer of a few words".into()),
        content_truncated: false,
        queue_wait_ms: Some(0.01),
        gpu: None,
    }
}

fn main() {
    let rows: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let dir = tempfile::tempdir().unwrap();
    let config = HistoryConfig {
        enabled: true,
        path: dir.path().join("history.db"),
        content: ContentPolicy::Truncated,
        retention: Duration::from_secs(86400 * 3650),
        events_retention: Duration::from_secs(86400 * 3650),
        samples_retention: Duration::from_secs(86400 * 3650),
        queue: 65536,
        batch_window: Duration::from_millis(50),
    };
    let (recorder, writer, _) = Recorder::start(&config).unwrap();
    let start = Instant::now();
    let mut offered = 0;
    for i in 0..rows {
        // Offer at the producer's full speed, backing off only when the
        // queue is full, so the figure is the writer's, not the producer's.
        while recorder.depth() >= 60_000 {
            std::thread::sleep(Duration::from_micros(200));
        }
        recorder.request(row(i));
        offered += 1;
    }
    assert!(recorder.flush_blocking(Duration::from_secs(120)));
    let elapsed = start.elapsed();
    let written = recorder.written();
    writer.close();
    let rate = written as f64 / elapsed.as_secs_f64();
    println!(
        "history writer: {written} of {offered} rows committed in {:.2} s = {:.0} rows/s (dropped {}); target >= 50000 rows/s",
        elapsed.as_secs_f64(),
        rate,
        recorder.dropped()
    );
    assert_eq!(written, offered, "nothing may be dropped in this run");
}
