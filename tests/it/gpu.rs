//! GPU readings through the real nvml-wrapper path, with the fake NVML
//! (`tests/fake-nvml/fake_nvml.c`) in place of NVIDIA's library: absence
//! (no library, `enabled = false`, a driver that fails to initialize), the
//! state file's values in /metrics and their changes, and GPU memory per
//! process, by `CUDA_VISIBLE_DEVICES` and up the process tree.
//!
//! The fake counts every process on the machine whose command line holds a
//! rule's text, so each test's rules carry a marker of its own.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claracore::config::GpuConfig;
use claracore::gpu::{Gpus, Snapshot};
use hyper::StatusCode;

use super::common::*;

const MIB: u64 = 1024 * 1024;

/// Replaces the state file whole, so the fake never reads half of it.
fn write_state(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, text);
    std::fs::rename(&tmp, path).unwrap();
}

/// A text no other test's processes have in their command line.
fn marker(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("cc-fake-gpu-{test}-{}-{nanos}", std::process::id())
}

fn gpu_log_lines(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains("GPU readings"))
        .map(String::from)
        .collect()
}

async fn metrics(d: &Daemon) -> String {
    let (status, text) = d.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    text.as_str().unwrap().to_string()
}

/// Polls /metrics until it has every line of `want` (each a whole series
/// line: name, labels and value).
async fn wait_metrics(d: &Daemon, want: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(d).await;
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            return text;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = want
                .iter()
                .filter(|w| !text.lines().any(|l| l == *w))
                .collect();
            panic!("/metrics lacks {missing:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn series(name: &str, gpu: u32, value: impl std::fmt::Display) -> String {
    format!("{name}{{gpu=\"{gpu}\"}} {value}")
}

/// A daemon with one fake-upstream model answers, says once in its log
/// that it has no GPU readings, and shows no GPU series.
async fn assert_absent(gpu_table: &str, env: &[(&str, &str)], reason: &str) {
    let body = format!("{gpu_table}\n{}", fake_model_table("m", &[], ""));
    let d = Daemon::start_env(&body, env);
    assert_eq!(chat_status(&d.addr, "m").await, StatusCode::OK);
    let text = metrics(&d).await;
    assert!(text.contains("claracore_requests_total"), "{text}");
    assert!(!text.contains("claracore_gpu"), "{text}");
    let lines = gpu_log_lines(&d);
    assert_eq!(lines.len(), 1, "one line about GPU readings: {lines:#?}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("no NVIDIA GPU readings"),
        "{lines:?}"
    );
    assert!(lines[0].contains(reason), "{reason:?} in {lines:?}");
}

#[tokio::test]
async fn without_nvml_one_line_says_so_and_nothing_else_changes() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().display().to_string();
    // A library path that does not exist, not the loader's search: on a
    // machine with a real driver the search would find it.
    assert_absent(
        &format!("[gpu]\nnvml_library = \"{dir}/libnvidia-ml.so.1\""),
        &[("LD_LIBRARY_PATH", &dir)],
        "NVML did not load",
    )
    .await;
}

#[tokio::test]
async fn disabled_gpu_readings_never_load_nvml() {
    // The fake would load from here: `enabled = false` must not try.
    let fake = fake_nvml_dir().display().to_string();
    let state = tempfile::NamedTempFile::new().unwrap();
    write_state(state.path(), "gpu 0 Fake total_mib=1024 used_mib=1\n");
    assert_absent(
        "[gpu]\nenabled = false",
        &[
            ("LD_LIBRARY_PATH", &fake),
            ("FAKE_NVML_STATE", state.path().to_str().unwrap()),
        ],
        "gpu.enabled = false",
    )
    .await;
}

#[tokio::test]
async fn a_driver_that_fails_to_initialize_is_absence() {
    // Found by the loader's search (LD_LIBRARY_PATH), as the driver's
    // library would be, but nvmlInit_v2 fails.
    let fake = fake_nvml_dir().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write_state(
        &state,
        "fail init   # as without the kernel driver\ngpu 0 Fake total_mib=1024 used_mib=1\n",
    );
    assert_absent(
        "",
        &[
            ("LD_LIBRARY_PATH", &fake),
            ("FAKE_NVML_STATE", state.to_str().unwrap()),
        ],
        "NVIDIA driver is not loaded",
    )
    .await;
}

