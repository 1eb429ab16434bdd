//! Who is asking, and what they may do.
//!
//! Principals:
//! - a connection on the local unix socket: whoever could open the socket
//!   file (0660, the service's group) is admin; the file's mode is the
//!   authorization, as with Docker's socket. Its peer uid is recorded.
//! - an API key, sent as `Authorization: Bearer …` or `x-api-key: …`
//!   (what OpenAI, Anthropic and Ollama clients send), with its scopes,
//!   optional models, rate and expiry.
//! - anyone else on TCP: with no key configured, they may run inference
//!   (loopback only, unless `auth.open`); once a key exists, nothing but the
//!   open probes.
//!
//! Keys are 256-bit random tokens with a recognisable prefix
//! ([`TOKEN_PREFIX`]); the config holds only their SHA-256. A slow password
//! hash (argon2) protects low-entropy secrets from guessing; a 256-bit
//! random token cannot be guessed, so one SHA-256 is enough, and a key's
//! definition can sit in a world-readable file or the Nix store without
//! giving the key away. Digests are compared in constant time, against
//! every key, so timing says nothing about which key nearly matched.
//!
//! Failed attempts are counted per IP: [`FAILURE_LIMIT`] within
//! [`FAILURE_WINDOW`] and that IP gets 429 for the window. Nothing here
//! ever logs, stores or returns a presented token.
//!
//! A dashboard login ([`session`]) is one more principal: a password
//! session is [`Principal::Dashboard`] (`read` and `admin`, never
//! `inference`); a key session resolves, on every request, to the very
//! [`ApiKey`] it logged in with, so it can never do more than the key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{AuthConfig, KeyConfig, Scope};
pub use crate::listen::{Peer, Transport};

pub mod session;

/// The start of every token `claracore key new` makes, so secret scanners
/// can recognise a leaked one: `ccsk_` and 64 hex digits.
pub const TOKEN_PREFIX: &str = "ccsk_";
/// Failed attempts from one IP that lead to 429 …
pub const FAILURE_LIMIT: u32 = 5;
/// … within this long, for this long.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// IPs whose failures are tracked at most (beyond: expired ones are
/// dropped first; a flood of fresh IPs is then not tracked).
const MAX_TRACKED: usize = 10_000;

/// Who a request is from.
#[derive(Debug, Clone)]
pub enum Principal {
    Local {
        uid: Option<u32>,
    },
    Key(Arc<ApiKey>),
    /// A dashboard session logged in with the password, or opened without
    /// login on an open loopback daemon (`open`): `read` and `admin`.
    Dashboard {
        open: bool,
    },
    Anonymous,
}

impl Principal {
    /// The priority its requests wait with: a key's `priority`, else 0.
    pub fn priority(&self) -> i32 {
        match self {
            Principal::Key(k) => k.config.priority,
            _ => 0,
        }
    }

    /// The history row's `key_name`: the key's name, or `local:uid=…`.
    pub fn name(&self) -> Option<String> {
        match self {
            Principal::Key(k) => Some(k.config.name.clone()),
            Principal::Local { uid: Some(uid) } => Some(format!("local:uid={uid}")),
            Principal::Local { uid: None } => Some("local".into()),
            Principal::Dashboard { open: false } => Some("dashboard".into()),
            Principal::Dashboard { open: true } => Some("dashboard:open".into()),
            Principal::Anonymous => None,
        }
    }

