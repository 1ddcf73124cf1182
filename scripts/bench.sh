#!/usr/bin/env bash
# Benchmarks beside llama.cpp: installs llama-cpp-python (built from source by pip) into
# $RAGCAKE_HOME/venv-llama-cpp once, then runs `ragcake bench prefill`; extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip and venv"

# The x86-64 instruction sets named, not -march=native: a native build on a CPU with AMX
# (Sapphire Rapids) takes llama.cpp's AMX matrix path, which crashes with a segmentation
# fault in the first evaluation of this GGUF (llama.cpp issue 20824); AVX-512 (VNNI, BF16)
# is what the comparison needs. On a CPU without AVX-512, set RAGCAKE_LLAMA_CMAKE_ARGS.
cmake_args="${RAGCAKE_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON}"
venv="$RAGCAKE_HOME/venv-llama-cpp"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "== installing llama-cpp-python into $venv (compiles llama.cpp, several minutes)"
    python3 -m venv "$venv"
    CMAKE_ARGS="$cmake_args" "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==0.3.36"
fi
cargo build --release --quiet -p ragcake-cli
"$CARGO_TARGET_DIR/release/ragcake" bench prefill --llama-cpp-python "$venv/bin/python" "$@"
