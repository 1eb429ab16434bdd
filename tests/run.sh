#!/usr/bin/env bash
# Runs every check and test the project has: formatting, clippy, unit tests,
# the integration tests against a real llama-server with the generated tiny
# model, the release artifacts (the .deb, the tarball and SHA256SUMS, built
# twice from clean target directories and compared byte for byte), and the
# systemd scenarios under a real PID-1 systemd (nspawn and a qemu VM), which
# install that .deb. The first run builds llama-server (~15 min on 2 cores) and the
# Debian trixie guests (~3 min); all are cached in
# ${CLARACORE_CACHE:-~/.cache/claracore}, keyed by version.
# Set CLARACORE_SKIP_VM=1 to leave out the systemd scenarios (they need root),
# CLARACORE_SKIP_REPRO=1 to build the release artifacts once instead of twice.
# Files the tests leave for a person to look at (the dashboard's screenshots
# from tests/it/browser.rs) go to CLARACORE_TEST_ARTIFACTS, by default
# tmp/test-artifacts/ in cargo's target directory (CARGO_TARGET_TMPDIR, where
# the tests put them when run by cargo alone); its path and contents are
# printed at the end, pass or fail, for CI to keep.
set -euo pipefail
cd "$(dirname "$0")/.."

artifacts="${CLARACORE_TEST_ARTIFACTS:-${CARGO_TARGET_DIR:-$PWD/target}/tmp/test-artifacts}"
mkdir -p "$artifacts"
artifacts="$(cd "$artifacts" && pwd)"
export CLARACORE_TEST_ARTIFACTS="$artifacts"
show_artifacts() {
    echo "=== test artifacts in $artifacts:" >&2
    (cd "$artifacts" && find . -type f | sort) >&2
}
trap show_artifacts EXIT

eval "$(tests/tools/setup-test-deps.sh)"
echo "llama-server: $CLARACORE_TEST_LLAMA_SERVER" >&2
echo "tiny model:   $CLARACORE_TEST_MODEL" >&2

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Not --all-targets: that would also run the benches (harness = false) as tests.
cargo test --locked --lib --bins --tests

echo "=== Nix: parse, unit drift, VM test scripts" >&2
tests/nix/check.sh

echo "=== GPU proof, dry run (no GPU)" >&2
# tests/gpu/prove.sh's checks against the fake NVML and the CPU
# llama-server (~2 min); the real proof runs on a GPU machine (its header).
tests/gpu/prove.sh "$artifacts/gpu-proof-dry-run" --dry-run

echo "=== benchmark smoke (gross regressions only)" >&2
tests/tools/bench.sh --quick

echo "=== chaos soak smoke (~80 s; the 10-minute run: tests/tools/chaos.sh)" >&2
tests/tools/chaos.sh --smoke

if [ "${CLARACORE_SKIP_REPRO:-0}" != 1 ]; then
    echo "=== release: .deb, tarball, SHA256SUMS; built twice and compared" >&2
    dist="$(tests/tools/release.sh --check-reproducible)"
else
    echo "=== release: .deb, tarball, SHA256SUMS" >&2
    dist="$(tests/tools/release.sh)"
fi
# The systemd suites install this package.
CLARACORE_DEB="$(ls "$dist"/claracore_*.deb)"
export CLARACORE_DEB

if [ "${CLARACORE_SKIP_VM:-0}" != 1 ]; then
    echo "=== systemd under systemd-nspawn" >&2
    tests/systemd/run-nspawn.sh
    echo "=== systemd in a qemu VM (cgroup limits)" >&2
    tests/systemd/run-qemu.sh
fi
