//! The integration tests: one test binary (linked once, not five times)
//! that runs the real `claracore` binary against real child processes.
//!
//! Each module is one area; `common` is the harness they share. The tests
//! run as threads of this one process, so none may change process-wide
//! state: no environment writes (clippy.toml bans them), no cwd changes,
//! no signal handlers. A daemon gets its environment on its own `Command`.
//!
//! - `access`: every route against every kind of key, over TCP and the
//!   local socket; brute force, rates, the key leaking nowhere.
//! - `browser`: the dashboard in a real headless Chromium through
//!   playwright-core: login, throttling, every page, live updates, the
//!   load and stop buttons, a read key's view, logout, screenshots.
//! - `cli`: config errors and exit codes, the client commands.
//! - `clients`: the official openai and anthropic Python clients against
//!   the real llama-server; bad input on the routes they use.
//! - `connections`: the connection cap, idle connections past the fd
//!   limit, memory after crowds of them.
//! - `dashboard`: `/ui/` over HTTP: security headers, cookie flags,
//!   logins, throttling, CSRF, logout, session ends, the open mode.
//! - `events`: the `/admin/events` stream: order and completeness against
//!   history, resume, a stalled client, no content, its scope.
//! - `faults`: the fake upstream (`tests/tools/fake_upstream.py`) for what
//!   llama-server won't do on demand; draining, limits, error shapes.
//! - `files`: modes of the state files under a permissive umask; the demo
//!   script's refusal of a directory it cannot write safely.
//! - `gpu`: GPU readings through the fake NVML: absence said once, the
//!   state file's values in /metrics, memory per process and process tree.
//! - `history`: request rows, model events, retention, recovery, metrics.
//! - `hostile`: bodies that would hold memory or time, malformed requests,
//!   wrong methods, oversized names.
//! - `llama`: the real llama-server with the generated tiny model.
//! - `models`: preload, pin, the load route and `claracore load`, on the
//!   real llama-server.
//! - `ollama`: Ollama's API with the official Python client and field by
//!   field.
//! - `logs`: per-model log rings and `/admin/logs/{model}` (snapshot and
//!   SSE follow) with the real llama-server and a flooding child; load
//!   progress in `/admin/ps` and `/v1/models`, and its expected time from
//!   past loads, in memory and from history after a restart.
//! - `ollama_js`: the official `ollama` and `openai` npm clients under
//!   node.
//! - `run`: `claracore run`, one-shot and interactive through a real
//!   pseudo-terminal, against the real llama-server.
//! - `sockets`: children on unix sockets in the private runtime directory
//!   (no TCP listener, modes, removal), and `cmd` models on `{port}`.
//! - `systemd`: the systemd protocol on the host (notify, reload, watchdog,
//!   socket activation, capabilities, JSON logs).

mod access;
mod browser;
mod cli;
mod clients;
mod common;
mod connections;
mod dashboard;
mod events;
mod faults;
mod files;
mod gpu;
mod history;
mod hostile;
mod llama;
mod logs;
mod models;
mod ollama;
mod ollama_js;
mod pull;
mod queue;
mod run;
mod sockets;
mod systemd;
