#!/usr/bin/env bash
# Builds `ragcake --features cuda` for compute capability 9.0 (H100, H200) on a machine with
# no GPU and no system CUDA: the CUDA 13 toolkit comes from PyPI packages, installed once
# into a venv under $RAGCAKE_HOME and gathered into one root ($RAGCAKE_HOME/cuda) with the
# unversioned library links the linker looks for and a stub libcuda (the driver library
# exists only on the GPU machine, which provides the real one at run time).
# The binary lands in $CARGO_TARGET_DIR/cuda/release/ragcake (its own target directory, so
# the CPU build is never rebuilt). Not part of the test command: it compiles candle's CUDA
# kernels and takes a while.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
need cargo "install Rust with rustup"
need python3 "install Python 3 with pip and venv"

cuda_venv="$RAGCAKE_HOME/cuda-venv"
cuda_root="$RAGCAKE_HOME/cuda"
packages=(
    "nvidia-cuda-nvcc==13.5.37" "nvidia-nvvm==13.5.37" "nvidia-cuda-crt==13.5.37"
    "nvidia-cuda-runtime==13.5.37" "nvidia-cuda-nvrtc==13.5.37" "nvidia-cuda-cccl==13.3.5.0.6"
    "nvidia-cublas==13.10.0.20" "nvidia-curand==10.4.4.72"
)
if ! [ -x "$cuda_venv/bin/python" ]; then
    python3 -m venv "$cuda_venv"
fi
"$cuda_venv/bin/pip" install --quiet "${packages[@]}"

# The wheels unpack under site-packages/nvidia/…; one root with bin/, include/ and lib/.
site="$("$cuda_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$cuda_root"
mkdir -p "$cuda_root/bin" "$cuda_root/include" "$cuda_root/lib64" "$cuda_root/nvvm"
for dir in "$site"/nvidia/*/ "$site"/nvidia/*/*/; do
    [ -d "$dir/bin" ] && cp -rsf "$dir/bin/." "$cuda_root/bin/"
    [ -d "$dir/include" ] && cp -rsf "$dir/include/." "$cuda_root/include/"
    [ -d "$dir/lib" ] && cp -rsf "$dir/lib/." "$cuda_root/lib64/"
    [ -d "$dir/lib64" ] && cp -rsf "$dir/lib64/." "$cuda_root/lib64/"
    [ -d "$dir/nvvm" ] && cp -rsf "$dir/nvvm/." "$cuda_root/nvvm/"
done
ln -sfn lib64 "$cuda_root/lib"
[ -x "$cuda_root/bin/nvcc" ] || { echo "error: no nvcc among the installed packages" >&2; exit 1; }
# Unversioned links (libcublas.so → libcublas.so.13, …) for the linker.
for lib in "$cuda_root"/lib64/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done
# The driver library: the link names libcuda, which none of the packages has (the driver
# installs it). A stub with the driver's soname defines every driver API name cuda.h
# mentions (each returning an error) to satisfy the linker; on the GPU machine the driver's
# own libcuda.so.1 is loaded in its place.
stubs="$cuda_root/lib64/stubs"
mkdir -p "$stubs"
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cuda_root/include/cuda.h" | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$stubs/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"

export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
export LIBRARY_PATH="$cuda_root/lib64:$cuda_root/lib64/stubs:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$cuda_root/lib64:${LD_LIBRARY_PATH:-}"
# cudarc 0.19 knows CUDA up to 13.4; the 13.5 toolkit's API is a superset.
export CUDARC_CUDA_VERSION=13040
export CUDA_COMPUTE_CAP=90
nvcc --version | tail -2
started=$(date +%s)
cargo build --release -p ragcake-cli --features cuda --target-dir "$CARGO_TARGET_DIR/cuda"
echo "built $CARGO_TARGET_DIR/cuda/release/ragcake in $(( $(date +%s) - started )) s"
