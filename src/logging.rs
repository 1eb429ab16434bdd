//! Where log events go: the journal (with PRIORITY and structured fields
//! such as MODEL=, CHILD_PID=), or stderr as human-readable text on a
//! terminal and one JSON object per line otherwise.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `serve --log-target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The journal when stderr is connected to it, else stderr.
    Auto,
    Journald,
    Stderr,
}

impl LogTarget {
    pub fn parse(text: &str) -> Result<LogTarget, String> {
        match text {
            "auto" => Ok(LogTarget::Auto),
            "journald" => Ok(LogTarget::Journald),
            "stderr" => Ok(LogTarget::Stderr),
            other => Err(format!(
                "--log-target {other:?} is not one of auto, journald, stderr"
            )),
        }
    }
}

/// Installs the global subscriber. `filter` is `CLARACORE_LOG` or the
/// config's `log_level`; `stderr_is_journal` comes from `JOURNAL_STREAM`.
/// Returns a note to log once logging works (e.g. why the journal was not
/// used).
pub fn init(
    target: LogTarget,
    format: LogFormat,
    filter: &str,
    stderr_is_journal: bool,
) -> Option<String> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal = match target {
        LogTarget::Journald => true,
        LogTarget::Auto => stderr_is_journal,
        LogTarget::Stderr => false,
    };
    let mut note = None;
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                // journald's own convention: info is 6, debug 7.
                let mut priorities = tracing_journald::PriorityMappings::new();
                priorities.info = tracing_journald::Priority::Informational;
                priorities.debug = tracing_journald::Priority::Debug;
                let layer = layer
                    .with_field_prefix(None)
                    .with_priority_mappings(priorities)
                    .with_syslog_identifier("claracore".into());
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .init();
                return None;
            }
            Err(e) => {
                note = Some(format!(
                    "journald is not reachable ({e}); logging to stderr"
                ))
            }
        }
    }
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .init();
    } else {
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
    note
}
