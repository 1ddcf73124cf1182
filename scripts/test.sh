#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (the models, into
# the model cache outside the clone), checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

need cargo "install Rust with rustup"
need python3 "install Python 3 with pip (apt-get install python3 python3-pip)"

echo "== build (tests, examples and the binary in one feature set, so nothing builds twice)"
cargo build --workspace --all-targets --quiet

echo "== models (cached in $RAGCAKE_HOME/models)"
"$CARGO_TARGET_DIR/debug/ragcake" models fetch
# The second real model: the llama.cpp conformance tests and the Gemma 3 paths need it.
"$CARGO_TARGET_DIR/debug/ragcake" models fetch gemma3-270m

echo "== tiny models of every family for the llama.cpp conformance tests (deterministic, written once)"
gguf_venv="$RAGCAKE_HOME/gguf-venv"
if ! "$gguf_venv/bin/python" -c "import gguf, numpy" 2>/dev/null; then
    python3 -m venv "$gguf_venv"
    # Pinned: the files must be byte for byte the ones the reference logits were computed on.
    "$gguf_venv/bin/pip" install --quiet "gguf==0.19.0" "numpy==2.4.6"
fi
"$gguf_venv/bin/python" scripts/conformance_fixtures.py --gguf-only --out "$RAGCAKE_HOME/conformance" >/dev/null

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== S3 test server (moto_server on loopback)"
source scripts/s3-server.sh
export RAGCAKE_TEST_S3_URL="s3://ragcake-test/kv"

echo "== s3rver and Azurite on loopback (the same conformance suite as on moto)"
source scripts/store-servers.sh

echo "== the official OpenAI Python client (for the compatibility test)"
client_venv="$RAGCAKE_HOME/client-venv"
if ! "$client_venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$client_venv"
    "$client_venv/bin/pip" install --quiet "openai==3.54.0"
fi
export RAGCAKE_TEST_OPENAI_PYTHON="$client_venv/bin/python"

echo "== Qdrant server (when QDRANT_BIN points to one)"
source scripts/qdrant-server.sh

echo "== tests"
# The SIMD kernels are checked against scalar references only where the CPU runs them.
for feature in avx512f avx512_vnni; do
    if ! grep -qw "$feature" /proc/cpuinfo 2>/dev/null; then
        case $feature in
            avx512f) test_name=attention_compiled_for_avx512_gives_the_bits_of_a_scalar_reference ;;
            avx512_vnni) test_name=the_vnni_kernels_give_the_bits_of_a_scalar_reference ;;
        esac
        echo "SKIPPED on this CPU (no $feature): $test_name"
    fi
done
# A test whose server, client or file is missing says "SKIPPED <name>: <why>" and fails
# under CI (CI=true), so a CI run never passes a test that did not run.
cargo test --workspace
