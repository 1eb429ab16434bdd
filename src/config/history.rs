//! `[history]`: whether and where requests are recorded, how much of their
//! text is kept, for how long, and how rows are batched to the writer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawHistory, Source};
use super::{
    ConfigError, DEFAULT_BATCH_WINDOW, DEFAULT_CONTENT_POLICY, DEFAULT_HISTORY_ENABLED,
    DEFAULT_HISTORY_FILE, DEFAULT_HISTORY_QUEUE, DEFAULT_RETENTION, DEFAULT_SAMPLES_RETENTION,
};

/// What request and response text is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ContentPolicy {
    None,
    /// The first `history::tap::TRUNCATE_CHARS` characters of each, marked as
    /// truncated when cut.
    Truncated,
    Full,
}

/// `[history]` in the config.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub enabled: bool,
    pub path: PathBuf,
    pub content: ContentPolicy,
    pub retention: Duration,
    pub events_retention: Duration,
    pub samples_retention: Duration,
    /// Rows that may wait for the writer before new ones are dropped.
    pub queue: usize,
    pub batch_window: Duration,
}

/// `[history]`; the database lives in `state_dir` unless `path` says
/// otherwise, and events are kept as long as requests unless told.
pub(super) fn validate_history(
    src: &Source<'_>,
    h: &RawHistory,
    state_dir: &Path,
) -> Result<HistoryConfig, ConfigError> {
    let retention = match &h.retention {
        None => DEFAULT_RETENTION,
        Some(v) => src.nonzero("history.retention", v)?,
    };
    Ok(HistoryConfig {
        enabled: h.enabled.unwrap_or(DEFAULT_HISTORY_ENABLED),
        path: h
            .path
            .as_ref()
            .map_or_else(|| state_dir.join(DEFAULT_HISTORY_FILE), PathBuf::from),
        content: content(src, h.content.as_ref())?,
        retention,
        events_retention: match &h.events_retention {
            None => retention,
            Some(v) => src.nonzero("history.events_retention", v)?,
        },
        samples_retention: match &h.samples_retention {
            None => DEFAULT_SAMPLES_RETENTION,
            Some(v) => src.nonzero("history.samples_retention", v)?,
        },
        queue: match &h.queue {
            None => DEFAULT_HISTORY_QUEUE,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| src.error(v, "history.queue: must be 1 or more"))?,
        },
        batch_window: match &h.batch_window {
            None => DEFAULT_BATCH_WINDOW,
            Some(v) => src.duration("history.batch_window", v)?,
        },
    })
}

/// `history.content`: `none`, `truncated` or `full`.
fn content(
    src: &Source<'_>,
    raw: Option<&toml::Spanned<String>>,
) -> Result<ContentPolicy, ConfigError> {
    match raw.map(|c| (c, c.get_ref().as_str())) {
        None => Ok(DEFAULT_CONTENT_POLICY),
        Some((_, "truncated")) => Ok(ContentPolicy::Truncated),
        Some((_, "none")) => Ok(ContentPolicy::None),
        Some((_, "full")) => Ok(ContentPolicy::Full),
        Some((c, other)) => Err(src.error(
            c,
            format!("history.content: {other:?} is not one of \"none\", \"truncated\", \"full\""),
        )),
    }
}
