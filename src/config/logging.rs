//! How the daemon logs: the top-level `log_format` (read by serde into
//! [`LogFormat`]) and `log_level`, and `[logging]`, how much of each
//! model's own output is kept in memory.

use serde::Deserialize;
use toml::Spanned;

use super::raw::{RawLogging, Source};
use super::{ConfigError, DEFAULT_LOG_LEVEL, DEFAULT_MODEL_LOG_LINES};

/// How log lines are written when not under journald; in the file, the
/// lowercase name of a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    Human,
    Json,
}

/// The most `model_log_lines` may be: at the 4 KiB line cap, 64 MiB a model.
pub const MAX_MODEL_LOG_LINES: usize = 16384;

/// `log_level`: a tracing filter, checked here so a typo fails at load,
/// not silently at start.
pub(super) fn validate_log_level(
    src: &Source<'_>,
    raw: Option<&Spanned<String>>,
) -> Result<String, ConfigError> {
    let Some(l) = raw else {
        return Ok(DEFAULT_LOG_LEVEL.to_string());
    };
    tracing_subscriber::EnvFilter::try_new(l.get_ref()).map_err(|e| {
        src.error(
            l,
            format!("log_level: {:?} is not a log filter ({e})", l.get_ref()),
        )
    })?;
    Ok(l.get_ref().clone())
}

/// `[logging] model_log_lines`: 0 (keep none) to [`MAX_MODEL_LOG_LINES`].
pub(super) fn validate_model_log_lines(
    src: &Source<'_>,
    raw: &RawLogging,
) -> Result<usize, ConfigError> {
    let Some(v) = &raw.model_log_lines else {
        return Ok(DEFAULT_MODEL_LOG_LINES);
    };
    usize::try_from(*v.get_ref())
        .ok()
        .filter(|n| *n <= MAX_MODEL_LOG_LINES)
        .ok_or_else(|| {
            src.error(
                v,
                format!("logging.model_log_lines: must be between 0 (keep none) and {MAX_MODEL_LOG_LINES}"),
            )
        })
}
