//! The dashboard under `/ui/`: its embedded pages and assets, the login,
//! the session endpoint and logout, and the security headers every `/ui/`
//! response carries ([`secure`]).
//!
//! The assets (src/ui/) are plain HTML, CSS and JavaScript modules compiled
//! into the binary with `include_str!`: no CDN, no build step, nothing
//! fetched at run time. They hold no data and are open; the data comes from
//! the API, authorized by the session cookie like any other principal
//! ([`super::dispatch`]).
//!
//! Login takes the dashboard password (→ `read` + `admin`) or an API key
//! with `read` or `admin` (→ that key). Failed logins count per IP (5 a
//! minute, then 429) and go to the audit trail with the IP, as do logins
//! and logouts.

use std::sync::OnceLock;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::routes::UiAsset;
use super::{full, json_response, ApiError, AppState};
use crate::auth::session::{self, Login, Session, COOKIE_NAME};
use crate::auth::{Denied, Peer, Transport};
use crate::config::{Config, Scope};
use crate::events::AuditAction;
use crate::proxy::BoxBody;

/// Largest login body read.
const LOGIN_BODY_LIMIT: usize = 8 * 1024;

struct Asset {
    body: &'static str,
    content_type: &'static str,
    html: bool,
}

fn asset(which: UiAsset) -> Asset {
    let (body, content_type, html) = match which {
        UiAsset::Index => (
            include_str!("../ui/index.html"),
            "text/html; charset=utf-8",
            true,
        ),
        UiAsset::Login => (
            include_str!("../ui/login.html"),
            "text/html; charset=utf-8",
            true,
        ),
        UiAsset::AppJs => (
            include_str!("../ui/app.js"),
            "text/javascript; charset=utf-8",
            false,
        ),
        UiAsset::LoginJs => (
            include_str!("../ui/login.js"),
            "text/javascript; charset=utf-8",
            false,
        ),
        UiAsset::Css => (
            include_str!("../ui/app.css"),
            "text/css; charset=utf-8",
            false,
        ),
    };
    Asset {
        body,
        content_type,
        html,
    }
}

/// Every asset, for tests and for [`etag`].
pub const ASSETS: [UiAsset; 5] = [
    UiAsset::Index,
    UiAsset::Login,
    UiAsset::AppJs,
    UiAsset::LoginJs,
    UiAsset::Css,
];

/// The asset's strong ETag: a digest of its bytes (fixed per binary).
fn etag(which: UiAsset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(asset(*a).body.as_bytes());
                format!("\"{}\"", crate::auth::hex_digest(&d[..12]))
            })
            .collect()
    });
    let i = ASSETS.iter().position(|a| *a == which).unwrap_or(0);
    tags.get(i).map_or("\"0\"", String::as_str)
}

/// The headers every `/ui/` response carries. No inline script or style
/// is allowed (all of it is in the asset files), no framing, no sniffing,
/// no referrer; HTML and session answers are never cached.
pub fn secure(resp: &mut Response<BoxBody>) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

fn redirect(to: &'static str, status: StatusCode) -> Response<BoxBody> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    resp
}

/// `/ui` → `/ui/`.
pub(super) fn root() -> Response<BoxBody> {
    redirect("/ui/", StatusCode::PERMANENT_REDIRECT)
}

/// An embedded file. The app page is served without a session too (it
/// holds no data; its script sends a browser without one to the login).
pub(super) fn serve_asset(which: UiAsset, headers: &HeaderMap) -> Response<BoxBody> {
    let a = asset(which);
    let tag = etag(which);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut resp = if matches {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(full(a.body))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    // Scripts and styles revalidate against their ETag; pages are not kept.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if a.html { "no-store" } else { "no-cache" }),
    );
    resp
}

/// The live session a request's cookie names, if any.
pub(super) fn current(
    state: &AppState,
    headers: &HeaderMap,
) -> Option<(String, std::sync::Arc<Session>)> {
    let id = session::presented_cookie(headers)?;
    let s = state.sessions.get(id, crate::events::now_ms())?;
    Some((id.to_string(), s))
}

