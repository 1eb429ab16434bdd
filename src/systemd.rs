//! The systemd side of the daemon: readiness and status notifications,
//! the watchdog interval, journald detection, and dropping privileges.
//!
//! Everything here takes what `main` read from the environment as plain
//! values; nothing reads or changes the environment itself (changing it
//! races once threads exist). `NOTIFY_SOCKET` and `LISTEN_*` are kept out
//! of children by the supervisor instead.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub use sd_notify::NotifyState;

/// Sends `sd_notify` messages to the service manager, if there is one.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<SocketAddr>,
}

impl Notifier {
    /// From the value of `NOTIFY_SOCKET`: a path, or `@name` for an
    /// abstract socket. None or an unusable value: notifications are off.
    pub fn new(notify_socket: Option<&OsStr>) -> Notifier {
        let target = notify_socket.and_then(|raw| {
            let bytes = raw.as_encoded_bytes();
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name),
                None => SocketAddr::from_pathname(raw),
            };
            addr.map_err(|e| tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable; not notifying"))
                .ok()
        });
        Notifier { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends the states as one datagram. A failure is logged, never fatal:
    /// the service keeps serving even if the manager went away.
    pub fn notify(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else { return };
        let mut msg = String::new();
        for state in states {
            msg.push_str(&state.to_string());
            msg.push('\n');
        }
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(msg.as_bytes(), target));
        if let Err(e) = sent {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// `STATUS=` with the given text.
    pub fn status(&self, text: &str) {
        self.notify(&[NotifyState::Status(text)]);
    }
}

/// The watchdog ping interval: half of `WATCHDOG_USEC`, when the watchdog is
/// meant for this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// True when stderr is the journal's stream for this service: systemd sets
/// `JOURNAL_STREAM=<dev>:<inode>` of the stream it connected.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}

/// What [`drop_privileges`] found and removed.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Capabilities that were held (effective, permitted or bounding set
    /// beyond what an unprivileged process has), by name.
    pub capabilities: Vec<String>,
}

/// Drops every capability (effective, permitted, inheritable, ambient and
/// the bounding set) and sets no_new_privs, so neither the daemon nor its
/// children can regain privileges. Capabilities are per thread: call this
/// before any thread is started.
pub fn drop_privileges() -> Result<Dropped, String> {
    use caps::CapSet;
    let mut held: Vec<String> = caps::read(None, CapSet::Permitted)
        .map_err(|e| format!("reading capabilities: {e}"))?
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    held.sort();
    if !held.is_empty() {
        // The bounding set can only shrink while CAP_SETPCAP is held, so it
        // goes first.
        for cap in caps::read(None, CapSet::Bounding)
            .map_err(|e| format!("reading the bounding set: {e}"))?
        {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
        }
        for set in [
            CapSet::Ambient,
            CapSet::Inheritable,
            CapSet::Effective,
            CapSet::Permitted,
        ] {
            caps::clear(None, set).map_err(|e| format!("clearing {set:?} capabilities: {e}"))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("setting no_new_privs: {e}"))?;
    Ok(Dropped { capabilities: held })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_respects_watchdog_pid() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn notifier_delivers_to_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.as_os_str()));
        assert!(n.enabled());
        n.notify(&[NotifyState::Ready, NotifyState::Status("1/2 models loaded")]);
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=1/2 models loaded\n");
        assert!(!Notifier::new(None).enabled());
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:1")));
    }
}
