#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (the models, into
# the model cache outside the clone), checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

need cargo "install Rust with rustup"
need python3 "install Python 3 with pip (apt-get install python3 python3-pip)"

echo "== models (cached in $RAGCAKE_HOME/models)"
cargo run --quiet --bin ragcake -- models fetch

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== S3 test server (moto_server on loopback)"
moto_venv="$RAGCAKE_HOME/moto-venv"
if ! "$moto_venv/bin/python" -c "import moto, boto3" 2>/dev/null; then
    python3 -m venv "$moto_venv"
    "$moto_venv/bin/pip" install --quiet "moto[server]==5.2.5"
fi
port=$("$moto_venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$RAGCAKE_HOME/moto.log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
export AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=ragcake-test AWS_SECRET_ACCESS_KEY=ragcake-test
started=0
for _ in $(seq 1 100); do   # up to 20 s
    if "$moto_venv/bin/python" - <<'PY' 2>/dev/null; then started=1; break; fi
import os, boto3
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"]).create_bucket(Bucket="ragcake-test")
PY
    sleep 0.2
done
[ "$started" = 1 ] || { echo "error: moto_server did not start, see $RAGCAKE_HOME/moto.log" >&2; exit 1; }
export RAGCAKE_TEST_S3_URL="s3://ragcake-test/kv"

echo "== tests"
cargo test --workspace
