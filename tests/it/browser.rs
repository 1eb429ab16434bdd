//! The dashboard end to end in a real headless Chromium (Debian's
//! `chromium`, driven by the pinned `playwright-core` from
//! `tests/tools/setup-test-deps.sh`) against the real binary and the real
//! llama-server with the tiny model.
//!
//! Each test starts a [`Daemon`], then one node script ([`Browser`]) that
//! launches Chromium, walks the pages by the DOM contract of the dashboard
//! (`data-page`, `data-model`, `data-field`, `data-action`, `data-testid`)
//! and prints what it saw. Where the Rust side must act in the middle of a
//! flow (send a chat request with hyper, replay the session cookie from
//! outside the browser, read `/admin/ps`), the script prints an `ask` line
//! and waits for the answer on its stdin; at the end it prints one
//! `result` line. The Rust side asserts on those and on the daemon's own
//! state and history, so a page that shows the wrong thing, or nothing,
//! fails the test.
//!
//! Bounds: every browser step waits at most [`STEP`]; a whole script at
//! most [`SCRIPT_DEADLINE`]; each wait for a line from it at most
//! [`LINE_DEADLINE`]. The script closes its browser itself; when it is
//! killed instead (a timeout, a failed assertion), [`Browser`]'s drop kills
//! the node process and the Chromium it launched, found as node's
//! descendants in /proc, by pid: no other browser on the machine is
//! touched.
//!
//! Screenshots of every page go to `dashboard/` under the artifact folder
//! (`CLARACORE_TEST_ARTIFACTS`, which `tests/run.sh` sets and prints at the
//! end; without it, cargo's `CARGO_TARGET_TMPDIR/test-artifacts`). The
//! README's screenshot is `models-ready.png` from
//! `password_login_models_activity_load_stop_stats_logs_audit_logout`,
//! copied to `tests/it/dashboard-models.png`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// The longest one browser step (a click, a selector, a state change on
/// the page) may take: Chromium's first page on two busy cores plus a
/// model load of the tiny model fit well within it.
const STEP: Duration = Duration::from_secs(30);
/// The longest a whole node script may run before it is killed.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(300);
/// The longest the Rust side waits for the script's next line.
const LINE_DEADLINE: Duration = Duration::from_secs(120);

/// The dashboard password of the tests that log in with one.
const PASSWORD: &str = "correct horse battery staple";

fn chromium() -> String {
    std::env::var("CLARACORE_TEST_CHROMIUM").unwrap_or_else(|_| {
        panic!(
            "CLARACORE_TEST_CHROMIUM is not set: run the tests with tests/run.sh, or first \
             `eval \"$(tests/tools/setup-test-deps.sh)\"`, which installs Debian's chromium"
        )
    })
}

fn node_modules() -> String {
    let dir = std::env::var("CLARACORE_TEST_NODE_MODULES").unwrap_or_else(|_| {
        panic!(
            "CLARACORE_TEST_NODE_MODULES is not set: run the tests with tests/run.sh, or first \
             `eval \"$(tests/tools/setup-test-deps.sh)\"`, which installs playwright-core"
        )
    });
    assert!(
        Path::new(&dir).join("playwright-core").is_dir(),
        "{dir} lacks playwright-core: rerun tests/tools/setup-test-deps.sh"
    );
    dir
}

/// Where this run's screenshots go (created).
fn shots_dir() -> PathBuf {
    let base = std::env::var_os("CLARACORE_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts"));
    let dir = base.join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The argon2id PHC string of `password`, made the way an operator makes
/// one: `claracore dashboard hash-password`, the password on stdin.
fn password_hash(password: &str) -> String {
    let mut child = Command::new(BIN)
        .args(["dashboard", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("$argon2id$"))
        .map(str::to_string);
    assert!(
        out.status.success() && hash.is_some(),
        "claracore dashboard hash-password: {out:?}"
    );
    hash.unwrap()
}

/// What the script printed next.
enum Line {
    /// `{"ask": NAME, ...}`: it waits for an answer on stdin.
    Ask(Value),
    /// `{"result": {...}}`: it is done.
    Result(Value),
}

/// A node script driving Chromium, killed with the browser it launched
/// when dropped (see the module doc).
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: PathBuf,
    started: Instant,
}

