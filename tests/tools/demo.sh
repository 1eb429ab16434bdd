#!/usr/bin/env bash
# Runs claracore on a generated demo config: the tiny test model served by
# the cached llama-server, on 127.0.0.1:5800. Builds llama-server on first
# use (~15 min on 2 cores). Extra arguments go to `claracore serve`.
set -euo pipefail
cd "$(dirname "$0")/../.."

eval "$(tests/tools/setup-test-deps.sh)"
dir="${CLARACORE_DEMO_DIR:-${TMPDIR:-/tmp}/claracore-demo}"
mkdir -p "$dir"
cat > "$dir/config.toml" <<TOML
listen = ["127.0.0.1:5800", "unix:$dir/claracore.sock"]
llama_server = "$CLARACORE_TEST_LLAMA_SERVER"
state_dir = "$dir/state"

[scheduler]
max_loaded = 1
idle_ttl = "5m"

[models.tiny]
model = "$CLARACORE_TEST_MODEL"
args = ["-c", "2048"]
aliases = ["tiny-chat"]

[models.tiny-embed]
model = "$CLARACORE_TEST_MODEL"
args = ["-c", "512", "--embeddings", "--pooling", "mean"]
TOML
echo "config: $dir/config.toml" >&2
exec cargo run --release -- serve --config "$dir/config.toml" "$@"
