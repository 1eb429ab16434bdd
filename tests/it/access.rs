//! Access control as an attacker would try it: every route without a key,
//! with a wrong, expired, under-scoped or wrong-model key, and with the
//! right one, over TCP and over the local socket; brute force; rates; the
//! key never leaking into logs, rows or metrics; bad auth config.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};

fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

const FULL: &str = "ccsk_full000000000000000000000000000000000000000000000000000000000000";
const OLD: &str = "ccsk_old0000000000000000000000000000000000000000000000000000000000000";
const INF: &str = "ccsk_inf0000000000000000000000000000000000000000000000000000000000000";
const READER: &str = "ccsk_reader0000000000000000000000000000000000000000000000000000000000";
const G_ONLY: &str = "ccsk_gonly00000000000000000000000000000000000000000000000000000000000";
const RATED: &str = "ccsk_rated00000000000000000000000000000000000000000000000000000000000";

fn keys() -> String {
    format!(
        "[auth.keys.full]\nhash = \"{}\"\nscopes = [\"inference\", \"admin\"]\n\
         [auth.keys.old]\nhash = \"{}\"\nscopes = [\"inference\", \"admin\"]\nexpires = \"2020-01-01\"\n\
         [auth.keys.inf]\nhash = \"{}\"\nscopes = [\"inference\"]\n\
         [auth.keys.reader]\nhash = \"{}\"\nscopes = [\"read\"]\n\
         [auth.keys.gonly]\nhash = \"{}\"\nscopes = [\"inference\", \"admin\"]\nmodels = [\"g\"]\n\
         [auth.keys.rated]\nhash = \"{}\"\nscopes = [\"inference\"]\nrate = 2\n",
        hash(FULL),
        hash(OLD),
        hash(INF),
        hash(READER),
        hash(G_ONLY),
        hash(RATED)
    )
}

/// One request with an optional key, over TCP from `source` or over the
/// unix socket; status and raw body.
async fn call(
    target: &Target<'_>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    key: Option<&str>,
) -> (StatusCode, String, hyper::HeaderMap) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    // A JSON string stands for a multipart form, sent as it is.
    let req = match body {
        Some(serde_json::Value::String(form)) => req
            .header("content-type", FORM_TYPE)
            .body(Full::new(Bytes::from(form))),
        body => req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            ))),
    }
    .unwrap();
    let resp = match target {
        Target::Tcp { addr, source } => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new((*source).into(), 0)).unwrap();
            let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        }
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&bytes).into_owned(),
        headers,
    )
}

enum Target<'a> {
    Tcp { addr: &'a str, source: [u8; 4] },
    Unix(&'a Path),
}

/// What a route needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Open,
    Inference,
    Listing,
    Read,
    Admin,
    /// `/ui/session`: only a session cookie (which no cell has) answers.
    Session,
}

const FORM_TYPE: &str = "multipart/form-data; boundary=b0";

/// The status of a request that passed every check: the fake upstream
/// answers chat, completions and embeddings, and the other model routes
/// with its own 404 "File Not Found" (told apart from claracore's 404s by
/// [`passed_through`]).
fn passed(path: &str) -> u16 {
    match path {
        "/v1/messages"
        | "/v1/messages/count_tokens"
        | "/v1/responses"
        | "/v1/audio/speech"
        | "/v1/audio/transcriptions"
        | "/v1/images/generations"
        | "/infill" => 404,
        // Models come from the config: Ollama's pull/delete say so.
        "/api/pull" | "/api/delete" => 400,
        _ => 200,
    }
}

/// Whether a body is the fake upstream's own 404.
fn passed_through(text: &str) -> bool {
    text.contains("File Not Found")
}

