//! Figures about processes read from `/proc`: resident memory and CPU time
//! of the daemon and of its children. A leaf: imports nothing from the crate.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_readable() {
        let (rss, cpu) = process_figures().unwrap();
        assert!(rss > 0 && cpu >= 0.0);
        assert_eq!(pid_figures(std::process::id()).map(|f| f.0 > 0), Some(true));
    }
}
