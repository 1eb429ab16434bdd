//! Every process the bench starts: each in its own process group, its pid
//! recorded, stopped (SIGTERM to the group, SIGKILL after a grace) when its
//! [`Proc`] is dropped, and by [`kill_all`] on panic or Ctrl-C. Nothing is
//! ever signalled that the bench did not start itself.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// (pid = pgid, name) of every process group started and not yet reaped.
static LIVE: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

pub struct Proc {
    pub name: String,
    child: Child,
    reaped: bool,
}

impl Proc {
    /// Starts `cmd` in a new process group with stdout and stderr appended
    /// to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // Record under the lock so kill_all never misses a started group.
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        live.push((child.id(), name.to_string()));
        Proc {
            name: name.to_string(),
            child,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not exited)?
    pub fn alive(&mut self) -> bool {
        !self.reaped && matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM to the group; SIGKILL to the group after `grace`; reaped.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.reaped {
            return None;
        }
        let group = Pid::from_raw(self.pid() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = killpg(group, Signal::SIGKILL);
                    break self.child.wait().ok();
                }
            }
        };
        // Anything left in the group (a router's children) goes too.
        let _ = killpg(group, Signal::SIGKILL);
        self.reaped = true;
        forget(self.pid());
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn forget(pid: u32) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|(p, _)| *p != pid);
}

/// Stops every recorded process group: SIGTERM, up to 2 s, then SIGKILL.
/// For panics and signals; normal runs drop their [`Proc`]s instead.
pub fn kill_all() {
    let live: Vec<(u32, String)> = LIVE
        .lock()
        .map(|l| l.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    for (pid, _) in &live {
        let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for (pid, _) in &live {
        // Not our child to reap here (the Child is elsewhere); poll with
        // signal 0 until the group is gone.
        while Instant::now() < deadline && killpg(Pid::from_raw(*pid as i32), None).is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
}

/// Runs `cmd` to completion (a load generator), recorded while it runs.
pub fn run(name: &str, cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name} ({:?}): {e}", cmd.get_program()));
        live.push((child.id(), name.to_string()));
        child
    };
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for load generator");
    forget(pid);
    out
}
