//! The dashboard over HTTP: security headers on every `/ui/` response,
//! the session cookie's flags, password and key logins, throttled and
//! audited failures, CSRF on cookie writes and logout, sessions ended by
//! expiry and by a password change on reload, the open mode, and assets
//! that reach no other host. (The browser tests drive the pages.)

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const READER: &str = "ccsk_dashreader000000000000000000000000000000000000000000000000000000";
const ADMIN: &str = "ccsk_dashadmin0000000000000000000000000000000000000000000000000000000";
const INF: &str = "ccsk_dashinf000000000000000000000000000000000000000000000000000000000";

fn sha(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The PHC string `claracore dashboard hash-password` prints for
/// `password` (given on stdin, not a terminal).
fn hash_password(password: &str) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_claracore"))
        .args(["dashboard", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let phc = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    phc
}

fn config(phc: &str, extra: &str) -> String {
    format!(
        "{}[auth.keys.reader]\nhash = \"{}\"\nscopes = [\"read\"]\n\
         [auth.keys.boss]\nhash = \"{}\"\nscopes = [\"admin\"]\n\
         [auth.keys.inf]\nhash = \"{}\"\nscopes = [\"inference\"]\n\
         [dashboard]\npassword_hash = \"{phc}\"\ntrusted_proxies = [\"127.0.0.9\"]\n{extra}",
        tiny_model_table("tiny", ""),
        sha(READER),
        sha(ADMIN),
        sha(INF),
    )
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `claracore_session=…` pair of its Set-Cookie.
    fn cookie(&self) -> String {
        let set = self.header("set-cookie");
        assert!(set.starts_with("claracore_session="), "{set:?}");
        set.split(';').next().unwrap().to_string()
    }
}

/// One request over TCP from `source` (a loopback address), with
/// `headers` and an optional body.
async fn call(
    addr: &str,
    source: [u8; 4],
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("answer within 30 s")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn login(addr: &str, source: [u8; 4], body: Value, extra: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    call(
        addr,
        source,
        Method::POST,
        "/ui/login",
        &headers,
        Some(body.to_string()),
    )
    .await
}

/// A logged-in session: its cookie pair and CSRF token.
async fn session(addr: &str, source: [u8; 4], body: Value) -> (String, String) {
    let a = login(addr, source, body, &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let cookie = a.cookie();
    let s = call(
        addr,
        source,
        Method::GET,
        "/ui/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.body);
    let csrf = s.json()["csrf"].as_str().unwrap().to_string();
    assert_eq!(csrf.len(), 64);
    (cookie, csrf)
}

fn assert_secure_headers(a: &Answer, what: &str) {
    assert_eq!(
        a.header("content-security-policy").split(';').next(),
        Some("default-src 'self'"),
        "{what}"
    );
    assert_eq!(a.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(a.header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(a.header("referrer-policy"), "no-referrer", "{what}");
}

const ASSETS: [(&str, &str); 5] = [
    ("/ui/", "text/html"),
    ("/ui/login", "text/html"),
    ("/ui/app.js", "text/javascript"),
    ("/ui/login.js", "text/javascript"),
    ("/ui/app.css", "text/css"),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_ui_response_carries_the_security_headers_and_assets_revalidate() {
    let d = Daemon::start(&config(&hash_password("pw"), ""));
    let src = [127, 0, 0, 1];
    for (path, ty) in ASSETS {
        let a = call(&d.addr, src, Method::GET, path, &[], None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(
            a.header("content-type").starts_with(ty),
            "{path}: {}",
            a.header("content-type")
        );
        assert_secure_headers(&a, path);
        if ty == "text/html" {
            assert_eq!(a.header("cache-control"), "no-store", "{path}");
        }
        let tag = a.header("etag").to_string();
        assert!(tag.starts_with('"'), "{path}: {tag:?}");
        let again = call(
            &d.addr,
            src,
            Method::GET,
            path,
            &[("if-none-match", &tag)],
            None,
        )
        .await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
        assert_secure_headers(&again, path);
    }
    // Errors, redirects and the session routes too.
    for (method, path, body) in [
        (Method::GET, "/ui/session", None),
        (Method::GET, "/ui/nothing-here", None),
        (Method::GET, "/ui", None),
        (Method::POST, "/ui/logout", None),
        (
            Method::POST,
            "/ui/login",
            Some(json!({"password": "no"}).to_string()),
        ),
        (Method::POST, "/ui/login", Some("{".to_string())),
        (Method::DELETE, "/ui/", None),
    ] {
        let a = call(&d.addr, [127, 0, 0, 2], method.clone(), path, &[], body).await;
        assert!(
            a.status.is_client_error() || a.status.is_redirection(),
            "{method} {path}: {}",
            a.status
        );
        assert_secure_headers(&a, path);
        assert_eq!(a.header("cache-control"), "no-store", "{method} {path}");
    }
    let s = call(&d.addr, src, Method::GET, "/ui/session", &[], None).await;
    assert_eq!(s.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_cookies_csrf_and_logout() {
    let d = Daemon::start(&config(&hash_password("s3cret pass"), ""));
    let addr = d.addr.as_str();
    let src = [127, 0, 0, 5];

    let wrong = login(addr, src, json!({"password": "nope"}), &[]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.body);
    assert!(wrong.headers.get("set-cookie").is_none());

    // The cookie's flags; Secure only behind a trusted TLS proxy.
    let ok = login(addr, src, json!({"password": "s3cret pass"}), &[]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let set = ok.header("set-cookie").to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=86400"] {
        assert!(set.split("; ").any(|f| f == flag), "{flag} missing: {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    assert_eq!(ok.header("cache-control"), "no-store");
    let proto = [("x-forwarded-proto", "https")];
    let trusted = login(
        addr,
        [127, 0, 0, 9],
        json!({"password": "s3cret pass"}),
        &proto,
    )
    .await;
    assert!(
        trusted
            .header("set-cookie")
            .split("; ")
            .any(|f| f == "Secure"),
        "{}",
        trusted.header("set-cookie")
    );
    let untrusted = login(
        addr,
        [127, 0, 0, 10],
        json!({"password": "s3cret pass"}),
        &proto,
    )
    .await;
    assert_eq!(untrusted.status, StatusCode::OK);
    assert!(!untrusted.header("set-cookie").contains("Secure"));
    // Another site's page cannot log a visitor in.
    let cross = login(
        addr,
        src,
        json!({"password": "s3cret pass"}),
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);

    // The password session reaches the API as admin.
    let (cookie, csrf) = session(addr, src, json!({"password": "s3cret pass"})).await;
    let c = [("cookie", cookie.as_str())];
    let s = call(addr, src, Method::GET, "/ui/session", &c, None).await;
    assert_eq!(s.json()["scopes"], json!(["read", "admin"]));
    assert_eq!(s.json()["open"], json!(false));
    assert_eq!(s.header("cache-control"), "no-store");
    let ps = call(addr, src, Method::GET, "/admin/ps", &c, None).await;
    assert_eq!(ps.status, StatusCode::OK, "{}", ps.body);
    assert!(ps.body.contains("\"tiny\""));
    // …but never as an inference principal.
    let inference = call(
        addr,
        src,
        Method::POST,
        "/v1/chat/completions",
        &[
            c[0],
            ("x-csrf-token", &csrf),
            ("content-type", "application/json"),
        ],
        Some(chat("tiny", 1, false).to_string()),
    )
    .await;
    assert_eq!(
        inference.status,
        StatusCode::FORBIDDEN,
        "{}",
        inference.body
    );
    // A cookie write needs the CSRF token.
    let stop = "/admin/models/tiny/stop";
    let bare = call(addr, src, Method::POST, stop, &c, None).await;
    assert_eq!(bare.status, StatusCode::FORBIDDEN, "{}", bare.body);
    assert!(bare.body.contains("x-csrf-token"), "{}", bare.body);
    let forged = call(
        addr,
        src,
        Method::POST,
        stop,
        &[c[0], ("x-csrf-token", "0000")],
        None,
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let with = call(
        addr,
        src,
        Method::POST,
        stop,
        &[c[0], ("x-csrf-token", &csrf)],
        None,
    )
    .await;
    assert_eq!(with.status, StatusCode::OK, "{}", with.body);

    // A read key's session reads but is refused every admin route.
    let (rc, rcsrf) = session(addr, src, json!({"key": READER})).await;
    let r = [("cookie", rc.as_str()), ("x-csrf-token", rcsrf.as_str())];
    let rs = call(addr, src, Method::GET, "/ui/session", &r, None).await;
    assert_eq!(rs.json()["scopes"], json!(["read"]));
    assert_eq!(rs.json()["principal"], json!("reader"));
    assert_eq!(
        call(addr, src, Method::GET, "/admin/ps", &r, None)
            .await
            .status,
        StatusCode::OK
    );
    for (m, path) in [
        (Method::POST, "/admin/models/x/stop"),
        (Method::POST, stop),
        (Method::POST, "/admin/models/tiny/load"),
        (Method::POST, "/admin/backup"),
        (Method::GET, "/admin/audit"),
        (Method::GET, "/upstream/tiny/health"),
    ] {
        let a = call(addr, src, m.clone(), path, &r, None).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{m} {path}: {}", a.body);
    }
    // An admin key's session may; an inference-only key cannot log in.
    let (ac, acsrf) = session(addr, src, json!({"key": ADMIN})).await;
    let audit = call(
        addr,
        src,
        Method::GET,
        "/admin/audit",
        &[("cookie", &ac), ("x-csrf-token", &acsrf)],
        None,
    )
    .await;
    assert_eq!(audit.status, StatusCode::OK);
    let inf = login(addr, src, json!({"key": INF}), &[]).await;
    assert_eq!(inf.status, StatusCode::FORBIDDEN, "{}", inf.body);

    // Logout needs the CSRF token, then the cookie is worthless.
    let no = call(addr, src, Method::POST, "/ui/logout", &c, None).await;
    assert_eq!(no.status, StatusCode::FORBIDDEN);
    assert_eq!(
        call(addr, src, Method::GET, "/admin/ps", &c, None)
            .await
            .status,
        StatusCode::OK
    );
    let out = call(
        addr,
        src,
        Method::POST,
        "/ui/logout",
        &[c[0], ("x-csrf-token", &csrf)],
        None,
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    for path in ["/admin/ps", "/ui/session"] {
        let a = call(addr, src, Method::GET, path, &c, None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Logins and logouts are audited with the IP.
    let (_, page) = d.get("/admin/audit").await;
    let rows = page["audit"].as_array().unwrap();
    let has = |action: &str, principal: &str, target: &str| {
        rows.iter().any(|r| {
            r["action"] == action
                && r["principal"] == principal
                && r["target"].as_str().unwrap_or("").contains(target)
        })
    };
    assert!(has("login", "dashboard", "ip:127.0.0.5"), "{rows:?}");
    assert!(has("login", "reader", "ip:127.0.0.5"), "{rows:?}");
    assert!(has("logout", "dashboard", "127.0.0.5"), "{rows:?}");
    assert!(has("login_failed", "ip:127.0.0.5", "password"), "{rows:?}");
    // No secret reaches the log.
    let log = d.log_text();
    for secret in [
        "s3cret pass",
        READER,
        ADMIN,
        &csrf,
        cookie.split('=').nth(1).unwrap(),
    ] {
        assert!(!log.contains(secret), "{secret} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_throttled_per_ip_and_audited_with_it() {
    let d = Daemon::start(&config(&hash_password("right"), ""));
    let bad = [127, 0, 0, 21];
    for i in 1..=5 {
        let a = login(&d.addr, bad, json!({"password": format!("wrong{i}")}), &[]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // The 6th, even with the right password, is refused for the window.
    let sixth = login(&d.addr, bad, json!({"password": "right"}), &[]).await;
    assert_eq!(
        sixth.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        sixth.body
    );
    let retry: u64 = sixth.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let key = login(&d.addr, bad, json!({"key": ADMIN}), &[]).await;
    assert_eq!(key.status, StatusCode::TOO_MANY_REQUESTS, "keys too");
    let other = login(&d.addr, [127, 0, 0, 22], json!({"password": "right"}), &[]).await;
    assert_eq!(other.status, StatusCode::OK, "another IP is unaffected");
    let (_, page) = d.get("/admin/audit").await;
    let rows = page["audit"].as_array().unwrap();
    let failed = rows
        .iter()
        .filter(|r| r["action"] == "login_failed" && r["principal"] == "ip:127.0.0.21")
        .count();
    assert_eq!(failed, 7, "5 wrong + 2 throttled: {rows:?}");
    assert!(rows
        .iter()
        .any(|r| r["action"] == "login" && r["target"] == "ip:127.0.0.22"));
}

/// Waits for the audit row of the `n`th reload.
async fn reloaded(d: &Daemon, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = d.get("/admin/audit").await;
        let reloads: Vec<Value> = page["audit"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == "reload")
            .cloned()
            .collect();
        if reloads.len() >= n {
            return reloads[0].clone();
        }
        assert!(Instant::now() < deadline, "no reload row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_password_on_reload_ends_every_session_and_sessions_expire() {
    let old = hash_password("old one");
    let d = Daemon::start(&config(&old, "session_lifetime = \"2s\"\n"));
    let addr = d.addr.as_str();
    let src = [127, 0, 0, 31];

    // Expiry.
    let (cookie, _) = session(addr, src, json!({"password": "old one"})).await;
    let c = [("cookie", cookie.as_str())];
    let a = login(addr, src, json!({"password": "old one"}), &[]).await;
    assert!(a.header("set-cookie").contains("Max-Age=2"));
    assert_eq!(
        call(addr, src, Method::GET, "/admin/ps", &c, None)
            .await
            .status,
        StatusCode::OK
    );
    // Stays: the 2 s session lifetime passing is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        call(addr, src, Method::GET, "/admin/ps", &c, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // A reload that keeps the password keeps sessions; a new one ends them.
    let config_path = d.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let longer = text.replace("session_lifetime = \"2s\"", "session_lifetime = \"1h\"");
    write_file(&config_path, &longer);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(reloaded(&d, 1).await["result"], "ok");
    let (pw, _) = session(addr, src, json!({"password": "old one"})).await;
    let (key, _) = session(addr, src, json!({"key": READER})).await;
    write_file(&config_path, &longer);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(reloaded(&d, 2).await["result"], "ok");
    assert_eq!(
        call(
            addr,
            src,
            Method::GET,
            "/admin/ps",
            &[("cookie", &pw)],
            None
        )
        .await
        .status,
        StatusCode::OK,
        "same password: kept"
    );

    let new = hash_password("new one");
    write_file(&config_path, &longer.replace(&old, &new));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(reloaded(&d, 3).await["result"], "ok");
    for cookie in [&pw, &key] {
        let a = call(
            addr,
            src,
            Method::GET,
            "/admin/ps",
            &[("cookie", cookie)],
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{cookie}");
    }
    assert_eq!(
        login(addr, src, json!({"password": "old one"}), &[])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let (fresh, _) = session(addr, src, json!({"password": "new one"})).await;

    // A key removed on reload ends its sessions; the password's stay.
    let (key, _) = session(addr, src, json!({"key": READER})).await;
    let without = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("[auth.keys.reader]", "[auth.keys.renamed]");
    write_file(&config_path, &without);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(reloaded(&d, 4).await["result"], "ok");
    assert_eq!(
        call(
            addr,
            src,
            Method::GET,
            "/admin/ps",
            &[("cookie", &key)],
            None
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            addr,
            src,
            Method::GET,
            "/admin/ps",
            &[("cookie", &fresh)],
            None
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_loopback_daemon_opens_the_dashboard_with_a_banner() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    let src = [127, 0, 0, 1];
    let s = call(&d.addr, src, Method::GET, "/ui/session", &[], None).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.body);
    assert_eq!(s.json()["open"], json!(true));
    assert_eq!(s.json()["login"], json!("open"));
    let cookie = s.cookie();
    let ps = call(
        &d.addr,
        src,
        Method::GET,
        "/admin/ps",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(ps.status, StatusCode::OK);
    // Without the cookie the API stays as open as before: no admin.
    assert_eq!(
        call(&d.addr, src, Method::GET, "/admin/ps", &[], None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let page = call(&d.addr, src, Method::GET, "/ui/", &[], None).await;
    assert!(page.body.contains("data-testid=\"open-banner\""));
    assert!(page.body.contains("open: no password or key configured"));
    // A page of another name (DNS rebinding) gets no open session.
    let rebound = call(
        &d.addr,
        src,
        Method::GET,
        "/ui/session",
        &[("host", "evil.example:80")],
        None,
    )
    .await;
    assert_eq!(rebound.status, StatusCode::UNAUTHORIZED, "{}", rebound.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_assets_reach_no_other_host_and_never_write_html_from_data() {
    let d = Daemon::start(&tiny_model_table("tiny", ""));
    for (path, _) in ASSETS {
        let a = call(&d.addr, [127, 0, 0, 1], Method::GET, path, &[], None).await;
        assert_eq!(a.status, StatusCode::OK);
        for scheme in ["http://", "https://", "//cdn", "@import"] {
            assert!(!a.body.contains(scheme), "{path} names {scheme}");
        }
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!a.body.contains(sink), "{path} uses {sink}");
        }
        if path.ends_with(".html") || path.ends_with('/') || path.ends_with("login") {
            for line in a.body.lines().filter(|l| l.contains("<script")) {
                assert!(line.contains("src=\"/ui/"), "{path}: {line}");
            }
            assert!(
                !a.body.contains("<style") && !a.body.contains(" style="),
                "{path}"
            );
        }
    }
    // The DOM the browser tests rely on.
    let index = call(&d.addr, [127, 0, 0, 1], Method::GET, "/ui/", &[], None)
        .await
        .body;
    for page in ["models", "activity", "stats", "logs", "audit"] {
        assert!(index.contains(&format!("data-page=\"{page}\"")), "{page}");
    }
    assert!(index.contains("data-action=\"logout\""));
    let login = call(&d.addr, [127, 0, 0, 1], Method::GET, "/ui/login", &[], None)
        .await
        .body;
    for part in [
        "name=\"password\"",
        "name=\"key\"",
        "type=\"submit\"",
        "data-testid=\"login-error\"",
    ] {
        assert!(login.contains(part), "{part}");
    }
}

#[test]
fn a_bad_dashboard_table_exits_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (text, want) in [
        (
            "[dashboard]\npassword_hash = \"hunter2\"\n",
            ":2:17: dashboard.password_hash: not a PHC string",
        ),
        (
            "[dashboard]\npassword_hash_file = \"/nonexistent/pw\"\n",
            ":2:22: dashboard.password_hash_file: cannot read /nonexistent/pw",
        ),
    ] {
        write_file(&path, text);
        // Without --strict, check-config (the Nix module's build-time
        // check) leaves the hash file to the running system.
        let strict = ["check-config", "--strict", path.to_str().unwrap()];
        let lenient = ["check-config", path.to_str().unwrap()];
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_claracore"))
            .args(lenient)
            .output()
            .unwrap();
        let reads_file = text.contains("password_hash_file");
        assert_eq!(
            out.status.code(),
            Some(if reads_file { 0 } else { 78 }),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for args in [
            strict.to_vec(),
            vec!["serve", "--config", path.to_str().unwrap()],
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_claracore"))
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
            assert!(
                err.contains(&format!("{}{want}", path.display())),
                "{args:?}: {err}"
            );
        }
    }
}