/// Whether the request came over HTTPS, as far as can be told: the daemon
/// speaks plain HTTP, so only a trusted proxy's `X-Forwarded-Proto` says so.
fn over_https(config: &Config, peer: &Peer, headers: &HeaderMap) -> bool {
    let Transport::Tcp { ip } = peer.transport else {
        return false;
    };
    config.dashboard.trusted_proxies.contains(&ip)
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn cookie(value: &str, max_age_s: u64, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
    ))
    .ok()
}

fn session_body(s: &Session, open: bool) -> serde_json::Value {
    let scopes: Vec<&str> = s.login.scopes().iter().map(|s| s.as_str()).collect();
    let models = match &s.login {
        Login::Key(k) => json!(k.models),
        _ => serde_json::Value::Null,
    };
    json!({
        "principal": s.login.principal_name(),
        "login": match s.login { Login::Password => "password", Login::Open => "open", Login::Key(_) => "key" },
        "scopes": scopes,
        "models": models,
        "csrf": s.csrf,
        "open": open,
        "expires_at_ms": s.expires_at_ms,
    })
}

/// Whether a `Host` header names this machine (an open daemon hands out
/// sessions only to pages loaded as localhost, so a DNS-rebound page of
/// another site gets none).
fn host_is_local(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `GET /ui/session`: the session's principal, scopes and CSRF token. On
/// an open daemon a page without a session gets one (no login).
pub(super) fn get_session(
    state: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Response<BoxBody>, ApiError> {
    let config = state.config();
    let open = session::open_mode(&config);
    if let Some((_, s)) = current(state, headers) {
        let auth = state.auth();
        if state
            .sessions
            .principal(&s, &auth, &config, crate::events::now_ms())
            .is_some()
        {
            return Ok(json_response(StatusCode::OK, &session_body(&s, open)));
        }
    }
    if !open {
        return Err(ApiError::Denied(Denied::Unauthenticated(
            "no dashboard session; log in at /ui/login",
        )));
    }
    if !host_is_local(headers) {
        return Err(ApiError::Denied(Denied::Unauthenticated(
            "an open dashboard is served only to pages loaded from localhost",
        )));
    }
    let Ok((id, s)) = state.sessions.create(
        Login::Open,
        config.dashboard.session_lifetime,
        crate::events::now_ms(),
    ) else {
        return Ok(no_randomness());
    };
    let mut resp = json_response(StatusCode::OK, &session_body(&s, true));
    set_cookie(&mut resp, &config, peer, headers, &id);
    Ok(resp)
}

fn set_cookie(
    resp: &mut Response<BoxBody>,
    config: &Config,
    peer: &Peer,
    headers: &HeaderMap,
    id: &str,
) {
    let https = over_https(config, peer, headers);
    if let Some(v) = cookie(id, config.dashboard.session_lifetime.as_secs(), https) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
}

/// What a login form sends.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    Password(String),
    Key(String),
}

/// Reads `{"password": …}` / `{"key": …}` as JSON or a urlencoded form.
fn credentials(content_type: Option<&str>, body: &[u8]) -> Result<Credentials, ApiError> {
    let fields: Vec<(String, String)> =
        if content_type.is_some_and(|t| t.starts_with("application/x-www-form-urlencoded")) {
            form_urlencoded::parse(body).into_owned().collect()
        } else {
            let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::BadRequest(format!("login: the body is not JSON or a form ({e})"))
            })?;
            let Some(obj) = v.as_object() else {
                return Err(ApiError::BadRequest(
                    "login: give {\"password\": …} or {\"key\": …}".into(),
                ));
            };
            obj.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        };
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    match (get("password"), get("key")) {
        (Some(p), None) => Ok(Credentials::Password(p)),
        (None, Some(k)) => Ok(Credentials::Key(k.trim().to_string())),
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "login: give a password or a key, not both".into(),
        )),
        (None, None) => Err(ApiError::BadRequest(
            "login: give a password or an API key".into(),
        )),
    }
}

/// Whether a browser's `Origin` (when sent) is this host, so another
/// site cannot log a visitor in to a session of its choosing.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let after = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    after.is_some_and(|h| h.eq_ignore_ascii_case(host))
}

