#!/usr/bin/env bash
# The GPU benchmarks, for a machine with an NVIDIA GPU and the binary scripts/build-cuda.sh
# builds (no cargo needed there): engine prefill throughput from 1k to 32k tokens in bf16,
# TTFT with the stored caches in a local directory and behind throttled stores (bf16 and
# int8 caches side by side), and the fidelity of reused caches against the GPU's own full
# computation. Every result is a CSV (with a PNG where the benchmark draws one) in OUT_DIR.
#
#   scripts/gpu-bench.sh [OUT_DIR]          (default bench-results/gpu)
#
# Environment:
#   RAGCAKE_BIN        the cuda binary [$CARGO_TARGET_DIR/cuda/release/ragcake, else ./ragcake]
#   RAGCAKE_CUDA_LIBS  a directory with libcudart.so.13, libcublas.so.13, libcurand.so.10
#                      when the machine's CUDA install does not provide them
#   RAGCAKE_MODEL      the GGUF to run [the default SmolLM2-135M, from the model cache;
#                      a machine with no network needs it copied there or named here]
#   GPU_ORDINAL        which GPU [0]
#   PREFILL_CONTEXTS   [1024,2048,4096,8192,16384,32768] (past the model's context: skipped)
#   TTFT_CONTEXTS      [4096,8192]   TTFT_BANDWIDTHS (MB/s per read; 0 = memory) [250,1000,4000,0]
#   FIDELITY_LIMIT     questions for the fidelity benchmark [all]
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-bench-results/gpu}"
ordinal="${GPU_ORDINAL:-0}"

# A GPU first: everything below measures it.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "error: nvidia-smi not found: this machine has no NVIDIA GPU (or no driver)." >&2
    echo "       scripts/gpu-bench.sh measures the GPU path and needs one; nothing was run." >&2
    exit 2
fi
if ! gpus="$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1)" \
    || [ -z "$gpus" ]; then
    echo "error: nvidia-smi finds no usable GPU: ${gpus:-none listed}" >&2
    echo "       scripts/gpu-bench.sh measures the GPU path and needs one; nothing was run." >&2
    exit 2
fi
echo "GPUs:"
echo "$gpus" | sed 's/^/  /'

if [ -z "${RAGCAKE_BIN:-}" ]; then
    target="${CARGO_TARGET_DIR:-${RAGCAKE_HOME:-$HOME/.cache/ragcake}/target}"
    if [ -x "$target/cuda/release/ragcake" ]; then
        RAGCAKE_BIN="$target/cuda/release/ragcake"
    else
        RAGCAKE_BIN=./ragcake
    fi
fi
if ! [ -x "$RAGCAKE_BIN" ]; then
    echo "error: no ragcake binary at $RAGCAKE_BIN (build it with scripts/build-cuda.sh," >&2
    echo "       copy it here, or set RAGCAKE_BIN)" >&2
    exit 1
fi
if [ -n "${RAGCAKE_CUDA_LIBS:-}" ]; then
    export LD_LIBRARY_PATH="$RAGCAKE_CUDA_LIBS:${LD_LIBRARY_PATH:-}"
fi
if missing="$(ldd "$RAGCAKE_BIN" | grep 'not found')"; then
    echo "error: $RAGCAKE_BIN lacks libraries (set RAGCAKE_CUDA_LIBS to where they are):" >&2
    echo "$missing" >&2
    exit 1
fi

mkdir -p "$out"
{
    date -u +%FT%TZ
    nvidia-smi
    "$RAGCAKE_BIN" --version
    echo "model: ${RAGCAKE_MODEL:-default}"
} > "$out/machine.txt"

gpu=(--cuda "$ordinal" --dtype bf16)
step() { echo; echo "== $*"; }

step "engine prefill, bf16"
"$RAGCAKE_BIN" bench prefill "${gpu[@]}" --no-llama-cpp --repeats 5 \
    --contexts "${PREFILL_CONTEXTS:-1024,2048,4096,8192,16384,32768}" \
    --csv "$out/prefill.csv"

step "TTFT: bf16 and int8 caches, local directory and throttled stores"
"$RAGCAKE_BIN" bench ttft "${gpu[@]}" --repeats 5 \
    --contexts "${TTFT_CONTEXTS:-4096,8192}" \
    --bandwidths "${TTFT_BANDWIDTHS:-250,1000,4000,0}" \
    --dtypes bf16,int8 \
    --csv "$out/ttft.csv"

step "fidelity of reused caches against the GPU's full computation"
fidelity_limit=()
[ -n "${FIDELITY_LIMIT:-}" ] && fidelity_limit=(--limit "$FIDELITY_LIMIT")
"$RAGCAKE_BIN" bench fidelity "${gpu[@]}" "${fidelity_limit[@]}" --csv "$out/fidelity.csv"

echo
echo "results in $out:"
ls -1 "$out"
