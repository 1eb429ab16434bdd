//! `claracore pull` against a loopback fake hub (tests/tools/fake_hub.py):
//! the documented endpoints, a redirect to a second "CDN" host, Range,
//! a gated repository, cut connections, a lying listing; then the pulled
//! file served by the real llama-server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const TOKEN: &str = "hf_test_token_4242";

struct Hub {
    _proc: KillOnDrop,
    url: String,
    root: tempfile::TempDir,
}

impl Hub {
    /// A hub serving `user/tiny-GGUF` (the tiny model as Q4_K_M and Q8_0)
    /// and a gated copy, `user/gated-GGUF`.
    fn start() -> Hub {
        let root = tempfile::tempdir().unwrap();
        let model = std::fs::read(tiny_model()).unwrap();
        for (repo, file) in [
            ("user/tiny-GGUF", "tiny-Q4_K_M.gguf"),
            ("user/tiny-GGUF", "tiny-Q8_0.gguf"),
            ("user/gated-GGUF", "gated-Q4_K_M.gguf"),
        ] {
            let dir = root.path().join(repo);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), &model).unwrap();
        }
        std::fs::write(root.path().join("user/gated-GGUF/_gated"), b"").unwrap();
        let ready = root.path().join("ready");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/fake_hub.py");
        let child = Command::new(python())
            .arg(script)
            .args(["--root", root.path().to_str().unwrap(), "--token", TOKEN])
            .args(["--ready-file", ready.to_str().unwrap()])
            .spawn()
            .unwrap();
        let proc = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the fake hub did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&ready).unwrap();
        let url = text.split_whitespace().next().unwrap().to_string();
        Hub {
            _proc: proc,
            url,
            root,
        }
    }

    fn repo(&self, repo: &str) -> PathBuf {
        let dir = self.root.path().join(repo);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn stats(&self) -> Value {
        http_json("GET", &format!("{}/_stats", self.url), None)
    }

    fn control(&self, body: Value) {
        http_json("POST", &format!("{}/_control", self.url), Some(body));
    }

    fn pull(&self, dir: &Path, args: &[&str], token: Option<&str>) -> Output {
        self.pull_command(dir, args, token).output().unwrap()
    }

    fn pull_command(&self, dir: &Path, args: &[&str], token: Option<&str>) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("pull")
            .args(args)
            .args(["--dir", dir.to_str().unwrap()])
            .env("HF_ENDPOINT", &self.url)
            .env_remove("HF_TOKEN")
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(t) = token {
            cmd.env("HF_TOKEN", t);
        }
        cmd
    }
}

/// A plain HTTP/1.1 exchange with the fake hub (JSON both ways).
fn http_json(method: &str, url: &str, body: Option<Value>) -> Value {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (_, json) = text.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(json).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn a_pulled_model_is_verified_placed_with_its_source_and_served() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(
        dir.path(),
        &["hf.co/user/tiny-GGUF:Q8_0", "--json"],
        Some(TOKEN),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let pulled: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pulled["name"], "tiny-q8_0");
    assert_eq!(pulled["repo"], "user/tiny-GGUF");
    assert_eq!(pulled["revision"], format!("c0ffee{}", "0".repeat(34)));
    let file = dir.path().join("tiny-Q8_0.gguf");
    assert_eq!(sha256_hex(&file), sha256_hex(Path::new(&tiny_model())));
    let sidecar: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".tiny-Q8_0.gguf.source")).unwrap())
            .unwrap();
    assert_eq!(sidecar["file"], "tiny-Q8_0.gguf");
    assert_eq!(sidecar["sha256"], sha256_hex(&file));
    assert!(!dir.path().join("tiny-Q8_0.gguf.part").exists());
    // The token went to the hub and never to the CDN it redirected to.
    assert_eq!(hub.stats()["cdn_auth_seen"], 0);

    // The folder scan names it as the daemon will, and the file serves.
    let scan = claracore::sources::folder::scan(&[dir.path().to_path_buf()]);
    assert_eq!(scan.models[0].name, "tiny-q8_0");
    assert_eq!(scan.models[0].source.kind(), "pulled");
    let table = tiny_model_table("pulled", "").replace(&tiny_model(), file.to_str().unwrap());
    let d = Daemon::start(&table);
    let (status, body) = d
        .post("/v1/chat/completions", &chat("pulled", 4, false))
        .await;
    assert_eq!(status, 200, "{body}");

    // Pulled again: already in place, nothing is downloaded.
    let before = hub.stats()["cdn_requests"].as_u64().unwrap();
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q8_0"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hub.stats()["cdn_requests"].as_u64().unwrap(), before);
}

