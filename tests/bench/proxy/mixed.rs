//! The figures that compare claracore with the peers on the real model
//! (full runs only): 10, model starts and time to first token for mixed
//! traffic on two models with one resident; 11 and 12, latency and req/s
//! of a one-token request to the tiny model (every contender can serve
//! that, Ollama included); 6b, daemon RSS with 1,000 requests open on the
//! tiny model; 7b, spawn to the first answered HTTP probe.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{probe, request, Addr, Conn};
use crate::peers::{self, SpawnCounter};
use crate::procs::Proc;
use crate::{
    admin, cpu_ticks, free_port, llama_body, main_models, median, ms, order, pct, plus_ms, post, q,
    rss_kb, shell, tail, wrk, Env, Plan, Report, Verdict,
};

/// How a contender counts its own model starts, to check the `/proc` count.
pub enum OwnCount {
    /// `starts` summed over `/admin/ps`.
    Claracore,
    /// "starting runner" lines in Ollama's log.
    OllamaLog(PathBuf),
    None,
}

impl OwnCount {
    fn read(&self, port: u16) -> Option<u64> {
        match self {
            OwnCount::Claracore => {
                let v = admin(port, "GET", "/admin/ps", b"").ok()?.json();
                Some(
                    v["models"]
                        .as_array()?
                        .iter()
                        .map(|m| m["starts"].as_u64().unwrap_or(0))
                        .sum(),
                )
            }
            OwnCount::OllamaLog(log) => Some(peers::runner_starts_logged(log) as u64),
            OwnCount::None => None,
        }
    }
}

pub struct Mixed {
    pub name: &'static str,
    pub port: u16,
    /// The daemon whose children are counted.
    pub pid: u32,
    /// What a model process's command line contains.
    pub needles: Vec<String>,
    pub own: OwnCount,
}

/// The most one contender may take for its requests; past it the clients
/// stop and the row says how many were served.
const MIXED_DEADLINE: Duration = Duration::from_secs(240);

// --- 10: mixed traffic, one model resident ---------------------------------

