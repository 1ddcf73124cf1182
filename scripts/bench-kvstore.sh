#!/usr/bin/env bash
# KV store load throughput: memory, local dir, memory tier and S3 (moto_server on loopback),
# each beside raw object_store GETs of the same bytes; extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip and venv"
source scripts/s3-server.sh
cargo build --release --quiet --bin ragcake
"$CARGO_TARGET_DIR/release/ragcake" bench kvstore --s3-url s3://ragcake-test/bench "$@"