/// Every route, with what it needs and whether it names model `f`.
fn routes() -> Vec<(Method, &'static str, Option<serde_json::Value>, Needs, bool)> {
    let chat =
        json!({"model": "f", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let named = |extra: serde_json::Value| {
        let mut v = json!({"model": "f"});
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        Some(v)
    };
    let form =
        "--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n\
                --b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nf\r\n--b0--\r\n";
    let msgs = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    vec![
        (
            Method::POST,
            "/v1/messages",
            named(msgs.clone()),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/messages/count_tokens",
            named(msgs),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/responses",
            named(json!({"input": "hi"})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/audio/speech",
            named(json!({"input": "hi"})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/audio/transcriptions",
            Some(serde_json::Value::String(form.into())),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/images/generations",
            named(json!({"prompt": "a"})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/infill",
            named(json!({"input_prefix": "a"})),
            Needs::Inference,
            true,
        ),
        (Method::GET, "/v1/models/f", None, Needs::Listing, true),
        (
            Method::POST,
            "/v1/chat/completions",
            Some(chat),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/v1/embeddings",
            Some(json!({"model": "f", "input": "x"})),
            Needs::Inference,
            true,
        ),
        (Method::GET, "/v1/models", None, Needs::Listing, false),
        (Method::GET, "/health", None, Needs::Open, false),
        (Method::GET, "/live", None, Needs::Open, false),
        (Method::GET, "/ready", None, Needs::Open, false),
        (Method::GET, "/metrics", None, Needs::Read, false),
        (Method::GET, "/admin/ps", None, Needs::Read, false),
        (Method::GET, "/admin/history", None, Needs::Read, false),
        (Method::GET, "/admin/history/1", None, Needs::Read, false),
        (Method::GET, "/admin/stats", None, Needs::Read, false),
        (Method::POST, "/admin/backup", None, Needs::Admin, false),
        (Method::GET, "/admin/audit", None, Needs::Admin, false),
        (Method::GET, "/admin/logs/f", None, Needs::Admin, true),
        // The stream ends after its replay, so the matrix can read it to
        // the end.
        (
            Method::GET,
            "/admin/events?replay_only=1",
            None,
            Needs::Read,
            false,
        ),
        (Method::GET, "/upstream/f/health", None, Needs::Admin, true),
        (Method::GET, "/ui/", None, Needs::Open, false),
        (Method::GET, "/ui/login", None, Needs::Open, false),
        (Method::GET, "/ui/app.js", None, Needs::Open, false),
        (Method::GET, "/ui/session", None, Needs::Session, false),
        (Method::GET, "/", None, Needs::Open, false),
        (Method::HEAD, "/", None, Needs::Open, false),
        (Method::GET, "/api/version", None, Needs::Open, false),
        (Method::GET, "/api/tags", None, Needs::Listing, false),
        (Method::GET, "/api/ps", None, Needs::Listing, false),
        (
            Method::POST,
            "/api/show",
            named(json!({})),
            Needs::Listing,
            true,
        ),
        (
            Method::POST,
            "/api/chat",
            named(
                json!({"messages": [{"role": "user", "content": "hi"}], "stream": false,
                "options": {"num_predict": 1}}),
            ),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/api/generate",
            named(json!({"prompt": "hi", "stream": false, "options": {"num_predict": 1}})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/api/embed",
            named(json!({"input": "x"})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/api/embeddings",
            named(json!({"prompt": "x"})),
            Needs::Inference,
            true,
        ),
        (
            Method::POST,
            "/api/pull",
            named(json!({})),
            Needs::Listing,
            false,
        ),
        (
            Method::DELETE,
            "/api/delete",
            named(json!({})),
            Needs::Listing,
            false,
        ),
        (
            Method::POST,
            "/admin/models/f/load",
            None,
            Needs::Admin,
            true,
        ),
        (
            Method::POST,
            "/admin/models/f/stop",
            None,
            Needs::Admin,
            true,
        ),
    ]
}

/// The columns of the matrix.
#[derive(Clone, Copy, Debug)]
enum Who {
    NoKey,
    Wrong,
    Expired,
    LacksScope,
    LacksModel,
    Right,
}

/// The one table of expected statuses over TCP (the local socket: 200
/// everywhere).
fn expected(needs: Needs, names_f: bool, who: Who) -> u16 {
    use Needs::*;
    match (who, needs) {
        (_, Open) => 200,
        // A key is no session, whoever holds it.
        (_, Session) => 401,
        (Who::NoKey | Who::Wrong | Who::Expired, _) => 401,
        // Both inference and read keys may list models: no key lacks it.
        (Who::LacksScope, Listing) => 200,
        (Who::LacksScope, _) => 403,
        (Who::LacksModel, _) if names_f => 404,
        (Who::LacksModel | Who::Right, _) => 200,
    }
}

/// The key of a column for a route (the one lacking its scope differs).
fn key_for(who: Who, needs: Needs) -> Option<&'static str> {
    match who {
        Who::NoKey => None,
        Who::Wrong => Some("ccsk_wrong000000000000000000000000000000000000000000000000000000000"),
        Who::Expired => Some(OLD),
        Who::LacksScope => Some(match needs {
            Needs::Inference => READER,
            Needs::Read | Needs::Listing => INF,
            Needs::Admin => READER,
            Needs::Open | Needs::Session => INF,
        }),
        Who::LacksModel => Some(G_ONLY),
        Who::Right => Some(FULL),
    }
}

fn models() -> String {
    format!(
        "{}{}",
        fake_model_table("f", &[], ""),
        fake_model_table("g", &[], "")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_against_every_kind_of_key_over_tcp_and_the_local_socket() {
    let d = Daemon::start(&format!("{}{}", models(), keys()));
    // A first row, so /admin/history/1 exists.
    let sock = d.socket();
    let first = call(
        &Target::Unix(&sock),
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "f", "messages": [], "max_tokens": 1})),
        None,
    )
    .await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let mut failures = Vec::new();
    // Failed attempts count per IP: each failing cell comes from its own.
    let mut next_ip = 1u8;
    for (method, path, body, needs, names_f) in routes() {
        for who in [
            Who::NoKey,
            Who::Wrong,
            Who::Expired,
            Who::LacksScope,
            Who::LacksModel,
            Who::Right,
        ] {
            next_ip = next_ip.wrapping_add(1).max(2);
            let tcp = Target::Tcp {
                addr: &d.addr,
                source: [127, 0, 3, next_ip],
            };
            let key = key_for(who, needs);
            let want = match expected(needs, names_f, who) {
                200 => passed(path),
                want => want,
            };
            let (got, text, headers) = call(&tcp, method.clone(), path, body.clone(), key).await;
            // The right key reaches the fake; a key without f never does.
            let reached = passed_through(&text);
            let should_reach = matches!(who, Who::Right) && want == 404;
            let must_not = matches!(who, Who::LacksModel) && names_f;
            if got.as_u16() != want || (should_reach && !reached) || (must_not && reached) {
                failures.push(format!(
                    "TCP {method} {path} {who:?}: {got}, want {want}: {}",
                    &text[..text.len().min(200)]
                ));
            }
            if got == StatusCode::UNAUTHORIZED && headers.get("www-authenticate").is_none() {
                failures.push(format!(
                    "TCP {method} {path} {who:?}: 401 without WWW-Authenticate"
                ));
            }
            if let Some(k) = key {
                if text.contains(k) {
                    failures.push(format!("TCP {method} {path} {who:?}: the key is echoed"));
                }
            }
            let (got, text, _) = call(
                &Target::Unix(&sock),
                method.clone(),
                path,
                body.clone(),
                key,
            )
            .await;
            let want_unix = if needs == Needs::Session {
                401
            } else {
                passed(path)
            };
            if got.as_u16() != want_unix {
                failures.push(format!(
                    "unix {method} {path} {who:?}: {got}: {}",
                    &text[..text.len().min(200)]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // A key limited to g sees only g, also in the list of valid names.
    let tcp = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 0, 1],
    };
    let (_, models, _) = call(&tcp, Method::GET, "/v1/models", None, Some(G_ONLY)).await;
    let v: serde_json::Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["g"]);
    let (_, body, _) = call(
        &tcp,
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "f", "messages": []})),
        Some(G_ONLY),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["available_models"], json!(["g"]), "{body}");
    let (_, ps, _) = call(&tcp, Method::GET, "/admin/ps", None, Some(G_ONLY)).await;
    assert!(!ps.contains("\"f\""), "{ps}");
    // Rows carry the key's name; refused inference requests have rows too.
    let (_, rows) = d.get("/admin/history?limit=1000").await;
    let rows = rows["requests"].as_array().unwrap().clone();
    assert!(rows
        .iter()
        .any(|r| r["key_name"] == "full" && r["status"] == 200));
    assert!(rows
        .iter()
        .any(|r| r["key_name"].is_null() && r["status"] == 401));
    assert!(rows.iter().any(|r| r["key_name"]
        .as_str()
        .is_some_and(|n| n.starts_with("local:uid="))));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_tcp_runs_inference_and_read_and_admin_need_the_local_socket() {
    let d = Daemon::start(&models());
    let sock = d.socket();
    for (method, path, body, needs, _) in routes() {
        let tcp = Target::Tcp {
            addr: &d.addr,
            source: [127, 0, 0, 1],
        };
        let (got, text, _) = call(&tcp, method.clone(), path, body.clone(), None).await;
        let want = match needs {
            Needs::Open | Needs::Inference | Needs::Listing => passed(path),
            // Open, but only to a page loaded from localhost (these
            // requests name host "x").
            Needs::Read | Needs::Admin | Needs::Session => 401,
        };
        assert_eq!(got.as_u16(), want, "TCP {method} {path}: {text}");
        let (got, text, _) = call(&Target::Unix(&sock), method.clone(), path, body, None).await;
        let want_unix = if needs == Needs::Session {
            401
        } else {
            passed(path)
        };
        assert_eq!(got.as_u16(), want_unix, "unix {method} {path}: {text}");
    }
    // Clients that always send a key (the OpenAI client does) are served
    // as anyone else, however often.
    let tcp = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 0, 1],
    };
    let chat = json!({"model": "f", "messages": [], "max_tokens": 1});
    for _ in 0..8 {
        let (got, text, _) = call(
            &tcp,
            Method::POST,
            "/v1/chat/completions",
            Some(chat.clone()),
            Some("sk-anything"),
        )
        .await;
        assert_eq!(got, StatusCode::OK, "{text}");
    }
    assert!(
        d.log_text().contains("access: no API key configured"),
        "{}",
        d.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn brute_force_from_one_ip_is_throttled_and_logged_and_another_ip_is_not() {
    let d = Daemon::start(&format!("{}{}", models(), keys()));
    let attacker = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 9, 1],
    };
    let chat = json!({"model": "f", "messages": [], "max_tokens": 1});
    for i in 0..5 {
        let token = format!("ccsk_guess{i:059}");
        let (got, _, _) = call(
            &attacker,
            Method::POST,
            "/v1/chat/completions",
            Some(chat.clone()),
            Some(&token),
        )
        .await;
        assert_eq!(got, StatusCode::UNAUTHORIZED);
    }
    let (got, _, headers) = call(
        &attacker,
        Method::POST,
        "/v1/chat/completions",
        Some(chat.clone()),
        Some(FULL),
    )
    .await;
    assert_eq!(
        got,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right key, from that IP"
    );
    assert!(headers.contains_key("retry-after"));
    let other = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 9, 2],
    };
    let (got, _, _) = call(
        &other,
        Method::POST,
        "/v1/chat/completions",
        Some(chat),
        Some(FULL),
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    let log = d.log_text();
    assert!(
        log.contains("authentication failed") && log.contains("127.0.9.1"),
        "{log}"
    );
    assert!(log.contains("too many failed attempts"), "{log}");
    assert!(
        !log.contains("ccsk_guess"),
        "a presented token is never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_beyond_a_keys_rate_gets_429_and_other_keys_are_unaffected() {
    let d = Daemon::start(&format!("{}{}", models(), keys()));
    let tcp = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 0, 1],
    };
    let chat = json!({"model": "f", "messages": [], "max_tokens": 1});
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            call(
                &tcp,
                Method::POST,
                "/v1/chat/completions",
                Some(chat.clone()),
                Some(RATED),
            )
            .await,
        );
    }
    assert_eq!(got[0].0, StatusCode::OK);
    assert_eq!(got[1].0, StatusCode::OK);
    assert_eq!(got[2].0, StatusCode::TOO_MANY_REQUESTS, "{}", got[2].1);
    let retry: u64 = got[2].2["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    let (ok, _, _) = call(
        &tcp,
        Method::POST,
        "/v1/chat/completions",
        Some(chat),
        Some(INF),
    )
    .await;
    assert_eq!(ok, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_key_appears_in_no_log_row_metric_or_file() {
    let d = Daemon::start(&format!("{}{}", models(), keys()));
    let tcp = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 0, 1],
    };
    let chat =
        json!({"model": "f", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for path in [
        "/v1/chat/completions",
        "/admin/ps",
        "/metrics",
        "/admin/history",
    ] {
        let (method, body) = if path.starts_with("/v1") {
            (Method::POST, Some(chat.clone()))
        } else {
            (Method::GET, None)
        };
        let (got, text, _) = call(&tcp, method, path, body, Some(FULL)).await;
        assert_eq!(got, StatusCode::OK, "{path}: {text}");
        assert!(!text.contains(FULL), "{path} echoes the key");
    }
    let (_, metrics, _) = call(&tcp, Method::GET, "/metrics", None, Some(FULL)).await;
    assert!(!metrics.contains(FULL));
    let (_, rows) = d.get("/admin/history?limit=100").await;
    assert!(!rows.to_string().contains(FULL));
    assert!(rows.to_string().contains("\"key_name\":\"full\""), "{rows}");
    // Stays: a check that something is absent; the pause gives the log
    // writer time to write anything it would, and no state says "done".
    std::thread::sleep(Duration::from_millis(200));
    assert!(!d.log_text().contains(FULL), "the log has the key");
    let db = std::fs::read(d.dir.path().join("state/history.db")).unwrap_or_default();
    let wal = std::fs::read(d.dir.path().join("state/history.db-wal")).unwrap_or_default();
    let needle = FULL.as_bytes();
    for (name, bytes) in [("db", db), ("wal", wal)] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the {name} file has the key"
        );
    }
}

