//! The peers an operator would run instead of claracore, started the way
//! their docs say, on loopback, with everything that reaches the network
//! off: Ollama (`ollama serve` with the tiny GGUF imported offline by
//! `ollama create` from a Modelfile), installed by
//! `tests/tools/install-peers.sh`. And a counter of the model processes a
//! daemon starts, read from `/proc` by parent pid, the same way for every
//! contender.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::probe;
use crate::procs::{self, Proc};

pub struct Ollama {
    pub proc: Proc,
    pub port: u16,
    pub log: PathBuf,
}

/// The same GGUF under a second name with other bytes: Ollama keys its
/// runners by blob, so two names of one file would share one runner and
/// never swap. Only `general.name`'s last character differs (same length,
/// so every offset stays).
pub fn second_gguf(model: &Path, out: &Path) {
    let mut bytes = std::fs::read(model).expect("read the tiny GGUF");
    let name = b"claracore-tiny-llama-seed";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tiny GGUF's general.name (make-tiny-model.py)");
    let last = at + name.len();
    bytes[last] = if bytes[last] == b'9' { b'8' } else { b'9' };
    std::fs::write(out, bytes).expect("write the second GGUF");
}

/// Starts `ollama serve` in `dir` on `port` and creates the models `tiny`
/// and `tiny2` from `model` (and a copy with other bytes), each with
/// `num_ctx 512`, `num_thread 1` (llama-server's `-c 512 -t 1` here).
/// `OLLAMA_MAX_LOADED_MODELS=1` (claracore's `max_loaded = 1`),
/// `OLLAMA_NUM_PARALLEL=4` (llama-server's default slots),
/// `OLLAMA_KEEP_ALIVE=-1` (claracore's `idle_ttl = "0"`: never unload).
pub fn start_ollama(bin: &Path, dir: &Path, model: &Path, port: u16) -> Ollama {
    std::fs::create_dir_all(dir.join("home")).unwrap();
    std::fs::create_dir_all(dir.join("models")).unwrap();
    let log = dir.join("ollama.log");
    let mut cmd = ollama_cmd(bin, dir, port);
    cmd.arg("serve");
    let mut proc = Proc::spawn("ollama", &mut cmd, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe(port, "/") != Some(200) {
        assert!(
            proc.alive() && Instant::now() < deadline,
            "ollama serve did not answer on port {port}; log {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::copy(model, dir.join("tiny.gguf")).unwrap();
    second_gguf(model, &dir.join("tiny2.gguf"));
    for (name, file) in [("tiny", "tiny.gguf"), ("tiny2", "tiny2.gguf")] {
        let modelfile = dir.join(format!("{name}.Modelfile"));
        std::fs::write(
            &modelfile,
            format!("FROM ./{file}\nPARAMETER num_ctx 512\nPARAMETER num_thread 1\n"),
        )
        .unwrap();
        let mut create = ollama_cmd(bin, dir, port);
        create
            .current_dir(dir)
            .args(["create", name, "-f"])
            .arg(&modelfile);
        let out = procs::run("ollama create", &mut create);
        assert!(
            out.status.success(),
            "ollama create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ollama { proc, port, log }
}

/// `ollama` with the bench's environment: its own home and model store,
/// loopback only, cloud features off.
pub fn ollama_cmd(bin: &Path, dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.join("home"))
        .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
        .env("OLLAMA_MODELS", dir.join("models"))
        .env("OLLAMA_NO_CLOUD", "1")
        .env("OLLAMA_MAX_LOADED_MODELS", "1")
        .env("OLLAMA_NUM_PARALLEL", "4")
        .env("OLLAMA_KEEP_ALIVE", "-1")
        .env("OLLAMA_MAX_QUEUE", "2048")
        .env("OLLAMA_NOPRUNE", "1");
    cmd
}

/// Lines of Ollama's log that say it started a model runner.
pub fn runner_starts_logged(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        // "starting llama server" up to v0.6, "starting runner" later.
        .filter(|l| {
            l.contains("msg=\"starting runner\"") || l.contains("msg=\"starting llama server\"")
        })
        .count()
}

/// Counts the model processes `parent` starts while it runs: every
/// process whose parent is `parent` and whose command line contains one of
/// `needles`, seen in a scan of `/proc` every 5 ms, told apart by (pid,
/// start time). A model process lives at least its load time (tens of
/// milliseconds for the tiny model), so none is missed.
pub struct SpawnCounter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl SpawnCounter {
    pub fn start(parent: u32, needles: Vec<String>) -> SpawnCounter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The model processes already running (the resident one) are not
        // starts.
        let before: HashSet<(u32, u64)> = children(parent)
            .into_iter()
            .filter_map(|pid| Some((pid, start_time(pid)?)))
            .collect();
        let thread = std::thread::spawn(move || {
            let mut seen = before;
            let already = seen.len();
            while !flag.load(Ordering::SeqCst) {
                for pid in children(parent) {
                    let Some(start) = start_time(pid) else {
                        continue;
                    };
                    if seen.contains(&(pid, start)) {
                        continue;
                    }
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                        .unwrap_or_default();
                    if needles.iter().any(|n| cmdline.contains(n.as_str())) {
                        seen.insert((pid, start));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen.len() - already
        });
        SpawnCounter { stop, thread }
    }

    /// Stops counting; the model processes seen.
    pub fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0)
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the ")" that ends comm: state(3) ppid(4) … starttime(22).
    Some(
        text[text.rfind(')')? + 2..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Live processes whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|pp| pp == parent)
        })
        .collect()
}
