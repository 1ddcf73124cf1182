#!/usr/bin/env bash
# Storage benchmarks with an S3 server beside memory and local dir:
#   scripts/bench-storage.sh kvstore [ARGS]   load throughput vs raw GETs
#   scripts/bench-storage.sh ttft [ARGS]      TTFT of the prefill modes across bandwidths
# Starts moto_server on loopback (scripts/s3-server.sh); extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip and venv"
bench="${1:?usage: scripts/bench-storage.sh kvstore|ttft [ARGS]}"
shift
source scripts/s3-server.sh
cargo build --release --quiet -p ragcake-cli
"$CARGO_TARGET_DIR/release/ragcake" bench "$bench" --s3-url "s3://ragcake-test/$bench" "$@"
