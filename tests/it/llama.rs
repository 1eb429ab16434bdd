//! Behaviour against a real llama-server serving the generated tiny model.

use std::time::{Duration, Instant};

use crate::common::*;
use hyper::StatusCode;
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn chat_non_stream_through_alias_starts_the_model_on_first_use() {
    let d = Daemon::start(&tiny_model_table("tiny", "aliases = [\"tiny-chat\"]"));
    assert_eq!(d.model("tiny").await["state"], "stopped");

    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny-chat", 8, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert!(!body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());

    let m = d.model("tiny").await;
    assert_eq!(m["state"], "ready");
    assert_eq!(m["starts"], 1);
    assert!(alive(m["pid"].as_u64().unwrap() as u32));

    // /v1/completions goes to the same child.
    let (status, body) = d
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "hi", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(d.model("tiny").await["starts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_chunks_arrive_incrementally() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    // Warm up so the measurement is about streaming, not loading.
    assert_eq!(
        d.post("/v1/chat/completions", &chat("tiny", 1, false))
            .await
            .0,
        StatusCode::OK
    );

    // Greedy: with random sampling the random-weight model now and then
    // emits a token that ends inside a UTF-8 character, which llama-server
    // holds back and sends with the next one (299 chunks for 300 tokens).
    let mut body = chat("tiny", 300, true);
    body["temperature"] = 0.into();
    body["seed"] = 1.into();
    let s = stream(&d.addr, "/v1/chat/completions", &body).await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.error.is_none(), "{:?}", s.error);
    let events = s.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let deltas = events.iter().filter(|e| e.contains("\"delta\"")).count();
    assert!(deltas >= 300, "expected a chunk per token, got {deltas}");
    // Many separate frames spread over the generation, the first long
    // before the last: nothing buffered the response.
    assert!(s.frames.len() > 50, "only {} frames", s.frames.len());
    let first = s.frames[0].0;
    let last = s.frames.last().unwrap().0;
    assert!(
        first * 3 < last,
        "first frame at {first:?}, last at {last:?}: the stream arrived in one burst"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_are_proxied() {
    let d = Daemon::start(&format!(
        "[models.embed]\nmodel = \"{}\"\nargs = [\"-c\", \"512\", \"-t\", \"1\", \"--embeddings\", \"--pooling\", \"mean\"]\n",
        tiny_model()
    ));
    let (status, body) = d
        .post(
            "/v1/embeddings",
            &json!({"model": "embed", "input": ["hello", "world"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_requests_to_a_stopped_model_spawn_one_child() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = d.addr.clone();
        tasks.push(tokio::spawn(async move {
            request(
                &addr,
                hyper::Method::POST,
                "/v1/chat/completions",
                Some(chat("tiny", 2, false).to_string()),
            )
            .await
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // All 20 arrive at the ready child at once. llama-server serves each
    // connection on a thread of its own; when claracore opened more
    // connections than it has threads, the extra ones waited until an idle
    // pooled connection timed out (5 s per wave: this test took 10 s).
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "a burst on a fresh child stalled: {:?}",
        began.elapsed()
    );
    let m = d.model("tiny").await;
    assert_eq!(m["starts"], 1, "{m}");
    // A llama-server child listens on a unix socket, not a port.
    assert!(m["port"].is_null(), "no TCP port: {m}");
    assert!(
        m["socket"].as_str().is_some_and(|p| p.contains("/tiny-")
            && p.ends_with(".sock")
            && std::path::Path::new(p).exists()),
        "ps shows the socket: {m}"
    );
    assert_eq!(
        children_of(d.pid()),
        vec![m["pid"].as_u64().unwrap() as u32]
    );
    assert_eq!(d.log_text().matches("started child").count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_models_alternate_with_max_loaded_one() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 1\n{}{}",
        tiny_model_table("a", ""),
        tiny_model_table("b", "")
    ));
    let mut pids = Vec::new();
    for (i, name) in ["a", "b", "a", "b"].iter().enumerate() {
        let (status, body) = d.post("/v1/chat/completions", &chat(name, 2, false)).await;
        assert_eq!(status, StatusCode::OK, "request {i} to {name}: {body}");
        let m = d.model(name).await;
        assert_eq!(m["state"], "ready");
        let other = d.model(if *name == "a" { "b" } else { "a" }).await;
        assert_eq!(
            other["state"], "stopped",
            "the other model was swapped out: {other}"
        );
        let kids = children_of(d.pid());
        assert_eq!(
            kids,
            vec![m["pid"].as_u64().unwrap() as u32],
            "exactly one child resident"
        );
        pids.push(kids[0]);
    }
    assert_eq!(d.model("a").await["starts"], 2);
    assert_eq!(d.model("b").await["starts"], 2);
    assert!(
        wait_gone(&pids[..3], Duration::from_secs(2)),
        "swapped-out children were reaped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn same_group_models_replace_each_other_even_with_room() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 3\n{}{}{}",
        tiny_model_table("a", "group = \"g\""),
        tiny_model_table("b", "group = \"g\""),
        tiny_model_table("c", "")
    ));
    for name in ["a", "c", "b"] {
        assert_eq!(
            d.post("/v1/chat/completions", &chat(name, 1, false))
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(d.model("a").await["state"], "stopped");
    assert_eq!(d.model("b").await["state"], "ready");
    assert_eq!(
        d.model("c").await["state"],
        "ready",
        "other groups are untouched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_ttl_unloads_and_the_next_request_restarts() {
    let d = Daemon::start(&tiny_model_table("tiny", "ttl = \"1s\""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("tiny", 2, false))
            .await
            .0,
        StatusCode::OK
    );
    let pid = d.model("tiny").await["pid"].as_u64().unwrap() as u32;
    let stopped_at = Instant::now();
    d.wait_state("tiny", "stopped", Duration::from_secs(5))
        .await;
    assert!(stopped_at.elapsed() >= Duration::from_millis(900));
    assert!(wait_gone(&[pid], Duration::from_secs(2)));
    assert!(
        d.log_text().contains("\"reason\":\"ttl\""),
        "the stop is logged with its reason"
    );

    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny", 2, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let m = d.model("tiny").await;
    assert_eq!(m["starts"], 2);
    assert_ne!(m["pid"].as_u64().unwrap() as u32, pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_child_mid_stream_ends_the_stream_with_an_error_and_recovers() {
    let d = Daemon::start(&format!(
        "[models.tiny]\nmodel = \"{}\"\nargs = [\"-c\", \"8192\", \"-t\", \"1\"]\n",
        tiny_model()
    ));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("tiny", 1, false))
            .await
            .0,
        StatusCode::OK
    );
    let pid = d.model("tiny").await["pid"].as_u64().unwrap() as i32;

    let resp = send(
        &d.addr,
        hyper::Method::POST,
        "/v1/chat/completions",
        Some(chat("tiny", 8000, true).to_string()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let mut text = String::new();
    let mut ended_with_error = false;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("stream hung")
    {
        match frame {
            Ok(f) => text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap_or_default())),
            Err(_) => {
                ended_with_error = true;
                break;
            }
        }
    }
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "stream took {:?} to end",
        killed.elapsed()
    );
    assert!(ended_with_error, "the stream must not end as if complete");
    assert!(!text.contains("[DONE]"));
    assert!(
        text.contains("upstream_error"),
        "an SSE error event tells the client why"
    );

    d.wait_state("tiny", "failed", Duration::from_secs(2)).await;
    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny", 2, false))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "next request restarts the model: {body}"
    );
    assert_eq!(d.model("tiny").await["starts"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_fails_to_load_fails_waiters_at_once() {
    let d = Daemon::start(
        "[models.broken]\nmodel = \"/nonexistent/model.gguf\"\nargs = [\"-t\", \"1\"]\n",
    );
    let t = Instant::now();
    let (status, body) = d
        .post("/v1/chat/completions", &chat("broken", 2, false))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("exited while starting"), "{msg}");
    assert!(
        !msg.contains("/nonexistent"),
        "no paths reach the client: {msg}"
    );
    assert!(d.log_text().contains("child exited while starting"));
    assert_eq!(d.model("broken").await["state"], "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_daemon_leaves_no_llama_server() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 2\n{}{}",
        tiny_model_table("a", ""),
        tiny_model_table("b", "")
    ));
    for name in ["a", "b"] {
        assert_eq!(
            d.post("/v1/chat/completions", &chat(name, 1, false))
                .await
                .0,
            StatusCode::OK
        );
    }
    let kids = children_of(d.pid());
    assert_eq!(kids.len(), 2);
    let mut d = d;
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(2));
    assert!(
        wait_gone(&kids, Duration::from_secs(1)),
        "orphans left: {kids:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_passthrough_reaches_the_child() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let (status, body) = d.get("/upstream/tiny/props").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["default_generation_settings"].is_object(), "{body}");
    let (status, _) = d.get("/upstream/nope/props").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
