//! Whether a child died out of memory: its output names a failed
//! allocation (CUDA's or llama.cpp's), or the OOM killer took it, as the
//! rise of the service cgroup's `oom_kill` count tells. The scheduler may
//! make room and start such a child once more.

/// Whether a child's output reports that an allocation failed: CUDA's
/// "out of memory" (cudaMalloc, cuBLAS), or llama.cpp's own "failed to
/// allocate" of a buffer.
pub(super) fn mentions_out_of_memory(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("out of memory") || text.contains("failed to allocate")
}

/// `oom_kill` from the memory.events of the cgroup this process runs in
/// (cgroup v2), e.g. /sys/fs/cgroup/system.slice/claracore.service.
pub(super) fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", path.trim())).ok()?;
    parse_oom_kills(&events)
}

fn parse_oom_kills(memory_events: &str) -> Option<u64> {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Whether the OOM kill count rose between a child's start and its exit.
pub(super) fn oom_killed(before: Option<u64>, after: Option<u64>) -> bool {
    matches!((before, after), (Some(b), Some(a)) if a > b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(events), Some(2));
        assert_eq!(parse_oom_kills("low 0\n"), None);
        assert!(oom_killed(Some(2), Some(3)));
        assert!(!oom_killed(Some(2), Some(2)));
        assert!(!oom_killed(None, Some(3)));
    }
}
