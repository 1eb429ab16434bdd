//! Where log events go: the journal (with PRIORITY and structured fields
//! such as MODEL=, CHILD_PID=), or stderr as human-readable text on a
//! terminal and one JSON object per line otherwise.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `serve --log-target`: `auto` is the journal when stderr is connected
/// to it, else stderr.
// No doc comments on the variants: clap would print them in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    Auto,
    Journald,
    Stderr,
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
                let _ = JOURNAL.set(());
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

/// Set once log lines go to journald.
static JOURNAL: std::sync::OnceLock<()> = std::sync::OnceLock::new();
/// journald's native protocol socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Replaces the default panic output (several lines, a backtrace) with one
/// structured entry naming where it happened: PRIORITY=2 (critical) in
/// the journal, else one error line in the configured format. A panic is a
/// bug: no request should be able to cause one.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| (l.file(), l.line(), l.column()));
        let message = panic_message(info.payload());
        if JOURNAL.get().is_some() && send_to_journal(&journal_entry(&message, location)).is_ok() {
            return;
        }
        let at = location.map_or_else(|| "unknown".into(), |(f, l, c)| format!("{f}:{l}:{c}"));
        let thread = std::thread::current();
        tracing::error!(target: "claracore::panic", location = %at,
            thread = thread.name().unwrap_or("unnamed"),
            "panic: {}", message.replace('\n', "\\n"));
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// A journal entry in the native protocol; MESSAGE uses the length-framed
/// form, so a message with newlines stays one entry.
fn journal_entry(message: &str, location: Option<(&str, u32, u32)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 128);
    let text = format!("panic: {message}");
    out.extend_from_slice(b"MESSAGE\n");
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\nPRIORITY=2\nSYSLOG_IDENTIFIER=claracore\nTARGET=claracore::panic\n");
    if let Some((file, line, column)) = location {
        out.extend_from_slice(
            format!("CODE_FILE={file}\nCODE_LINE={line}\nCODE_COLUMN={column}\n").as_bytes(),
        );
    }
    out
}

fn send_to_journal(entry: &[u8]) -> std::io::Result<()> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.send_to(entry, JOURNAL_SOCKET).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_one_critical_journal_entry_with_its_location() {
        let e = journal_entry("boom\nsecond line", Some(("src/api/mod.rs", 12, 5)));
        let (head, rest) = e.split_at(b"MESSAGE\n".len());
        assert_eq!(head, b"MESSAGE\n");
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(&rest[8..8 + len], b"panic: boom\nsecond line");
        let fields = std::str::from_utf8(&rest[8 + len..]).unwrap();
        for f in [
            "PRIORITY=2\n",
            "CODE_FILE=src/api/mod.rs\n",
            "CODE_LINE=12\n",
            "SYSLOG_IDENTIFIER=claracore\n",
        ] {
            assert!(fields.contains(f), "{fields}");
        }
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&42), "(no message)");
    }
}