#[test]
fn without_a_quant_q4_k_m_is_chosen() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("tiny-Q4_K_M.gguf").is_file());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pulled tiny-q4_k_m ("));
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let hub = Hub::start();
    let size = std::fs::metadata(tiny_model()).unwrap().len();
    hub.control(json!({"cut_after": size / 2, "cut_times": 2}));
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q4_K_M"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    let ranges = hub.stats()["ranges"].clone();
    assert_eq!(ranges[0], format!("bytes={}-", size / 2), "{ranges}");
    assert_eq!(
        sha256_hex(&dir.path().join("tiny-Q4_K_M.gguf")),
        sha256_hex(Path::new(&tiny_model()))
    );
}

#[test]
fn a_killed_pull_resumes_from_its_part_file() {
    let hub = Hub::start();
    let size = std::fs::metadata(tiny_model()).unwrap().len();
    // Slow enough to be caught mid-file.
    hub.control(json!({"rate": (size / 4).max(1 << 16)}));
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("tiny-Q4_K_M.gguf.part");
    let mut first = KillOnDrop(
        hub.pull_command(dir.path(), &["hf.co/user/tiny-GGUF"], None)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "no bytes arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.0.wait().unwrap();
    let had = std::fs::metadata(&part).unwrap().len();
    assert!(had > 0 && had < size, "{had} of {size}");
    hub.control(json!({"rate": 0}));
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let ranges = hub.stats()["ranges"].clone();
    let from: u64 = ranges[0].as_str().unwrap()[6..]
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from <= had, "{ranges} after {had}");
    assert!(!part.exists());
}

#[test]
fn two_pulls_of_one_file_share_one_download() {
    let hub = Hub::start();
    let size = std::fs::metadata(tiny_model()).unwrap().len();
    hub.control(json!({"rate": (size * 2).max(1 << 16)}));
    let dir = tempfile::tempdir().unwrap();
    let args = ["hf.co/user/tiny-GGUF:Q8_0"];
    let a = hub.pull_command(dir.path(), &args, None).spawn().unwrap();
    let b = hub.pull_command(dir.path(), &args, None).spawn().unwrap();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(hub.stats()["cdn_requests"], 1);
}

