# Sourced by the scripts: when QDRANT_BIN names the prebuilt Qdrant server (an .xz archive
# or the binary), starts it on free loopback ports with a storage directory of its own for
# this shell's lifetime and exports QDRANT_URL (its gRPC port). Without it nothing starts and
# the Qdrant-server test reports itself skipped, by name (and fails under CI).
if [ -n "${QDRANT_BIN:-}" ] && [ -f "$QDRANT_BIN" ]; then
    qdrant_dir="$RAGCAKE_HOME/qdrant"
    mkdir -p "$qdrant_dir"
    case "$QDRANT_BIN" in
        *.xz)
            stamp="$(sha256sum "$QDRANT_BIN" | cut -d' ' -f1)"
            if [ "$(cat "$qdrant_dir/unpacked-from" 2>/dev/null)" != "$stamp" ]; then
                xz -dc "$QDRANT_BIN" > "$qdrant_dir/qdrant" && chmod +x "$qdrant_dir/qdrant"
                echo "$stamp" > "$qdrant_dir/unpacked-from"
            fi
            qdrant_exe="$qdrant_dir/qdrant" ;;
        *) qdrant_exe="$QDRANT_BIN" ;;
    esac
    free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
    qdrant_http=$(free_port)
    qdrant_grpc=$(free_port)
    qdrant_data="$(mktemp -d)"
    server_dirs="${server_dirs:-} $qdrant_data"
    QDRANT__SERVICE__HOST=127.0.0.1 QDRANT__SERVICE__HTTP_PORT=$qdrant_http \
    QDRANT__SERVICE__GRPC_PORT=$qdrant_grpc QDRANT__STORAGE__STORAGE_PATH=$qdrant_data/storage \
    QDRANT__STORAGE__SNAPSHOTS_PATH=$qdrant_data/snapshots QDRANT__TELEMETRY_DISABLED=true \
        "$qdrant_exe" > "$RAGCAKE_HOME/qdrant.log" 2>&1 &
    server_pids="${server_pids:-} $!"
    trap 'kill $server_pids 2>/dev/null || true; rm -rf ${server_dirs:-}' EXIT
    qdrant_started=0
    for _ in $(seq 1 300); do   # up to 60 s
        if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$qdrant_http/', timeout=1)" 2>/dev/null; then
            qdrant_started=1
            break
        fi
        sleep 0.2
    done
    [ "$qdrant_started" = 1 ] || { echo "error: the Qdrant server did not start, see $RAGCAKE_HOME/qdrant.log" >&2; exit 1; }
    export QDRANT_URL="http://127.0.0.1:$qdrant_grpc"
    echo "Qdrant server on 127.0.0.1:$qdrant_grpc (gRPC)"
else
    unset QDRANT_URL
    echo "no Qdrant server (QDRANT_BIN unset): its conformance test is reported skipped"
fi
