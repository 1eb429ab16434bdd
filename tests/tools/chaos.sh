#!/usr/bin/env bash
# The chaos soak (issue 17): steady mixed traffic against the real daemon and
# real llama-server children (three models, max_loaded = 2, idle TTL 1 s)
# while a chaos loop SIGKILLs a child, SIGSTOPs one past the health checks,
# reloads the config adding and removing a fourth model, fills the history
# disk (a small tmpfs) and frees it, and once SIGKILLs the daemon and starts
# it again. Then it checks the invariants and prints them as figures; the
# last line is "N passed, M failed", and the exit status is non-zero on any
# failure. The work is in tests/tools/chaos.py.
#
#   tests/tools/chaos.sh                 # 10 minutes of traffic (~11 min)
#   tests/tools/chaos.sh --smoke         # ~75 s: what tests/run.sh runs
#   tests/tools/chaos.sh --seed N        # replay a run's chaos schedule
#   tests/tools/chaos.sh --duration 120  # any length, in seconds
#
# Other options go to chaos.py (--clients, --health-gap-s, --rss-limit-mib).
# --release tests a release build instead of the debug one cargo test builds.
# The tmpfs needs root (mount); without it the history lives in a plain
# directory and the disk-full action is skipped, with the reason printed.
# CHAOS_KEEP=1 keeps the work directory (config, daemon logs, records.json);
# it is kept on failure too.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
log() { echo "chaos.sh: $*" >&2; }

profile=debug
args=()
for a in "$@"; do
    case "$a" in
    --release) profile=release ;;
    *) args+=("$a") ;;
    esac
done

if [ -z "${CLARACORE_TEST_LLAMA_SERVER:-}" ] || [ -z "${CLARACORE_TEST_MODEL:-}" ]; then
    eval "$("$here/setup-test-deps.sh")"
fi

log "building claracore ($profile)"
if [ "$profile" = release ]; then
    cargo build --release --bin claracore >&2
else
    cargo build --bin claracore >&2
fi
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"

work="$(mktemp -d /tmp/claracore-chaos.XXXXXX)"
# A copy: another build in a shared target directory cannot swap the
# binary under a running soak.
cp "$target/$profile/claracore" "$work/claracore"
mkdir -p "$work/state"
tmpfs=()
if [ "$(id -u)" = 0 ] && mount -t tmpfs -o size=24m,mode=0700 tmpfs "$work/state" 2>/dev/null; then
    tmpfs=(--tmpfs)
else
    log "cannot mount a tmpfs (needs root): the history stays in a plain directory and the disk-full action is skipped"
fi

py_pid=
cleanup() {
    local rc=$?
    if [ -n "$py_pid" ] && kill -0 "$py_pid" 2>/dev/null; then
        kill -TERM "$py_pid" 2>/dev/null || true
        wait "$py_pid" 2>/dev/null || true
    fi
    # The daemon the soak started, if the soak could not stop it: only
    # that pid, and only while it still runs our copy of the binary.
    if [ -f "$work/daemon.pid" ]; then
        pid="$(cat "$work/daemon.pid")"
        if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$work/claracore" ]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # Its children die with it (PR_SET_PDEATHSIG); a SIGSTOPped one too.
    local keep=0
    if [ "$rc" != 0 ] || [ "${CHAOS_KEEP:-0}" = 1 ]; then
        keep=1
    fi
    if [ ${#tmpfs[@]} -gt 0 ]; then
        # The database goes with the tmpfs: keep a copy to look at.
        if [ "$keep" = 1 ]; then
            mkdir -p "$work/state-copy"
            cp -a "$work/state/." "$work/state-copy/" 2>/dev/null || true
        fi
        umount -l "$work/state" 2>/dev/null || true
    fi
    if [ "$keep" = 0 ]; then
        rm -rf "$work"
    else
        log "work directory kept: $work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 "$here/chaos.py" --work "$work" --bin "$work/claracore" \
    --llama-server "$CLARACORE_TEST_LLAMA_SERVER" --model "$CLARACORE_TEST_MODEL" \
    "${tmpfs[@]}" "${args[@]}" &
py_pid=$!
wait "$py_pid"
