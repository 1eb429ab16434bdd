#!/usr/bin/env bash
# Installs the peers the full benchmark compares claracore with, using the
# ordinary Go client and the module proxy (GOPROXY as configured), and prints
# `export` lines for the ones that installed (all other output on stderr):
#
#   eval "$(tests/tools/install-peers.sh)"
#
#   CLARACORE_BENCH_OLLAMA      ollama, `go install github.com/ollama/ollama@$OLLAMA_VERSION`
#                               (CPU: its llama.cpp/ggml is compiled through cgo)
#   CLARACORE_BENCH_PEERS_NOTE  one line per peer that is left out, with the
#                               go tool's own error (the bench prints it)
#
# llama-swap (github.com/mostlygeek/llama-swap) is tried first with
# `go list -m` at $LLAMA_SWAP_VERSION (a commit's pseudo-version, or
# "latest" to resolve one): its release tags (v250, …) are not Go versions
# of that module path. Where the proxy does not serve it, it is left out;
# it is never built any other way. The harness has no llama-swap contender
# yet: a served version is reported, not measured.
#
# Each peer goes to $CLARACORE_CACHE/peers/<name>-<version>/bin (GOBIN), so
# reruns are no-ops. Nothing here is needed by `bench.sh --quick` or CI.
# Env: CLARACORE_CACHE (default ~/.cache/claracore), OLLAMA_VERSION,
#      LLAMA_SWAP_VERSION.
set -euo pipefail

cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
mkdir -p "$cache/peers"
cache="$(cd "$cache" && pwd)"
log() { echo "install-peers: $*" >&2; }

# v0.6.5 is the newest Ollama that `go install` can build from the module
# proxy. From v0.11 on (v0.11.10, v0.12.6, v0.13.5, v0.16.x, v0.17.4 were
# served on 2026-12-07) its cgo flags include llama/llama.cpp/vendor
# (nlohmann/json), and a module zip never holds a vendor/ directory, so the
# build stops at "json-schema-to-grammar.h:3:10: fatal error:
# nlohmann/json_fwd.hpp: No such file or directory".
ollama_version="${OLLAMA_VERSION:-v0.6.5}"
llama_swap_version="${LLAMA_SWAP_VERSION:-latest}"
notes=()

command -v go >/dev/null || {
    log "go not found: no peers (install the Go toolchain to compare with them)"
    echo "export CLARACORE_BENCH_PEERS_NOTE=$(printf '%q' 'go not found: peers left out')"
    exit 0
}

if command -v flock >/dev/null; then
    exec 9>"$cache/peers/.install.lock"
    flock 9
fi

# The bench never reads a VCS stamp; the fetched module has no .git anyway.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"

# --- llama-swap ---------------------------------------------------------------
if out="$(go list -m -f '{{.Version}}' "github.com/mostlygeek/llama-swap@$llama_swap_version" 2>&1)"; then
    log "llama-swap $out is served by the module proxy; the harness has no llama-swap contender yet"
    notes+=("llama-swap $out: served, not measured (no contender in the harness)")
else
    err="$(echo "$out" | tr '\n' ' ' | sed 's/[[:space:]]*$//')"
    log "llama-swap left out: $err"
    notes+=("llama-swap left out: $err")
fi

# --- Ollama -------------------------------------------------------------------
dir="$cache/peers/ollama-$ollama_version"
if [ ! -x "$dir/bin/ollama" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    log "go install github.com/ollama/ollama@$ollama_version (cgo, CPU; long on 2 cores)"
    start=$(date +%s)
    if GOBIN="$dir/bin" CGO_ENABLED=1 nice -n 10 \
        go install "github.com/ollama/ollama@$ollama_version" >"$dir/install.log" 2>&1; then
        echo "$(( $(date +%s) - start )) s" >"$dir/build-seconds"
        log "ollama $ollama_version built in $(cat "$dir/build-seconds")"
    else
        err="$(tail -5 "$dir/install.log" | tr '\n' ' ')"
        log "ollama left out: go install failed: $err (full log $dir/install.log)"
        notes+=("ollama $ollama_version left out: $err")
        rm -rf "$dir/bin"
    fi
fi
if [ -x "$dir/bin/ollama" ]; then
    echo "export CLARACORE_BENCH_OLLAMA=$(printf '%q' "$dir/bin/ollama")"
    echo "export CLARACORE_BENCH_OLLAMA_VERSION=$(printf '%q' "$ollama_version")"
fi
if [ ${#notes[@]} -gt 0 ]; then
    joined="$(printf '%s; ' "${notes[@]}")"
    echo "export CLARACORE_BENCH_PEERS_NOTE=$(printf '%q' "${joined%; }")"
fi