/// `plan.mixed_clients` clients, half on `tiny` and half on `tiny2`, each
/// sending `plan.mixed_per_client` streamed requests (8 tokens) one after
/// another, against a daemon that keeps one model loaded, `tiny` resident
/// at the start. Counts the model processes the daemon starts (`/proc`, by
/// parent pid) and the time to first token (the first SSE chunk with
/// `"content":"`).
pub fn fig_mixed(env: &Env, plan: &Plan, rep: &mut Report, contenders: &[Mixed]) {
    let total = plan.mixed_clients * plan.mixed_per_client;
    env.log(&format!(
        "figure 10: {total} streamed requests, {} clients on each of two models, one resident",
        plan.mixed_clients / 2
    ));
    let body = Arc::new(request(
        "POST",
        "/v1/chat/completions",
        &llama_body("tiny", true, 8),
        false,
    ));
    let body2 = Arc::new(request(
        "POST",
        "/v1/chat/completions",
        &llama_body("tiny2", true, 8),
        false,
    ));
    for c in contenders {
        // One model resident: tiny.
        post(
            c.port,
            "/v1/chat/completions",
            &llama_body("tiny", false, 1),
        );
        std::thread::sleep(Duration::from_millis(300));
        let own_before = c.own.read(c.port);
        let counter = SpawnCounter::start(c.pid, c.needles.clone());
        let t0 = Instant::now();
        let threads: Vec<_> = (0..plan.mixed_clients)
            .map(|i| {
                let req = if i % 2 == 0 {
                    body.clone()
                } else {
                    body2.clone()
                };
                let (port, n) = (c.port, plan.mixed_per_client);
                std::thread::spawn(move || {
                    let mut conn = Conn::new(port)
                        .with_timeout(Duration::from_secs(120))
                        .with_mark(br#""content":""#);
                    // (ttft ms, None or what failed)
                    let mut out = Vec::new();
                    for _ in 0..n {
                        if t0.elapsed() > MIXED_DEADLINE {
                            break;
                        }
                        match conn.send(&req) {
                            Ok(r) if r.status == 200 => {
                                let first = r.marked.unwrap_or(r.end);
                                out.push(((first - r.sent).as_secs_f64() * 1e3, None));
                            }
                            Ok(r) => out.push((
                                f64::NAN,
                                Some(format!(
                                    "status {}: {}",
                                    r.status,
                                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                                )),
                            )),
                            Err(e) => out.push((f64::NAN, Some(e.to_string()))),
                        }
                    }
                    out
                })
            })
            .collect();
        let results: Vec<(f64, Option<String>)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        // A start the last request caused is seen by now.
        std::thread::sleep(Duration::from_millis(100));
        let spawned = counter.finish();
        let own = match (own_before, c.own.read(c.port)) {
            (Some(a), Some(b)) => format!("; its own count {}", b.saturating_sub(a)),
            _ => String::new(),
        };
        let ttft: Vec<f64> = results
            .iter()
            .filter(|r| r.1.is_none())
            .map(|r| r.0)
            .collect();
        let errors = results.iter().filter(|r| r.1.is_some()).count();
        let first_error = results.iter().find_map(|r| r.1.clone());
        let served = results.len();
        rep.row(
            "10 mixed A/B, 1 resident: model starts",
            c.name,
            format!("{spawned} starts"),
            "—".into(),
            format!("{served}"),
            format!(
                "model processes spawned (/proc by parent pid){own}; {wall:.1} s for the lot{}{}",
                if let Some(e) = &first_error {
                    format!("; {errors} errors, the first: {e}")
                } else {
                    String::new()
                },
                if served < total {
                    format!("; only {served} of {total} sent within {MIXED_DEADLINE:?}")
                } else {
                    String::new()
                }
            ),
            "",
            Verdict::Info,
        );
        rep.row(
            "10 mixed A/B, 1 resident: time to first token",
            c.name,
            ms(median(&ttft)),
            ms(pct(&ttft, 99.0)),
            format!("{}", ttft.len()),
            format!("max {}", ms(pct(&ttft, 100.0))),
            "",
            Verdict::Info,
        );
        if c.name == "claracore" {
            rep.check(
                "claracore: every mixed request answered 200",
                errors == 0 && served == total,
                format!("{errors} errors, {served} of {total} sent"),
            );
        }
    }
}

// --- 11: latency of a one-token request ------------------------------------

/// One keep-alive connection each, non-streamed `max_tokens = 1` to the
/// tiny model; per round p50/p99, minus direct's (the child claracore
/// started, on its socket) in the same round.
pub fn fig_model_latency(env: &Env, plan: &Plan, rep: &mut Report, contenders: &[(&str, Addr)]) {
    let fig = "11 latency, tiny model, 1 token";
    env.log(&format!(
        "figure 11: one-token requests to the tiny model, {} rounds × {}",
        plan.model_lat_rounds, plan.model_lat_per_round
    ));
    let req = request(
        "POST",
        "/v1/chat/completions",
        &llama_body("tiny", false, 1),
        false,
    );
    let k = contenders.len();
    let mut conns: Vec<Conn> = contenders.iter().map(|c| Conn::new(c.1.clone())).collect();
    for (c, (name, _)) in conns.iter_mut().zip(contenders) {
        for _ in 0..20 {
            let r = c.send(&req).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.status, 200, "{name}: {}", r.text());
        }
    }
    let rounds = plan.model_lat_rounds;
    let mut samples = vec![vec![Vec::new(); rounds]; k];
    let mut errors = vec![0usize; k];
    for r in 0..rounds {
        for c in order(k, r) {
            for _ in 0..plan.model_lat_per_round {
                match conns[c].send(&req) {
                    Ok(resp) if resp.status == 200 => {
                        samples[c][r].push((resp.end - resp.sent).as_secs_f64() * 1e3)
                    }
                    _ => errors[c] += 1,
                }
            }
        }
    }
    let p = |c: usize, r: usize, x: f64| pct(&samples[c][r], x);
    let abs = |c: usize, x: f64| median(&(0..rounds).map(|r| p(c, r, x)).collect::<Vec<_>>());
    let added = |c: usize, x: f64| {
        median(
            &(0..rounds)
                .map(|r| p(c, r, x) - p(0, r, x))
                .collect::<Vec<_>>(),
        )
    };
    let n = format!("{rounds}×{}", plan.model_lat_per_round);
    for c in 0..k {
        let name = contenders[c].0;
        let (median_s, p99_s, vs) = if c == 0 {
            (
                ms(abs(0, 50.0)),
                ms(abs(0, 99.0)),
                "baseline: llama-server itself (absolute round-trip)".to_string(),
            )
        } else {
            (
                plus_ms(added(c, 50.0)),
                plus_ms(added(c, 99.0)),
                format!(
                    "abs {} / {}{}",
                    ms(abs(c, 50.0)),
                    ms(abs(c, 99.0)),
                    if name == "ollama" {
                        "; its own runner and engine: not overhead alone"
                    } else {
                        ""
                    }
                ),
            )
        };
        let errs = if errors[c] > 0 {
            format!("; {} errors", errors[c])
        } else {
            String::new()
        };
        rep.row(
            fig,
            name,
            median_s,
            p99_s,
            n.clone(),
            format!("{vs}{errs}"),
            "",
            Verdict::Info,
        );
    }
}

