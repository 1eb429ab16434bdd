//! `[auth]`: the API keys (by the SHA-256 of their tokens) with their
//! scopes, models, rates, expiries and priorities, and whether a listener
//! beyond loopback may go without any key.

use toml::Spanned;

use super::raw::{RawAuth, RawKey, Source};
use super::{ConfigError, ListenAddr, ModelConfig};

/// What a principal may do. `Admin` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The model routes (`/v1/*`, later Ollama's).
    Inference,
    /// History, stats, ps, metrics.
    Read,
    /// Stop, backup, the raw `/upstream/` pass-through.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Inference, Scope::Read, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// `[auth.keys.NAME]`: one API key, by the SHA-256 of its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    /// As configured; `admin` also grants `read` (see [`KeyConfig::allows`]).
    pub scopes: Vec<Scope>,
    /// Canonical names of the models it may use; `None`: all.
    pub models: Option<Vec<String>>,
    /// Requests per minute (a token bucket of that size); `None`: unlimited.
    pub rate_per_minute: Option<u32>,
    /// Unix milliseconds after which it is refused.
    pub expires_at_ms: Option<i64>,
    /// Added to the priority of its requests while they wait for a model:
    /// higher is served first and may swap a busy model out before the
    /// fairness bound.
    pub priority: i32,
}

impl KeyConfig {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
            || (scope == Scope::Read && self.scopes.contains(&Scope::Admin))
    }

    /// Whether it may use the model of this canonical name.
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == model))
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// A listener beyond loopback without any key is meant (else a config
    /// error).
    pub open: bool,
    /// `/metrics` without a key (Prometheus scrapers often have none).
    pub metrics_public: bool,
    pub keys: Vec<KeyConfig>,
}

/// The `hash` of a key: `sha256:` and 64 hex digits.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An expiry: an RFC 3339 time, or a date (midnight UTC).
fn parse_expiry(text: &str) -> Option<i64> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// `[auth]`: every key, then refuses a listener beyond loopback with no
/// key unless `open` says that is meant.
pub(super) fn validate_auth(
    src: &Source<'_>,
    raw: &RawAuth,
    listen: &[ListenAddr],
    models: &[ModelConfig],
) -> Result<AuthConfig, ConfigError> {
    let mut keys: Vec<KeyConfig> = Vec::with_capacity(raw.keys.len());
    for (name, key) in &raw.keys {
        let key = validate_key(src, name, key.get_ref(), &keys, models)?;
        keys.push(key);
    }
    let open = raw.open.unwrap_or(false);
    if keys.is_empty() && !open {
        if let Some(exposed) = listen.iter().find(|l| !l.is_loopback()) {
            return Err(src.unpositioned(format!(
                "listen: {exposed} is reachable beyond this machine and no API key is configured; add an [auth.keys.NAME] (claracore key new) or set auth.open = true if every client on the network may run inference"
            )));
        }
    }
    Ok(AuthConfig {
        open,
        metrics_public: raw.metrics_public.unwrap_or(false),
        keys,
    })
}

/// `[auth.keys.NAME]`; `earlier` are the keys before it, whose hashes it
/// must not repeat.
fn validate_key(
    src: &Source<'_>,
    name: &Spanned<String>,
    k: &RawKey,
    earlier: &[KeyConfig],
    models: &[ModelConfig],
) -> Result<KeyConfig, ConfigError> {
    let at = |what: &str| format!("auth.keys.{}.{what}", name.get_ref());
    let sha256 = parse_key_hash(k.hash.get_ref()).ok_or_else(|| {
        src.error(
            &k.hash,
            format!(
                "{}: must be \"sha256:\" and 64 hex digits (claracore key new prints it)",
                at("hash")
            ),
        )
    })?;
    if let Some(other) = earlier.iter().find(|o| o.sha256 == sha256) {
        return Err(src.error(
            &k.hash,
            format!("{}: the same key as auth.keys.{}", at("hash"), other.name),
        ));
    }
    let scopes = scopes(src, &k.scopes, &at("scopes"))?;
    let allowed = match &k.models {
        None => None,
        Some(list) => Some(allowed_models(src, list, models, &at("models"))?),
    };
    let rate_per_minute = match &k.rate {
        None => None,
        Some(r) => Some(
            u32::try_from(*r.get_ref())
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    src.error(r, format!("{}: requests per minute, 1 or more", at("rate")))
                })?,
        ),
    };
    let expires_at_ms = match &k.expires {
        None => None,
        Some(e) => Some(parse_expiry(e.get_ref()).ok_or_else(|| {
            src.error(
                e,
                format!(
                    "{}: {:?} is not a date (2027-01-31) or an RFC 3339 time",
                    at("expires"),
                    e.get_ref()
                ),
            )
        })?),
    };
    let priority = src.priority(&at("priority"), k.priority.as_ref())?;
    Ok(KeyConfig {
        name: name.get_ref().clone(),
        sha256,
        scopes,
        models: allowed,
        rate_per_minute,
        expires_at_ms,
        priority,
    })
}

/// A key's `scopes`: at least one, each once, in the order given.
fn scopes(
    src: &Source<'_>,
    raw: &Spanned<Vec<Spanned<String>>>,
    key: &str,
) -> Result<Vec<Scope>, ConfigError> {
    let mut scopes = Vec::new();
    for s in raw.get_ref() {
        let scope = Scope::parse(s.get_ref()).ok_or_else(|| {
            src.error(
                s,
                format!(
                    "{key}: {:?} is not one of inference, read, admin",
                    s.get_ref()
                ),
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(src.error(raw, format!("{key}: give at least one scope")));
    }
    Ok(scopes)
}

/// A key's `models`: each a configured name or alias, kept as the
/// model's canonical name.
fn allowed_models(
    src: &Source<'_>,
    list: &[Spanned<String>],
    models: &[ModelConfig],
    key: &str,
) -> Result<Vec<String>, ConfigError> {
    let mut names = Vec::with_capacity(list.len());
    for m in list {
        let Some(found) = models
            .iter()
            .find(|c| &c.name == m.get_ref() || c.aliases.contains(m.get_ref()))
        else {
            return Err(src.error(
                m,
                format!("{key}: no model or alias {:?} is configured", m.get_ref()),
            ));
        };
        names.push(found.name.clone());
    }
    Ok(names)
}