    /// Whether it may use the model of this canonical name (a key with a
    /// model list sees only those; for the others every model exists).
    pub fn may_use(&self, model: &str) -> bool {
        match self {
            Principal::Key(k) => k.config.may_use(model),
            Principal::Local { .. } | Principal::Dashboard { .. } | Principal::Anonymous => true,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials where the route needs some.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A presented key that is wrong or expired (audited).
    #[error("{0}")]
    Rejected(&'static str),
    #[error("too many failed attempts from this address; retry after {}s", .retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
    #[error("this key lacks the `{}` scope this route needs", .needs.as_str())]
    Forbidden { needs: Scope },
    #[error("this key's request rate is used up; retry after {}s", .retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
}

/// A configured key with its request bucket; a request authenticated by
/// it carries it, so its rate is taken without looking the key up again.
#[derive(Debug)]
pub struct ApiKey {
    pub config: KeyConfig,
    bucket: Option<Mutex<Bucket>>,
}

impl ApiKey {
    pub fn new(config: KeyConfig) -> ApiKey {
        ApiKey {
            bucket: config.rate_per_minute.map(|r| Mutex::new(Bucket::new(r))),
            config,
        }
    }

    /// One request against the key's rate, if it has one.
    fn take_rate(&self) -> Result<(), Denied> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let mut bucket = match bucket.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        bucket
            .take(Instant::now())
            .map_err(|retry_after| Denied::RateLimited { retry_after })
    }
}

/// A token bucket: `capacity` requests, refilled over a minute.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Bucket {
        let capacity = f64::from(per_minute);
        Bucket {
            tokens: capacity,
            capacity,
            at: Instant::now(),
        }
    }

    /// Takes one token, or says when one will be there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let per_second = self.capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

/// Failed attempts from one IP in the current window.
struct Failures {
    count: u32,
    since: Instant,
}

/// Failed attempts per IP: [`FAILURE_LIMIT`] within [`FAILURE_WINDOW`]
/// and the IP is refused for the rest of the window.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

impl Throttle {
    /// How long `ip` is still refused, if it is.
    pub fn throttled(&self, ip: IpAddr) -> Option<Duration> {
        let map = self.failures.lock().ok()?;
        let f = map.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(f.since.elapsed())?;
        (f.count >= FAILURE_LIMIT).then_some(left)
    }

    /// Counts one failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let f = map.entry(ip).or_insert(Failures {
            count: 0,
            since: Instant::now(),
        });
        if f.since.elapsed() >= FAILURE_WINDOW {
            *f = Failures {
                count: 0,
                since: Instant::now(),
            };
        }
        f.count += 1;
        if f.count == FAILURE_LIMIT {
            tracing::warn!(ip = %ip, failures = f.count, block_s = FAILURE_WINDOW.as_secs(),
                "too many failed attempts; refusing this address for a while");
        }
    }
}

/// The keys and the throttling state; rebuilt on reload.
pub struct Auth {
    keys: Vec<Arc<ApiKey>>,
    failures: Throttle,
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Auth {
        Auth {
            keys: config
                .keys
                .iter()
                .map(|k| Arc::new(ApiKey::new(k.clone())))
                .collect(),
            failures: Throttle::default(),
        }
    }

