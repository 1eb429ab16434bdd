//! Figures about processes read from `/proc`: resident memory and CPU time
//! of the daemon and of its children, and who is whose parent. A leaf:
//! imports nothing from the crate.

/// (resident bytes, CPU seconds) of this process from /proc.
pub fn process_figures() -> Option<(i64, f64)> {
    pid_figures(std::process::id())
}

/// (resident bytes, CPU seconds) of a process from /proc.
pub fn pid_figures(pid: u32) -> Option<(i64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    // After the command: state is field 3; utime 14, stime 15, rss 24
    // (1-based in proc(5)), i.e. indexes 11, 12 and 21 here.
    let ticks = 100.0; // USER_HZ is 100 on every Linux architecture claracore targets.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: i64 = fields.get(21)?.parse().ok()?;
    Some((rss_pages * 4096, (utime + stime) / ticks))
}

/// The parent of a process (`ppid`, field 4 of /proc/PID/stat); `None`
/// once it is gone. The command name before it may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_readable() {
        let (rss, cpu) = process_figures().unwrap();
        assert!(rss > 0 && cpu >= 0.0);
        assert_eq!(pid_figures(std::process::id()).map(|f| f.0 > 0), Some(true));
    }

    #[test]
    fn a_child_names_this_process_as_its_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent_of(child.id()), Some(std::process::id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(parent_of(child.id()), None, "reaped: gone from /proc");
    }
}
