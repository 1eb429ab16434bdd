//! The integration tests: one test binary (linked once, not five times)
//! that runs the real `claracore` binary against real child processes.
//!
//! Each module is one area; `common` is the harness they share. The tests
//! run as threads of this one process, so none may change process-wide
//! state: no environment writes (clippy.toml bans them), no cwd changes,
//! no signal handlers. A daemon gets its environment on its own `Command`.
//!
//! - `cli`: config errors and exit codes, the client commands.
//! - `connections`: the connection cap, idle connections past the fd
//!   limit, memory after crowds of them.
//! - `faults`: the fake upstream (`tests/tools/fake_upstream.py`) for what
//!   llama-server won't do on demand; draining, limits, error shapes.
//! - `history`: request rows, model events, retention, recovery, metrics.
//! - `llama`: the real llama-server with the generated tiny model.
//! - `systemd`: the systemd protocol on the host (notify, reload, watchdog,
//!   socket activation, capabilities, JSON logs).

mod cli;
mod common;
mod connections;
mod faults;
mod history;
mod llama;
mod systemd;