// --- 12: req/s of a one-token request --------------------------------------

/// A figure-12 contender: (name, port, the daemon's pid and whether its
/// direct children count: nginx's workers, never a model process).
pub type RpsContender<'a> = (&'a str, u16, Option<(u32, bool)>);

/// `wrk -t2 -c64` with the one-token request, CPU per request of each
/// daemon. There is no direct row: the child listens on a unix socket.
pub fn fig_model_rps(env: &Env, plan: &Plan, rep: &mut Report, contenders: &[RpsContender]) {
    let fig = "12 req/s, tiny model, 1 token, 64 conns";
    if env.wrk.is_none() {
        rep.skip(fig, "wrk not installed");
        return;
    }
    env.log(&format!(
        "figure 12: wrk -c64 on the tiny model, {} rounds × {} s",
        plan.model_rps_rounds, plan.rps_secs
    ));
    let script = env.dir.join("tiny.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
            String::from_utf8(llama_body("tiny", false, 1)).unwrap()
        ),
    )
    .unwrap();
    let k = contenders.len();
    for c in contenders {
        wrk(env, &script, c.1, 1);
    }
    let rounds = plan.model_rps_rounds;
    let mut res: Vec<Vec<crate::Wrk>> = (0..k).map(|_| Vec::new()).collect();
    let mut used = vec![(0u64, 0u64); k];
    for r in 0..rounds {
        for c in order(k, r) {
            let before = contenders[c].2.map(|(pid, ch)| cpu_ticks(pid, ch));
            let w = wrk(env, &script, contenders[c].1, plan.rps_secs);
            if let (Some(b), Some((pid, ch))) = (before, contenders[c].2) {
                used[c].0 += cpu_ticks(pid, ch).saturating_sub(b);
                used[c].1 += w.requests;
            }
            res[c].push(w);
        }
    }
    let tick_us = 1e6 / shell("getconf CLK_TCK").parse::<f64>().unwrap_or(100.0);
    let rps = |c: usize| median(&res[c].iter().map(|w| w.rps).collect::<Vec<_>>());
    let ratio = |a: usize, b: usize| {
        median(
            &(0..rounds)
                .map(|r| res[a][r].rps / res[b][r].rps)
                .collect::<Vec<_>>(),
        )
    };
    for c in 0..k {
        let bad: u64 = res[c].iter().map(|w| w.bad + w.timeouts).sum();
        let requests: u64 = res[c].iter().map(|w| w.requests).sum();
        let cpu = (used[c].1 > 0).then(|| used[c].0 as f64 * tick_us / used[c].1 as f64);
        rep.row(
            fig,
            contenders[c].0,
            format!("{:.0} req/s", rps(c)),
            format!(
                "lat {}",
                ms(median(&res[c].iter().map(|w| w.p99_ms).collect::<Vec<_>>()))
            ),
            format!("{rounds}×{} s", plan.rps_secs),
            format!(
                "{}{}; {bad} of {requests} non-2xx, errors or timeouts",
                if c == 0 {
                    "baseline".to_string()
                } else {
                    format!("{:.2}× {}", ratio(c, 0), contenders[0].0)
                },
                cpu.map_or(String::new(), |us| format!(
                    "; daemon CPU {us:.1} µs/req (not its model process)"
                ))
            ),
            "",
            Verdict::Info,
        );
    }
}

// --- 6b: RSS with requests open on the real model --------------------------

