#!/usr/bin/env bash
# The main job on the embedded defaults: fetch the models, ingest the bundled demo corpus
# into embedded Qdrant and a local KV directory (under $RAGCAKE_HOME/data), answer the demo
# questions compute-only and bidirectional, and compare their time to first token.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip (apt-get install python3 python3-pip)"

cargo build --release --quiet -p ragcake-cli
ragcake="$CARGO_TARGET_DIR/release/ragcake"
"$ragcake" models fetch
exec "$ragcake" demo "$@"
