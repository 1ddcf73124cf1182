#!/usr/bin/env bash
# Benchmarks beside llama.cpp: installs llama-cpp-python (built from source by pip) into
# $RAGCAKE_HOME/venv once, then runs `ragcake bench prefill`; extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip and venv"

venv="$RAGCAKE_HOME/venv"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "== installing llama-cpp-python into $venv (compiles llama.cpp, several minutes)"
    python3 -m venv "$venv"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet "llama-cpp-python==0.3.36"
fi
cargo build --release --quiet --bin ragcake
"$CARGO_TARGET_DIR/release/ragcake" bench prefill --llama-cpp-python "$venv/bin/python" "$@"
