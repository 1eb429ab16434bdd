#!/usr/bin/env bash
# The GPU proof: claracore's GPU claims checked against a real NVIDIA GPU
# and its driver's NVML, in one run that needs nothing from a network.
#
#   tests/gpu/prove.sh OUTDIR             on a machine with an NVIDIA GPU
#   tests/gpu/prove.sh OUTDIR --dry-run   anywhere: the same checks against
#                                         the fake NVML and the CPU llama-server
#
# What it checks (tests/gpu/prove.py does the checking; each step has a
# timeout, and a step that fails or times out is a FAIL row):
#   1. llama-server built with CUDA for this GPU's architecture only
#      (compute_cap from nvidia-smi, Ninja, all cores, the RPC backend on),
#      from the trimmed llama.cpp source in tests/gpu/pack/ (the sdist the
#      tests build from; tests/gpu/pack.sh makes it), in parallel with
#   2. three random-weight llama GGUFs from tests/tools/make-tiny-model.py
#      (~670 MB each, f32; the size flags), which all fit the card: the
#      placement phase sets scheduler.vram_reserve_mb, worked out at run
#      time from claracore's own reading, so that two fit and three do not
#   3. claracore (the release binary in the pack) with the driver's NVML:
#      readings per GPU against nvidia-smi; each child's GPU memory against
#      nvidia-smi's per-process figure; the first start placed by the GGUF
#      estimate (its exact bytes), the run's peak stored with the stop and
#      used as the need after it and after a restart; two models side by
#      side and the third evicting the least recently used idle one; a
#      model that can never fit refused at once with the numbers;
#      size_vram in /api/ps, claracore_model_vram_bytes in /metrics, the
#      GPU figures in the history rows (`claracore history --json`); a
#      child SIGKILLed and its memory back before the next placement,
#      which then evicts nothing; a clean stop with no child left; the
#      CUDA llama-server under the unit's sandboxing (systemd-run, where
#      systemd is PID 1). A model split across GPUs is not checked: that
#      path is not built yet.
#   4. tokens/s streamed through claracore against the same llama-server
#      run directly, and the proxy's added latency (one-token requests),
#      loopback only
#   5. one table (check, expected, got, result) on stdout and in
#      OUTDIR/summary.txt (and .json), with every log beside it; exit 1 on
#      any failed check.
#
# The real proof (~4 min of build, ~2 min of checks; the timeouts add up to
# under 600 s: configure 45, build 330, checks 180), from this machine:
#
#   tests/gpu/pack.sh       # once: tests/gpu/pack/ (trimmed llama.cpp
#                           # source + release claracore), ~50 MiB
#   then the device tool's `run` with
#     command:   tests/gpu/prove.sh "$OUT/gpu-proof"
#     carry:     ["tests/gpu/pack"]
#     timeout_s: 600
#   OUT/gpu-proof/summary.txt is the table; the logs lie beside it.
#
# The dry run (tests/run.sh runs it, ~1-2 min) takes llama-server, the
# generator's Python and the fake NVML from setup-test-deps.sh (its
# CLARACORE_TEST_* variables, else it runs it), and claracore from
# CLARACORE_BIN, else cargo's debug build.
#
# Env: CLARACORE_BIN (the claracore binary), CLARACORE_GPU_WORK (scratch:
#      the CUDA build and the models; kept; default a fresh directory in
#      /tmp, removed at the end),
#      CARGO_TARGET_DIR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dry=0
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h | --help) sed -n '2,58p' "$0"; exit 0 ;;
        -*) echo "prove.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            [ -z "$out" ] || { echo "prove.sh: one OUTDIR only" >&2; exit 2; }
            out="$arg"
            ;;
    esac
