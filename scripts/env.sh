# Shared by the scripts: where the model cache and the build live (outside the clone, so a
# fresh clone reuses them), and a helper that names a missing tool.
export RAGCAKE_HOME="${RAGCAKE_HOME:-$HOME/.cache/ragcake}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$RAGCAKE_HOME/target}"
mkdir -p "$RAGCAKE_HOME"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' not found: $2" >&2; exit 1; }
}
