//! Watches the models folders, so a folder is served as it is: a GGUF
//! written (closed after writing), moved in, moved out or deleted there,
//! or a subdirectory made or removed, triggers a reload once the folder has
//! been quiet for [`QUIET`].
//!
//! One thread blocks on inotify and only forwards "something changed"; the
//! reload itself runs on the server's loop, in order with SIGHUP reloads.
//! Files still being written are not looked at until closed (`*.part` is
//! never a model), and hidden files (a pull's sidecars and locks) are
//! ignored.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;

/// How long a folder must be quiet before the reload (a copy of several
/// files, a pull of a split model, is one reload).
pub(super) const QUIET: Duration = Duration::from_millis(300);

/// Starts watching `dirs` and their subdirectories; `None` when there is
/// nothing to watch or inotify is unavailable (said in the log).
pub(super) fn start(dirs: &[PathBuf]) -> Option<mpsc::UnboundedReceiver<()>> {
    if dirs.is_empty() {
        return None;
    }
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the models folders; changes are picked up on reload");
            return None;
        }
    };
    let mut watched = HashMap::new();
    for dir in dirs {
        add_tree(&inotify, dir, &mut watched);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("models-watch".into())
        .spawn(move || run(inotify, watched, tx));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the models folder watcher");
        return None;
    }
    Some(rx)
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Watches `dir` and its subdirectories one level down.
fn add_tree(inotify: &Inotify, dir: &Path, watched: &mut HashMap<WatchDescriptor, PathBuf>) {
    match inotify.add_watch(dir, flags()) {
        Ok(wd) => {
            watched.insert(wd, dir.to_path_buf());
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this models folder; changes are picked up on reload");
            return;
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) && !hidden(&entry.file_name()) {
            if let Ok(wd) = inotify.add_watch(&entry.path(), flags()) {
                watched.insert(wd, entry.path());
            }
        }
    }
}

fn hidden(name: &OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// Whether an event about `name` can change what is served.
fn relevant(name: Option<&OsStr>, is_dir: bool) -> bool {
    let Some(name) = name else {
        return true;
    };
    if hidden(name) {
        return false;
    }
    is_dir || crate::sources::is_gguf_name(&name.to_string_lossy())
}

fn run(
    inotify: Inotify,
    mut watched: HashMap<WatchDescriptor, PathBuf>,
    tx: mpsc::UnboundedSender<()>,
) {
    loop {
        let events = match inotify.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the models folder watcher stopped; changes are picked up on reload");
                return;
            }
        };
        let mut changed = false;
        for ev in events {
            let is_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR);
            if ev.mask.contains(AddWatchFlags::IN_CREATE) && !is_dir {
                // A file being created is picked up when it is closed.
                continue;
            }
            if is_dir
                && ev
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            {
                if let (Some(parent), Some(name)) = (watched.get(&ev.wd).cloned(), &ev.name) {
                    let sub = parent.join(name);
                    if let Ok(wd) = inotify.add_watch(&sub, flags()) {
                        watched.insert(wd, sub);
                    }
                }
            }
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                watched.remove(&ev.wd);
                continue;
            }
            changed |= relevant(ev.name.as_deref(), is_dir);
        }
        if changed && tx.send(()).is_err() {
            return;
        }
    }
}

/// Waits for the next change, then for [`QUIET`] without another.
pub(super) async fn next_change(rx: &mut Option<mpsc::UnboundedReceiver<()>>) -> Option<()> {
    let Some(rx) = rx.as_mut() else {
        return std::future::pending().await;
    };
    rx.recv().await?;
    while let Ok(Some(())) = tokio::time::timeout(QUIET, rx.recv()).await {}
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ggufs_and_directories_count() {
        assert!(relevant(Some(OsStr::new("m.gguf")), false));
        assert!(relevant(Some(OsStr::new("M.GGUF")), false));
        assert!(relevant(Some(OsStr::new("vision")), true));
        assert!(!relevant(Some(OsStr::new("m.gguf.part")), false));
        assert!(!relevant(Some(OsStr::new(".m.gguf.source")), false));
        assert!(!relevant(Some(OsStr::new(".m.gguf.lock")), false));
        assert!(!relevant(Some(OsStr::new("notes.txt")), false));
    }
}
