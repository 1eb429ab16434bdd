//! claracore: serves local LLMs through on-demand llama.cpp `llama-server`
//! children, the way systemd expects a service to behave.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → validated [`config::Config`].
//! - [`listen`]: TCP and unix listeners.
//! - [`server`]: accept loops, HTTP/1.1 connections, ordered shutdown.
//! - [`daemon`]: bootstrap (env, config, logging, bind, privileges, runtime,
//!   signals) before [`server::serve`].
//! - [`api`]: the route table, handlers, error → status mapping.
//! - [`auth`]: principals (local socket, API keys, anonymous), scopes,
//!   rates and failure throttling.
//! - [`proxy`]: streaming pass-through to a child, holding its lease.
//! - [`upstream`]: the HTTP client to one child and its pool.
//! - [`connector`]: the unix-socket connector of the HTTP clients to
//!   children (the upstream pool, the supervisor's health probe).
//! - [`scheduler`]: the actor that owns every model's state (start, swap,
//!   evict, TTL, backoff), its gate fast path and the pure planner.
//! - [`events`]: what happened (records, lifecycle, states) and the bus
//!   that carries it to history, metrics and live subscribers.
//! - [`procfs`]: process figures from /proc.
//! - [`sources`]: where models come from besides the config: a models
//!   folder, an Ollama store read in place, Hugging Face references.
//! - [`gguf`]: GGUF model headers (metadata, tensor infos) and the file
//!   digest and header caches behind the Ollama routes.
//! - [`pull`]: models fetched from a Hugging Face hub or a URL into a
//!   models folder, resumable and verified.
//! - [`supervisor`]: one child process's lifecycle.
//! - [`history`]: request rows and model events in SQLite, written off the
//!   request path by one thread.
//! - [`gpu`]: NVIDIA GPU readings (memory, use, per process) from NVML,
//!   sampled by one thread; absent without a driver.
//! - [`metrics`]: Prometheus figures.
//! - [`systemd`]: sd_notify, watchdog interval, journald detection,
//!   privilege drop.
//! - [`logging`]: journald, human or JSON log output.
//! - [`cli`]: argument parsing and the client commands.
//! - [`wire`]: the SSE line splitter and the OpenAI shapes, typed once for
//!   the history tap, the Ollama translation and the CLI.
//!
//! The binary (`main.rs`) only parses arguments and dispatches; the
//! daemon's bootstrap is [`daemon`].
//!
//! Dependencies point down only (a test below reads every `crate::` path
//! and fails on one that points up or sideways):
//!
//! ```text
//! daemon
//!   server, cli
//!     api
//!       proxy
//!         scheduler, metrics, auth, pull
//!           history, supervisor, upstream, sources, listen, logging, systemd, gpu
//!             config, events, procfs, gguf, connector, wire   (leaves)
//! ```

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connector;
pub mod daemon;
pub mod events;
pub mod gguf;
pub mod gpu;
pub mod history;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod procfs;
pub mod proxy;
pub mod pull;
pub mod scheduler;
pub mod server;
pub mod sources;
pub mod supervisor;
pub mod systemd;
pub mod upstream;
pub mod wire;

/// Exit status for a bad configuration (sysexits' EX_CONFIG); systemd units
/// list it in `RestartPreventExitStatus=` so a typo does not restart-loop.
pub const EXIT_CONFIG: u8 = 78;

#[cfg(test)]
mod layout {
    //! The dependency rule of the crate's `# Layout`, checked on the source.

    /// Each top-level module's rank: a module may use only modules of a
    /// lower rank.
    const RANKS: [(&str, u8); 26] = [
        ("config", 0),
        ("connector", 0),
        ("wire", 0),
        ("events", 0),
        ("gguf", 0),
        ("procfs", 0),
        ("history", 1),
        ("gpu", 1),
        ("supervisor", 1),
        ("upstream", 1),
        ("sources", 1),
        ("listen", 1),
        ("logging", 1),
        ("systemd", 1),
        ("scheduler", 2),
        ("pull", 2),
        ("auth", 2),
        ("metrics", 2),
        ("proxy", 3),
        ("api", 4),
        ("server", 5),
        ("cli", 5),
        ("daemon", 6),
        ("lib", 7),
        ("main", 7),
        ("EXIT_CONFIG", 0),
    ];

    fn rank(module: &str) -> Option<u8> {
        RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// `(importing module, imported module, line)` for every `crate::`
    /// path outside comments.
    fn imports() -> Vec<(String, String, String)> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut found = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let code = line.split("//").next().unwrap_or("");
                for (i, _) in code.match_indices("crate::") {
                    let rest = &code[i + "crate::".len()..];
                    let target: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.push((module.clone(), target, line.trim().to_string()));
                }
            }
        }
        found
    }

    #[test]
    fn every_module_has_a_rank() {
        for (module, target, line) in imports() {
            assert!(rank(&module).is_some(), "module {module} has no rank");
            assert!(
                target.is_empty() || rank(&target).is_some(),
                "{module}: {line}: {target} has no rank"
            );
        }
    }

    #[test]
    fn dependencies_point_down_only() {
        let upward: Vec<String> = imports()
            .into_iter()
            .filter(|(module, target, _)| module != target && !target.is_empty())
            .filter(|(module, target, _)| rank(target) >= rank(module))
            .map(|(module, target, line)| format!("{module} -> {target}: {line}"))
            .collect();
        assert!(
            upward.is_empty(),
            "imports that point up or sideways:\n{}",
            upward.join("\n")
        );
    }

    #[test]
    fn the_check_sees_an_upward_import() {
        // The scheduler emitting to metrics directly is what the bus
        // replaced; the rule must call it out.
        assert!(rank("metrics") >= rank("scheduler"));
        assert!(rank("proxy") > rank("scheduler"));
        assert!(imports()
            .iter()
            .any(|(m, t, _)| m == "proxy" && t == "scheduler"));
    }
}