#[test]
fn bad_auth_config_exits_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let cases = [
        ("[auth.keys.a]\nhash = \"sha256:abc\"\nscopes = [\"read\"]\n", "c.toml:2:8: auth.keys.a.hash"),
        (&*format!("[auth.keys.a]\nhash = \"{}\"\nscopes = [\"reed\"]\n", hash("x")), "c.toml:3:11: auth.keys.a.scopes"),
        (&*format!("[auth.keys.a]\nhash = \"{0}\"\nscopes = [\"read\"]\n[auth.keys.a]\nhash = \"{0}\"\nscopes = [\"read\"]\n", hash("x")), "c.toml:4:"),
        (&*format!("[auth.keys.a]\nhash = \"{0}\"\nscopes = [\"read\"]\n[auth.keys.b]\nhash = \"{0}\"\nscopes = [\"read\"]\n", hash("x")), "the same key as auth.keys.a"),
        ("listen = [\"0.0.0.0:5800\"]\n", "no API key is configured"),
    ];
    for (text, says) in cases {
        write_file(&cfg, text);
        let out = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text}: {err}");
        assert!(err.contains(says), "{text}: wanted {says:?} in {err}");
    }
}

#[test]
fn key_new_prints_a_token_once_and_config_lines_with_only_its_hash() {
    let out = std::process::Command::new(BIN)
        .args([
            "key",
            "new",
            "ci",
            "--scope",
            "inference",
            "--model",
            "f",
            "--rate",
            "60",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("ccsk_"))
        .unwrap();
    assert_eq!(token.len(), 5 + 64);
    let toml_start = text.find("[auth.keys.ci]").unwrap();
    let lines = &text[toml_start..];
    assert!(lines.contains(&hash(token)), "{lines}");
    assert!(!lines.contains(token), "only the hash goes into the config");
    // The printed lines are a valid config together with model f.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    write_file(&cfg, &format!("{}{lines}", fake_model_table("f", &[], "")));
    let check = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_actions_and_rejected_keys_are_in_the_audit_trail() {
    let d = Daemon::start(&format!("{}{}", models(), keys()));
    let sock = d.socket();
    let local = Target::Unix(&sock);
    let tcp = Target::Tcp {
        addr: &d.addr,
        source: [127, 0, 7, 1],
    };
    let chat = json!({"model": "f", "messages": [], "max_tokens": 1});
    assert_eq!(
        call(
            &local,
            Method::POST,
            "/v1/chat/completions",
            Some(chat),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&local, Method::POST, "/admin/models/f/stop", None, None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&tcp, Method::POST, "/admin/backup", None, Some(FULL))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&tcp, Method::GET, "/upstream/f/health", None, Some(FULL))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&tcp, Method::GET, "/admin/ps", None, Some(OLD))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let want = [
        ("stop", "local:uid="),
        ("backup", "full"),
        ("upstream", "full"),
        ("key_rejected", "ip:127.0.7.1"),
        ("reload", "signal:SIGHUP"),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let (_, page) = d.get("/admin/audit").await;
        let rows = page["audit"].as_array().cloned().unwrap_or_default();
        let all = want.iter().all(|(action, who)| {
            rows.iter().any(|r| {
                r["action"] == *action && r["principal"].as_str().unwrap().starts_with(who)
            })
        });
        if all || std::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (action, who) in want {
        assert!(
            rows.iter().any(|r| r["action"] == action && r["principal"].as_str().unwrap().starts_with(who)),
            "no {action} by {who}: {rows:?}"
        );
    }
    let stop = rows.iter().find(|r| r["action"] == "stop").unwrap();
    assert_eq!(stop["target"], "f");
    let upstream = rows.iter().find(|r| r["action"] == "upstream").unwrap();
    assert_eq!(upstream["target"], "GET f/health");
    assert_eq!(upstream["result"], "200");
    assert!(
        !serde_json::to_string(&rows).unwrap().contains(OLD),
        "the rejected key is not stored"
    );
    let out = d.cli(&["audit", "--limit", "10"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("key_rejected") && text.contains("PRINCIPAL"),
        "{out:?}"
    );
}

/// An interpreter `nobody` can run (a pyenv or venv one under /root is not).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// `argv` run as the unprivileged user `nobody` (util-linux's setpriv).
fn as_nobody(argv: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(argv)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_local_user_can_reach_neither_the_history_file_nor_the_admin_routes_nor_a_model() {
    if !nix::unistd::geteuid().is_root() || !Path::new(SYSTEM_PYTHON).exists() {
        eprintln!("skipped: needs root (to act as nobody) and {SYSTEM_PYTHON}");
        return;
    }
    let d = Daemon::start_with(
        Listen::Itself,
        &format!("{}{}", models(), tiny_model_table("tiny", "")),
    );
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "a secret"}], "max_tokens": 1});
    assert_eq!(
        d.post("/v1/chat/completions", &chat).await.0,
        StatusCode::OK
    );
    let (status, _) = d.get("/admin/history").await; // flushes the row to disk
    assert_eq!(status, StatusCode::OK);
    // The state directory is the harness's; open it up so only the file's
    // own mode stands in the way.
    let state = d.dir.path().join("state");
    for dir in [d.dir.path(), state.as_path()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let db = state.join("history.db");
    let out = as_nobody(&["cat", &db.display().to_string()]);
    assert!(
        !out.status.success(),
        "nobody read the history file: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // The local socket (0660, root's group) does not let them in.
    let sock = d.socket().display().to_string();
    let connect = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({sock:?})\n    print('connected')\nexcept PermissionError:\n    print('denied')"
    );
    let out = as_nobody(&[SYSTEM_PYTHON, "-c", &connect]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "denied",
        "{out:?}"
    );
    // Nor the model process: llama-server listens on a unix socket in the
    // daemon's private runtime directory.
    let ps = d.model("tiny").await;
    let child = ps["socket"].as_str().unwrap_or_else(|| panic!("{ps}"));
    let connect = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({child:?})\n    print('connected')\nexcept PermissionError:\n    print('denied')"
    );
    let out = as_nobody(&[SYSTEM_PYTHON, "-c", &connect]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "denied",
        "{out:?}"
    );
    // Over TCP they are anonymous: inference, but no history.
    let url = format!("http://{}/admin/history", d.addr);
    let out = as_nobody(&[
        SYSTEM_PYTHON,
        "-c",
        &format!(
            "import urllib.request, urllib.error\n\
         try:\n    urllib.request.urlopen({url:?})\n    print('200')\n\
         except urllib.error.HTTPError as e:\n    print(e.code)"
        ),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "401",
        "{out:?}"
    );
}
