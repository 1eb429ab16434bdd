//! `[dashboard]`: the web UI's login — the argon2id hash a password is
//! checked against (inline or from a file, often a systemd credential),
//! how long a session lasts, and which proxies are believed about TLS.

use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawDashboard, Source};
use super::{ConfigError, DEFAULT_SESSION_LIFETIME};

/// `[dashboard]`: the web UI's login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardConfig {
    /// The argon2id PHC string a password login is checked against (from
    /// `password_hash` or the file `password_hash_file` names); `None`: no
    /// password login.
    pub password_hash: Option<String>,
    /// How long a session lasts after its login.
    pub session_lifetime: Duration,
    /// Peers whose `X-Forwarded-Proto` is believed (a TLS-terminating
    /// reverse proxy), for the cookie's `Secure` flag.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            password_hash: None,
            session_lifetime: DEFAULT_SESSION_LIFETIME,
            trusted_proxies: Vec::new(),
        }
    }
}

/// What a leading `$CREDENTIALS_DIRECTORY/` in `password_hash_file` stands
/// for: systemd's `LoadCredential=` directory of the service.
const CREDENTIALS_VAR: &str = "$CREDENTIALS_DIRECTORY/";

/// Checks that `text` is an argon2id PHC string; the message says what is
/// wrong with it.
pub fn check_password_hash(text: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(text).map_err(|e| {
        format!("not a PHC string like \"$argon2id$v=19$m=19456,t=2,p=1$…\" ({e}); `claracore dashboard hash-password` prints one")
    })?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "the hash is {}, not argon2id; `claracore dashboard hash-password` prints an argon2id one",
            parsed.algorithm
        ));
    }
    argon2::Params::try_from(&parsed)
        .map_err(|e| format!("argon2id parameters are invalid ({e})"))?;
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the PHC string has no salt or no hash".into());
    }
    Ok(())
}

/// `[dashboard]`.
pub(super) fn validate_dashboard(
    src: &Source<'_>,
    raw: &RawDashboard,
) -> Result<DashboardConfig, ConfigError> {
    let password_hash = password_hash(src, raw)?;
    let session_lifetime = match &raw.session_lifetime {
        None => DEFAULT_SESSION_LIFETIME,
        Some(v) => src.nonzero("dashboard.session_lifetime", v)?,
    };
    let mut trusted_proxies = Vec::with_capacity(raw.trusted_proxies.len());
    for p in &raw.trusted_proxies {
        let ip = p.get_ref().trim().parse().map_err(|_| {
            src.error(
                p,
                format!(
                    "dashboard.trusted_proxies: {:?} is not an IP address",
                    p.get_ref()
                ),
            )
        })?;
        trusted_proxies.push(ip);
    }
    Ok(DashboardConfig {
        password_hash,
        session_lifetime,
        trusted_proxies,
    })
}

/// `password_hash` or `password_hash_file` (at most one), checked to be
/// an argon2id PHC string. The file is read only when the running
/// system's files are (see [`Source::read_runtime_files`]).
fn password_hash(src: &Source<'_>, raw: &RawDashboard) -> Result<Option<String>, ConfigError> {
    match (&raw.password_hash, &raw.password_hash_file) {
        (Some(_), Some(file)) => Err(src.error(
            file,
            "dashboard.password_hash_file: give password_hash or password_hash_file, not both",
        )),
        (Some(h), None) => {
            let text = h.get_ref().trim();
            check_password_hash(text)
                .map_err(|e| src.error(h, format!("dashboard.password_hash: {e}")))?;
            Ok(Some(text.to_string()))
        }
        (None, Some(file)) if !src.read_runtime_files => {
            if file.get_ref().trim().is_empty() {
                return Err(src.error(file, "dashboard.password_hash_file: must not be empty"));
            }
            Ok(None)
        }
        (None, Some(file)) => read_password_hash_file(src, file).map(Some),
        (None, None) => Ok(None),
    }
}

/// The trimmed PHC string in the file `password_hash_file` names.
fn read_password_hash_file(
    src: &Source<'_>,
    file: &Spanned<String>,
) -> Result<String, ConfigError> {
    let path = credential_path(file.get_ref());
    let text = std::fs::read_to_string(&path).map_err(|e| {
        src.error(
            file,
            format!(
                "dashboard.password_hash_file: cannot read {}: {e}",
                path.display()
            ),
        )
    })?;
    let text = text.trim();
    check_password_hash(text).map_err(|e| {
        src.error(
            file,
            format!("dashboard.password_hash_file: {}: {e}", path.display()),
        )
    })?;
    Ok(text.to_string())
}

/// A `password_hash_file` path: a leading `$CREDENTIALS_DIRECTORY/` is the
/// directory systemd's `LoadCredential=` fills (read here, once per load,
/// since only this key uses it); anything else as written.
fn credential_path(text: &str) -> PathBuf {
    match text.strip_prefix(CREDENTIALS_VAR) {
        Some(rest) => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join(rest),
            None => PathBuf::from(text),
        },
        None => PathBuf::from(text),
    }
}
