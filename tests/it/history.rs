//! Request history and metrics against the real binary, a real SQLite
//! file, the real llama-server and the fake upstream.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;
use hyper::StatusCode;
use nix::sys::signal::Signal;
use rusqlite::Connection;
use serde_json::json;

fn db_path(d: &Daemon) -> PathBuf {
    d.dir.path().join("state/history.db")
}

fn db(d: &Daemon) -> Connection {
    Connection::open(db_path(d)).unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Waits until `sql` (a count) reaches `n`; rows land within the batch
/// window after the request ends.
fn wait_count(d: &Daemon, sql: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = count(&db(d), sql);
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {got} < {n}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_carry_the_usage_the_client_saw_with_timings_and_ttft() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let (status, body) = d
        .post("/v1/chat/completions", &chat("tiny", 6, false))
        .await;
    assert_eq!(status, StatusCode::OK);
    let usage = body["usage"].clone();

    let mut req = chat("tiny", 9, true);
    req["stream_options"] = json!({"include_usage": true});
    let s = stream(&d.addr, "/v1/chat/completions", &req).await;
    let stream_usage: serde_json::Value = s
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .expect("client asked for usage");
    // And one stream where the client did not ask: counts come from timings.
    let plain = stream(&d.addr, "/v1/chat/completions", &chat("tiny", 4, true)).await;
    assert!(
        !plain.text().contains("\"usage\""),
        "what the client receives is unchanged"
    );

    wait_count(&d, "SELECT count(*) FROM requests", 3);
    let conn = db(&d);
    let rows: Vec<(i64, i64, bool, Option<f64>, Option<f64>, Option<f64>, String)> = conn
        .prepare("SELECT prompt_tokens, completion_tokens, streamed, ttft_ms, predicted_per_second, prompt_ms, outcome FROM requests ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows[0].0, usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(rows[0].1, 6);
    assert!(!rows[0].2 && rows[0].3.is_none(), "non-streamed: no TTFT");
    assert_eq!(rows[1].0, stream_usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(
        rows[1].1,
        stream_usage["completion_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        rows[2].1, 4,
        "streams without include_usage still get counts"
    );
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.6, "ok", "row {i}");
        assert!(
            r.4.unwrap() > 0.0 && r.5.is_some(),
            "row {i} has llama.cpp timings"
        );
    }
    assert!(
        rows[1].3.unwrap() > 0.0 && rows[2].3.is_some(),
        "streams have a TTFT"
    );
    let (model, endpoint, client, content): (String, String, String, String) = conn
        .query_row(
            "SELECT model, endpoint, client, request_content FROM requests WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (model.as_str(), endpoint.as_str()),
        ("tiny", "/v1/chat/completions")
    );
    assert!(client.starts_with("127.0.0.1:"));
    assert!(
        content.contains("\"hello\""),
        "truncated policy keeps the prompt: {content}"
    );

    // The API and the CLI read the same rows.
    let (_, page) = d.get("/admin/history?model=tiny&limit=2").await;
    assert_eq!(page["requests"].as_array().unwrap().len(), 2);
    assert_eq!(page["requests"][0]["id"], 3, "newest first");
    let cursor = page["next_cursor"].as_i64().unwrap();
    let (_, rest) = d
        .get(&format!("/admin/history?model=tiny&cursor={cursor}"))
        .await;
    assert_eq!(rest["requests"][0]["id"], 1);
    assert!(rest["next_cursor"].is_null());
    let (_, one) = d.get("/admin/history/2").await;
    assert_eq!(one["completion_tokens"], 9);
    let (_, stats) = d.get("/admin/stats?window=1h").await;
    assert_eq!(stats["models"][0]["model"], "tiny");
    assert_eq!(stats["models"][0]["requests"], 3);
    assert_eq!(stats["models"][0]["loads"], 1);
    assert!(
        stats["models"][0]["generation_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let out = d.cli(&["history", "--model", "tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.lines().count() == 4 && text.contains("/v1/chat/completions"),
        "{text}"
    );
    let out = d.cli(&["stats", "--window", "1h"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tiny"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_and_cancels_are_recorded_with_their_outcome() {
    let d = Daemon::start(&format!(
        "{}{}",
        fake_model_table("slow", &["--chunk-delay-ms", "50"], ""),
        fake_model_table(
            "broken",
            &["--mode", "exit-on-start", "--start-delay-ms", "10"],
            ""
        )
    ));
    assert_eq!(
        d.post("/v1/chat/completions", &json!({"model": "nope"}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.post("/v1/chat/completions", &chat("broken", 1, false))
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A stream the client abandons after two events.
    {
        let resp = send(
            &d.addr,
            hyper::Method::POST,
            "/v1/chat/completions",
            Some(chat("slow", 100, true).to_string()),
        )
        .await;
        let mut body = resp.into_body();
        use http_body_util::BodyExt;
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
    }
    wait_count(&d, "SELECT count(*) FROM requests", 3);
    let conn = db(&d);
    let outcome = |sql: &str| -> (String, i64, Option<String>) {
        conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
    };
    let (o, status, err) =
        outcome("SELECT outcome, status, error FROM requests WHERE model IS NULL");
    assert_eq!((o.as_str(), status), ("rejected", 404));
    assert!(err.unwrap().contains("'nope' not found"));
    let (o, status, err) =
        outcome("SELECT outcome, status, error FROM requests WHERE model = 'broken'");
    assert_eq!((o.as_str(), status), ("upstream_error", 503));
    assert!(err.unwrap().contains("exited while starting"));
    let (o, status, err) =
        outcome("SELECT outcome, status, error FROM requests WHERE model = 'slow'");
    assert_eq!((o.as_str(), status), ("cancelled", 200));
    assert!(err.unwrap().contains("client closed"));
    let events = count(
        &conn,
        "SELECT count(*) FROM model_events WHERE model = 'broken' AND event = 'start_failed'",
    );
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_events_show_start_ready_and_ttl_stop_with_load_time() {
    let d = Daemon::start(&tiny_model_table("tiny", "ttl = \"1s\""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("tiny", 1, false))
            .await
            .0,
        StatusCode::OK
    );
    d.wait_state("tiny", "stopped", Duration::from_secs(5))
        .await;
    wait_count(&d, "SELECT count(*) FROM model_events", 3);
    let conn = db(&d);
    let events: Vec<(String, Option<String>, Option<f64>, Option<i64>)> = conn
        .prepare(
            "SELECT event, reason, load_ms, pid FROM model_events WHERE model = 'tiny' ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["start_requested", "ready", "stopped"]);
    let load = events[1].2.unwrap();
    assert!(load > 1.0 && load < 30_000.0, "load_ms {load}");
    assert!(events[1].3.is_some());
    assert_eq!(events[2].1.as_deref(), Some("ttl"));
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_rows_at_start() {
    let mut d = Daemon::start(&fake_model_table("f", &[], ""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
        StatusCode::OK
    );
    wait_count(&d, "SELECT count(*) FROM requests", 1);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)).code(), Some(0));
    // Age the row by two days, and add a fresh one.
    let conn = db(&d);
    conn.execute_batch(
        "UPDATE requests SET started_at_ms = started_at_ms - 172800000;
         UPDATE model_events SET at_ms = at_ms - 172800000;
         INSERT INTO requests (request_id, started_at_ms, finished_at_ms, client, endpoint, status, outcome, latency_ms, streamed)
         VALUES ('fresh', CAST(strftime('%s','now') AS INTEGER) * 1000, 0, 'x', '/v1/completions', 200, 'ok', 1.0, 0);",
    )
    .unwrap();
    drop(conn);
    let config = d.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[history]\nretention = \"1d\"\n")).unwrap();
    let log = d.dir.path().join("daemon2.log");
    // A listener of its own: the first closed with the first daemon.
    let again = serve(&config, &log, Some(prebound().0), &[]);
    let mut again = KillOnDrop(again);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logged = std::fs::read_to_string(&log)
            .unwrap()
            .contains("retention deleted");
        let c = db(&d);
        let (old, fresh) = (
            count(
                &c,
                "SELECT count(*) FROM requests WHERE request_id != 'fresh'",
            ),
            count(
                &c,
                "SELECT count(*) FROM requests WHERE request_id = 'fresh'",
            ),
        );
        if old == 0 && logged {
            assert_eq!(fresh, 1, "only old rows go");
            assert_eq!(
                count(&c, "SELECT count(*) FROM model_events"),
                0,
                "events follow the same retention"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old rows still there: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    again.0.kill().unwrap();
    again.0.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_survives_sigkill_under_load() {
    let mut d = Daemon::start(&fake_model_table("f", &[], ""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
        StatusCode::OK
    );
    let addr = d.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (addr, stop, answered) = (addr.clone(), stop.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(s) = tokio::net::TcpStream::connect(&addr).await else {
                    break;
                };
                let Ok((mut tx, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await
                else {
                    break;
                };
                tokio::spawn(conn);
                let req = hyper::Request::post("/v1/chat/completions")
                    .header("host", "x")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        chat("f", 1, false).to_string(),
                    )))
                    .unwrap();
                match tx.send_request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        use http_body_util::BodyExt;
                        if r.into_body().collect().await.is_ok() {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    _ => break,
                }
            }
        }));
    }
    // Stays: the load running for a while before the SIGKILL is the
    // scenario (rows in every stage of the writer's batches).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.await;
    }
    let conn = db(&d);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let rows = count(&conn, "SELECT count(*) FROM requests");
    let answered = answered.load(std::sync::atomic::Ordering::Relaxed) as i64;
    // At most the last batch window (plus requests answered but not yet
    // ended on the server side) may be missing; measured, reported here.
    eprintln!(
        "SIGKILL under load: {answered} answered, {rows} recorded, {} missing",
        answered - rows
    );
    assert!(
        rows > 0 && rows <= answered + 8,
        "{rows} rows for {answered} answers"
    );
    assert!(
        answered - rows < answered / 2 + 50,
        "lost far more than one batch window: {rows}/{answered}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_database_is_moved_aside_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("history.db"), vec![0x5a; 16384]).unwrap();
    let (listener, addr) = prebound();
    let config = dir.path().join("c.toml");
    write_file(
        &config,
        &format!(
            "listen = [\"{addr}\"]\nstate_dir = \"{}\"\n{}",
            state.display(),
            fake_model_table("f", &[], "")
        ),
    );
    let log = dir.path().join("log");
    let child = serve(&config, &log, Some(listener), &[]);
    let mut child = KillOnDrop(child);
    wait_live(&addr, &mut child.0, &log);
    let status = chat_status(&addr, "f").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert_eq!(status, StatusCode::OK);
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("history.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        vec![0x5a; 16384],
        "kept as it was"
    );
    let conn = Connection::open(state.join("history.db")).unwrap();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM requests"),
        1,
        "the fresh database records"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("\"level\":\"ERROR\"") && text.contains("moved it to"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_drops_rows_counted_while_the_proxy_keeps_serving() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=700k", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a small tmpfs and needs root"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let d = Daemon::start(&format!(
        "[history]\npath = \"{}/history.db\"\ncontent = \"full\"\n{}",
        mnt.path().display(),
        fake_model_table("f", &[], "")
    ));
    // Fill the filesystem so the database cannot grow.
    let filler = mnt.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 700 * 1024]);
    let big = "x".repeat(20_000);
    let mut ok = 0;
    for _ in 0..60 {
        let body =
            json!({"model": "f", "messages": [{"role": "user", "content": big}], "max_tokens": 1});
        if d.post("/v1/chat/completions", &body).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 60, "every request was served");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = d.get("/metrics").await;
        let text = metrics.as_str().unwrap().to_string();
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("claracore_history_rows_dropped_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0);
        if dropped > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drops counted:\n{text}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.log_text().contains("history rows dropped"));
    // The disk recovers: writing resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let before = count(
        &Connection::open(mnt.path().join("history.db")).unwrap(),
        "SELECT count(*) FROM requests",
    );
    for _ in 0..3 {
        assert_eq!(
            d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
            StatusCode::OK
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(
        &Connection::open(mnt.path().join("history.db")).unwrap(),
        "SELECT count(*) FROM requests",
    ) < before + 3
    {
        assert!(Instant::now() < deadline, "writing did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Found by tests/tools/chaos.sh (a daemon SIGKILL while the history disk
/// was full): the restart took the full disk for a corrupt database, moved
/// the sound file aside as `history.db.corrupt-*`, failed to create a fresh
/// one and exited, so the service stayed down until the disk was freed.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_on_a_full_history_disk_moved_the_database_aside_and_did_not_start() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=700k", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a small tmpfs and needs root"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let body = format!(
        "[history]\npath = \"{}/history.db\"\n{}",
        mnt.path().display(),
        fake_model_table("f", &[], "")
    );
    let db_file = mnt.path().join("history.db");
    let rows = || {
        count(
            &Connection::open(&db_file).unwrap(),
            "SELECT count(*) FROM requests",
        )
    };

    let mut first = Daemon::start(&body);
    assert_eq!(
        first
            .post("/v1/chat/completions", &chat("f", 1, false))
            .await
            .0,
        StatusCode::OK
    );
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(rows(), 1);

    let filler = mnt.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 700 * 1024]);
    // Starts (Daemon::start waits for /live and fails if it exits) and serves.
    let d = Daemon::start(&body);
    for _ in 0..3 {
        assert_eq!(
            d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
            StatusCode::OK
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = d.get("/metrics").await;
        let text = metrics.as_str().unwrap().to_string();
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("claracore_history_rows_dropped_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0);
        if dropped >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rows not written were not counted:\n{text}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let aside: Vec<String> = std::fs::read_dir(mnt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(
        aside.is_empty(),
        "a sound database was moved aside: {aside:?}"
    );

    // Space again: the writer opens the same file and records again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert_eq!(
            d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        if rows() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recording did not resume once the disk had room:\n{}",
            d.log_text()
        );
    }
    let first_row: i64 = Connection::open(&db_file)
        .unwrap()
        .query_row("SELECT min(id) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(first_row, 1, "the rows of the first run are still there");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_under_load_is_a_valid_database() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    let addr = d.addr.clone();
    let load = tokio::spawn(async move {
        for _ in 0..200 {
            request(
                &addr,
                hyper::Method::POST,
                "/v1/chat/completions",
                Some(chat("f", 1, false).to_string()),
            )
            .await;
        }
    });
    d.wait_rows(1, Duration::from_secs(10)).await;
    let file = d.dir.path().join("backup.db");
    let out = d.cli(&["backup", &file.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("integrity ok"));
    load.await.unwrap();
    let conn = Connection::open(&file).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    assert!(count(&conn, "SELECT count(*) FROM requests") > 0);
    let out = d.cli(&["backup", &file.display().to_string()]);
    assert!(!out.status.success(), "never overwrites");

    // Restore refuses while the daemon answers, then works once it is gone.
    let config = d.dir.path().join("config.toml").display().to_string();
    let out = std::process::Command::new(BIN)
        .args(["restore", &file.display().to_string(), "--config", &config])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{out:?}"
    );
    let mut d = d;
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(5));
    let garbage = d.dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database at all").unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "restore",
            &garbage.display().to_string(),
            "--config",
            &config,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken file is refused: {out:?}");
    let out = std::process::Command::new(BIN)
        .args(["restore", &file.display().to_string(), "--config", &config])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("previous database is at"));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_match_the_history() {
    let d = Daemon::start(&format!(
        "[scheduler]\nmax_loaded = 2\n{}{}",
        tiny_model_table("tiny", ""),
        fake_model_table("f", &[], "")
    ));
    for _ in 0..3 {
        assert_eq!(
            d.post("/v1/chat/completions", &chat("tiny", 3, false))
                .await
                .0,
            StatusCode::OK
        );
    }
    stream(&d.addr, "/v1/chat/completions", &chat("tiny", 5, true)).await;
    assert_eq!(
        d.post("/v1/chat/completions", &json!({"model": "nope"}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.post("/v1/embeddings", &json!({"model": "f", "input": "x"}))
            .await
            .0,
        StatusCode::OK
    );
    wait_count(&d, "SELECT count(*) FROM requests", 6);

    let resp = send_unix(&d.socket(), hyper::Method::GET, "/metrics", None).await;
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    use http_body_util::BodyExt;
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let metrics_file = d.dir.path().join("metrics.txt");
    std::fs::write(&metrics_file, &text).unwrap();
    // The reference parser, from the Python client library.
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        key = s.name + json.dumps(dict(sorted(s.labels.items())), separators=(",", ":"))
        out[key] = s.value
print(json.dumps(out))
"#;
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .arg(&metrics_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str, labels: serde_json::Value| {
        samples[format!("{name}{labels}")].as_f64().unwrap_or(-1.0)
    };

    let conn = db(&d);
    let history = |sql: &str| count(&conn, sql) as f64;
    assert_eq!(
        get(
            "claracore_requests_total",
            json!({"endpoint": "/v1/chat/completions", "model": "tiny", "outcome": "ok"})
        ),
        history("SELECT count(*) FROM requests WHERE model = 'tiny' AND outcome = 'ok'")
    );
    assert_eq!(
        get(
            "claracore_requests_total",
            json!({"endpoint": "/v1/chat/completions", "model": "", "outcome": "rejected"})
        ),
        1.0
    );
    assert_eq!(
        get(
            "claracore_tokens_total",
            json!({"kind": "completion", "model": "tiny"})
        ),
        history("SELECT sum(completion_tokens) FROM requests WHERE model = 'tiny'")
    );
    assert_eq!(
        get(
            "claracore_model_starts_total",
            json!({"model": "tiny", "result": "ok"})
        ),
        1.0
    );
    assert_eq!(
        get(
            "claracore_model_state",
            json!({"model": "tiny", "state": "ready"})
        ),
        1.0
    );
    assert_eq!(
        get(
            "claracore_model_state",
            json!({"model": "tiny", "state": "stopped"})
        ),
        0.0
    );
    assert_eq!(
        get(
            "claracore_time_to_first_token_seconds_count",
            json!({"model": "tiny"})
        ),
        1.0
    );
    assert_eq!(get("claracore_history_rows_dropped_total", json!({})), 0.0);
    assert!(get("claracore_process_resident_memory_bytes", json!({})) > 1e6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_still_commits_the_rows_already_queued() {
    // A long batch window keeps answered requests' rows in the queue; a
    // hung stream keeps the first SIGTERM draining.
    let mut d = Daemon::start(&format!(
        "[history]\nbatch_window = \"10s\"\n{}{}",
        fake_model_table("quick", &[], ""),
        fake_model_table("hung", &["--mode", "hang-mid-stream"], "")
    ));
    for _ in 0..5 {
        assert_eq!(chat_status(&d.addr, "quick").await, StatusCode::OK);
    }
    let addr = d.addr.clone();
    let _hung = tokio::spawn(async move {
        stream(&addr, "/v1/chat/completions", &chat("hung", 15, true)).await
    });
    d.wait_model(
        "hung",
        Duration::from_secs(5),
        "the stream in flight",
        |m| m["inflight"] == 1,
    )
    .await;
    d.signal(Signal::SIGTERM);
    // Stays: the daemon must still be running a while after the first
    // signal; time passing without an exit is what this checks.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(d.child.try_wait().unwrap().is_none(), "still draining");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)).code(), Some(143));
    assert_eq!(
        count(
            &db(&d),
            "SELECT count(*) FROM requests WHERE model = 'quick'"
        ),
        5,
        "every answered request's row is in the file after a forced exit"
    );
    assert!(d.log_text().contains("committing queued history rows"));
}