/// Opens `n` connections, each writing one streamed request for the tiny
/// model, waits until all are written (or 30 s), samples `pid`'s RSS while
/// they are open, closes them. (written, max VmRSS kB).
fn hold_open(port: u16, pid: u32, n: usize) -> (usize, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let req = Arc::new(request(
        "POST",
        "/v1/chat/completions",
        &llama_body("tiny", true, 256),
        false,
    ));
    let written = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (req, written, gate, mut close) =
                (req.clone(), written.clone(), gate.clone(), close_rx.clone());
            rt.spawn(async move {
                let permit = gate.acquire_owned().await.ok()?;
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?;
                s.write_all(&req).await.ok()?;
                written.fetch_add(1, Ordering::SeqCst);
                drop(permit);
                let mut buf = vec![0u8; 4096];
                loop {
                    tokio::select! {
                        r = s.read(&mut buf) => if !matches!(r, Ok(k) if k > 0) { return Some(()) },
                        _ = close.wait_for(|c| *c) => return Some(()),
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut max_rss = 0;
    for _ in 0..10 {
        max_rss = max_rss.max(rss_kb(pid).0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = close_tx.send(true);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    (written.load(Ordering::SeqCst), max_rss)
}

/// `daemons`: (name, port, pid, RSS kB idle after warm-up). Rows: idle
/// after warm-up, idle after the load figures, and with
/// `plan.open_requests` requests open on the tiny model.
pub fn fig_open_rss(env: &Env, plan: &Plan, rep: &mut Report, daemons: &[(&str, u16, u32, u64)]) {
    let fig = "6b daemon RSS, real model";
    env.log(&format!(
        "figure 6b: daemon RSS with {} requests open on the tiny model",
        plan.open_requests
    ));
    std::thread::sleep(Duration::from_secs(3));
    let mb = |kb: u64| format!("{:.1} MB", kb as f64 / 1024.0);
    let after: Vec<u64> = daemons.iter().map(|d| rss_kb(d.2).0).collect();
    for (i, &(name, port, pid, idle)) in daemons.iter().enumerate() {
        let (got, held) = hold_open(port, pid, plan.open_requests);
        // Let the daemon drop what the clients left.
        std::thread::sleep(Duration::from_secs(2));
        rep.row(
            fig,
            name,
            mb(held),
            format!("VmHWM {}", mb(rss_kb(pid).1)),
            "1".into(),
            format!(
                "{got} of {} requests open (streamed, 256 tokens; most queued); idle after \
                 warm-up {}, idle after load {}; the daemon process only, not its model process",
                plan.open_requests,
                mb(idle),
                mb(after[i])
            ),
            "",
            Verdict::Info,
        );
    }
}

// --- 7b: spawn to the first answered probe ---------------------------------

/// claracore (history on, empty state dir) to `GET /ready` 200, and
/// `ollama serve` (empty model store) to `GET /` 200, both polled every
/// 1 ms, interleaved.
pub fn fig_peer_ready(env: &Env, plan: &Plan, rep: &mut Report) {
    let fig = "7b start → first HTTP 200";
    let Some(ollama) = env.ollama.clone() else {
        return;
    };
    env.log("figure 7b: start to the first answered HTTP probe, claracore and ollama");
    let mut times = [Vec::new(), Vec::new()];
    for r in 0..plan.ready_rounds {
        for c in order(2, r) {
            let dir = env.dir.join(format!("ready-http-{r}-{c}"));
            std::fs::create_dir_all(dir.join("state")).unwrap();
            let port = free_port();
            let log = dir.join("daemon.log");
            let (mut cmd, path) = if c == 0 {
                let config = format!(
                    "listen = [{}]\nstate_dir = {}\nllama_server = \"llama-server\"\nlog_format = \"json\"\n{}",
                    q(format!("127.0.0.1:{port}")),
                    q(dir.join("state").display().to_string()),
                    main_models(env),
                );
                std::fs::write(dir.join("config.toml"), config).unwrap();
                let mut cmd = Command::new(&env.claracore);
                cmd.arg("serve")
                    .arg("--config")
                    .arg(dir.join("config.toml"))
                    .env_remove("NOTIFY_SOCKET");
                (cmd, "/ready")
            } else {
                std::fs::create_dir_all(dir.join("home")).unwrap();
                std::fs::create_dir_all(dir.join("models")).unwrap();
                let mut cmd = peers::ollama_cmd(&ollama, &dir, port);
                cmd.arg("serve");
                (cmd, "/")
            };
            let t0 = Instant::now();
            let mut p = Proc::spawn(if c == 0 { "claracore" } else { "ollama" }, &mut cmd, &log);
            while probe(port, path) != Some(200) {
                assert!(
                    p.alive() && t0.elapsed() < Duration::from_secs(20),
                    "no answer on {path}: {}",
                    tail(&log, 10)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            times[c].push(t0.elapsed().as_secs_f64() * 1e3);
            p.stop(Duration::from_secs(5));
        }
    }
    let n = plan.ready_rounds.to_string();
    for (c, name, what) in [
        (
            0,
            "claracore, history on",
            "spawn → GET /ready 200 (creates history.db)",
        ),
        (1, "ollama", "spawn → GET / 200 (empty model store)"),
    ] {
        rep.row(
            fig,
            name,
            ms(median(&times[c])),
            ms(pct(&times[c], 99.0)),
            n.clone(),
            what.into(),
            "",
            Verdict::Info,
        );
    }
}
