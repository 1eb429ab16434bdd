#!/usr/bin/env bash
# The proxy benchmarks in one command (see BENCHMARKS.md): installs wrk and
# nginx when missing (Debian, apt-get, as root), prepares llama-server and
# the tiny model (tests/tools/setup-test-deps.sh, cached), builds claracore
# in release mode and runs the harness, tests/bench/proxy.rs.
#
#   tests/tools/bench.sh           # every comparison, ~2 min of measuring
#   tests/tools/bench.sh --quick   # ~10 s: CI smoke, fails only on
#                                  # gross regressions; last line "N passed, M failed"
#
# Other arguments go to the harness, e.g. `--only latency,rps,stream,cold,
# swap,rss,ready,events`. BENCH_KEEP=1 keeps the work directory (configs, logs).
# Without wrk or nginx (no root, no apt) their rows are reported as skipped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
log() { echo "bench.sh: $*" >&2; }

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
            { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
        # The bench runs its own nginx on loopback ports; the package's
        # service, if the install started one, is not wanted.
        if [[ " ${need[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null &&
            systemctl is-active --quiet nginx 2>/dev/null; then
            log "stopping and disabling the nginx service the package started"
            systemctl disable --now nginx >&2 || true
        fi
    else
        log "missing ${need[*]} and cannot apt-get install them (not root or no apt): those rows are skipped"
    fi
fi

eval "$("$here/setup-test-deps.sh")"

# 1000 concurrent streams need ~3000 descriptors in the daemon and as many
# in the harness; children inherit the limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building claracore (release)"
cargo build --release --bin claracore >&2
exec cargo bench --bench proxy -- "$@"
