# Sourced by the scripts: starts moto_server (a real S3-compatible server) on a free loopback
# port for this shell's lifetime, creates the bucket `ragcake-test`, and exports the AWS_*
# variables that point object_store at it. Installs moto[server] into a venv once.
moto_venv="$RAGCAKE_HOME/moto-venv"
if ! "$moto_venv/bin/python" -c "import moto, boto3" 2>/dev/null; then
    python3 -m venv "$moto_venv"
    "$moto_venv/bin/pip" install --quiet "moto[server]==5.2.5"
fi
moto_port=$("$moto_venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" > "$RAGCAKE_HOME/moto.log" 2>&1 &
moto_pid=$!
server_pids="${server_pids:-} $moto_pid"
trap 'kill $server_pids 2>/dev/null || true; rm -rf ${server_dirs:-}' EXIT
export AWS_ENDPOINT="http://127.0.0.1:$moto_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=ragcake-test AWS_SECRET_ACCESS_KEY=ragcake-test
moto_started=0
for _ in $(seq 1 100); do   # up to 20 s
    if "$moto_venv/bin/python" - <<'PY' 2>/dev/null; then moto_started=1; break; fi
import os, boto3
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"]).create_bucket(Bucket="ragcake-test")
PY
    sleep 0.2
done
[ "$moto_started" = 1 ] || { echo "error: moto_server did not start, see $RAGCAKE_HOME/moto.log" >&2; exit 1; }
