# Sourced by scripts/test.sh: starts the object-store servers the conformance suite runs
# against besides moto (scripts/s3-server.sh), each on a free loopback port with its own data
# directory, for this shell's lifetime, and exports where each one is:
#   RAGCAKE_TEST_S3RVER_STORE   a second S3 implementation (npm `s3rver`)
#   RAGCAKE_TEST_AZURITE_STORE  Azure Blob Storage's emulator (npm `azurite`)
#   RAGCAKE_TEST_GCS_STORE      object_store's GCS client against moto (see below)
# Each holds a store URL and object_store options, separated by spaces. The bucket or
# container `ragcake-test` is created on each. Installs the servers once, under
# $RAGCAKE_HOME/store-servers.
# GCS: object_store's GCS client speaks GCS's XML API (S3-shaped requests with a bearer
# token). No GCS emulator installable here answers all of it — fake-gcs-server (pip wrapper
# 0.1.1) refuses every XML put ("invalid uploadType"), gcp-storage-emulator answers HEAD and
# list with 501 and puts without an ETag — but moto's S3 server does (put, get, ranged get,
# head, list, multipart, delete; it ignores the GCS headers of copy and create-if-absent,
# which the store does not use). It must be sourced after scripts/s3-server.sh.
servers_home="$RAGCAKE_HOME/store-servers"
mkdir -p "$servers_home"
node_dir="$servers_home/node"
if [ ! -x "$node_dir/node_modules/.bin/s3rver" ] || [ ! -x "$node_dir/node_modules/.bin/azurite-blob" ]; then
    need npm "install Node.js and npm (apt-get install nodejs npm)"
    npm install --silent --no-audit --no-fund --prefix "$node_dir" s3rver@3.7.1 azurite@3.37.0
fi
servers_venv="$servers_home/venv"
# The Azure SDK creates Azurite's container (object_store creates none).
if ! "$servers_venv/bin/python" -c "import azure.storage.blob" 2>/dev/null; then
    python3 -m venv "$servers_venv"
    "$servers_venv/bin/pip" install --quiet "azure-storage-blob==12.31.1"
fi
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
servers_data="$(mktemp -d)"
server_dirs="${server_dirs:-} $servers_data"

# Runs a Python snippet until it succeeds (up to 30 s): the server is up and its bucket made.
until_ready() {
    local name="$1" snippet="$2"
    for _ in $(seq 1 150); do
        if "$servers_venv/bin/python" -c "$snippet" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    echo "error: $name did not start, see $servers_home/$name.log" >&2
    exit 1
}

s3rver_port=$(free_port)
"$node_dir/node_modules/.bin/s3rver" -d "$servers_data/s3rver" -a 127.0.0.1 -p "$s3rver_port" \
    --configure-bucket ragcake-test > "$servers_home/s3rver.log" 2>&1 &
server_pids="${server_pids:-} $!"
trap 'kill $server_pids 2>/dev/null || true; rm -rf ${server_dirs:-}' EXIT
until_ready s3rver "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$s3rver_port/ragcake-test', timeout=1)"
export RAGCAKE_TEST_S3RVER_STORE="s3://ragcake-test/kv aws_endpoint=http://127.0.0.1:$s3rver_port aws_allow_http=true aws_region=us-east-1 aws_access_key_id=S3RVER aws_secret_access_key=S3RVER"

azurite_port=$(free_port)
"$node_dir/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$azurite_port" \
    --location "$servers_data/azurite" --skipApiVersionCheck > "$servers_home/azurite.log" 2>&1 &
server_pids="${server_pids:-} $!"
# Azurite's documented development account.
azurite_connection="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$azurite_port/devstoreaccount1;"
until_ready azurite "
from azure.storage.blob import BlobServiceClient
BlobServiceClient.from_connection_string('$azurite_connection').create_container('ragcake-test')"
# object_store's emulator mode takes the development account and this endpoint.
export AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$azurite_port"
export RAGCAKE_TEST_AZURITE_STORE="az://ragcake-test/kv azure_storage_use_emulator=true"

# moto takes a bucket name of letters and digits only for GCS-shaped paths (object_store
# percent-encodes '-'); any bearer token without '/' is taken as S3's.
"$moto_venv/bin/python" - <<'PY'
import os, boto3
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"]).create_bucket(Bucket="ragcakegcs")
PY
export RAGCAKE_TEST_GCS_STORE="gs://ragcakegcs/kv google_base_url=$AWS_ENDPOINT google_bearer_token=ragcake allow_http=true"

echo "s3rver on :$s3rver_port, Azurite on :$azurite_port, GCS client on moto at $AWS_ENDPOINT"
