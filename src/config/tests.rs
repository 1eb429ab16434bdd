use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::parallel_arg;
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("test.toml"), text)
}

fn err(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn queue_priority_and_gpu_keys_have_defaults_and_bounds() {
    let cfg = parse("[models.a]\nmodel = \"/a\"\n").unwrap();
    assert_eq!(cfg.scheduler.max_queue, DEFAULT_MAX_QUEUE);
    assert_eq!(
        cfg.scheduler.max_wait_before_swap,
        DEFAULT_MAX_WAIT_BEFORE_SWAP
    );
    assert_eq!(
        cfg.scheduler.vram_reserve_bytes,
        DEFAULT_VRAM_RESERVE_MB * MIB
    );
    let a = cfg.model("a").unwrap();
    assert_eq!((a.vram_bytes, &a.gpus, a.priority), (None, &None, 0));

    let cfg = parse(
        "[scheduler]\nmax_queue = 10\nmax_wait_before_swap = \"0s\"\nvram_reserve_mb = 0\n\
         [models.a]\nmodel = \"/a\"\nvram_mb = 6000\ngpus = [1, 0]\npriority = -5\n\
         [auth.keys.k]\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\"\n\
         scopes = [\"inference\"]\npriority = 100\n",
    )
    .unwrap();
    assert_eq!(cfg.scheduler.max_queue, 10);
    assert_eq!(cfg.scheduler.max_wait_before_swap, Duration::ZERO);
    assert_eq!(cfg.scheduler.vram_reserve_bytes, 0);
    let a = cfg.model("a").unwrap();
    assert_eq!(a.vram_bytes, Some(6000 * MIB));
    assert_eq!(a.gpus, Some(vec![1, 0]));
    assert_eq!(a.priority, -5);
    assert_eq!(cfg.auth.keys[0].priority, 100);

    for (text, says) in [
        (
            "[scheduler]\nmax_queue = 0\n",
            "2:13: scheduler.max_queue: must be between 1 and 1000000",
        ),
        (
            "[scheduler]\nvram_reserve_mb = -1\n",
            "2:19: scheduler.vram_reserve_mb: must be between 0 and",
        ),
        (
            "[scheduler]\nmax_wait_before_swap = \"soon\"\n",
            "scheduler.max_wait_before_swap",
        ),
        (
            "[models.a]\nmodel = \"/a\"\nvram_mb = 0\n",
            "3:11: models.a.vram_mb: must be between 1 and",
        ),
        (
            "[models.a]\nmodel = \"/a\"\ngpus = []\n",
            "3:8: models.a.gpus: name at least one GPU index",
        ),
        (
            "[models.a]\nmodel = \"/a\"\ngpus = [0, 64]\n",
            "3:12: models.a.gpus: 64 is not a GPU index (0 to 63)",
        ),
        (
            "[models.a]\nmodel = \"/a\"\ngpus = [1, 1]\n",
            "models.a.gpus: GPU 1 is listed twice",
        ),
        (
            "[models.a]\nmodel = \"/a\"\ngpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }\n",
            "models.a: give either `gpus` or env CUDA_VISIBLE_DEVICES, not both",
        ),
        (
            "[models.a]\nmodel = \"/a\"\npriority = 1001\n",
            "3:12: models.a.priority: must be between -1000 and 1000",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(says), "{text:?}: {e}");
    }
}

#[test]
fn issue_example_shape_parses() {
    let cfg = parse(
        r#"
listen = ["127.0.0.1:5800", "unix:/run/claracore/claracore.sock"]
llama_server = "llama-server"
state_dir = "/var/lib/claracore"

[scheduler]
max_loaded = 1
idle_ttl = "10m"
start_timeout = "5m"
stop_grace = "10s"
shutdown_timeout = "30s"

[models.tiny]
model = "/models/tiny.gguf"
args = ["-c", "512"]
aliases = ["tiny-chat"]
ttl = "5m"
group = "small"

[models.custom]
cmd = ["/opt/bin/server", "--port", "{port}"]
health = "/health"
"#,
    )
    .unwrap();
    assert_eq!(cfg.listen.len(), 2);
    assert_eq!(
        cfg.listen[1],
        ListenAddr::Unix("/run/claracore/claracore.sock".into())
    );
    let tiny = cfg.model("tiny-chat").unwrap();
    assert_eq!(tiny.name, "tiny");
    assert_eq!(tiny.ttl, Some(Duration::from_secs(300)));
    assert!(
        tiny.uses_socket(),
        "llama-server children listen on a unix socket"
    );
    assert_eq!(
        tiny.command(4242, Path::new("/run/cc/models.x/tiny-1.sock")),
        [
            "llama-server",
            "-m",
            "/models/tiny.gguf",
            "--host",
            "/run/cc/models.x/tiny-1.sock",
            "--port",
            "8080",
            "--threads-http",
            "34",
            "--alias",
            "tiny",
            "-c",
            "512"
        ]
    );
    let custom = cfg.model("custom").unwrap();
    assert!(!custom.uses_socket(), "only {{port}}: loopback TCP");
    assert_eq!(
        custom.command(7, Path::new("/unused.sock")),
        ["/opt/bin/server", "--port", "7"]
    );
    assert_eq!(
        custom.ttl,
        Some(Duration::from_secs(600)),
        "inherits idle_ttl"
    );
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let cfg = parse("").unwrap();
    assert_eq!(
        cfg.listen,
        [ListenAddr::Tcp("127.0.0.1:5800".parse().unwrap())]
    );
    assert_eq!(cfg.socket_mode, 0o660);
    assert_eq!(cfg.scheduler.max_loaded, 1);
    assert_eq!(cfg.http.max_body_bytes, 32 * 1024 * 1024);
    assert_eq!(cfg.http.body_memory_bytes, 256 * 1024 * 1024);
    assert_eq!(cfg.http.body_read_timeout, Duration::from_secs(30));
}

#[test]
fn the_body_budget_must_hold_the_largest_body() {
    let cfg = parse(
        "[http]\nmax_body_bytes = 1000\nbody_memory_bytes = 5000\nbody_read_timeout = \"5s\"\n",
    )
    .unwrap();
    assert_eq!(cfg.http.body_memory_bytes, 5000);
    assert_eq!(cfg.http.body_read_timeout, Duration::from_secs(5));
    let big = parse("[http]\nmax_body_bytes = 300000000\n").unwrap();
    assert_eq!(
        big.http.body_memory_bytes, 300_000_000,
        "raised to the largest body"
    );
    let e = err("[http]\nmax_body_bytes = 1000\nbody_memory_bytes = 999\n");
    assert!(
        e.starts_with("test.toml:3:21: http.body_memory_bytes: must be at least"),
        "{e}"
    );
    let e = err("[http]\nbody_read_timeout = \"0\"\n");
    assert!(
        e.contains("http.body_read_timeout: must be greater than 0"),
        "{e}"
    );
    let e = err("[http]\nmax_body_bytes = 5000000000\n");
    assert!(e.contains("at most 4294967295"), "{e}");
}

/// A real argon2id PHC string (of "pw"), as `claracore dashboard
/// hash-password` prints.
const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$1sGHDcE6HaFBFQe6mgoYJA$8ApO4nFsT8+C+d1YBN1syU6JPL0sdqmNaN71jRnHvGU";

#[test]
fn the_dashboard_table_reads_a_hash_or_a_credential_file_and_says_what_is_wrong() {
    let c = parse("").unwrap();
    assert_eq!(c.dashboard, DashboardConfig::default());
    assert_eq!(c.dashboard.session_lifetime, Duration::from_secs(86400));
    let c = parse(&format!(
        "[dashboard]\npassword_hash = \"{PHC}\"\nsession_lifetime = \"8h\"\ntrusted_proxies = [\"10.0.0.1\", \"::1\"]\n"
    ))
    .unwrap();
    assert_eq!(c.dashboard.password_hash.as_deref(), Some(PHC));
    assert_eq!(c.dashboard.session_lifetime, Duration::from_secs(8 * 3600));
    assert_eq!(c.dashboard.trusted_proxies.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-password");
    std::fs::write(&file, format!("{PHC}\n")).unwrap();
    let c = parse(&format!(
        "[dashboard]\npassword_hash_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.dashboard.password_hash.as_deref(), Some(PHC), "trimmed");

    for (text, want) in [
        ("[dashboard]\npassword_hash = \"hunter2\"", "test.toml:2:17: dashboard.password_hash: not a PHC string"),
        ("[dashboard]\npassword_hash = \"$argon2i$v=19$m=19456,t=2,p=1$1sGHDcE6HaFBFQe6mgoYJA$8ApO4nFsT8+C+d1YBN1syU6JPL0sdqmNaN71jRnHvGU\"", "is argon2i, not argon2id"),
        ("[dashboard]\npassword_hash_file = \"/nonexistent/pw\"", "test.toml:2:22: dashboard.password_hash_file: cannot read /nonexistent/pw"),
        ("[dashboard]\npassword_hash = \"x\"\npassword_hash_file = \"/y\"", "not both"),
        ("[dashboard]\nsession_lifetime = \"0\"", "dashboard.session_lifetime: must be greater than 0"),
        ("[dashboard]\nsession_lifetime = \"soon\"", "dashboard.session_lifetime"),
        ("[dashboard]\ntrusted_proxies = [\"proxy.lan\"]", "test.toml:2:20: dashboard.trusted_proxies: \"proxy.lan\" is not an IP address"),
        ("[dashboard]\npasword_hash = \"x\"", "unknown field `pasword_hash`"),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn unknown_key_names_line_column_and_key() {
    let e = err("listen = []\n\n[scheduler]\nmax_loadd = 2\n");
    assert!(e.starts_with("test.toml:4:1: "), "{e}");
    assert!(e.contains("max_loadd"), "{e}");
}

#[test]
fn model_with_both_or_neither_is_rejected() {
    let e = err("[models.a]\nmodel = \"/m.gguf\"\ncmd = [\"x\", \"{port}\"]\n");
    assert!(e.contains("models.a: give either `model` or `cmd`"), "{e}");
    assert!(e.starts_with("test.toml:1:"), "{e}");
    let e = err("[models.b]\nttl = \"1m\"\n");
    assert!(e.contains("models.b: needs `model`"), "{e}");
}

#[test]
fn duplicate_alias_is_rejected_with_its_position() {
    let e =
        err("[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\naliases = [\"x\", \"a\"]\n");
    assert!(e.starts_with("test.toml:5:17: "), "{e}");
    assert!(e.contains("already a name or alias of models.a"), "{e}");
}

#[test]
fn model_log_lines_defaults_validates_and_zero_keeps_none() {
    let c = Config::from_toml(Path::new("test.toml"), "").unwrap();
    assert_eq!(c.model_log_lines, DEFAULT_MODEL_LOG_LINES);
    let c = Config::from_toml(Path::new("test.toml"), "[logging]\nmodel_log_lines = 0\n").unwrap();
    assert_eq!(c.model_log_lines, 0);
    let e = err("[logging]\nmodel_log_lines = -1\n");
    assert!(
        e.starts_with("test.toml:2:19: logging.model_log_lines: must be between 0"),
        "{e}"
    );
    let e = err("[logging]\nmodel_log_lines = 99999999\n");
    assert!(e.contains("logging.model_log_lines"), "{e}");
    let e = err("[logging]\nlines = 5\n");
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn bad_listen_address_is_positioned() {
    let e = err("listen = [\"127.0.0.1:5800\", \"localhost\"]\n");
    assert!(e.starts_with("test.toml:1:29: listen: "), "{e}");
    let e = err("listen = [\"unix:relative.sock\"]\n");
    assert!(e.contains("must be absolute"), "{e}");
}

#[test]
fn bad_duration_and_limits_are_positioned() {
    let e = err("[scheduler]\nidle_ttl = \"ten minutes\"\n");
    assert!(e.starts_with("test.toml:2:12: scheduler.idle_ttl: "), "{e}");
    let e = err("[scheduler]\nmax_loaded = 0\n");
    assert!(e.contains("scheduler.max_loaded: must be 1 or more"), "{e}");
    let e = err("socket_mode = \"0999\"\n");
    assert!(e.contains("socket_mode"), "{e}");
    let e = err("log_format = \"xml\"\n");
    assert!(e.starts_with("test.toml:1:14: log_format"), "{e}");
    let e = err("[http]\nworker_threads = 0\n");
    assert!(
        e.starts_with("test.toml:2:18: http.worker_threads: must be between 1 and 256"),
        "{e}"
    );
}

#[test]
fn gpu_table_defaults_bounds_and_positioned_errors() {
    let cfg = parse("").unwrap();
    assert_eq!(
        cfg.gpu,
        GpuConfig {
            enabled: true,
            sample_interval: Duration::from_secs(2),
            nvml_library: None,
        }
    );
    let cfg = parse(
        "[gpu]\nenabled = false\nsample_interval = \"100ms\"\nnvml_library = \"/opt/nvml/libnvidia-ml.so.1\"\n",
    )
    .unwrap();
    assert!(!cfg.gpu.enabled);
    assert_eq!(cfg.gpu.sample_interval, Duration::from_millis(100));
    assert_eq!(
        cfg.gpu.nvml_library.as_deref(),
        Some(Path::new("/opt/nvml/libnvidia-ml.so.1"))
    );
    assert_eq!(
        parse("[gpu]\nsample_interval = \"1h\"\n")
            .unwrap()
            .gpu
            .sample_interval,
        Duration::from_secs(3600)
    );
    for bad in ["99ms", "0", "1h 1s"] {
        let e = err(&format!("[gpu]\nsample_interval = \"{bad}\"\n"));
        assert!(
            e.starts_with("test.toml:2:19: gpu.sample_interval: must be between 100ms and 1h"),
            "{bad}: {e}"
        );
    }
    let e = err("[gpu]\nsample_interval = \"often\"\n");
    assert!(
        e.starts_with("test.toml:2:19: gpu.sample_interval: "),
        "{e}"
    );
    let e = err("[gpu]\nnvml_library = \"libnvidia-ml.so.1\"\n");
    assert!(
        e.starts_with(
            "test.toml:2:16: gpu.nvml_library: \"libnvidia-ml.so.1\" must be an absolute path"
        ),
        "{e}"
    );
    let e = err("[gpu]\nenabled = \"yes\"\n");
    assert!(e.starts_with("test.toml:2:11: "), "{e}");
    let e = err("[gpu]\nindex = 0\n");
    assert!(
        e.starts_with("test.toml:2:1: ") && e.contains("index"),
        "{e}"
    );
}

#[test]
fn llama_models_are_named_by_alias_unless_their_args_name_one() {
    let cfg = parse(
        "[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\nargs = [\"-a\", \"mine\"]\n\
         [models.c]\nmodel = \"/c\"\nargs = [\"--alias=x,y\"]\n\
         [models.d]\ncmd = [\"x\", \"{port}\"]\n",
    )
    .unwrap();
    let aliases = |n: &str| {
        let argv = &cfg.model(n).unwrap().argv;
        argv.iter()
            .enumerate()
            .filter(|(_, a)| *a == "-a" || a.starts_with("--alias"))
            .map(|(i, a)| match a.as_str() {
                "-a" | "--alias" => format!("{a} {}", argv[i + 1]),
                _ => a.clone(),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(aliases("a"), ["--alias a"]);
    assert_eq!(aliases("b"), ["-a mine"], "the user's own wins");
    assert_eq!(aliases("c"), ["--alias=x,y"]);
    assert!(aliases("d").is_empty(), "cmd argv is the user's alone");
}

#[test]
fn llama_models_get_a_connection_limit_and_enough_http_threads() {
    let cfg = parse(
        "[models.a]\nmodel = \"/a\"\n[models.b]\nmodel = \"/b\"\nargs = [\"-np\", \"30\"]\n\
         [models.c]\nmodel = \"/c\"\nmax_connections = 3\n\
         [models.d]\ncmd = [\"x\", \"{port}\"]\n[models.e]\ncmd = [\"x\", \"{port}\"]\nmax_connections = 5\n",
    )
    .unwrap();
    let limit = |n: &str| cfg.model(n).unwrap().max_connections;
    let threads = |n: &str| {
        let argv = &cfg.model(n).unwrap().argv;
        let at = argv.iter().position(|a| a == "--threads-http").unwrap();
        argv[at + 1].clone()
    };
    assert_eq!((limit("a"), threads("a")), (Some(16), "34".to_string()));
    assert_eq!(
        (limit("b"), threads("b")),
        (Some(34), "70".to_string()),
        "--parallel 30 + 4"
    );
    assert_eq!((limit("c"), threads("c")), (Some(3), "8".to_string()));
    assert_eq!(limit("d"), None, "cmd models are not limited by default");
    assert_eq!(limit("e"), Some(5));
    assert_eq!(parallel_arg(&["--parallel=6".to_string()]), Some(6));
    let e = err("[models.a]\nmodel = \"/a\"\nmax_connections = 0\n");
    assert!(
        e.starts_with("test.toml:3:19: models.a.max_connections: must be between 1 and 1024"),
        "{e}"
    );
}

#[test]
fn worker_threads_default_to_half_the_cpus_up_to_four() {
    let cfg = parse("[http]\nworker_threads = 3\n").unwrap();
    assert_eq!(cfg.worker_threads(), 3);
    let cfg = parse("").unwrap();
    assert_eq!(cfg.http.worker_threads, None);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(cfg.worker_threads(), (cpus / 2).clamp(1, 4));
    assert!((1..=4).contains(&cfg.worker_threads()));
}

#[test]
fn max_open_connections_defaults_to_the_fd_limit_less_a_reserve() {
    let cfg = parse("").unwrap();
    assert_eq!(cfg.http.max_open_connections, None);
    assert_eq!(cfg.max_open_connections(65536), 65536 - 64);
    assert_eq!(cfg.max_open_connections(256), 192);
    assert_eq!(cfg.max_open_connections(64), 16, "a quarter at least");
    // Only the max_loaded largest pools are reserved: c (16 + 4) and
    // the unlimited cmd model (64 + 4).
    let cfg = parse(
        "[scheduler]\nmax_loaded = 2\n[models.a]\nmodel = \"/a\"\nmax_connections = 2\n\
         [models.c]\nmodel = \"/c\"\n[models.d]\ncmd = [\"x\", \"{port}\"]\n",
    )
    .unwrap();
    assert_eq!(cfg.max_open_connections(1024), 1024 - 64 - 20 - 68);
    let cfg = parse("[http]\nmax_open_connections = 300\n").unwrap();
    assert_eq!(cfg.max_open_connections(256), 300, "explicit wins");
    for bad in ["0", "-1", "1048577"] {
        let e = err(&format!("[http]\nmax_open_connections = {bad}\n"));
        assert!(
            e.starts_with(
                "test.toml:2:24: http.max_open_connections: must be between 1 and 1048576"
            ),
            "{e}"
        );
    }
}

#[test]
fn history_defaults_and_errors() {
    let cfg = parse("state_dir = \"/srv/cc\"\n").unwrap();
    assert_eq!(cfg.history.path, PathBuf::from("/srv/cc/history.db"));
    assert_eq!(cfg.history.content, ContentPolicy::Truncated);
    assert_eq!(cfg.history.retention, Duration::from_secs(30 * 86400));
    let e = err("[history]\ncontent = \"some\"\n");
    assert!(e.starts_with("test.toml:2:11: history.content"), "{e}");
    let e = err("[history]\nretention = \"0\"\n");
    assert!(
        e.contains("history.retention: must be greater than 0"),
        "{e}"
    );
}

#[test]
fn preload_and_pin_are_booleans_off_by_default() {
    let cfg = parse(
        "[models.a]\nmodel = \"/a\"\npreload = true\npin = true\n[models.b]\nmodel = \"/b\"\n",
    )
    .unwrap();
    let (a, b) = (cfg.model("a").unwrap(), cfg.model("b").unwrap());
    assert!(a.preload && a.pin);
    assert!(!b.preload && !b.pin);
    let e = err("[models.a]\nmodel = \"/a\"\npin = \"yes\"\n");
    assert!(e.starts_with("test.toml:3:7: "), "{e}");
    assert!(e.contains("boolean"), "{e}");
    let e = err("[models.a]\nmodel = \"/a\"\npinned = true\n");
    assert!(
        e.starts_with("test.toml:3:1: ") && e.contains("pinned"),
        "{e}"
    );
}

#[test]
fn ttl_zero_means_never() {
    let cfg = parse("[scheduler]\nidle_ttl = \"0\"\n[models.a]\nmodel = \"/a\"\n").unwrap();
    assert_eq!(cfg.models[0].ttl, None);
}

#[test]
fn cmd_must_carry_the_port_or_socket_placeholder() {
    let e = err("[models.a]\ncmd = [\"/bin/server\", \"--port\", \"8080\"]\n");
    assert!(e.contains("{port}") && e.contains("{socket}"), "{e}");
    let cfg = parse("[models.a]\ncmd = [\"/bin/server\", \"--unix={socket}\"]\n").unwrap();
    assert!(cfg.models[0].uses_socket());
    assert_eq!(
        cfg.models[0].command(1, Path::new("/d/a-3.sock")),
        ["/bin/server", "--unix=/d/a-3.sock"]
    );
}

#[test]
fn log_format_is_read_by_its_lowercase_name_and_a_bad_one_names_the_key() {
    assert_eq!(parse("").unwrap().log_format, LogFormat::Auto);
    for (text, want) in [
        ("auto", LogFormat::Auto),
        ("human", LogFormat::Human),
        ("json", LogFormat::Json),
    ] {
        let cfg = parse(&format!("log_format = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.log_format, want, "{text}");
    }
    assert_eq!(
        err("log_format = \"xml\"\n"),
        "test.toml:1:14: log_format: \"xml\" is not one of \"auto\", \"human\", \"json\""
    );
    assert_eq!(
        err("log_format = \"JSON\"\n"),
        "test.toml:1:14: log_format: \"JSON\" is not one of \"auto\", \"human\", \"json\""
    );
    let e = err("log_format = 1\n");
    assert!(e.starts_with("test.toml:1:14: "), "{e}");
}