#[tokio::test]
async fn metrics_follow_the_gpus_and_the_models_on_them() {
    let fake = fake_nvml_dir().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mark = marker("metrics");
    // The model's argv carries the marker (in its pid file's name): the
    // fake puts it on GPU 1, from the CUDA_VISIBLE_DEVICES of its env.
    let pid_file = dir.path().join(format!("{mark}.pid"));
    let model = fake_model_table(
        "m",
        &["--pid-file", pid_file.to_str().unwrap()],
        "env = { CUDA_VISIBLE_DEVICES = \"1\" }",
    );
    let first = format!(
        "gpu 0 Fake-H100 total_mib=81920 used_mib=1024 util=37 temp=45 power_mw=123456\n\
         gpu 1 Fake-L4 total_mib=24576 used_mib=0\n\
         proc 512 {mark}\n"
    );
    write_state(&state, &first);
    let d = Daemon::start_env(
        &format!("[gpu]\nsample_interval = \"200ms\"\n{model}"),
        &[
            ("LD_LIBRARY_PATH", &fake),
            ("FAKE_NVML_STATE", state.to_str().unwrap()),
        ],
    );
    let lines = gpu_log_lines(&d);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(
            "NVIDIA GPU readings from NVML: 0: Fake-H100 (81920 MiB), 1: Fake-L4 (24576 MiB)"
        ) && lines[0].contains("libnvidia-ml.so.1"),
        "{lines:?}"
    );

    let text = wait_metrics(
        &d,
        &[
            "claracore_gpu_info{gpu=\"0\",name=\"Fake-H100\"} 1".into(),
            "claracore_gpu_info{gpu=\"1\",name=\"Fake-L4\"} 1".into(),
            series("claracore_gpu_memory_used_bytes", 0, 1024 * MIB),
            series("claracore_gpu_memory_total_bytes", 0, 81920 * MIB),
            series("claracore_gpu_utilization_ratio", 0, 0.37),
            series("claracore_gpu_temperature_celsius", 0, 45),
            series("claracore_gpu_power_watts", 0, 123.456),
            series("claracore_gpu_memory_used_bytes", 1, 0),
            series("claracore_gpu_memory_total_bytes", 1, 24576 * MIB),
        ],
    )
    .await;
    // GPU 1 gives no utilization, temperature or power: no series, not 0.
    for name in [
        "claracore_gpu_utilization_ratio",
        "claracore_gpu_temperature_celsius",
        "claracore_gpu_power_watts",
    ] {
        assert!(!text.contains(&format!("{name}{{gpu=\"1\"}}")), "{text}");
    }

    // New readings show at the next sample.
    write_state(
        &state,
        &format!(
            "gpu 0 Fake-H100 total_mib=81920 used_mib=40000 util=100 temp=71 power_mw=350000\n\
             gpu 1 Fake-L4 total_mib=24576 used_mib=100 temp=60\n\
             proc 512 {mark}\n"
        ),
    );
    wait_metrics(
        &d,
        &[
            series("claracore_gpu_memory_used_bytes", 0, 40000 * MIB),
            series("claracore_gpu_utilization_ratio", 0, "1.0"),
            series("claracore_gpu_temperature_celsius", 0, 71),
            series("claracore_gpu_power_watts", 0, "350.0"),
            series("claracore_gpu_memory_used_bytes", 1, 100 * MIB),
            series("claracore_gpu_temperature_celsius", 1, 60),
        ],
    )
    .await;

    // The model's child holds 512 MiB on GPU 1 while it runs.
    assert_eq!(chat_status(&d.addr, "m").await, StatusCode::OK);
    wait_metrics(
        &d,
        &[series("claracore_gpu_memory_used_bytes", 1, 612 * MIB)],
    )
    .await;
    let (status, _) = d.post_unix("/admin/models/m/stop").await;
    assert_eq!(status, StatusCode::OK);
    wait_metrics(
        &d,
        &[series("claracore_gpu_memory_used_bytes", 1, 100 * MIB)],
    )
    .await;
    assert_eq!(gpu_log_lines(&d).len(), 1, "nothing more logged about it");

    // A reload keeps the sampler, and says that a changed [gpu] waits
    // for a restart.
    let config_path = d.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    write_file(
        &config_path,
        &text.replace("sample_interval = \"200ms\"", "sample_interval = \"5s\""),
    );
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warned: Vec<String> = d
        .log_text()
        .lines()
        .filter(|l| l.contains("the [gpu] table takes effect only after a restart"))
        .map(String::from)
        .collect();
    assert_eq!(warned.len(), 1, "{}", d.log_text());
    assert!(warned[0].contains("WARN"), "{warned:?}");
    write_state(
        &state,
        "gpu 0 Fake-H100 total_mib=81920 used_mib=7\ngpu 1 Fake-L4 total_mib=24576 used_mib=8\n",
    );
    wait_metrics(&d, &[series("claracore_gpu_memory_used_bytes", 1, 8 * MIB)]).await;
}