    /// The configured key whose token has this SHA-256 (compared in
    /// constant time against every key), for a key login.
    pub fn key_by_digest(&self, digest: &[u8; 32]) -> Option<Arc<ApiKey>> {
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.config.sha256.ct_eq(digest)) {
                found = Some(key.clone());
            }
        }
        found
    }

    /// The key configured exactly as `config` (same name, hash, scopes,
    /// models, rate, expiry), for a key session: a key removed or changed
    /// since the login has none.
    pub fn key_as_configured(&self, config: &KeyConfig) -> Option<Arc<ApiKey>> {
        self.keys.iter().find(|k| k.config == *config).cloned()
    }

    /// Whether any key is configured (then TCP needs one).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Who `headers` on `peer` come from; `now_ms` is wall-clock time for
    /// expiry.
    pub fn authenticate(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        now_ms: i64,
    ) -> Result<Principal, Denied> {
        let ip = match peer.transport {
            Transport::Unix { uid } => return Ok(Principal::Local { uid }),
            Transport::Tcp { ip } => ip,
        };
        // With no key configured there is nothing to check a token
        // against, and clients send one anyway (the OpenAI client always
        // does): it is ignored, as Ollama does, and is no failed attempt.
        if !self.has_keys() {
            return Ok(Principal::Anonymous);
        }
        if let Some(retry_after) = self.throttled(ip) {
            return Err(Denied::Throttled { retry_after });
        }
        let Some(token) = presented(headers) else {
            return Ok(Principal::Anonymous);
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every key is compared, whatever matched before.
        let found = self.key_by_digest(&digest);
        let refused = match &found {
            None => "invalid API key",
            Some(k) if k.config.expires_at_ms.is_some_and(|t| now_ms >= t) => "API key expired",
            Some(k) => return Ok(Principal::Key(k.clone())),
        };
        let key = found.as_ref().map(|k| k.config.name.as_str());
        tracing::warn!(ip = %ip, key, reason = refused, "authentication failed");
        self.failed(ip);
        Err(Denied::Rejected(refused))
    }

    /// Whether `principal` may call a route that needs one of `scopes`
    /// (none: open to all). Counts the request against a key's rate.
    pub fn authorize(&self, principal: &Principal, scopes: &[Scope]) -> Result<(), Denied> {
        if scopes.is_empty() {
            return Ok(());
        }
        match principal {
            Principal::Local { .. } => Ok(()),
            Principal::Dashboard { .. } => match scopes.first() {
                Some(&needs) if !scopes.iter().any(|s| *s != Scope::Inference) => {
                    Err(Denied::Forbidden { needs })
                }
                _ => Ok(()),
            },
            Principal::Anonymous => {
                if !self.has_keys() && scopes.contains(&Scope::Inference) {
                    Ok(())
                } else if self.has_keys() {
                    Err(Denied::Unauthenticated("this route needs an API key"))
                } else {
                    Err(Denied::Unauthenticated(
                        "this route needs an API key or the local socket",
                    ))
                }
            }
            Principal::Key(k) => match scopes.first() {
                Some(&needs) if !scopes.iter().any(|s| k.config.allows(*s)) => {
                    Err(Denied::Forbidden { needs })
                }
                _ => k.take_rate(),
            },
        }
    }

    fn throttled(&self, ip: IpAddr) -> Option<Duration> {
        self.failures.throttled(ip)
    }

    fn failed(&self, ip: IpAddr) {
        self.failures.failed(ip)
    }
}

/// The token a request presents, if any.
pub fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A new token and its config hash, for `claracore key new`.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&secret));
    let hash = format!("sha256:{}", hex(&Sha256::digest(token.as_bytes())));
    Ok((token, hash))
}

