//! Dashboard sessions: who logged in at `/ui/login`, held in memory only.
//!
//! A session id is 256 random bits from the OS, sent to the browser once in
//! the `claracore_session` cookie and kept here only as its SHA-256, so a
//! memory dump of the map gives no usable cookie. Each session carries its
//! own CSRF token (which the page reads from `/ui/session`), what it logged
//! in with ([`Login`]) and its expiry.
//!
//! Invariants:
//! - A session never authorizes more than its login: a password session is
//!   [`Principal::Dashboard`] (`read`, `admin`); a key session is resolved on
//!   every request to the configured key it logged in with, compared whole
//!   ([`Auth::key_as_configured`]), so a key removed or changed on reload
//!   (or expired) ends its sessions at once.
//! - A change of the password hash on reload ends every session
//!   ([`Sessions::reconfigure`]).
//! - The map is bounded ([`MAX_SESSIONS`]): expired sessions are dropped
//!   first, then the one closest to expiry.
//! - One mutex owns the map; it is never held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{HeaderMap, COOKIE};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{hex, Auth, Principal, Throttle};
use crate::config::{Config, KeyConfig, Scope};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "claracore_session";
/// Sessions held at most.
pub const MAX_SESSIONS: usize = 10_000;

/// What a session logged in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// The dashboard password.
    Password,
    /// No login: an open loopback daemon (no password, no key).
    Open,
    /// An API key with `read` or `admin`, as it was configured at login.
    Key(KeyConfig),
}

impl Login {
    /// The scopes the session has.
    pub fn scopes(&self) -> Vec<Scope> {
        match self {
            Login::Password | Login::Open => vec![Scope::Read, Scope::Admin],
            Login::Key(k) => Scope::ALL.into_iter().filter(|s| k.allows(*s)).collect(),
        }
    }

    /// How the audit trail and `/ui/session` name it.
    pub fn principal_name(&self) -> String {
        match self {
            Login::Password => "dashboard".into(),
            Login::Open => "dashboard:open".into(),
            Login::Key(k) => k.name.clone(),
        }
    }
}

/// One logged-in browser.
#[derive(Debug)]
pub struct Session {
    pub login: Login,
    /// What a state-changing request must send in `x-csrf-token`.
    pub csrf: String,
    /// Unix milliseconds after which it is refused.
    pub expires_at_ms: i64,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

/// Every live session, and the login failures per IP. Lives as long as
/// the daemon (not rebuilt on reload, unlike [`Auth`]).
#[derive(Default)]
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Arc<Session>>>,
    /// Failed logins per IP (5 a minute, then 429).
    pub throttle: Throttle,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex(&bytes))
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Session>>> {
        match self.by_digest.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A new session for `login`, lasting `lifetime` from `now_ms`: its id
    /// (the cookie's value, never stored) and the session.
    pub fn create(
        &self,
        login: Login,
        lifetime: Duration,
        now_ms: i64,
    ) -> Result<(String, Arc<Session>), getrandom::Error> {
        let id = random_hex()?;
        let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
        let session = Arc::new(Session {
            login,
            csrf: random_hex()?,
            expires_at_ms: now_ms.saturating_add(lifetime_ms),
        });
        let mut map = self.map();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires_at_ms > now_ms);
        }
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        map.insert(digest(&id), session.clone());
        Ok((id, session))
    }

    /// The live session of this id; an expired one is removed.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Arc<Session>> {
        let key = digest(id);
        let mut map = self.map();
        let session = map.get(&key)?.clone();
        if now_ms >= session.expires_at_ms {
            map.remove(&key);
            return None;
        }
        Some(session)
    }

    /// Ends the session of this id; whether there was one.
    pub fn end(&self, id: &str) -> bool {
        self.map().remove(&digest(id)).is_some()
    }

    /// Sessions held now (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies a reloaded config: a changed password hash ends every
    /// session; a key session ends when its key is gone or configured
    /// differently; an open session ends when the daemon is no longer open.
    /// Returns how many ended.
    pub fn reconfigure(&self, old: &Config, new: &Config) -> usize {
        let mut map = self.map();
        let before = map.len();
        if old.dashboard.password_hash != new.dashboard.password_hash {
            map.clear();
        } else {
            let open = open_mode(new);
            map.retain(|_, s| match &s.login {
                Login::Password => new.dashboard.password_hash.is_some(),
                Login::Open => open,
                Login::Key(k) => new.auth.keys.contains(k),
            });
        }
        before - map.len()
    }

    /// Who a request carrying `session` is, under the current keys; `None`
    /// when its login no longer holds.
    pub fn principal(
        &self,
        session: &Session,
        auth: &Auth,
        config: &Config,
        now_ms: i64,
    ) -> Option<Principal> {
        match &session.login {
            Login::Password => config
                .dashboard
                .password_hash
                .is_some()
                .then_some(Principal::Dashboard { open: false }),
            Login::Open => open_mode(config).then_some(Principal::Dashboard { open: true }),
            Login::Key(k) => {
                let key = auth.key_as_configured(k)?;
                if key.config.expires_at_ms.is_some_and(|t| now_ms >= t) {
                    return None;
                }
                Some(Principal::Key(key))
            }
        }
    }
}

/// Whether the dashboard opens without login: no password and no key
/// configured, and every listener reachable only from this machine (the
/// API is open to loopback then too).
pub fn open_mode(config: &Config) -> bool {
    config.dashboard.password_hash.is_none()
        && config.auth.keys.is_empty()
        && config.listen.iter().all(|l| l.is_loopback())
}