/// Spawns `sh -c SCRIPT NAME` in a process group of its own (so it and
/// what it starts are killed together), with `CUDA_VISIBLE_DEVICES` as
/// given (`None`: unset).
fn spawn_group(script: &str, name: &str, visible: Option<&str>) -> KillGroup {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script, name])
        .stdin(Stdio::null())
        .process_group(0);
    match visible {
        Some(v) => cmd.env("CUDA_VISIBLE_DEVICES", v),
        None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
    };
    KillGroup(cmd.spawn().unwrap())
}

/// A process group this test started, killed (SIGKILL, by its leader's
/// pid) and its leader reaped on drop.
struct KillGroup(std::process::Child);

impl KillGroup {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Nudges the sampler until a snapshot satisfies `done`.
fn wait_snapshot(gpus: &Gpus, what: &str, done: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = gpus.latest().filter(|s| done(s)) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("no snapshot with {what} within 10 s: {:#?}", gpus.latest());
        }
        gpus.refresh();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn process_memory_goes_to_the_visible_gpu_and_up_the_tree() {
    // This process's environment cannot name a state file now, so the
    // fake is copied into a directory of its own and reads the
    // `fake-nvml.state` beside it; `nvml_library` names the copy.
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml_dir().join("libnvidia-ml.so.1"), &library).unwrap();
    let mark = marker("tree");
    write_state(
        &dir.path().join("fake-nvml.state"),
        &format!(
            "gpu 0 Fake-A total_mib=16384 used_mib=100\n\
             gpu 1 Fake-B total_mib=8192 used_mib=0\n\
             proc 100 {mark}-parent\n\
             proc 300 {mark}-child\n\
             proc 50 {mark}-zero\n"
        ),
    );
    let gpus = Gpus::start(&GpuConfig {
        enabled: true,
        sample_interval: Duration::from_millis(100),
        nvml_library: Some(library),
    });
    assert!(gpus.present());
    let idle = wait_snapshot(&gpus, "both GPUs", |s| s.gpus.len() == 2);
    let a = idle.gpu(0).unwrap();
    assert_eq!((a.name.as_str(), a.total_bytes), ("Fake-A", 16384 * MIB));
    assert_eq!((a.used_bytes, a.free_bytes), (100 * MIB, 16284 * MIB));
    assert_eq!(
        (a.utilization, a.temperature_c, a.power_watts),
        (None, None, None),
        "readings the GPU does not give are None"
    );

    // parent (GPU 1 by its environment) ─ child (inherits it); the child
    // is a list, so sh does not exec sleep in its place.
    let parent = spawn_group(
        &format!("sh -c 'sleep 300; : {mark}-child' & wait"),
        &format!("{mark}-parent"),
        Some("1,0"),
    );
    let unset = spawn_group("sleep 300; :", &format!("{mark}-zero"), None);
    let uuid = spawn_group("sleep 300; :", &format!("{mark}-zero"), Some("GPU-5a1b"));
    let child = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = children_of(parent.pid()).first() {
                break *pid;
            }
            assert!(Instant::now() < deadline, "the parent's sh never started");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mine = [parent.pid(), child, unset.pid(), uuid.pid()];
    // Exact totals too: between fork and exec a process still has its
    // parent's command line, and the fake counts what it sees.
    let busy = wait_snapshot(&gpus, "the four processes", |s| {
        mine.iter()
            .all(|pid| s.processes.iter().any(|p| p.pid == *pid))
            && s.processes.len() == 4
            && s.gpu(0).map(|g| g.used_bytes) == Some(200 * MIB)
            && s.gpu(1).map(|g| g.used_bytes) == Some(400 * MIB)
    });
    let held = |pid: u32| -> Vec<(u32, u64)> {
        busy.processes
            .iter()
            .filter(|p| p.pid == pid)
            .map(|p| (p.gpu, p.used_bytes))
            .collect()
    };
    assert_eq!(held(parent.pid()), [(1, 100 * MIB)], "first entry of 1,0");
    assert_eq!(held(child), [(1, 300 * MIB)], "inherited");
    assert_eq!(held(unset.pid()), [(0, 50 * MIB)], "unset: GPU 0");
    assert_eq!(held(uuid.pid()), [(0, 50 * MIB)], "not a number: GPU 0");
    assert_eq!(busy.gpu(0).unwrap().used_bytes, 200 * MIB);
    assert_eq!(busy.gpu(1).unwrap().used_bytes, 400 * MIB);
    assert_eq!(busy.gpu(1).unwrap().free_bytes, 7792 * MIB);