done
[ -n "$out" ] || { echo "usage: tests/gpu/prove.sh OUTDIR [--dry-run]" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/results.tsv "$out"/summary.* "$out"/*.log "$out"/*.json "$out"/*.err "$out"/*.txt
if [ -n "${CLARACORE_GPU_WORK:-}" ]; then
    work="$CLARACORE_GPU_WORK"
    mkdir -p "$work"
else
    work="$(mktemp -d /tmp/claracore-gpu-proof.XXXXXX)"
fi
began=$(date +%s)

# Any Python 3 runs the stdlib-only checker; the generator needs numpy.
py=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 8))'; then
        py="$candidate"
        break
    fi
done
[ -n "$py" ] || { echo "prove.sh: no python3" >&2; exit 1; }
prove() { "$py" "$here/prove.py" "$@"; }
row() { prove row "$out" "$@"; }
finish() {
    local rc=$?
    trap - EXIT
    [ -n "${CLARACORE_GPU_WORK:-}" ] || rm -rf "$work"
    row "total run time" "≤ 480 s (real)" "$(( $(date +%s) - began )) s" INFO || true
    echo
    if prove summary "$out" && [ "$rc" = 0 ]; then exit 0; fi
    exit 1
}
trap finish EXIT

if [ "$dry" = 1 ]; then
    mode=dry
    if [ -z "${CLARACORE_TEST_LLAMA_SERVER:-}" ] || [ -z "${CLARACORE_TEST_PYTHON:-}" ] \
        || [ -z "${CLARACORE_TEST_FAKE_NVML_DIR:-}" ]; then
        eval "$("$root/tests/tools/setup-test-deps.sh")"
    fi
    server="$CLARACORE_TEST_LLAMA_SERVER"
    gen_py="$CLARACORE_TEST_PYTHON"
    vocab="$(dirname "$server")/../models/ggml-vocab-llama-spm.gguf"
    fake_dir="$CLARACORE_TEST_FAKE_NVML_DIR"
    bin="${CLARACORE_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/claracore}"
    if [ ! -x "$bin" ]; then
        (cd "$root" && timeout 900 cargo build --locked --bin claracore) >&2
    fi
    dims=(--n-layer 3 --n-embd 96 --n-head 4 --n-ff 192)
    check_args=(--ctx 512 --threads 1 --bench-tokens 32 --bench-runs 2 --latency-runs 10 --huge-mb 82944)
    check_timeout=150
    row "llama-server built with CUDA for this GPU" "-" "dry run: the tests' CPU llama-server, the fake NVML" SKIP
else
    mode=real
    pack="$here/pack"
    [ -x "$pack/claracore" ] && [ -d "$pack/llama.cpp" ] || {
        row "the pack (tests/gpu/pack.sh) is here" "pack/claracore, pack/llama.cpp" "missing" FAIL
        exit 1
    }
    bin="${CLARACORE_BIN:-$pack/claracore}"
    src="$pack/llama.cpp"
    vocab="$src/models/ggml-vocab-llama-spm.gguf"
    fake_dir=""
    command -v nvidia-smi >/dev/null || { row "nvidia-smi" "present" "missing" FAIL; exit 1; }
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
    nvidia-smi -q >"$out/nvidia-smi-q.txt" 2>&1 || true
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')"
    total_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1 | tr -d ' ')"
    nvcc="$(command -v nvcc || ls /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null | head -n 1 || true)"
    [ -n "$nvcc" ] || { row "nvcc" "present" "missing" FAIL; exit 1; }
    cuda_home="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"
    for lib in "$cuda_home/lib64" "$cuda_home/targets/x86_64-linux/lib"; do
        [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    row "machine" "-" "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1), sm_$cap, $("$nvcc" --version | grep -o 'release [0-9.]*'), $(nproc) cores, pid ns $(readlink /proc/self/ns/pid)" INFO
    gen_py=""
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import numpy' 2>/dev/null; then
            gen_py="$candidate"
            break
        fi
    done
    [ -n "$gen_py" ] || { row "python with numpy" "present" "missing" FAIL; exit 1; }
    # gguf from the pack's gguf-py where the python has none.
    "$gen_py" -c 'import gguf' 2>/dev/null || export PYTHONPATH="$src/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
    dims=(--n-layer 8 --n-embd 1024 --n-head 16 --n-ff 2816)
    check_args=(--ctx 4096 --threads 4 --bench-tokens 256 --bench-runs 3 --latency-runs 30 --huge-mb $((total_mib + 1024)))
    check_timeout=180
fi
[ -x "$bin" ] || { row "claracore binary" "$bin" "missing" FAIL; exit 1; }
if ! "$bin" --version >/dev/null 2>"$out/claracore-version.err"; then
    # The pack's binary is linked against the packing machine's glibc.
    row "claracore runs here" "$bin --version" "$(head -c 300 "$out/claracore-version.err")" FAIL
    exit 1
fi
[ -f "$vocab" ] || { row "the llama vocab" "$vocab" "missing" FAIL; exit 1; }
row "claracore under test" "-" "$("$bin" --version | head -n 1) ($bin)" INFO

# The models, in the background (the real build keeps the cores busy).
models=("$work/model-a.gguf" "$work/model-b.gguf" "$work/model-c.gguf")
gen_pids=()
gen_began=$(date +%s)
for i in 0 1 2; do
    rm -f "${models[$i]}"
    timeout 240 "$gen_py" "$here/prove.py" gen --vocab "$vocab" --out "${models[$i]}" \
        --seed $((i + 1)) "${dims[@]}" >"$out/gen-$i.log" 2>&1 &
    gen_pids+=($!)
done

if [ "$mode" = real ]; then
    build="$work/build"
    build_began=$(date +%s)
    status=PASS
    {
        timeout 45 cmake -S "$src" -B "$build" -G Ninja \
            -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
            -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$cap" -DCMAKE_CUDA_COMPILER="$nvcc" \
            -DGGML_RPC=ON -DGGML_NATIVE=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF &&
            timeout 330 cmake --build "$build" --target llama-server -j "$(nproc)"
    } >"$out/build.log" 2>&1 || status=FAIL
    server="$build/bin/llama-server"
    row "llama-server built with CUDA for sm_$cap only (Ninja, $(nproc) jobs, RPC on)" \
        "built within 375 s" "$status in $(( $(date +%s) - build_began )) s" "$status"
    if [ "$status" = PASS ]; then
        missing="$(ldd "$server" | grep 'not found' || true)"
        cuda_libs="$(ldd "$server" | grep -o 'lib\(cudart\|cublas\|cuda\)[^ ]*' | sort -u | tr '\n' ' ')"
        row "llama-server's CUDA libraries resolve" "no 'not found' in ldd" \
            "${missing:-all found: $cuda_libs}" "$([ -z "$missing" ] && [ -n "$cuda_libs" ] && echo PASS || echo FAIL)"
    else
        tail -n 40 "$out/build.log" >&2
    fi
fi

gen_ok=PASS
for pid in "${gen_pids[@]}"; do
    wait "$pid" || gen_ok=FAIL
done
sizes="$(for m in "${models[@]}"; do [ -f "$m" ] && stat -c %s "$m"; done | tr '\n' ' ')"
row "three random-weight GGUFs (make-tiny-model.py ${dims[*]})" "3 files" \
    "$gen_ok: ${sizes:-none} bytes in $(( $(date +%s) - gen_began )) s" "$gen_ok"
[ "$gen_ok" = PASS ] || { tail -n 20 "$out"/gen-*.log >&2; exit 1; }
[ -x "$server" ] || exit 1

timeout -k 10 "$check_timeout" "$py" "$here/prove.py" check --mode "$mode" --outdir "$out" \
    --work "$work/run" --claracore "$bin" --llama-server "$server" --models "${models[@]}" \
    --fake-nvml-dir "$fake_dir" "${check_args[@]}" || {
    rc=$?
    [ "$rc" = 124 ] && row "the checks finished within their time" "≤ $check_timeout s" "timed out" FAIL
    exit 1
}
