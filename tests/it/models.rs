//! Model lifecycle controls against the real llama-server and the tiny
//! model: `preload` (after READY=1, never before it; on reload), `pin`
//! under `max_loaded`, the admin load route and `claracore load`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Receives datagrams on `notify` until one has a line starting with
/// `prefix`.
fn recv_until(notify: &UnixDatagram, prefix: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no notification: {e}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l.starts_with(prefix))
        {
            return;
        }
        assert!(Instant::now() < deadline, "no {prefix} within 20s");
    }
}

/// One model's entry in `/admin/ps` on `socket`.
async fn ps_entry(socket: &Path, name: &str) -> Value {
    let (status, ps) = request_unix(socket, Method::GET, "/admin/ps", None).await;
    assert_eq!(status, StatusCode::OK, "{ps}");
    ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {ps}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn preload_starts_the_model_after_ready_without_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("claracore.sock");
    let config = dir.path().join("config.toml");
    write_file(
        &config,
        &format!(
            "listen = [\"unix:{}\"]\nstate_dir = \"{}\"\n[scheduler]\nmax_loaded = 2\n{}{}",
            socket.display(),
            dir.path().join("state").display(),
            delayed_tiny_table("warm", 2000, "preload = true"),
            tiny_model_table("cold", ""),
        ),
    );
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = dir.path().join("log");
    let _daemon = KillOnDrop(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CLARACORE_LOG", "info,claracore=debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    recv_until(&notify, "READY=1", &log);
    // READY=1 went out first: the preloaded model cannot be up yet (its
    // llama-server only runs two seconds after the spawn).
    let warm = ps_entry(&socket, "warm").await;
    assert_ne!(warm["state"], "ready", "{warm}");
    assert_eq!(warm["pinned"], false);
    // Up with no request at all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let warm = loop {
        let m = ps_entry(&socket, "warm").await;
        if m["state"] == "ready" {
            break m;
        }
        assert!(
            Instant::now() < deadline && m["state"] != "failed",
            "warm not ready: {m}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (warm["starts"].as_u64(), warm["inflight"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(alive(warm["pid"].as_u64().unwrap() as u32));
    // It answers, and the model without preload was left alone.
    let (status, body) = request_unix(
        &socket,
        Method::POST,
        "/v1/chat/completions",
        Some(chat("warm", 2, false).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ps_entry(&socket, "warm").await["starts"], 1);
    assert_eq!(ps_entry(&socket, "cold").await["state"], "stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_preload_shows_as_failed_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 2\n[models.broken]\nmodel = \"{}/missing.gguf\"\npreload = true\n{}",
        std::env::temp_dir().display(),
        tiny_model_table("tiny", "")
    ));
    let broken = d
        .wait_state("broken", "failed", Duration::from_secs(30))
        .await;
    assert!(
        broken["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{broken}"
    );
    assert!(d.log_text().contains("preload failed"), "{}", d.log_text());
    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny", 2, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_turns_preload_on_starts_the_model() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    assert_eq!(d.model("tiny").await["state"], "stopped");
    let config = d.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let table = tiny_model_table("tiny", "");
    assert!(text.contains(&table));
    write_file(
        &config,
        &text.replace(&table, &tiny_model_table("tiny", "preload = true")),
    );
    d.signal(Signal::SIGHUP);
    let tiny = d.wait_state("tiny", "ready", Duration::from_secs(60)).await;
    assert_eq!(tiny["starts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_model_keeps_its_place_and_the_other_fails_at_once_naming_it() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 1\n{}{}",
        tiny_model_table("keep", "pin = true"),
        tiny_model_table("other", "")
    ));
    let (status, body) = d
        .post("/v1/chat/completions", &chat("keep", 2, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keep = d.model("keep").await;
    assert_eq!(keep["pinned"], true);
    assert_eq!(d.model("other").await["pinned"], false);
    let pid = keep["pid"].as_u64().unwrap() as u32;

    let began = Instant::now();
    let (status, body) = d
        .post("/v1/chat/completions", &chat("other", 2, false))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "failed at once, took {:?}",
        began.elapsed()
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("pinned model keep") && message.contains("max_loaded = 1"),
        "{message}"
    );
    assert_eq!(body["error"]["code"], "model_pinned", "{body}");
    let keep = d.model("keep").await;
    assert_eq!(
        (keep["state"].as_str(), keep["pid"].as_u64()),
        (Some("ready"), Some(pid as u64))
    );
    assert!(alive(pid));
    assert_eq!(d.model("other").await["state"], "stopped");

    // An explicit stop still stops it; then the other model gets the place.
    let out = d.cli(&["stop", "keep"]);
    assert!(out.status.success(), "{out:?}");
    d.wait_state("keep", "stopped", Duration::from_secs(20))
        .await;
    let (status, body) = d
        .post("/v1/chat/completions", &chat("other", 2, false))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn claracore_load_and_the_admin_route_start_a_model_and_say_how_long() {
    let d = Daemon::start(&tiny_model_table("tiny", "aliases = [\"tiny-chat\"]"));
    let out = d.cli(&["load", "tiny-chat"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let ms: u64 = stdout
        .strip_prefix("tiny ready in ")
        .and_then(|rest| rest.strip_suffix(" ms\n"))
        .unwrap_or_else(|| panic!("{stdout:?}"))
        .parse()
        .unwrap();
    assert!(ms > 0, "a real start takes time: {stdout:?}");
    let tiny = d.model("tiny").await;
    assert_eq!(tiny["state"], "ready");
    assert_eq!(tiny["inflight"], 0, "load holds no lease: {tiny}");
    assert_eq!(tiny["starts"], 1);

    // Already ready: no new start, and about no time.
    let (status, body) =
        request_unix(&d.socket(), Method::POST, "/admin/models/tiny/load", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["state"], "ready");
    assert!(body["load_ms"].as_u64().unwrap() < ms.max(50), "{body}");
    assert_eq!(d.model("tiny").await["starts"], 1);

    // Unknown: 404 listing the valid names, from the route and the CLI.
    let (status, body) =
        request_unix(&d.socket(), Method::POST, "/admin/models/nope/load", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        body["error"]["available_models"],
        serde_json::json!(["tiny"])
    );
    let out = d.cli(&["load", "nope"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("404") || stderr.contains("not found"),
        "{stderr}"
    );

    // Every load is in the audit trail, with its outcome.
    let (_, audit) = d.get("/admin/audit").await;
    let loads: Vec<(&str, &str)> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "load")
        .map(|a| {
            (
                a["target"].as_str().unwrap_or("-"),
                a["result"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        loads,
        [
            ("nope", "unknown model"),
            ("nope", "unknown model"),
            ("tiny", "ready"),
            ("tiny", "ready")
        ],
        "{audit}"
    );
}
