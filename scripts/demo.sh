#!/usr/bin/env bash
# The main job on the embedded defaults: fetch the models, then answer the demo questions
# with the timing breakdown.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip (apt-get install python3 python3-pip)"

cargo build --release --quiet --bin ragcake
ragcake="$CARGO_TARGET_DIR/release/ragcake"
"$ragcake" models fetch
while IFS= read -r question; do
    [ -n "$question" ] || continue
    echo "Q: $question"
    printf 'A: '
    "$ragcake" generate --max-tokens 96 "$question"
    echo
done < demo/questions.txt