/// The `claracore_session` cookie's value, from any `Cookie` header.
pub fn presented_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// Whether `password` matches the argon2id PHC string `phc`. Slow on
/// purpose (tens of milliseconds): call it off the async threads.
pub fn verify_password(phc: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    let Ok(parsed) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// An argon2id PHC string of `password` with a fresh random salt and the
/// argon2 crate's default parameters (OWASP's m=19456 KiB, t=2, p=1), for
/// `claracore dashboard hash-password`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let salt = argon2::password_hash::SaltString::encode_b64(&salt)
        .map_err(|e| format!("cannot encode the salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::from_toml(Path::new("t.toml"), text).unwrap()
    }

    #[test]
    fn a_hash_verifies_its_password_only_and_passes_the_config_check() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password(&phc, "correct horse"));
        assert!(!verify_password(&phc, "correct hors"));
        assert!(!verify_password("garbage", "x"));
        crate::config::check_password_hash(&phc).unwrap();
    }

    #[test]
    fn sessions_are_stored_hashed_expire_and_end() {
        let s = Sessions::default();
        let (id, session) = s
            .create(Login::Password, Duration::from_secs(10), 1000)
            .unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(session.csrf, id);
        assert!(!s.map().contains_key(id.as_bytes()));
        assert!(s.get(&id, 10_999).is_some());
        assert!(s.get("0".repeat(64).as_str(), 1000).is_none());
        assert!(s.get(&id, 11_000).is_none(), "expired");
        assert!(s.is_empty(), "an expired session is removed when touched");
        let (id, _) = s.create(Login::Open, Duration::from_secs(10), 0).unwrap();
        assert!(s.end(&id));
        assert!(!s.end(&id));
    }

    #[test]
    fn the_csrf_check_needs_the_exact_token() {
        let s = Sessions::default();
        let (_, session) = s
            .create(Login::Password, Duration::from_secs(9), 0)
            .unwrap();
        assert!(session.csrf_matches(Some(&session.csrf.clone())));
        assert!(!session.csrf_matches(None));
        assert!(!session.csrf_matches(Some("")));
        assert!(!session.csrf_matches(Some(&session.csrf[1..])));
    }

    #[test]
    fn a_reload_ends_sessions_whose_login_no_longer_holds() {
        let h1 = hash_password("a").unwrap();
        let h2 = hash_password("b").unwrap();
        let key = "[auth.keys.ops]\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"read\"]\n";
        let with = |h: &str, k: &str| config(&format!("[dashboard]\npassword_hash = \"{h}\"\n{k}"));
        let old = with(&h1, key);
        let s = Sessions::default();
        let ttl = Duration::from_secs(60);
        s.create(Login::Password, ttl, 0).unwrap();
        let (kid, _) = s
            .create(Login::Key(old.auth.keys[0].clone()), ttl, 0)
            .unwrap();
        assert_eq!(s.reconfigure(&old, &with(&h1, key)), 0, "nothing changed");
        let narrower = key.replace("[\"read\"]", "[\"read\", \"inference\"]");
        assert_eq!(
            s.reconfigure(&old, &with(&h1, &narrower)),
            1,
            "the key changed"
        );
        assert!(s.get(&kid, 1).is_none());
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.reconfigure(&old, &with(&h2, key)),
            1,
            "a new password ends all"
        );
        assert!(s.is_empty());
    }

    #[test]
    fn a_key_session_is_that_key_and_a_password_session_is_never_inference() {
        let c = config("[auth.keys.ops]\nhash = \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\nscopes = [\"read\"]\n");
        let auth = Auth::new(&c.auth);
        let s = Sessions::default();
        let (_, session) = s
            .create(
                Login::Key(c.auth.keys[0].clone()),
                Duration::from_secs(60),
                0,
            )
            .unwrap();
        let p = s.principal(&session, &auth, &c, 1).unwrap();
        assert!(auth.authorize(&p, &[Scope::Read]).is_ok());
        assert!(auth.authorize(&p, &[Scope::Admin]).is_err());
        let other = Auth::new(&config("").auth);
        assert!(s.principal(&session, &other, &c, 1).is_none(), "key gone");
        let dash = Principal::Dashboard { open: false };
        assert!(auth.authorize(&dash, &[Scope::Admin]).is_ok());
        assert!(auth.authorize(&dash, &[Scope::Inference]).is_err());
        assert!(auth
            .authorize(&dash, &[Scope::Inference, Scope::Read])
            .is_ok());
        assert_eq!(Login::Key(c.auth.keys[0].clone()).scopes(), [Scope::Read]);
    }

    #[test]
    fn open_mode_needs_no_password_no_key_and_loopback_only() {
        assert!(open_mode(&config(
            "listen = [\"127.0.0.1:1\", \"unix:/x.sock\"]"
        )));
        assert!(!open_mode(&config(
            "listen = [\"0.0.0.0:1\"]\n[auth]\nopen = true"
        )));
        let h = hash_password("p").unwrap();
        assert!(!open_mode(&config(&format!(
            "[dashboard]\npassword_hash = \"{h}\""
        ))));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; claracore_session=abc ; b=2"),
        );
        assert_eq!(presented_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("x=1"));
        h.append(COOKIE, HeaderValue::from_static("claracore_session=def"));
        assert_eq!(presented_cookie(&h), Some("def"));
        assert_eq!(presented_cookie(&HeaderMap::new()), None);
    }
}
