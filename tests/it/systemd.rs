//! The systemd protocol on the host, for fast feedback: a real
//! NOTIFY_SOCKET listener, real signals, `systemd-socket-activate` for
//! inherited sockets, /proc for capabilities. The same behaviours run under
//! a real PID-1 systemd in tests/systemd/run-nspawn.sh.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use hyper::StatusCode;
use nix::sys::signal::Signal;

/// The `listen` of a [`Notified`] daemon's config: it binds itself, so
/// READY=1 can be checked against its own listener; admin calls go to its
/// unix socket in `dir`.
fn listen(dir: &Path) -> String {
    format!(
        "listen = [\"127.0.0.1:0\", \"unix:{0}/claracore.sock\"]\nstate_dir = \"{0}/state\"\n",
        dir.display()
    )
}

/// A daemon started with a NOTIFY_SOCKET we listen on.
struct Notified {
    child: Child,
    /// The port it bound, read from /proc on first use (see [`Notified::addr`]).
    addr: std::cell::OnceCell<String>,
    config: PathBuf,
    notify: UnixDatagram,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notified {
    fn start(models: &str, env: &[(&str, &str)]) -> Notified {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        write_file(&config, &format!("{}{models}", listen(dir.path())));
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let log = dir.path().join("log");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Notified {
            child,
            addr: std::cell::OnceCell::new(),
            config,
            notify,
            log,
            _dir: dir,
        }
    }

    /// Its unix socket (the local principal: admin).
    fn socket(&self) -> PathBuf {
        self._dir.path().join("claracore.sock")
    }

    /// The `listen` line its config starts with.
    fn listen(&self) -> String {
        listen(self._dir.path())
    }

    /// The address it listens on. It must be listening by then: the first
    /// call comes after READY=1.
    fn addr(&self) -> &str {
        self.addr.get_or_init(|| {
            tcp_listener_of(self.child.id())
                .unwrap_or_else(|| panic!("not listening on TCP\n{}", self.log_text()))
        })
    }

    /// The next datagram's lines.
    fn recv(&self) -> Vec<String> {
        let mut buf = vec![0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification: {e}\n{}", self.log_text()));
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Receives until a datagram has a line starting with `prefix`; returns
    /// that datagram.
    fn recv_until(&self, prefix: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let msg = self.recv();
            if msg.iter().any(|l| l.starts_with(prefix)) {
                return msg;
            }
            assert!(Instant::now() < deadline, "no {prefix} within 10s");
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_once_listening_and_status_says_what_runs() {
    let d = Notified::start(&fake_model_table("f", &[], ""), &[]);
    let msg = d.recv_until("READY=1");
    // The listener was live when READY=1 was sent.
    std::net::TcpStream::connect(d.addr()).expect("READY=1 before the listener was live");
    assert!(msg.contains(&"READY=1".to_string()));
    let status = d.recv_until("STATUS=");
    assert_eq!(status, ["STATUS=0/1 models loaded; 0 requests in flight"]);

    let code = chat_status(d.addr(), "f").await;
    assert_eq!(code, StatusCode::OK);
    let status = d.recv_until("STATUS=1/1");
    assert_eq!(
        status,
        ["STATUS=1/1 models loaded (f); 0 requests in flight"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_models_and_a_broken_file_keeps_the_old_config() {
    let d = Notified::start(&fake_model_table("f", &[], ""), &[]);
    d.recv_until("READY=1");
    let code = chat_status(d.addr(), "f").await;
    assert_eq!(code, StatusCode::OK);
    let (_, ps) = request_unix(&d.socket(), hyper::Method::GET, "/admin/ps", None).await;
    let f_pid = ps["models"][0]["pid"].as_u64().unwrap() as u32;

    // f removed (its child is stopped), g added.
    write_file(
        &d.config,
        &format!("{}{}", d.listen(), fake_model_table("g", &[], "")),
    );
    d.signal(Signal::SIGHUP);
    let reloading = d.recv_until("RELOADING=1");
    let usec = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING");
    assert!(usec.parse::<u64>().unwrap() > 0);
    let ready = d.recv_until("READY=1");
    // f may still be stopping at this instant; STATUS= says so truthfully.
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("models loaded")),
        "{ready:?}"
    );
    let (_, models) = request(d.addr(), hyper::Method::GET, "/v1/models", None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["g"]);
    assert!(
        wait_gone(&[f_pid], Duration::from_secs(3)),
        "removed model's child stopped"
    );
    let code = chat_status(d.addr(), "g").await;
    assert_eq!(code, StatusCode::OK);

    // A broken file: still READY, old config in force, STATUS says why.
    write_file(
        &d.config,
        &format!(
            "{}{}bogus_key = 1\n",
            d.listen(),
            fake_model_table("h", &[], "")
        ),
    );
    d.signal(Signal::SIGHUP);
    d.recv_until("RELOADING=1");
    let ready = d.recv_until("READY=1");
    let status = ready.iter().find(|l| l.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("reload failed") && status.contains("bogus_key"),
        "{status}"
    );
    assert!(
        status.contains(&format!("{}:", d.config.display())),
        "names the file: {status}"
    );
    let (_, models) = request(d.addr(), hyper::Method::GET, "/v1/models", None).await;
    assert_eq!(models["data"][0]["id"], "g");
    assert!(d.log_text().contains("reload failed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_restarts_a_changed_model_once_idle() {
    let d = Notified::start(&fake_model_table("f", &[], ""), &[]);
    d.recv_until("READY=1");
    let code = chat_status(d.addr(), "f").await;
    assert_eq!(code, StatusCode::OK);
    let (_, ps) = request_unix(&d.socket(), hyper::Method::GET, "/admin/ps", None).await;
    let old_pid = ps["models"][0]["pid"].as_u64().unwrap() as u32;

    write_file(
        &d.config,
        &format!(
            "{}{}",
            d.listen(),
            fake_model_table("f", &["--chunk-delay-ms", "1"], "aliases = [\"eff\"]")
        ),
    );
    d.signal(Signal::SIGHUP);
    d.recv_until("READY=1");
    assert!(
        wait_gone(&[old_pid], Duration::from_secs(3)),
        "changed model's old child stopped"
    );
    let code = chat_status(d.addr(), "eff").await;
    assert_eq!(
        code,
        StatusCode::OK,
        "new alias works and the model restarts with the new argv"
    );
    let (_, ps) = request_unix(&d.socket(), hyper::Method::GET, "/admin/ps", None).await;
    let pid = ps["models"][0]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("--chunk-delay-ms"), "{cmdline:?}");
}

#[test]
fn watchdog_pings_at_half_the_interval_and_stop_when_the_daemon_is_frozen() {
    let d = Notified::start(
        &fake_model_table("f", &[], ""),
        &[("WATCHDOG_USEC", "400000")],
    );
    d.recv_until("READY=1");
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1100) {
        if d.recv().contains(&"WATCHDOG=1".to_string()) {
            pings += 1;
        }
    }
    assert!(
        (4..=8).contains(&pings),
        "{pings} pings in 1.1s at a 200ms interval"
    );

    d.signal(Signal::SIGSTOP);
    d.notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while d.notify.recv(&mut [0u8; 512]).is_ok() {} // drain what was sent before the stop
    d.notify
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    assert!(
        d.notify.recv(&mut [0u8; 512]).is_err(),
        "a frozen daemon must not ping"
    );
    d.signal(Signal::SIGCONT);
    d.notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    d.recv_until("WATCHDOG=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_stopping_and_extends_the_timeout_while_draining() {
    let mut d = Notified::start(
        &fake_model_table("f", &["--chunk-delay-ms", "100"], ""),
        &[],
    );
    d.recv_until("READY=1");
    let addr = d.addr().to_string();
    let streamer =
        tokio::spawn(
            async move { stream(&addr, "/v1/chat/completions", &chat("f", 12, true)).await },
        );
    // The stream's start made the model ready: its connection is open.
    wait_until_async(Duration::from_secs(5), "the streamed model ready", || {
        d.log_text().contains("child ready")
    })
    .await;
    d.signal(Signal::SIGTERM);
    let stopping = d.recv_until("STOPPING=1");
    assert!(
        stopping
            .iter()
            .any(|l| l == "STATUS=stopping: draining 1 connections"),
        "{stopping:?}"
    );
    let extend = d.recv_until("EXTEND_TIMEOUT_USEC=");
    let usec: u64 = extend[0]
        .strip_prefix("EXTEND_TIMEOUT_USEC=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        usec > 30_000_000,
        "covers shutdown_timeout + stop_grace: {usec}"
    );
    let s = streamer.await.unwrap();
    assert_eq!(s.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
}

fn socket_activate(args: &[&str], config: &Path, log: &Path) -> Child {
    Command::new("systemd-socket-activate")
        .args(args)
        .arg(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is needed")
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_uses_the_named_inherited_sockets_instead_of_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (config_port, http_port) = (free_port(), free_port());
    let sock = dir.path().join("local.sock");
    let config = dir.path().join("c.toml");
    write_file(
        &config,
        &format!(
            "listen = [\"127.0.0.1:{config_port}\"]\nstate_dir = \"{}/state\"\n{}",
            dir.path().display(),
            fake_model_table("f", &[], "")
        ),
    );
    let log = dir.path().join("log");
    let http = format!("127.0.0.1:{http_port}");
    let child = socket_activate(
        &[
            "-l",
            &http,
            "-l",
            &sock.display().to_string(),
            "--fdname=http:local",
        ],
        &config,
        &log,
    );
    let mut child = KillOnDrop(child);
    // Like a socket unit, systemd-socket-activate starts the daemon on the
    // first connection; this request is queued on the socket until then.
    wait_listening(&http, Some(&log));
    let code = chat_status(&http, "f").await;
    assert_eq!(code, StatusCode::OK);
    let out = Command::new(BIN)
        .args(["list", "--host", &format!("unix:{}", sock.display())])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ready"),
        "{out:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", config_port)).is_err(),
        "config's address must not be bound"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("\"fd_name\":\"http\"") && text.contains("\"fd_name\":\"local\""),
        "{text}"
    );
    // The child did not inherit LISTEN_* (checked through its environ).
    let (_, ps) = request_unix(&sock, hyper::Method::GET, "/admin/ps", None).await;
    let pid = ps["models"][0]["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("LISTEN_FDS="));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert!(
        sock.exists(),
        "an inherited socket's file belongs to the socket unit, not to us"
    );
}

#[test]
fn unnamed_inherited_sockets_are_http() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    write_file(
        &config,
        &format!(
            "listen = [\"127.0.0.1:1\"]\nstate_dir = \"{}/state\"\n",
            dir.path().display()
        ),
    );
    let log = dir.path().join("log");
    let http = format!("127.0.0.1:{}", free_port());
    let child = socket_activate(&["-l", &http], &config, &log);
    let mut child = KillOnDrop(child);
    wait_listening(&http, Some(&log));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, _) = rt.block_on(request(&http, hyper::Method::GET, "/health", None));
    let _ = child.0.kill();
    let _ = child.0.wait();
    assert_eq!(code, StatusCode::OK);
    let text = std::fs::read_to_string(&log).unwrap();
    // systemd-socket-activate leaves LISTEN_FDNAMES unset here, as systemd
    // does for sockets without FileDescriptorName= ("unknown"): http.
    assert!(
        text.contains("socket-activated listener") && text.contains("\"fd_name\":\"http\""),
        "{text}"
    );
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_are_dropped_for_the_daemon_and_its_children() {
    let held = field(&proc_status(std::process::id()), "CapEff:").to_string();
    if held == "0000000000000000" {
        // The property only means something when started privileged; CI
        // runs as root, so this branch is for unprivileged developer runs.
        eprintln!("test process holds no capabilities; nothing to drop");
        return;
    }
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
        StatusCode::OK
    );
    let child = d.model("f").await["pid"].as_u64().unwrap() as u32;
    for pid in [d.pid(), child] {
        let s = proc_status(pid);
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&s, set), "0000000000000000", "pid {pid} {set}");
        }
        assert_eq!(field(&s, "NoNewPrivs:"), "1", "pid {pid}");
    }
    assert!(d.log_text().contains("dropped all capabilities"));
    let adj = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(
        adj(child).trim(),
        "500",
        "the OOM killer prefers model processes"
    );
    assert_eq!(adj(d.pid()).trim(), "0");
    assert!(d.log_text().contains("cap_sys_admin") || d.log_text().contains("CAP_SYS_ADMIN"));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_json_lines_with_model_fields_when_not_a_terminal() {
    let d = Daemon::start(&fake_model_table("f", &[], ""));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
        StatusCode::OK
    );
    let text = d.log_text();
    let mut child_lines = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["target"] == "claracore::child" {
            assert_eq!(v["model"], "f", "{line}");
            assert!(v["child_pid"].is_u64(), "{line}");
            child_lines += 1;
        }
    }
    assert!(child_lines >= 2, "the child's output is in the log: {text}");
}