/// Lower-case hex of `bytes` (digests in ETags and ids).
pub fn hex_digest(bytes: &[u8]) -> String {
    hex(bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_key_hash;
    use hyper::header::HeaderValue;

    fn key(name: &str, token: &str, scopes: &[Scope]) -> KeyConfig {
        let hash = format!("sha256:{}", hex(&Sha256::digest(token.as_bytes())));
        KeyConfig {
            name: name.into(),
            sha256: parse_key_hash(&hash).unwrap(),
            scopes: scopes.to_vec(),
            models: None,
            rate_per_minute: None,
            expires_at_ms: None,
            priority: 0,
        }
    }

    fn tcp(ip: [u8; 4]) -> Peer {
        Peer {
            addr: Arc::from("x"),
            transport: Transport::Tcp {
                ip: IpAddr::from(ip),
            },
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn a_new_token_matches_its_hash_and_has_the_prefix() {
        let (token, hash) = new_token().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        let k = KeyConfig {
            sha256: parse_key_hash(&hash).unwrap(),
            ..key("n", "other", &[Scope::Read])
        };
        let auth = Auth::new(&AuthConfig {
            keys: vec![k],
            ..AuthConfig::default()
        });
        let p = auth
            .authenticate(&tcp([127, 0, 0, 1]), &bearer(&token), 0)
            .unwrap();
        assert_eq!(p.name().as_deref(), Some("n"));
    }

    #[test]
    fn scopes_admin_implies_read_and_anonymous_gets_inference_only_without_keys() {
        let none = Auth::new(&AuthConfig::default());
        assert!(none
            .authorize(&Principal::Anonymous, &[Scope::Inference])
            .is_ok());
        assert!(none
            .authorize(&Principal::Anonymous, &[Scope::Read])
            .is_err());
        assert!(none
            .authorize(&Principal::Local { uid: Some(0) }, &[Scope::Admin])
            .is_ok());
        let auth = Auth::new(&AuthConfig {
            keys: vec![key("a", "t", &[Scope::Admin])],
            ..AuthConfig::default()
        });
        assert!(auth
            .authorize(&Principal::Anonymous, &[Scope::Inference])
            .is_err());
        let admin = Principal::Key(Arc::new(ApiKey::new(key("a", "t", &[Scope::Admin]))));
        assert!(auth.authorize(&admin, &[Scope::Read]).is_ok());
        assert_eq!(
            auth.authorize(&admin, &[Scope::Inference]),
            Err(Denied::Forbidden {
                needs: Scope::Inference
            })
        );
        assert!(auth.authorize(&admin, &[]).is_ok(), "open routes");
    }

    #[test]
    fn without_keys_a_presented_token_is_ignored_and_never_a_failure() {
        let auth = Auth::new(&AuthConfig::default());
        for _ in 0..(FAILURE_LIMIT * 2) {
            let p = auth.authenticate(&tcp([127, 0, 0, 1]), &bearer("sk-from-an-openai-client"), 0);
            assert!(matches!(p, Ok(Principal::Anonymous)), "{p:?}");
        }
        assert!(auth.throttled(IpAddr::from([127, 0, 0, 1])).is_none());
    }

    #[test]
    fn five_failures_throttle_that_ip_only() {
        let auth = Auth::new(&AuthConfig {
            keys: vec![key("a", "right", &[Scope::Read])],
            ..AuthConfig::default()
        });
        let bad = tcp([10, 0, 0, 1]);
        for _ in 0..FAILURE_LIMIT {
            assert_eq!(
                auth.authenticate(&bad, &bearer("wrong"), 0).unwrap_err(),
                Denied::Rejected("invalid API key")
            );
        }
        assert!(matches!(
            auth.authenticate(&bad, &bearer("right"), 0),
            Err(Denied::Throttled { .. })
        ));
        assert!(auth
            .authenticate(&tcp([10, 0, 0, 2]), &bearer("right"), 0)
            .is_ok());
    }

    #[test]
    fn an_expired_key_is_refused_and_x_api_key_is_read() {
        let mut k = key("old", "tok", &[Scope::Inference]);
        k.expires_at_ms = Some(1000);
        let auth = Auth::new(&AuthConfig {
            keys: vec![k],
            ..AuthConfig::default()
        });
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("tok"));
        assert!(auth.authenticate(&tcp([127, 0, 0, 1]), &h, 999).is_ok());
        assert_eq!(
            auth.authenticate(&tcp([127, 0, 0, 1]), &h, 1000)
                .unwrap_err(),
            Denied::Rejected("API key expired")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_rate_is_a_token_bucket_per_minute() {
        let mut k = key("r", "tok", &[Scope::Inference]);
        k.rate_per_minute = Some(2);
        let auth = Auth::new(&AuthConfig {
            keys: vec![k.clone()],
            ..AuthConfig::default()
        });
        let p = Principal::Key(Arc::new(ApiKey::new(k)));
        assert!(auth.authorize(&p, &[Scope::Inference]).is_ok());
        assert!(auth.authorize(&p, &[Scope::Inference]).is_ok());
        match auth.authorize(&p, &[Scope::Inference]) {
            Err(Denied::RateLimited { retry_after }) => {
                assert_eq!(retry_after.as_secs(), 30)
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(auth.authorize(&p, &[Scope::Inference]).is_ok());
    }
}
