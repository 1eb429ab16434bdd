#!/usr/bin/env bash
# Runs every check and test the project has: formatting, clippy, unit tests
# and the integration tests against a real llama-server with the generated
# tiny model. The first run builds llama-server (~15 min on 2 cores) and
# caches it in ${CLARACORE_CACHE:-~/.cache/claracore}.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(tests/tools/setup-test-deps.sh)"
echo "llama-server: $CLARACORE_TEST_LLAMA_SERVER" >&2
echo "tiny model:   $CLARACORE_TEST_MODEL" >&2

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
