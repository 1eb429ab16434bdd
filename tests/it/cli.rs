//! The binary's command line: config validation, exit codes, client
//! commands.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use hyper::StatusCode;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn example_config() -> String {
    format!("{}/systemd/config.example.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_example_config_is_valid() {
    let out = run(&["check-config", &example_config()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 models, 2 listeners)"));
    // --strict also wants the model files, which the example only names.
    let out = run(&["check-config", "--strict", &example_config()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("models.tiny.model"));
}

#[test]
fn bad_config_at_start_exits_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    write_file(
        &path,
        "listen = [\"127.0.0.1:0\"]\n\n[scheduler]\nidle_tll = \"5m\"\n",
    );
    for args in [vec!["serve", "--config"], vec!["check-config"]] {
        let mut args: Vec<&str> = args;
        let p = path.display().to_string();
        args.push(&p);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:4:1:", path.display())), "{err}");
        assert!(err.contains("idle_tll"), "{err}");
    }
}

#[test]
fn a_missing_config_file_exits_78() {
    let out = run(&["serve", "--config", "/nonexistent/claracore.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/claracore.toml"));
}

#[test]
fn a_file_in_the_unix_socket_path_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    write_file(&sock, "not a socket");
    let cfg = dir.path().join("c.toml");
    write_file(
        &cfg,
        &format!(
            "listen = [\"unix:{}\"]\nstate_dir = \"{}/state\"\n",
            sock.display(),
            dir.path().display()
        ),
    );
    let out = run(&["serve", "--config", &cfg.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a file that is not a socket is in the way")
    );
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

#[test]
fn usage_errors_exit_2() {
    let out = run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: claracore"));
    assert!(run(&["version"]).status.success());
}

// Before clap every command accepted every flag: `ps --strict` ran ps.
#[test]
fn each_command_takes_only_its_own_flags_and_arguments() {
    for (args, named) in [
        (&["ps", "--strict"][..], "--strict"),
        (&["stop"], "MODEL"),
        (&["history", "--limit", "0"], "--limit"),
        (&["history", "--outcome", "fine"], "--outcome"),
        (&["serve", "--log-target", "syslog"], "--log-target"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{args:?}: {err}");
    }
    let out = run(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    let out = run(&["history", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--outcome"));
}

#[test]
fn client_commands_take_the_host_from_claracore_host_unless_given() {
    let cli = |args: &[&str], host: &str| {
        Command::new(BIN)
            .args(args)
            .env("CLARACORE_HOST", host)
            .output()
            .unwrap()
    };
    let out = cli(&["ps"], "unix:/nonexistent/claracore.sock");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot reach claracore at unix:/nonexistent/claracore.sock"));
    let out = cli(&["stop", "tiny", "--host", "http://127.0.0.1:1"], "unix:/x");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at http://127.0.0.1:1"));
    let out = cli(&["list"], "ftp://x");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--host"));
}

#[test]
fn completions_and_man_pages_are_generated_from_the_commands() {
    let commands = [
        "serve",
        "check-config",
        "version",
        "run",
        "ps",
        "list",
        "stop",
        "history",
        "stats",
        "backup",
        "restore",
    ];
    let out = run(&["generate", "completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    for c in commands.iter().chain(&["--outcome", "--log-target"]) {
        assert!(script.contains(c), "bash completion lacks {c}");
    }
    for shell in ["zsh", "fish"] {
        let out = run(&["generate", "completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 100, "{shell}");
    }

    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = run(&["generate", "man", &man.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(man.join("claracore.1")).unwrap();
    // roff's apostrophe preamble (.ie/.el) precedes the title.
    let title = page
        .lines()
        .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "));
    assert!(
        title.is_some_and(|l| l.starts_with(".TH claracore 1")),
        "{page}"
    );
    for c in commands {
        let sub = std::fs::read_to_string(man.join(format!("claracore-{c}.1"))).unwrap();
        assert!(sub.contains(".TH claracore-"), "{c}");
    }
    assert!(!man.join("claracore-generate.1").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn ps_list_and_stop_talk_to_the_daemon() {
    let d = Daemon::start(&format!(
        "{}{}",
        fake_model_table("f", &[], ""),
        fake_model_table("g", &[], "")
    ));
    let out = d.cli(&["list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("NAME") && text.contains("f ") && text.contains("g "),
        "{text}"
    );

    assert_eq!(
        d.post("/v1/chat/completions", &chat("f", 1, false)).await.0,
        StatusCode::OK
    );
    let pid = d.model("f").await["pid"].as_u64().unwrap();
    let text = String::from_utf8_lossy(&d.cli(&["ps"]).stdout).into_owned();
    assert!(
        text.contains(&pid.to_string()) && text.contains("ready"),
        "{text}"
    );
    assert!(
        !text.contains("\ng "),
        "ps shows loaded models only: {text}"
    );

    let out = d.cli(&["stop", "f"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "f: stopping\n");
    d.wait_state("f", "stopped", Duration::from_secs(3)).await;
    let out = d.cli(&["stop", "g"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "g: not running\n");
    let out = d.cli(&["stop", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    let out = Command::new(BIN)
        .args(["ps", "--host", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot reach claracore at http://127.0.0.1:1"));
}