fn ip_of(peer: &Peer) -> Option<std::net::IpAddr> {
    match peer.transport {
        Transport::Tcp { ip } => Some(ip),
        Transport::Unix { .. } => None,
    }
}

/// `POST /ui/login`.
pub(super) async fn login(
    state: &AppState,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    let config = state.config();
    let who = match ip_of(peer) {
        Some(ip) => format!("ip:{ip}"),
        None => format!("local:{}", peer.addr),
    };
    if !same_origin(req.headers()) {
        return Ok(refusal(
            StatusCode::FORBIDDEN,
            "login: the Origin is not this server",
            "cross_origin",
        ));
    }
    if let Some(retry_after) = ip_of(peer).and_then(|ip| state.sessions.throttle.throttled(ip)) {
        super::audit(state, who, AuditAction::LoginFailed, None, "throttled");
        return Err(ApiError::Denied(Denied::Throttled { retry_after }));
    }
    let headers = req.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let limited = http_body_util::Limited::new(req.into_body(), LOGIN_BODY_LIMIT);
    let body = match tokio::time::timeout(config.http.body_read_timeout, limited.collect()).await {
        Err(_) => {
            return Err(ApiError::BodyTimeout {
                after: config.http.body_read_timeout,
            })
        }
        Ok(Err(_)) => {
            return Err(ApiError::PayloadTooLarge {
                limit: LOGIN_BODY_LIMIT as u64,
            })
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let creds = credentials(content_type.as_deref(), &body)?;
    let (kind, checked) = match creds {
        Credentials::Password(password) => ("password", check_password(&config, password).await),
        Credentials::Key(token) => ("key", check_key(state, &token)),
    };
    let login = match checked {
        Ok(login) => login,
        Err(Refused::Wrong(why)) => {
            if let Some(ip) = ip_of(peer) {
                state.sessions.throttle.failed(ip);
            }
            tracing::warn!(peer = %peer.addr, login = kind, reason = why, "dashboard login failed");
            super::audit(state, who, AuditAction::LoginFailed, Some(kind), why);
            return Err(ApiError::Denied(Denied::Rejected(why)));
        }
        Err(Refused::Scope(why)) => {
            super::audit(state, who, AuditAction::LoginFailed, Some(kind), why);
            return Ok(refusal(StatusCode::FORBIDDEN, why, "insufficient_scope"));
        }
    };
    let Ok((id, s)) = state.sessions.create(
        login,
        config.dashboard.session_lifetime,
        crate::events::now_ms(),
    ) else {
        return Ok(no_randomness());
    };
    super::audit(
        state,
        s.login.principal_name(),
        AuditAction::Login,
        Some(&who),
        kind,
    );
    let open = session::open_mode(&config);
    let mut resp = json_response(StatusCode::OK, &session_body(&s, open));
    set_cookie(&mut resp, &config, peer, &headers, &id);
    Ok(resp)
}

enum Refused {
    /// Wrong credentials: a failed attempt.
    Wrong(&'static str),
    /// A right key without the scopes the dashboard needs.
    Scope(&'static str),
}

async fn check_password(config: &Config, password: String) -> Result<Login, Refused> {
    let Some(phc) = config.dashboard.password_hash.clone() else {
        return Err(Refused::Wrong("no dashboard password is configured"));
    };
    // argon2 takes tens of milliseconds of CPU on purpose: not on the
    // async threads.
    let ok = tokio::task::spawn_blocking(move || session::verify_password(&phc, &password))
        .await
        .unwrap_or(false);
    if ok {
        Ok(Login::Password)
    } else {
        Err(Refused::Wrong("wrong password"))
    }
}

fn check_key(state: &AppState, token: &str) -> Result<Login, Refused> {
    let auth = state.auth();
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let Some(key) = auth.key_by_digest(&digest) else {
        return Err(Refused::Wrong("invalid API key"));
    };
    if key
        .config
        .expires_at_ms
        .is_some_and(|t| crate::events::now_ms() >= t)
    {
        return Err(Refused::Wrong("API key expired"));
    }
    if !(key.config.allows(Scope::Read) || key.config.allows(Scope::Admin)) {
        return Err(Refused::Scope(
            "this key has neither the read nor the admin scope the dashboard needs",
        ));
    }
    Ok(Login::Key(key.config.clone()))
}

/// A 403 that is not about a key's scope (CSRF, cross-origin login).
pub(super) fn refusal(status: StatusCode, message: &str, code: &str) -> Response<BoxBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "permission_error", "code": code}}),
    )
}