    assert_eq!(busy.tree_usage(parent.pid()), [(1, 400 * MIB)]);
    assert_eq!(busy.tree_usage(child), [(1, 300 * MIB)]);
    assert_eq!(busy.tree_usage(unset.pid()), [(0, 50 * MIB)]);
    assert_eq!(
        busy.tree_usage(std::process::id()),
        [(0, 100 * MIB), (1, 400 * MIB)],
        "this process started them all"
    );

    // Gone processes leave the readings at the next sample.
    drop(parent);
    drop(unset);
    drop(uuid);
    // Exact totals again: a forked shell of these groups carries their
    // command line until it execs, so a reading may catch one that is
    // not among `mine` while the groups go down.
    let after = wait_snapshot(&gpus, "the processes gone", |s| {
        s.processes.iter().all(|p| !mine.contains(&p.pid))
            && s.gpu(0).map(|g| g.used_bytes) == Some(100 * MIB)
            && s.gpu(1).map(|g| g.used_bytes) == Some(0)
    });
    assert_eq!(after.gpu(0).unwrap().used_bytes, 100 * MIB);
    assert_eq!(after.gpu(1).unwrap().used_bytes, 0);
    assert!(after.tree_usage(std::process::id()).is_empty());
}

/// Polls `/admin/ps` until `name` shows `vram_bytes` of `bytes`; returns
/// its entry.
async fn wait_vram(d: &Daemon, name: &str, bytes: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = d.model(name).await;
        if m["vram_bytes"].as_u64() == Some(bytes) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never showed {bytes} bytes of GPU memory: {m}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Real llama-server children placed by the fake GPUs' memory: the
/// fullest GPU a model fits on, with CUDA_VISIBLE_DEVICES set to it (the
/// fake charges the child to that GPU); a model declared smaller than it
/// measures is warned about with both numbers; `gpus = [0]` evicts the
/// idle model there rather than going elsewhere; one that can never fit
/// fails at once with the numbers; the figures reach ps, /metrics,
/// Ollama's /api/ps, the request rows and the stop event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_are_placed_evicted_and_refused_by_measured_gpu_memory() {
    let fake = fake_nvml_dir().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mark = marker("place");
    let (x, y, z, huge) = (
        format!("{mark}-x"),
        format!("{mark}-y"),
        format!("{mark}-z"),
        format!("{mark}-huge"),
    );
    write_state(
        &state,
        &format!(
            "gpu 0 Fake-A total_mib=4000 used_mib=0 util=50\n\
             gpu 1 Fake-B total_mib=4000 used_mib=0 util=10\n\
             proc 2500 --alias {x} \n\
             proc 2500 --alias {y} \n\
             proc 3000 --alias {z} \n"
        ),
    );
    let d = Daemon::start_env(
        &format!(
            "[gpu]\nsample_interval = \"200ms\"\n\
             [scheduler]\nmax_loaded = 4\nvram_reserve_mb = 500\n\
             [history]\nbatch_window = \"10ms\"\n{}{}{}{}",
            tiny_model_table(&x, "vram_mb = 2000"),
            tiny_model_table(&y, "vram_mb = 2500"),
            tiny_model_table(&z, "vram_mb = 3000\ngpus = [0]"),
            tiny_model_table(&huge, "vram_mb = 5000"),
        ),
        &[
            ("LD_LIBRARY_PATH", &fake),
            ("FAKE_NVML_STATE", state.to_str().unwrap()),
        ],
    );
    // The trailing space in the rules keeps "-x " from matching "-xy".
    assert_eq!(chat_status(&d.addr, &x).await, StatusCode::OK);
    let m = wait_vram(&d, &x, 2500 * MIB).await;
    assert_eq!(m["gpu"], 0, "both GPUs equally free: the first: {m}");
    assert_eq!(m["vram_need_source"], "declared");
    let warned: Vec<String> = d
        .log_text()
        .lines()
        .filter(|l| l.contains("more GPU memory than its vram_mb"))
        .map(String::from)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].contains("\"measured_mib\":2500") && warned[0].contains("\"vram_mb\":2000"),
        "{warned:?}"
    );

    // 4000 - 500 reserved - 2500 leaves 1000 on GPU 0: y goes on GPU 1.
    assert_eq!(chat_status(&d.addr, &y).await, StatusCode::OK);
    assert_eq!(wait_vram(&d, &y, 2500 * MIB).await["gpu"], 1);

    // z may only use GPU 0: x, idle, is evicted for it; y stays.
    assert_eq!(chat_status(&d.addr, &z).await, StatusCode::OK);
    assert_eq!(wait_vram(&d, &z, 3000 * MIB).await["gpu"], 0);
    assert_eq!(d.model(&x).await["state"], "stopped");
    assert_eq!(d.model(&y).await["state"], "ready");

    // 5000 MiB fits on neither 4000 MiB GPU: refused at once, with why.
    let began = Instant::now();
    let (status, body) = request(
        &d.addr,
        hyper::Method::POST,
        "/v1/chat/completions",
        Some(chat(&huge, 1, false).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(body["error"]["code"], "insufficient_gpu_memory", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs 5000 MiB of GPU memory")
            && message.contains("GPU 0: 4000 MiB total, 500 MiB reserved"),
        "{message}"
    );
    assert_eq!(d.model(&huge).await["starts"], 0);

    let text = wait_metrics(
        &d,
        &[
            format!(
                "claracore_model_vram_bytes{{model=\"{z}\",gpu=\"0\"}} {}",
                3000 * MIB
            ),
            format!(
                "claracore_model_vram_bytes{{model=\"{y}\",gpu=\"1\"}} {}",
                2500 * MIB
            ),
            format!("claracore_model_vram_bytes{{model=\"{x}\",gpu=\"0\"}} 0"),
        ],
    )
    .await;
    assert!(
        text.contains("claracore_queue_wait_seconds_bucket"),
        "{text}"
    );

    let (_, ollama_ps) = d.get("/api/ps").await;
    let entry = ollama_ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == format!("{y}:latest"))
        .cloned()
        .unwrap_or_else(|| panic!("{y} not in {ollama_ps}"));
    assert_eq!(entry["size_vram"], 2500 * MIB, "{entry}");

    // The rows: z's request ran on GPU 0, which held x's 2500 MiB when it
    // was leased (before z had allocated) at the earliest.
    let rows = d.wait_rows(4, Duration::from_secs(10)).await;
    let row = rows.iter().find(|r| r["model"] == z).unwrap();
    assert_eq!(row["gpu"], 0, "{row}");
    assert!(row["gpu_mem_before_bytes"].as_u64().is_some(), "{row}");
    assert!(row["gpu_mem_after_bytes"].as_u64().is_some(), "{row}");
    assert_eq!(row["gpu_utilization"], 0.5, "{row}");
    assert!(row["queue_wait_ms"].as_f64().unwrap() > 0.0, "{row}");
    let refused = rows.iter().find(|r| r["model"] == huge).unwrap();
    assert_eq!(refused["outcome"], "rejected", "{refused}");

    // x's stop event holds its run's peak: what it learns to need.
    let db = rusqlite::Connection::open_with_flags(
        d.dir.path().join("state/history.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (gpu, peak): (i64, i64) = loop {
        let found = db.query_row(
            "SELECT gpu, vram_bytes FROM model_events WHERE model = ?1 AND event = 'stopped'",
            [&x],
            |r| Ok((r.get(0)?, r.get(1)?)),
        );
        match found {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no stop event for {x}: {e}"),
        }
    };
    assert_eq!((gpu, peak as u64), (0, 2500 * MIB));
}