impl Browser {
    /// Runs [`PRELUDE`] + `script` under node (CommonJS: `NODE_PATH` is
    /// ignored by ESM `import`) with `BASE=http://ADDR` and `env`.
    fn start(script: &str, addr: &str, dir: &Path, env: &[(&str, &str)]) -> Browser {
        let stderr = dir.join("browser.stderr");
        let mut child = Command::new("node")
            .arg("-e")
            .arg(format!("{PRELUDE}\n{script}"))
            .env("NODE_PATH", node_modules())
            .env("CLARACORE_TEST_CHROMIUM", chromium())
            .env("BASE", format!("http://{addr}"))
            .env("SHOTS", shots_dir())
            .env("STEP_MS", STEP.as_millis().to_string())
            // Plain text in the failure messages.
            .env("NO_COLOR", "1")
            .env("FORCE_COLOR", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run node ({e}): tests/tools/setup-test-deps.sh installs it")
            });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser {
            child,
            stdin,
            lines,
            stderr,
            started: Instant::now(),
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The script's next `ask` or `result` line (other lines are its
    /// chatter and are skipped).
    async fn next(&mut self) -> Line {
        loop {
            assert!(
                self.started.elapsed() < SCRIPT_DEADLINE,
                "the browser script ran past {SCRIPT_DEADLINE:?}:\n{}",
                self.stderr_text()
            );
            let line = tokio::task::block_in_place(|| self.lines.recv_timeout(LINE_DEADLINE));
            let line = match line {
                Ok(line) => line,
                Err(e) => panic!(
                    "no line from the browser script ({e}) after {:?}:\n{}",
                    self.started.elapsed(),
                    self.stderr_text()
                ),
            };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if value.get("ask").is_some() {
                return Line::Ask(value);
            }
            if let Some(result) = value.get("result") {
                return Line::Result(result.clone());
            }
        }
    }

    /// Waits for the script to ask `name`; its message. A script that
    /// finished instead (it failed a step) fails the test with its error.
    async fn ask(&mut self, name: &str) -> Value {
        match self.next().await {
            Line::Ask(v) if v["ask"] == name => v,
            Line::Ask(v) => panic!("the browser script asked {v} instead of {name}"),
            Line::Result(r) => panic!(
                "the browser script ended before asking {name}: {}\nstderr:\n{}",
                failure(&r),
                self.stderr_text()
            ),
        }
    }

    /// Answers the script's last `ask`.
    fn reply(&mut self, answer: &Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{answer}").unwrap();
        stdin.flush().unwrap();
    }

    /// The script's result once it has closed its browser and exited;
    /// fails the test if any step failed.
    async fn finish(mut self) -> Value {
        let result = match self.next().await {
            Line::Result(r) => r,
            Line::Ask(v) => panic!("the browser script asked {v} where it should have ended"),
        };
        drop(self.stdin.take());
        let deadline = Instant::now() + STEP;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "node did not exit after its result"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            result["error"].is_null(),
            "the browser script failed: {}\nstderr:\n{}",
            failure(&result),
            self.stderr_text()
        );
        result
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // Chromium is node's child (playwright starts it in its own process
        // group) with its zygote and renderers under it: all found from
        // node's pid before node dies and they are reparented.
        let pid = self.child.id();
        for p in descendants_of(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A failed script's error, the page it was on and its failure screenshot.
fn failure(result: &Value) -> String {
    format!(
        "{} (at {}, screenshot {}, page errors {})",
        result["error"].as_str().unwrap_or("no error"),
        result["url"],
        result["failure_shot"],
        result["page_errors"]
    )
}

/// What every script starts with: `run(async ({ context, page, out }) =>
/// ...)` launches Chromium, runs the steps, records any failure with a
/// screenshot, closes the browser and prints `{"result": out}`.
/// `ask(name, data)` prints `{"ask": name, ...data}` and resolves to the
/// JSON line the Rust side answers. `until(fn, what)` polls `fn` until it
/// returns something truthy, failing after `STEP_MS` with the last value.
/// `shot(page, name)` saves `SHOTS/name.png`.
const PRELUDE: &str = r#"
"use strict";
const { chromium } = require("playwright-core");
const path = require("path");
const readline = require("readline");
const BASE = process.env.BASE, SHOTS = process.env.SHOTS, STEP_MS = Number(process.env.STEP_MS);

const answers = [], waiting = [];
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const w = waiting.shift();
  if (w) w(line); else answers.push(line);
});
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
async function ask(name, data = {}) {
  say({ ask: name, ...data });
  const line = answers.length ? answers.shift()
    : await new Promise((resolve, reject) => {
        waiting.push(resolve);
        setTimeout(() => reject(new Error(`no answer to ${name}`)), 4 * STEP_MS).unref();
      });
  return JSON.parse(line);
}
async function until(fn, what) {
  const end = Date.now() + STEP_MS;
  let last;
  for (;;) {
    try { last = await fn(); } catch (e) { last = `threw ${e}`; }
    if (last && !String(last).startsWith("threw ")) return last;
    if (Date.now() > end) throw new Error(`${what}: not within ${STEP_MS} ms, last saw ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
const shots = [];
async function shot(page, name) {
  const file = path.join(SHOTS, name + ".png");
  await page.screenshot({ path: file, fullPage: true, timeout: STEP_MS });
  shots.push(file);
}
const text = async (loc) => ((await loc.textContent({ timeout: STEP_MS })) || "").trim();
// Waits for the POST to /ui/login that `click` sets off; its status.
async function submitLogin(page) {
  const [resp] = await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === "/ui/login" && r.request().method() === "POST",
                         { timeout: STEP_MS }),
    page.click("button[type=submit]"),
  ]);
  return resp.status();
}
// A step whose failure is recorded (in out.soft_errors[name], with a
// screenshot) without ending the flow: the pages after it still get
// checked, and the Rust side names the step that failed.
async function soft(page, out, name, fn) {
  try { await fn(); }
  catch (e) {
    out.soft_errors = out.soft_errors || {};
    out.soft_errors[name] = String((e && e.message) || e);
    await shot(page, `failure-${process.env.TEST_NAME || "script"}-${name}`).catch(() => {});
  }
}
// Follows a navigation link and waits for its page's root, then for
// `ready` inside it: the root exists before the page has fetched and drawn
// its content.
async function open(page, name, ready) {
  await page.click(`a[data-page=${name}]`);
  await page.locator(`main[data-page=${name}] ${ready}`).first().waitFor();
}

function run(steps) {
  const out = { page_errors: [], console_errors: [] };
  const watchdog = setTimeout(() => { console.error("script watchdog fired"); process.exit(3); }, 20 * STEP_MS);
  (async () => {
    // --no-sandbox: Chromium refuses to start its sandbox as root, which
    // the CI runs as; the pages are our own dashboard on loopback.
    const browser = await chromium.launch({
      executablePath: process.env.CLARACORE_TEST_CHROMIUM, args: ["--no-sandbox"], timeout: STEP_MS,
    });
    let page;
    try {
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      context.setDefaultTimeout(STEP_MS);
      // Layout shifts not caused by input (Chromium's layout-shift
      // entries), summed per document; a step resets window.__shift.
      await context.addInitScript(() => {
        window.__shift = 0;
        new PerformanceObserver((list) => {
          for (const e of list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value;
        }).observe({ type: "layout-shift", buffered: true });
      });
      page = await context.newPage();
      page.on("pageerror", (e) => out.page_errors.push(String(e)));
      page.on("console", (m) => { if (m.type() === "error") out.console_errors.push(m.text()); });
      // Every response of the dashboard's own paths, with its security
      // headers, as the browser got them.
      out.ui_responses = [];
      page.on("response", (r) => {
        const p = new URL(r.url()).pathname;
        if (!p.startsWith("/ui")) return;
        const h = r.headers();
        out.ui_responses.push({ path: p, status: r.status(), csp: h["content-security-policy"] || null,
                                frame: h["x-frame-options"] || null, nosniff: h["x-content-type-options"] || null,
                                referrer: h["referrer-policy"] || null });
      });
      await steps({ context, page, out });
    } catch (e) {
      out.error = String((e && e.stack) || e);
      if (page) {
        out.url = page.url();
        try { await shot(page, "failure-" + (process.env.TEST_NAME || "script")); out.failure_shot = shots[shots.length - 1]; }
        catch (_) {}
      }
    } finally {
      out.shots = shots;
      await browser.close().catch(() => {});
      clearTimeout(watchdog);
      say({ result: out });
      process.exit(0);
    }
  })();
}
"#;

/// The model table and history policy of the browser tests: the tiny
/// model, and full content recorded, so the request detail has a prompt.
fn models() -> String {
    format!(
        "{}[history]\ncontent = \"full\"\n",
        tiny_model_table("tiny", "")
    )
}

/// The session cookie as `name=value` for a `Cookie` header.
fn cookie_header(cookie: &Value) -> String {
    format!(
        "{}={}",
        cookie["name"].as_str().unwrap(),
        cookie["value"].as_str().unwrap()
    )
}

/// The admin's walk through every page.
const ADMIN_FLOW: &str = r#"
run(async ({ context, page, out }) => {
  // Not logged in: the app sends the browser to the login page.
  await page.goto(BASE + "/ui/");
  await page.waitForSelector("input[name=password]");
  out.unauthenticated_path = new URL(page.url()).pathname;
  await shot(page, "login");

  await page.fill("input[name=password]", "not the password");
  out.wrong_status = await submitLogin(page);
  out.wrong_error = await text(page.locator("[data-testid=login-error]"));

  await page.fill("input[name=password]", process.env.PASSWORD);
  out.login_status = await submitLogin(page);
  await page.locator("main[data-page=models] tr[data-model=tiny]").waitFor();
  out.logged_in_path = new URL(page.url()).pathname;
  out.open_banner = await page.locator("[data-testid=open-banner]").isVisible();
  const row = page.locator("tr[data-model=tiny]");
  const state = () => text(row.locator("[data-field=state]"));
  out.initial_state = await until(state, "the tiny model's state cell");
  out.fields = {};
  for (const f of ["state", "pid", "memory", "uptime", "inflight", "last-error", "load-time"]) {
    out.fields[f] = await row.locator(`[data-field=${f}]`).count();
  }
  out.buttons = { load: await row.locator("button[data-action=load]").count(),
                  stop: await row.locator("button[data-action=stop]").count() };
  out.cookie = (await context.cookies()).find((c) => c.name === "claracore_session") || null;
  out.session = await page.evaluate(() => fetch("/ui/session").then((r) => r.json()));
  await shot(page, "models-1280x800");
  await page.setViewportSize({ width: 390, height: 844 });
  out.phone_overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await shot(page, "models-390x844");
  await page.setViewportSize({ width: 1280, height: 800 });

  // The Rust side replays the cookie from outside the browser.
  await ask("cookie", { cookie: out.cookie, csrf: out.session.csrf });

  // From here on the page must never reload: the marker would be gone.
  await page.evaluate(() => { window.__stay = true; });
  await row.locator("button[data-action=load]").click();
  const seen = new Set();
  let progress = 0;
  await until(async () => {
    const s = await state();
    seen.add(s);
    progress = Math.max(progress, await row.locator("[data-field=progress]").count());
    return s === "ready";
  }, "ready after the load button");
  out.states_after_load = [...seen];
  out.progress_seen = progress > 0;
  const ps = await ask("loaded");
  out.pid_cell = await until(async () => {
    const t = await text(row.locator("[data-field=pid]"));
    return t.includes(String(ps.pid)) && t;
  }, `pid ${ps.pid} in its cell`);
  out.load_time_cell = await text(row.locator("[data-field=load-time]"));
  out.uptime_cell = await text(row.locator("[data-field=uptime]"));
  out.memory_cell = await text(row.locator("[data-field=memory]"));
  await shot(page, "models-ready");
  out.stayed_after_load = await page.evaluate(() => window.__stay === true);

  await open(page, "activity", "select[name=window]");
  for (const f of ["model", "outcome", "window"]) {
    out[`filter_${f}`] = await page.locator(`select[name=${f}]`).count();
  }
  out.filter_key = await page.locator("input[name=key]").count();
  await page.evaluate(() => { window.__shift = 0; });
  const chat = await ask("chat");
  const req = page.locator(`tr[data-request-id="${chat.id}"]`);
  await req.waitFor();
  await page.waitForTimeout(500);
  out.shift_on_request = await page.evaluate(() => window.__shift);
  out.stayed_after_chat = await page.evaluate(() => window.__stay === true);
  await shot(page, "activity");
  await req.click();
  const detail = page.locator("[data-testid=request-detail]");
  await detail.waitFor();
  out.detail = {};
  for (const f of ["latency", "ttft", "tokens", "content"]) {
    out.detail[f] = await until(() => text(detail.locator(`[data-field=${f}]`)), `the detail's ${f}`);
  }
  out.detail_markup = await detail.evaluate((el) => el.querySelectorAll("script, img, iframe").length);
  out.pwned = await page.evaluate(() => (window.__pwned === undefined ? null : window.__pwned));
  await shot(page, "detail");

  await open(page, "models", "tr[data-model=tiny]");
  await row.locator("button[data-action=stop]").click();
  out.state_after_stop = await until(async () => (await state()) === "stopped" && "stopped", "stopped after the stop button");
  out.stayed_after_stop = await page.evaluate(() => window.__stay === true);
  await ask("stopped");

  // A load from outside the browser shows on the page by itself.
  await page.evaluate(() => { window.__shift = 0; });
  await ask("loaded_elsewhere");
  const t0 = Date.now();
  out.external_state = await until(async () => (await state()) === "ready" && "ready",
                                   "ready after a load from outside the browser");
  await page.waitForTimeout(500);
  out.shift_on_state = await page.evaluate(() => window.__shift);
  out.external_ms = Date.now() - t0;
  out.stayed_after_external = await page.evaluate(() => window.__stay === true);

  await open(page, "stats", "svg[data-chart]");
  out.charts = {};
  for (const c of ["requests", "latency", "ttft", "tokens"]) {
    out.charts[c] = await page.locator(`svg[data-chart=${c}]`).count();
  }
  out.stats_window = await page.locator("select[name=window]").count();
  await shot(page, "stats");

  await open(page, "logs", "select[name=model]");
  await soft(page, out, "logs", async () => {
    await page.selectOption("select[name=model]", "tiny");
    out.log_lines = await until(() => text(page.locator("pre[data-testid=log-lines]")), "log lines of tiny");
  });
  await shot(page, "logs");

  await open(page, "audit", "tr[data-audit]");
  out.audit_rows = await page.locator("tr[data-audit]").allTextContents();
  await shot(page, "audit");

  await page.click("button[data-action=logout]");
  await page.waitForSelector("input[name=password]");
  out.after_logout_path = new URL(page.url()).pathname;
  await ask("logged_out");
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn password_login_models_activity_load_stop_stats_logs_audit_logout() {
    let hash = password_hash(PASSWORD);
    let d = Daemon::start(&format!(
        "{}[dashboard]\npassword_hash = \"{hash}\"\n",
        models()
    ));
    let mut b = Browser::start(
        ADMIN_FLOW,
        &d.addr,
        d.dir.path(),
        &[("PASSWORD", PASSWORD), ("TEST_NAME", "admin")],
    );

    // The browser's session cookie works from a plain HTTP client too: as
    // the admin on a read route, and a state change without the CSRF
    // header is refused.
    let ask = b.ask("cookie").await;
    let cookie = cookie_header(&ask["cookie"]);
    let (status, _, body) = send_with_headers(
        &d.addr,
        Method::GET,
        "/admin/ps",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the session cookie is a principal: {body}"
    );
    let (status, _, body) = send_with_headers(
        &d.addr,
        Method::POST,
        "/admin/models/tiny/load",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no x-csrf-token: {body}");
    assert_eq!(d.model("tiny").await["state"], "stopped");
    b.reply(&json!({}));

    // The load button loaded it.
    b.ask("loaded").await;
    let m = d.wait_state("tiny", "ready", STEP).await;
    b.reply(&json!({"pid": m["pid"]}));

    // A chat request from outside the browser, streamed (so it has a
    // TTFT), with markup in the prompt that must stay text on the page.
    b.ask("chat").await;
    let mut body = chat("tiny", 4, true);
    body["messages"][0]["content"] = PROMPT.into();
    let s = stream(&d.addr, "/v1/chat/completions", &body).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text());
    let rows = d.wait_rows(1, STEP).await;
    let row = rows[0].clone();
    b.reply(&json!({"id": row["request_id"]}));

    b.ask("stopped").await;
    d.wait_state("tiny", "stopped", STEP).await;
    b.reply(&json!({}));

    b.ask("loaded_elsewhere").await;
    let (status, body) = d.post_unix("/admin/models/tiny/load").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    d.wait_state("tiny", "ready", STEP).await;
    b.reply(&json!({}));

    b.ask("logged_out").await;
    let (status, _, body) = send_with_headers(
        &d.addr,
        Method::GET,
        "/admin/ps",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the cookie of a logged-out session is refused: {body}"
    );
    b.reply(&json!({}));
    let out = b.finish().await;

    assert_eq!(out["unauthenticated_path"], "/ui/login", "{out}");
    assert_eq!(out["wrong_status"], 401, "{out}");
    assert!(!out["wrong_error"].as_str().unwrap().is_empty(), "{out}");
    assert!(out["login_status"].as_u64().unwrap() < 400, "{out}");
    assert_eq!(out["open_banner"], false, "a password is configured: {out}");
    assert_eq!(out["initial_state"], "stopped", "{out}");
    for (field, n) in out["fields"].as_object().unwrap() {
        assert_eq!(n, 1, "one [data-field={field}] in the model's row: {out}");
    }
    assert_eq!(out["buttons"], json!({"load": 1, "stop": 1}), "{out}");
    let c = &out["cookie"];
    assert_eq!(
        (&c["httpOnly"], &c["sameSite"], &c["path"], &c["secure"]),
        (&json!(true), &json!("Strict"), &json!("/"), &json!(false)),
        "the session cookie's flags over plain HTTP: {c}"
    );
    assert_eq!(out["session"]["open"], false, "{out}");
    assert!(
        out["session"]["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("admin")),
        "a password login is admin: {out}"
    );
    assert!(
        out["phone_overflow"].as_i64().unwrap() <= 0,
        "the models page scrolls sideways at 390 px: {out}"
    );

    let states = out["states_after_load"].as_array().unwrap();
    assert!(states.contains(&json!("ready")), "{out}");
    assert!(
        states
            .iter()
            .all(|s| ["stopped", "starting", "ready"].contains(&s.as_str().unwrap())),
        "only the states of a load: {out}"
    );
    assert_eq!(out["stayed_after_load"], true, "the page reloaded: {out}");
    assert_eq!(out["stayed_after_chat"], true, "the page reloaded: {out}");
    assert_eq!(out["stayed_after_stop"], true, "the page reloaded: {out}");
    assert_eq!(out["external_state"], "ready", "{out}");
    assert_eq!(
        out["stayed_after_external"], true,
        "the page reloaded: {out}"
    );
    // No layout shift as events arrive: below 0.1, the bound web.dev
    // calls good for a whole page's cumulative layout shift.
    for shift in ["shift_on_request", "shift_on_state"] {
        assert!(out[shift].as_f64().unwrap() < 0.1, "{shift}: {out}");
    }
    assert!(!out["load_time_cell"].as_str().unwrap().is_empty(), "{out}");
    for f in ["model", "outcome", "window", "key"] {
        assert_eq!(
            out[format!("filter_{f}")],
            1,
            "the activity filter {f}: {out}"
        );
    }

    // The detail shows this request's numbers, and its content as text.
    let detail = &out["detail"];
    let digits = |v: &Value| v.as_str().unwrap().chars().any(|c| c.is_ascii_digit());
    assert!(
        digits(&detail["latency"]) && digits(&detail["ttft"]),
        "{detail}"
    );
    assert!(row["ttft_ms"].is_number(), "a stream has a TTFT: {row}");
    let tokens = detail["tokens"].as_str().unwrap();
    for n in ["prompt_tokens", "completion_tokens"] {
        assert!(
            tokens.contains(&row[n].to_string()),
            "{n} = {} not in the detail's tokens {tokens:?}",
            row[n]
        );
    }
    assert!(
        detail["content"].as_str().unwrap().contains(PROMPT),
        "the prompt, markup and all, shows as text: {detail}"
    );
    assert_eq!(
        out["detail_markup"], 0,
        "the content became elements: {out}"
    );
    assert!(
        out["pwned"].is_null(),
        "a script from the prompt ran: {out}"
    );

    for (chart, n) in out["charts"].as_object().unwrap() {
        assert_eq!(n, 1, "one svg[data-chart={chart}]: {out}");
    }
    assert_eq!(out["stats_window"], 1, "{out}");
    let audit = out["audit_rows"].as_array().unwrap().len();
    assert!(audit >= 2, "the load and the stop are audited: {out}");
    assert_eq!(out["after_logout_path"], "/ui/login", "{out}");
    assert!(out["page_errors"].as_array().unwrap().is_empty(), "{out}");
    assert_security_headers(&out);
    // Last, as it rests on the per-model log route (GET /admin/logs/{model}).
    assert!(
        out["soft_errors"]["logs"].is_null(),
        "the logs page: {}",
        out["soft_errors"]["logs"]
    );
    assert!(
        out["log_lines"].as_str().unwrap().contains("llama"),
        "llama-server's own output on the logs page: {out}"
    );
    // A ready model's memory and uptime are figures, not placeholders.
    for cell in ["memory_cell", "uptime_cell"] {
        assert!(
            out[cell]
                .as_str()
                .unwrap()
                .chars()
                .any(|c| c.is_ascii_digit()),
            "{cell} of the ready model shows no figure: {}",
            out[cell]
        );
    }
}

/// Every `/ui` response the browser got carries the security headers,
/// and the page broke none of its Content-Security-Policy.
fn assert_security_headers(out: &Value) {
    let responses = out["ui_responses"].as_array().unwrap();
    assert!(responses.len() >= 5, "pages, scripts, styles: {out}");
    for r in responses {
        let csp = r["csp"].as_str().unwrap_or_default();
        assert!(
            csp.split(';').next() == Some("default-src 'self'") && !csp.contains("unsafe"),
            "{r}"
        );
        assert_eq!(r["frame"], "DENY", "{r}");
        assert_eq!(r["nosniff"], "nosniff", "{r}");
        assert!(r["referrer"].is_string(), "{r}");
    }
    let csp_broken = out["console_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.as_str().unwrap().contains("Content Security Policy"))
        .count();
    assert_eq!(csp_broken, 0, "{out}");
}

/// A prompt that runs script if it is ever parsed as HTML. No quotes or
/// backslashes: the detail shows the request body as recorded, JSON, where
/// those would be escaped.
const PROMPT: &str =
    "hi <script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2> there";

/// Seven logins from one browser: five wrong, a sixth wrong one, then the
/// right password.
const THROTTLE_FLOW: &str = r#"
run(async ({ page, out }) => {
  await page.goto(BASE + "/ui/login");
  await page.waitForSelector("input[name=password]");
  out.attempts = [];
  for (let i = 0; i < 7; i++) {
    await page.fill("input[name=password]", i < 6 ? `wrong ${i}` : process.env.PASSWORD);
    const status = await submitLogin(page);
    const error = await until(() => text(page.locator("[data-testid=login-error]")), `the error of attempt ${i + 1}`);
    out.attempts.push({ status, error, path: new URL(page.url()).pathname });
  }
  await shot(page, "login-throttled");
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_refused_and_throttled_after_five() {
    let hash = password_hash(PASSWORD);
    let d = Daemon::start(&format!(
        "{}[dashboard]\npassword_hash = \"{hash}\"\n",
        models()
    ));
    let b = Browser::start(
        THROTTLE_FLOW,
        &d.addr,
        d.dir.path(),
        &[("PASSWORD", PASSWORD), ("TEST_NAME", "throttle")],
    );
    let out = b.finish().await;
    let attempts = out["attempts"].as_array().unwrap();
    let statuses: Vec<u64> = attempts
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 429, 429],
        "five refusals, then throttled, even for the right password: {out}"
    );
    assert_ne!(
        attempts[0]["error"], attempts[5]["error"],
        "the page says it is throttled, not just wrong: {out}"
    );
    assert!(
        attempts.iter().all(|a| a["path"] == "/ui/login"),
        "never let in: {out}"
    );
    assert_security_headers(&out);

    // Each failure is in the audit trail with the browser's IP.
    let (_, page) = d.get("/admin/audit").await;
    let rows = page["audit"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            r["action"].as_str().unwrap_or("").contains("login")
                && r["principal"].as_str().unwrap_or("").contains("127.0.0.1")
        })
        .collect();
    assert!(failed.len() >= 5, "failed logins with the IP: {rows:?}");
}

/// A `read` key's session: no admin buttons, admin routes refused.
const READ_KEY_FLOW: &str = r#"
run(async ({ context, page, out }) => {
  await page.goto(BASE + "/ui/login");
  await page.fill("input[name=key]", process.env.READ_KEY);
  out.login_status = await submitLogin(page);
  await page.locator("main[data-page=models] tr[data-model=tiny]").waitFor();
  const row = page.locator("tr[data-model=tiny]");
  out.state = await until(() => text(row.locator("[data-field=state]")), "the tiny model's state cell");
  out.buttons = await page.locator("button[data-action=load], button[data-action=stop]").count();
  out.audit_link = await page.locator("a[data-page=audit]:visible").count();
  out.session = await page.evaluate(() => fetch("/ui/session").then((r) => r.json()));
  // The page's own fetches, with the CSRF token, still cannot do admin work.
  out.load_status = await page.evaluate(async (csrf) =>
    (await fetch("/admin/models/tiny/load", { method: "POST", headers: { "x-csrf-token": csrf } })).status,
    out.session.csrf);
  out.audit_status = await page.evaluate(async () => (await fetch("/admin/audit")).status);
  out.cookie = (await context.cookies()).find((c) => c.name === "claracore_session") || null;
  await shot(page, "models-read-key");
  await ask("cookie", { cookie: out.cookie });
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_read_keys_session_sees_no_admin_buttons_and_is_refused_admin_routes() {
    const READER: &str = "ccsk_b40e5e7000000000000000000000000000000000000000000000000000000001";
    let hash = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(READER.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    let d = Daemon::start(&format!(
        "{}[auth.keys.reader]\nhash = \"{hash}\"\nscopes = [\"read\"]\n",
        models()
    ));
    let mut b = Browser::start(
        READ_KEY_FLOW,
        &d.addr,
        d.dir.path(),
        &[("READ_KEY", READER), ("TEST_NAME", "read-key")],
    );
    let ask = b.ask("cookie").await;
    let cookie = cookie_header(&ask["cookie"]);
    let (status, _, body) = send_with_headers(
        &d.addr,
        Method::GET,
        "/admin/ps",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "read is allowed: {body}");
    let (status, _, body) = send_with_headers(
        &d.addr,
        Method::GET,
        "/admin/audit",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "admin is not: {body}");
    b.reply(&json!({}));
    let out = b.finish().await;

    assert!(out["login_status"].as_u64().unwrap() < 400, "{out}");
    assert_eq!(out["state"], "stopped", "{out}");
    assert_eq!(out["buttons"], 0, "no load or stop button for read: {out}");
    assert_eq!(out["audit_link"], 0, "no audit page for read: {out}");
    assert_eq!(out["session"]["scopes"], json!(["read"]), "{out}");
    assert_eq!(out["load_status"], 403, "{out}");
    assert_eq!(out["audit_status"], 403, "{out}");
    assert_eq!(d.model("tiny").await["state"], "stopped", "nothing loaded");
    assert_security_headers(&out);
}

/// A keyless loopback daemon without a password: the dashboard opens
/// without a login and says so.
const OPEN_FLOW: &str = r#"
run(async ({ page, out }) => {
  await page.goto(BASE + "/ui/");
  await page.locator("main[data-page=models] tr[data-model=tiny]").waitFor();
  out.path = new URL(page.url()).pathname;
  out.banner = (await page.locator("[data-testid=open-banner]").isVisible())
    && await text(page.locator("[data-testid=open-banner]"));
  out.state = await until(() => text(page.locator("tr[data-model=tiny] [data-field=state]")), "the tiny model's state cell");
  out.session = await page.evaluate(() => fetch("/ui/session").then((r) => r.json()));
  await shot(page, "open-banner");
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_keyless_loopback_daemon_opens_the_dashboard_with_a_banner() {
    let d = Daemon::start(&models());
    let b = Browser::start(OPEN_FLOW, &d.addr, d.dir.path(), &[("TEST_NAME", "open")]);
    let out = b.finish().await;
    assert_eq!(out["path"], "/ui/", "no login page: {out}");
    assert!(
        out["banner"].as_str().is_some_and(|b| !b.is_empty()),
        "the open-mode banner says so: {out}"
    );
    assert_eq!(out["state"], "stopped", "{out}");
    assert_eq!(out["session"]["open"], true, "{out}");
    assert_security_headers(&out);
}