#[test]
fn a_gated_repository_needs_a_token_and_says_how_to_give_one() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(dir.path(), &["hf.co/user/gated-GGUF"], None);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("refused access (401)") && e.contains("HF_TOKEN"),
        "{e}"
    );
    let out = hub.pull(dir.path(), &["hf.co/user/gated-GGUF"], Some("hf_wrong"));
    assert!(
        stderr(&out).contains("refused access (403)"),
        "{}",
        stderr(&out)
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let out = hub.pull(
        dir.path(),
        &[
            "hf.co/user/gated-GGUF",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hub.stats()["cdn_auth_seen"], 0);
}

#[test]
fn unknown_repositories_files_and_quants_are_named() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/nothing-here"], None));
    assert!(
        e.contains("repository user/nothing-here at revision main not found"),
        "{e}"
    );
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/tiny-GGUF/nope.gguf"], None));
    assert!(
        e.contains("the repository has no file \"nope.gguf\""),
        "{e}"
    );
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q2_K"], None));
    assert!(
        e.contains(
            "no file matches \"Q2_K\"; the repository has: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"
        ),
        "{e}"
    );
    std::fs::copy(
        tiny_model(),
        hub.repo("user/tiny-GGUF").join("other-Q8_0.gguf"),
    )
    .unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q8_0"], None));
    assert!(
        e.contains("\"Q8_0\" matches several models: other-Q8_0, tiny-Q8_0"),
        "{e}"
    );
    let e = stderr(&hub.pull(dir.path(), &["llama3"], None));
    assert!(e.contains("is not a model reference"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_hash_mismatch_deletes_the_part_and_names_both_hashes() {
    let hub = Hub::start();
    let repo = hub.repo("user/liar-GGUF");
    std::fs::copy(tiny_model(), repo.join("liar-Q4_K_M.gguf")).unwrap();
    let wrong = "ab".repeat(32);
    std::fs::write(
        repo.join("_lie.json"),
        json!({"liar-Q4_K_M.gguf": wrong}).to_string(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/liar-GGUF"], None));
    let real = sha256_hex(Path::new(&tiny_model()));
    assert!(
        e.contains(&format!("SHA-256 mismatch: expected {wrong}, got {real}")),
        "{e}"
    );
    assert!(!dir.path().join("liar-Q4_K_M.gguf").exists());
    assert!(!dir.path().join("liar-Q4_K_M.gguf.part").exists());
}

#[test]
fn traversal_names_links_and_non_gguf_files_are_refused() {
    let hub = Hub::start();
    let repo = hub.repo("user/evil-GGUF");
    let entry = json!([{"type": "file", "path": "../evil-Q4_K_M.gguf", "size": 1,
                        "lfs": {"oid": "00".repeat(32), "size": 1, "pointerSize": 1}}]);
    std::fs::write(repo.join("_extra.json"), entry.to_string()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/evil-GGUF"], None));
    assert!(
        e.contains("unsafe file name in the listing: \"../evil-Q4_K_M.gguf\""),
        "{e}"
    );

    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("tiny-Q8_0.gguf")).unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q8_0"], None));
    assert!(e.contains("tiny-Q8_0.gguf: is a symbolic link"), "{e}");
    std::os::unix::fs::symlink(&victim, dir.path().join("tiny-Q4_K_M.gguf.part")).unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q4_K_M"], None));
    assert!(
        e.contains("tiny-Q4_K_M.gguf.part: is a symbolic link"),
        "{e}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");

    let html = hub.repo("user/html-GGUF");
    std::fs::write(html.join("page-Q4_K_M.gguf"), b"<html>login</html>").unwrap();
    let e = stderr(&hub.pull(dir.path(), &["hf.co/user/html-GGUF"], None));
    assert!(e.contains("\"page-Q4_K_M.gguf\" is not a GGUF file"), "{e}");
    assert!(!dir.path().join("page-Q4_K_M.gguf").exists());
}

#[test]
fn a_url_pull_needs_its_sha256() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/user/tiny-GGUF/resolve/main/tiny-Q8_0.gguf", hub.url);
    let e = stderr(&hub.pull(dir.path(), &[&url], None));
    assert!(e.contains("a URL pull needs --sha256"), "{e}");
    let sha = sha256_hex(Path::new(&tiny_model()));
    let out = hub.pull(dir.path(), &[&url, "--sha256", &sha], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_hex(&dir.path().join("tiny-Q8_0.gguf")), sha);
}

#[test]
fn a_paged_listing_is_read_to_its_end() {
    let hub = Hub::start();
    hub.control(json!({"page_size": 1}));
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q8_0"], None);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_full_disk_is_refused_before_downloading() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            dir.path().to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let out = hub.pull(dir.path(), &["hf.co/user/tiny-GGUF:Q8_0"], None);
    let _ = Command::new("umount").arg(dir.path()).status();
    let e = stderr(&out);
    assert!(
        e.contains("not enough disk space") && e.contains("MiB free"),
        "{e}"
    );
    assert!(e.contains("the partial file is kept"), "{e}");
}
