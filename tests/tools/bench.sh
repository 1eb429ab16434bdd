#!/usr/bin/env bash
# The proxy benchmarks in one command (see BENCHMARKS.md): installs wrk and
# nginx when missing (Debian, apt-get, as root), prepares llama-server and
# the tiny model (tests/tools/setup-test-deps.sh, cached), builds claracore
# in release mode and runs the harness, tests/bench/proxy.rs.
#
#   tests/tools/bench.sh           # every comparison, the peers included
#                                  # (~10 min of measuring on 2 cores)
#   tests/tools/bench.sh --quick   # ~10 s: CI smoke, fails only on
#                                  # gross regressions; last line "N passed, M failed";
#                                  # no peers (add --peers to check their setup)
#
# The full run first installs the peers (tests/tools/install-peers.sh: Ollama
# with `go install` from the module proxy, cached by version; minutes the
# first time). Without Go, or where a peer does not install, its rows are
# left out and the header says why.
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

quick=0 peers=0
for a in "$@"; do
    case "$a" in --quick) quick=1 ;; --peers) peers=1 ;; esac
done
if [ "$quick" = 0 ] || [ "$peers" = 1 ]; then
    eval "$("$here/install-peers.sh")"
fi

# 1000 concurrent streams need ~3000 descriptors in the daemon and as many
# in the harness; children inherit the limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building claracore (release)"
cargo build --release --bin claracore >&2
exec cargo bench --bench proxy -- "$@"