/// The OS gave no random bytes for a session id (never seen in practice).
fn no_randomness() -> Response<BoxBody> {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"error": {"message": "no randomness from the OS for a session id", "type": "server_error", "code": "no_randomness"}}),
    )
}

/// The 403 of a cookie-authenticated state-changing request without the
/// session's CSRF token.
pub(super) fn csrf_refused() -> Response<BoxBody> {
    refusal(
        StatusCode::FORBIDDEN,
        "a state-changing request with a session cookie must send the session's x-csrf-token (GET /ui/session)",
        "csrf_token_missing",
    )
}

/// The `x-csrf-token` a request sends.
pub(super) fn presented_csrf(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-csrf-token").and_then(|v| v.to_str().ok())
}

/// `POST /ui/logout`: needs the session and its CSRF token.
pub(super) fn logout(
    state: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Response<BoxBody>, ApiError> {
    let Some((id, s)) = current(state, headers) else {
        return Err(ApiError::Denied(Denied::Unauthenticated(
            "no dashboard session to end",
        )));
    };
    if !s.csrf_matches(presented_csrf(headers)) {
        return Ok(csrf_refused());
    }
    state.sessions.end(&id);
    super::audit(
        state,
        s.login.principal_name(),
        AuditAction::Logout,
        Some(&format!("ip:{}", peer.addr)),
        "ok",
    );
    let mut resp = json_response(StatusCode::OK, &json!({"logged_out": true}));
    let config = state.config();
    if let Some(v) = cookie("", 0, over_https(&config, peer, headers)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_as_json_or_a_form() {
        assert_eq!(
            credentials(Some("application/json"), br#"{"password":"p"}"#).unwrap(),
            Credentials::Password("p".into())
        );
        assert_eq!(
            credentials(
                Some("application/x-www-form-urlencoded"),
                b"password=&key=+ccsk_1"
            )
            .unwrap(),
            Credentials::Key("ccsk_1".into())
        );
        for bad in [
            &b"[1]"[..],
            b"{}",
            b"{\"password\":\"a\",\"key\":\"b\"}",
            b"\xff",
        ] {
            assert!(credentials(None, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_localhost_hosts_get_an_open_session() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static(v));
            m
        };
        for ok in [
            "localhost:5800",
            "127.0.0.1:5800",
            "[::1]:5800",
            "LOCALHOST",
        ] {
            assert!(host_is_local(&h(ok)), "{ok}");
        }
        for bad in [
            "evil.example:5800",
            "10.0.0.1:5800",
            "localhost.evil.example",
        ] {
            assert!(!host_is_local(&h(bad)), "{bad}");
        }
        assert!(!host_is_local(&HeaderMap::new()));
    }

    #[test]
    fn a_login_from_another_origin_is_refused() {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5800"));
        assert!(
            same_origin(&m),
            "no Origin: not a cross-site browser request"
        );
        m.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:5800"),
        );
        assert!(same_origin(&m));
        m.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&m));
    }

    #[test]
    fn every_asset_is_embedded_with_a_distinct_etag_and_no_inline_code() {
        let mut tags = std::collections::HashSet::new();
        for a in ASSETS {
            assert!(!asset(a).body.is_empty());
            assert!(tags.insert(etag(a)), "{a:?}");
            let body = asset(a).body;
            if asset(a).html {
                assert!(!body.contains("<style"), "{a:?}: inline style");
                assert!(!body.contains(" style="), "{a:?}: inline style");
                for line in body.lines().filter(|l| l.contains("<script")) {
                    assert!(line.contains(" src="), "{a:?}: inline script: {line}");
                }
            }
        }
    }
}
