//! The config file as serde reads it, before validation: one `Raw*` struct
//! per table, each `deny_unknown_fields` so a misspelt key is an error,
//! with the source spans validation needs to position its messages.
//! [`Source`] turns such a span into a file:line:column [`ConfigError`],
//! and holds the value checks every section shares (durations,
//! priorities).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::de::{Deserializer, Error as _, IntoDeserializer};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, LogFormat};

/// Bounds of a model's or a key's `priority`.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Vec<Spanned<String>>>,
    pub(super) llama_server: Option<String>,
    pub(super) state_dir: Option<String>,
    pub(super) socket_mode: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "log_format")]
    pub(super) log_format: Option<LogFormat>,
    pub(super) log_level: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) http: RawHttp,
    #[serde(default)]
    pub(super) scheduler: RawScheduler,
    #[serde(default)]
    pub(super) history: RawHistory,
    #[serde(default)]
    pub(super) logging: RawLogging,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) dashboard: RawDashboard,
    #[serde(default)]
    pub(super) gpu: RawGpu,
    #[serde(default)]
    pub(super) models: BTreeMap<Spanned<String>, Spanned<RawModel>>,
    pub(super) models_dir: Option<Spanned<OneOrMany>>,
    pub(super) ollama_models: Option<String>,
    #[serde(default)]
    pub(super) models_defaults: RawModelsDefaults,
}

/// A path or a list of paths.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn paths(&self) -> Vec<String> {
        match self {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(ps) => ps.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelsDefaults {
    #[serde(default)]
    pub(super) args: Vec<String>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) group: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHistory {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<String>,
    pub(super) content: Option<Spanned<String>>,
    pub(super) retention: Option<Spanned<String>>,
    pub(super) events_retention: Option<Spanned<String>>,
    pub(super) samples_retention: Option<Spanned<String>>,
    pub(super) queue: Option<Spanned<i64>>,
    pub(super) batch_window: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLogging {
    pub(super) model_log_lines: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) max_body_bytes: Option<Spanned<u64>>,
    pub(super) header_read_timeout: Option<Spanned<String>>,
    pub(super) body_memory_bytes: Option<Spanned<u64>>,
    pub(super) body_read_timeout: Option<Spanned<String>>,
    pub(super) worker_threads: Option<Spanned<i64>>,
    pub(super) max_open_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub(super) max_loaded: Option<Spanned<i64>>,
    pub(super) idle_ttl: Option<Spanned<String>>,
    pub(super) start_timeout: Option<Spanned<String>>,
    pub(super) stop_grace: Option<Spanned<String>>,
    pub(super) shutdown_timeout: Option<Spanned<String>>,
    pub(super) health_interval: Option<Spanned<String>>,
    pub(super) max_queue: Option<Spanned<i64>>,
    pub(super) max_wait_before_swap: Option<Spanned<String>>,
    pub(super) vram_reserve_mb: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGpu {
    pub(super) enabled: Option<bool>,
    pub(super) sample_interval: Option<Spanned<String>>,
    pub(super) nvml_library: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) model: Option<String>,
    pub(super) cmd: Option<Vec<String>>,
    pub(super) args: Option<Vec<String>>,
    #[serde(default)]
    pub(super) aliases: Vec<Spanned<String>>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) group: Option<String>,
    #[serde(default)]
    pub(super) preload: bool,
    #[serde(default)]
    pub(super) pin: bool,
    pub(super) health: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) vram_mb: Option<Spanned<i64>>,
    pub(super) gpus: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(super) priority: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) open: Option<bool>,
    pub(super) metrics_public: Option<bool>,
    #[serde(default)]
    pub(super) keys: BTreeMap<Spanned<String>, Spanned<RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) hash: Spanned<String>,
    pub(super) scopes: Spanned<Vec<Spanned<String>>>,
    pub(super) models: Option<Vec<Spanned<String>>>,
    pub(super) rate: Option<Spanned<i64>>,
    pub(super) expires: Option<Spanned<String>>,
    pub(super) priority: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDashboard {
    pub(super) password_hash: Option<Spanned<String>>,
    pub(super) password_hash_file: Option<Spanned<String>>,
    pub(super) session_lifetime: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Spanned<String>>,
}

/// `log_format` by [`LogFormat`]'s serde names. serde's own message for an
/// unknown name ("unknown variant …") names no key, so it is replaced by
/// one that does, as every other config error does; toml positions it at
/// the value.
fn log_format<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
    let text = String::deserialize(d)?;
    let named: Result<LogFormat, serde::de::value::Error> =
        LogFormat::deserialize(text.as_str().into_deserializer());
    named.map(Some).map_err(|_| {
        D::Error::custom(format!(
            "log_format: {text:?} is not one of \"auto\", \"human\", \"json\""
        ))
    })
}

/// Positions byte offsets in the source as 1-based line and column.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    /// Whether files the config names only for the running system
    /// (`dashboard.password_hash_file`, often a systemd credential) are
    /// read now; `check-config` without `--strict` (the Nix module's
    /// build-time check) leaves them to the daemon.
    pub(super) read_runtime_files: bool,
}

impl Source<'_> {
    /// The file read into its raw shape; a syntax error, a wrong type or
    /// an unknown key is positioned where toml found it.
    pub(super) fn read(&self) -> Result<RawConfig, ConfigError> {
        toml::from_str(self.text).map_err(|e| match e.span() {
            Some(span) => self.error_at(span.start, e.message().trim_end().to_string()),
            None => ConfigError::Unpositioned {
                path: self.path.to_path_buf(),
                message: e.message().trim_end().to_string(),
            },
        })
    }

    pub(super) fn error_at(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    pub(super) fn error<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error_at(spanned.span().start, message)
    }

    /// An error about the file as a whole, not one place in it.
    pub(super) fn unpositioned(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Unpositioned {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(super) fn duration(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<Duration, ConfigError> {
        parse_duration(value.get_ref()).map_err(|e| self.error(value, format!("{key}: {e}")))
    }

    /// A duration where "0" means "never".
    pub(super) fn optional_duration(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<Option<Duration>, ConfigError> {
        let d = self.duration(key, value)?;
        Ok((!d.is_zero()).then_some(d))
    }

    /// A duration that must not be zero.
    pub(super) fn nonzero(&self, key: &str, v: &Spanned<String>) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v)?;
        if d.is_zero() {
            return Err(self.error(v, format!("{key}: must be greater than 0")));
        }
        Ok(d)
    }

    /// A `priority` key: an integer in [`PRIORITY_RANGE`], 0 when absent.
    pub(super) fn priority(&self, key: &str, v: Option<&Spanned<i64>>) -> Result<i32, ConfigError> {
        let Some(v) = v else { return Ok(0) };
        i32::try_from(*v.get_ref())
            .ok()
            .filter(|p| PRIORITY_RANGE.contains(&i64::from(*p)))
            .ok_or_else(|| {
                self.error(
                    v,
                    format!(
                        "{key}: must be between {} and {}",
                        PRIORITY_RANGE.start(),
                        PRIORITY_RANGE.end()
                    ),
                )
            })
    }
}

/// Parses a humantime duration such as `10m`, `1h 30s` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"10m\" ({e})"))
}
