//! The integration tests: one test binary (linked once, not twenty times)
//! that runs the real `claracore` binary against real child processes.
//!
//! Each module is one area; `common` is the harness they share. The tests
//! run as threads of this one process, so none may change process-wide
//! state: no environment writes (clippy.toml bans them), no cwd changes,
//! no signal handlers. A daemon gets its environment on its own `Command`.
//! Each daemon under test gets a TCP listener and a unix socket the harness
//! has already bound, passed as fds 3 and 4 by socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES=http:local`), so no port is picked free
//! and bound later; admin and read calls go through the unix socket, as an
//! operator's CLI does. The few tests about the daemon's own binding let it
//! bind. Tests wait on state (a port, a row, a model's state, READY=1)
//! through `common`'s polling helpers; a `sleep` that remains is the
//! behaviour under test (a TTL or backoff that must pass, a slow client, a
//! paced stream) and says so where it stands.
//!
//! `tests/run.sh` runs everything (CI runs it through `.ci/run`); one area
//! alone: `cargo test --test it queue::` after
//! `eval "$(tests/tools/setup-test-deps.sh)"`.
//!
//! # What each file proves
//!
//! - `access.rs`: access control as an attacker tries it: every route ×
//!   {no key, wrong, expired, lacking the scope, lacking the model, right
//!   key} × {TCP, local socket} against one table of expected statuses
//!   (each failing cell from its own source IP); the keyless defaults;
//!   brute force from one IP throttled and logged, another IP unaffected; a
//!   key's rate; the used key absent from responses, logs, rows, metrics
//!   and the database files; bad auth config (exit 78 naming the key); the
//!   audit trail; another local user (`nobody`, via `setpriv`, when run as
//!   root) reading neither the history file nor the admin socket nor a
//!   model's socket.
//! - `browser.rs`: the dashboard in a real headless Chromium through
//!   playwright-core: login, throttling, every page, live updates, the
//!   load and stop buttons, a read key's view, logout, screenshots (the
//!   README's `dashboard-models.png` is one).
//! - `cli.rs`: config errors and exit codes, the client commands.
//! - `clients.rs`: the official `openai` and `anthropic` Python clients on
//!   `/v1/*` (chat, responses, messages, models), answers naming the
//!   configured model never a path, bad input in each route's shape.
//! - `connections.rs`: `/health` with 300 idle connections under
//!   `ulimit -n 256`, the cap with every connection busy, idle-longest
//!   eviction, RSS over rounds of 2,000 idle connections.
//! - `dashboard.rs`: `/ui/` over HTTP: security headers, cookie flags,
//!   password and key logins, throttling, CSRF, logout, sessions ended by
//!   expiry and by a password change on reload, the open mode.
//! - `events.rs`: the `/admin/events` stream: order and completeness
//!   against history, `Last-Event-ID` resume, a stalled client cut off, no
//!   content on the wire, its scope.
//! - `faults.rs`: `tests/tools/fake_upstream.py` for what llama-server
//!   won't do on demand: exit while starting, never healthy, ignore
//!   SIGTERM, hang or die mid-stream, stop answering health, port taken, a
//!   pooled connection closed under a request; SIGTERM draining, the second
//!   signal, 413s, error shapes, header and environment stripping, the
//!   unix socket.
//! - `files.rs`: state files 0600/0700 under umask 000, backups and
//!   restores private, the demo refusing planted symlinks.
//! - `gpu.rs`: GPU readings without a GPU: a fake NVML
//!   (`tests/fake-nvml/fake_nvml.c`) loaded through the real nvml-wrapper
//!   path answers from a state file the test rewrites. No library,
//!   `enabled = false` and a failing init each give one log line and no
//!   `claracore_gpu_*` series; `/metrics` follows the file; a process
//!   tree's memory is summed. Real llama-server children placed by the fake
//!   GPUs' memory: the fullest GPU that fits, a model measured above its
//!   `vram_mb` warned about, an idle model evicted for a `gpus = [0]` one,
//!   one that can never fit refused at once with the numbers, and the
//!   figures in ps, `/metrics`, `/api/ps`, the rows and the stop event.
//! - `history.rs`: rows against what clients saw, outcomes, model events,
//!   retention, SIGKILL under load, a corrupt file, a full tmpfs,
//!   backup/restore, `/metrics` through the Python `prometheus_client`
//!   parser.
//! - `hostile.rs`: one test per hostile-input finding: twelve held 32 MiB
//!   bodies within the body budget (RSS measured), a trickling body cut at
//!   the deadline as `timeout`, a client leaving mid-body as `cancelled`,
//!   `["tiny"]` refused, near-miss admin paths, `Content-Length: -1`, 405
//!   with `Allow`, a 100 KB model name not echoed.
//! - `llama.rs`: a real llama-server with the generated tiny model: chat,
//!   streaming (chunks arrive incrementally), embeddings, single-flight
//!   start under 20 concurrent requests, `max_loaded = 1` alternation,
//!   groups, TTL unload and restart, `kill -9` of the child mid-stream,
//!   load failure, SIGKILL of the daemon leaves no child.
//! - `logs.rs`: per-model log rings and `/admin/logs/{model}` (snapshot and
//!   SSE follow) with the real llama-server and a flooding child; load
//!   progress in `/admin/ps` and `/v1/models`, and its expected time from
//!   past loads, in memory and from history after a restart.
//! - `models.rs`: preload after READY=1, pinning under `max_loaded`,
//!   `claracore load` and the load route.
//! - `ollama.rs`: Ollama's API with the official Python client, every
//!   answer's fields and types against Ollama's docs/api.md, NDJSON lines
//!   arriving per token, bad input (a 400 in Ollama's shape, nothing
//!   started, a row each), tool calls and thinking through a fake
//!   tool-calling child.
//! - `ollama_js.rs`: the same with the official `ollama` and `openai` npm
//!   clients under node.
//! - `pull.rs`: `claracore pull` against a loopback fake hub
//!   (`tests/tools/fake_hub.py`): quant choice, the CDN redirect without the
//!   token, a cut connection and a killed pull resumed with Range, a shared
//!   download, a gated repository, unknown names, a lying hash, traversal
//!   names, planted links, a non-GGUF file, a full disk; the pulled file
//!   served by the real llama-server.
//! - `sources.rs`: a watched models folder (a GGUF copied in is served,
//!   removed is withdrawn, no reload) and an Ollama store served in place
//!   (names, params in the argv, a corrupt manifest skipped), on the real
//!   llama-server.
//! - `queue.rs`: the queue against the real llama-server: 200 requests
//!   from 5 clients on model A and 5 on B with `max_loaded = 1` (the starts
//!   with grouping on and off, printed; at most 12 with it), a priority key
//!   swapping a busy model out before an older plain request, a full
//!   queue's 503 with `Retry-After` and its row.
//! - `run.rs`: `claracore run`, one-shot (argument, stdin, both) and
//!   interactive through a real pseudo-terminal (Ctrl-C cancels the answer,
//!   not the program), against the real llama-server.
//! - `sockets.rs`: model processes on unix sockets: no TCP socket at all
//!   (read from /proc), private modes, nothing left behind; `cmd` models on
//!   `{port}`.
//! - `systemd.rs`: the systemd protocol on the host: a real `NOTIFY_SOCKET`
//!   listener (READY, STATUS, RELOADING, WATCHDOG, STOPPING,
//!   EXTEND_TIMEOUT), SIGHUP reloads, `systemd-socket-activate` with named
//!   fds, capabilities and no_new_privs read from /proc, JSON log lines.
//!
//! # Outside this binary
//!
//! - Unit tests sit beside the code in `src/`, among them property tests
//!   (proptest, 4096 cases each, every run) over everything a request
//!   controls: route parsing, model sniffing, `Content-Length` values,
//!   query strings. Also the route table, the event bus, the scheduler's
//!   planner and gate, and its actor driven through a fake spawner on a
//!   paused clock (drain before a swap, restart on a changed config, crash
//!   backoff, a request racing the TTL stop, a waiter whose client left).
//! - `tests/tools/release.sh --check-reproducible`: the `.deb`, the tarball
//!   and `SHA256SUMS`, built twice from clean target directories at
//!   different paths; fails unless both builds' hashes are identical,
//!   naming the files that differ.
//! - `tests/systemd/run-nspawn.sh`: the `.deb` installed with apt under a
//!   real PID-1 systemd 257 (a cached debootstrapped Debian trixie booted
//!   with `systemd-nspawn --private-network`, one container per scenario).
//!   The package itself: files, the conffile and its 0640 root:claracore
//!   mode, the sysusers user, the state directory, sockets enabled with the
//!   service socket-activated; an upgrade keeping an edited config and the
//!   history; remove keeping state and config; purge dropping them. Then on
//!   that install: socket activation with named fds, READY and `Status:`,
//!   reload with a good and a broken config, watchdog restart after
//!   `kill -STOP`, journal fields (`MODEL=`, `CHILD_PID=`, `PRIORITY`),
//!   `systemctl stop` with a stream in flight, exit 78 without a restart
//!   loop, sockets surviving service restarts, `systemd-analyze verify` and
//!   `security`, and `PrivateNetwork=` holding.
//! - `tests/systemd/run-qemu.sh`: the same `.deb` in a qemu TCG VM, where
//!   cgroup limits are enforced: under `MemoryMax=128M` a model's
//!   llama-server is OOM-killed, claracore keeps its PID, reports the model
//!   failed "by the OOM killer", and serves the next request.
//! - `tests/tools/chaos.sh`: steady mixed traffic against the real daemon
//!   while a seeded chaos loop SIGKILLs and SIGSTOPs children, reloads the
//!   config, fills and frees the history disk and SIGKILLs the daemon once;
//!   then the invariants as figures (one row per answer a client saw, no
//!   orphan child, every reload applied, `/health` never silent over 5 s,
//!   RSS bounded, `PRAGMA integrity_check` ok). `--smoke` (~80 s; in
//!   `tests/run.sh`) or 10 minutes; `--seed N` replays a run.
//! - `tests/tools/bench.sh --quick`: the benchmark's gross-regression smoke
//!   (BENCHMARKS.md).
//! - `tests/nix/check.sh`: every `.nix` file parses, the module's unit
//!   settings match `systemd/`, the VM test scripts are valid Python.

// Tests fail loudly by design; row tuples read plainly as tuples.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

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
mod sources;
mod systemd;
