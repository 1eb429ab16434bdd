//! claracore: serves local LLMs through on-demand llama.cpp `llama-server`
//! children, the way systemd expects a service to behave.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → validated [`config::Config`].
//! - [`listen`]: TCP and unix listeners.
//! - [`server`]: accept loops, HTTP/1.1 connections, ordered shutdown.
//! - [`api`]: routes, handlers, error → status mapping.
//! - [`proxy`]: streaming pass-through to a child, holding its lease.
//! - [`scheduler`]: the actor that owns every model's state (start, swap,
//!   evict, TTL, backoff).
//! - [`supervisor`]: one child process's lifecycle.
//! - [`history`]: request rows and model events in SQLite, written off the
//!   request path by one thread.
//! - [`metrics`]: Prometheus figures.
//! - [`systemd`]: sd_notify, watchdog interval, journald detection,
//!   privilege drop.
//! - [`logging`]: journald, human or JSON log output.
//! - [`cli`]: argument parsing and the client commands.
//!
//! The binary (`main.rs`) only parses arguments, reads the environment,
//! installs signal handlers and calls into these.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod history;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod procfs;
pub mod proxy;
pub mod scheduler;
pub mod server;
pub mod supervisor;
pub mod systemd;
pub mod upstream;

/// Exit status for a bad configuration (sysexits' EX_CONFIG); systemd units
/// list it in `RestartPreventExitStatus=` so a typo does not restart-loop.
pub const EXIT_CONFIG: u8 = 78;
