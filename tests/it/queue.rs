//! The queue against the real llama-server and the tiny model: ABAB
//! traffic served AABB (model starts for 200 requests with grouping on and
//! off), a priority key jumping the queue, and a full queue's 503 with
//! `Retry-After`.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;

fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// How many times each model was started, from `/admin/ps`.
async fn starts(d: &Daemon) -> u64 {
    let (_, ps) = d.get("/admin/ps").await;
    ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["starts"].as_u64().unwrap_or(0))
        .sum()
}

/// 5 clients on `a` and 5 on `b`, 20 sequential requests each, with
/// `max_loaded = 1` and the fairness bound `bound`: the model starts it
/// took, and the longest queue wait in history (ms).
async fn abab(bound: &str) -> (u64, f64) {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"{bound}\"\n\
         [history]\nbatch_window = \"10ms\"\n{}{}",
        tiny_model_table("a", ""),
        tiny_model_table("b", "")
    ));
    let mut clients = Vec::new();
    for i in 0..10 {
        let addr = d.addr.clone();
        let model = if i % 2 == 0 { "a" } else { "b" };
        clients.push(tokio::spawn(async move {
            for _ in 0..20 {
                let status = chat_status(&addr, model).await;
                assert_eq!(status, StatusCode::OK, "a request for {model} failed");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let rows = d.wait_rows(200, Duration::from_secs(20)).await;
    let longest = rows
        .iter()
        .filter_map(|r| r["queue_wait_ms"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        rows.iter().all(|r| r["queue_wait_ms"].is_number()),
        "every row has its queue wait"
    );
    (starts(&d).await, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abab_traffic_is_served_aabb_with_a_dozen_starts_at_most() {
    let (grouped, grouped_wait) = abab("5s").await;
    let (ungrouped, ungrouped_wait) = abab("0s").await;
    eprintln!(
        "200 requests, 5 clients on a and 5 on b, max_loaded = 1: \
         {grouped} model starts with grouping (longest wait {grouped_wait:.0} ms), \
         {ungrouped} without (longest wait {ungrouped_wait:.0} ms)"
    );
    assert!(grouped <= 12, "{grouped} starts with grouping");
    assert!(
        ungrouped > grouped,
        "grouping makes fewer starts: {ungrouped} without, {grouped} with"
    );
    // Nobody starves: the longest wait is the bound plus a drain and a
    // start of the tiny model, far from the test's time.
    assert!(grouped_wait < 30_000.0, "longest wait {grouped_wait} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_priority_key_swaps_a_busy_model_out_before_an_older_plain_request() {
    const PLAIN: &str = "ccsk_plain0000000000000000000000000000000000000000000000000000000000";
    const VIP: &str = "ccsk_vip000000000000000000000000000000000000000000000000000000000000";
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
         [auth.keys.plain]\nhash = \"{}\"\nscopes = [\"inference\"]\n\
         [auth.keys.vip]\nhash = \"{}\"\nscopes = [\"inference\"]\npriority = 10\n{}{}{}",
        hash(PLAIN),
        hash(VIP),
        fake_model_table("a", &["--chunk-delay-ms", "100"], ""),
        tiny_model_table("b", ""),
        tiny_model_table("c", "")
    ));
    let ask = |model: &'static str, token: &'static str| {
        let addr = d.addr.clone();
        async move {
            let began = Instant::now();
            let auth = format!("Bearer {token}");
            let (status, _, _) = send_with_headers(
                &addr,
                Method::POST,
                "/v1/chat/completions",
                &[("authorization", &auth)],
                Some(chat(model, 2, false).to_string()),
            )
            .await;
            (status, began.elapsed())
        }
    };
    // `a` stays busy: one stream of 40 chunks 100 ms apart (the fake
    // upstream), so the swap below can only come from the priority.
    let busy = {
        let addr = d.addr.clone();
        tokio::spawn(async move {
            let auth = format!("Bearer {PLAIN}");
            send_with_headers(
                &addr,
                Method::POST,
                "/v1/chat/completions",
                &[("authorization", &auth)],
                Some(chat("a", 40, true).to_string()),
            )
            .await
            .0
        })
    };
    d.wait_model("a", Duration::from_secs(60), "a's stream in flight", |m| {
        m["inflight"] == 1
    })
    .await;
    let plain = tokio::spawn(ask("b", PLAIN));
    d.wait_model(
        "b",
        Duration::from_secs(5),
        "the plain request waiting",
        |m| m["waiting"] == 1,
    )
    .await;
    let (vip_status, vip_took) = ask("c", VIP).await;
    assert_eq!(vip_status, StatusCode::OK);
    assert!(
        !plain.is_finished(),
        "the older plain request for b still waits while a is busy"
    );
    assert!(
        vip_took < Duration::from_secs(30),
        "the priority request swapped a out at once: {vip_took:?}"
    );
    assert_eq!(
        busy.await.unwrap(),
        StatusCode::OK,
        "a's stream was drained, not cut"
    );
    let (plain_status, plain_took) = plain.await.unwrap();
    assert_eq!(plain_status, StatusCode::OK);
    assert!(plain_took > vip_took, "{plain_took:?} vs {vip_took:?}");
    let rows = d.wait_rows(3, Duration::from_secs(10)).await;
    let wait_of = |key: &str, model: &str| -> f64 {
        rows.iter()
            .find(|r| r["key_name"] == key && r["model"] == model)
            .and_then(|r| r["queue_wait_ms"].as_f64())
            .unwrap()
    };
    assert!(wait_of("plain", "b") > wait_of("vip", "c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beyond_max_queue_a_request_gets_503_with_retry_after_and_a_row() {
    // The model takes 3 s to start, so requests certainly wait for it.
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_queue = 2\n{}",
        delayed_tiny_table("slow", 3000, "")
    ));
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let addr = d.addr.clone();
            tokio::spawn(async move { chat_status(&addr, "slow").await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.model("slow").await["waiting"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "two requests never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, headers, body) = send_with_headers(
        &d.addr,
        Method::POST,
        "/v1/chat/completions",
        &[],
        Some(chat("slow", 1, false).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    let rows = d.wait_rows(3, Duration::from_secs(10)).await;
    let refused: Vec<&Value> = rows.iter().filter(|r| r["status"] == 503).collect();
    assert_eq!(refused.len(), 1, "{rows:?}");
    assert_eq!(refused[0]["outcome"], "rejected");
    assert_eq!(
        d.model("slow").await["starts"],
        1,
        "the refused request started nothing"
    );
}
