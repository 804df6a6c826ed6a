#!/usr/bin/env bash
# Build TVM v0.27's CUDA runtime on a Jetson against the board's own CUDA, and put it into the
# installed apache-tvm wheel. Run ON THE BOARD (aarch64, JetPack 5 or 6), not on the workstation.
#
# Why: the PyPI aarch64 apache-tvm wheel ships its CUDA runtime as a sidecar library,
# tvm/lib/libtvm_runtime_cuda.so, linked against libcudart.so.13. JetPack 6 has CUDA 12 (JetPack 5:
# CUDA 11.4), so that sidecar fails to load and TVM silently runs without CUDA
# (tvm.runtime.enabled("cuda") is False). TVM's own release builds that sidecar separately
# (runtime-only CMake: CUDA on, LLVM off) and drops it into the wheel; this script does the same
# with the board's CUDA, from a TVM source checkout you provide. It downloads nothing.
#
# NOT TESTED: written without access to a Jetson; nothing here was run on a board.
#
# Before running it, on the board:
#   1. The runtime wheel, in the Python that will run the RPC server or run.py (docs/deploy.md):
#        python3 -m pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0 numpy cloudpickle psutil
#   2. The TVM source of the same release, with submodules (clone anywhere, copy to the board):
#        git clone --recursive --branch v0.27.0 https://github.com/apache/tvm tvm-v0.27
#   3. Build tools: CUDA toolkit from JetPack (/usr/local/cuda with nvcc), cmake >= 3.18, a C++20
#      compiler (g++ >= 10; JetPack 6's Ubuntu 22.04 has g++ 11; on JetPack 5 install g++-10 and
#      export CXX=g++-10), make, patchelf:
#        sudo apt-get install -y build-essential cmake patchelf
#
# Usage:  scripts/build_tvm_runtime_on_jetson.sh TVM_SOURCE_DIR [BUILD_DIR]
# Env:    PYTHON (default python3), CUDA_HOME (default /usr/local/cuda),
#         CUDA_ARCH (default 87: Orin; 72: Xavier), JOBS (default: half the cores; the Orin Nano has 8 GB)
# Undo:   the wheel's original sidecar is kept as libtvm_runtime_cuda.so.pypi next to it.
set -euo pipefail

die() { echo "build_tvm_runtime_on_jetson: $*" >&2; exit 1; }
log() { echo "[build-tvm-runtime] $*"; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 TVM_SOURCE_DIR [BUILD_DIR]"
SRC="$(cd "$1" && pwd)" || die "no directory $1"
BUILD="${2:-$SRC/build-jetson-runtime}"
PY="${PYTHON:-python3}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
CUDA_ARCH="${CUDA_ARCH:-87}"
JOBS="${JOBS:-$(( ($(nproc) + 1) / 2 ))}"

# ---------------------------------------------------------------- 1. check what is needed, before building
[[ "$(uname -m)" == aarch64 ]] || die "run this on the board (aarch64), not on $(uname -m)"
[[ -f "$SRC/CMakeLists.txt" && -f "$SRC/cmake/modules/CUDA.cmake" ]] || die "$SRC is not a TVM source checkout"
[[ -f "$SRC/3rdparty/tvm-ffi/CMakeLists.txt" ]] \
    || die "$SRC has no submodules: git -C $SRC submodule update --init --recursive"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc in $CUDA_HOME/bin: install JetPack's CUDA toolkit or set CUDA_HOME"
for tool in cmake make patchelf readelf; do
    command -v "$tool" >/dev/null || die "$tool is missing: sudo apt-get install -y build-essential cmake patchelf binutils"
done
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    described="$(git -C "$SRC" describe --tags 2>/dev/null || echo unknown)"
    [[ "$described" == v0.27* ]] || die "$SRC is at $described, not v0.27: check out the tag of the installed wheel"
fi
WHEEL_LIB="$("$PY" - <<'EOF'
import os, tvm
assert tvm.__version__.startswith("0.27"), f"installed apache-tvm is {tvm.__version__}, not 0.27"
print(os.path.join(os.path.dirname(tvm.__file__), "lib"))
EOF
)" || die "$PY cannot import apache-tvm 0.27: pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"
[[ -f "$WHEEL_LIB/libtvm_runtime.so" ]] || die "no libtvm_runtime.so in $WHEEL_LIB"
log "source $SRC ($("$CUDA_HOME/bin/nvcc" --version | tail -1)), wheel $WHEEL_LIB, sm_$CUDA_ARCH, $JOBS jobs"

# ---------------------------------------------------------------- 2. configure: runtime only, CUDA on, LLVM off
# The flags of TVM's release script (ci/scripts/package/manylinux_build_libtvm_runtime_cuda.sh),
# with the board's CUDA. CMAKE_CUDA_ARCHITECTURES is set because cmake < 3.24 has no "native".
cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_TESTING=OFF \
    -DUSE_CUDA="$CUDA_HOME" \
    -DUSE_LLVM=OFF \
    -DUSE_RPC=ON \
    -DUSE_CUBLAS=OFF -DUSE_CUDNN=OFF -DUSE_CUTLASS=OFF -DUSE_NCCL=OFF -DUSE_NVTX=OFF \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH"

# ---------------------------------------------------------------- 3. build the runtime and its CUDA sidecar
cmake --build "$BUILD" --target tvm_runtime tvm_runtime_cuda --parallel "$JOBS"
SIDECAR="$BUILD/lib/libtvm_runtime_cuda.so"
[[ -f "$SIDECAR" ]] || die "the build produced no $SIDECAR"
patchelf --set-rpath '$ORIGIN' "$SIDECAR"   # resolve libtvm_runtime.so next to it, inside the wheel
CUDART="$(readelf -d "$SIDECAR" | grep -o 'libcudart\.so\.[0-9]*' || true)"
[[ -n "$CUDART" ]] || die "$SIDECAR does not link libcudart: the CUDA configuration failed"
log "built $SIDECAR (links $CUDART)"

# ---------------------------------------------------------------- 4. install it into the wheel (keep the original)
if [[ -f "$WHEEL_LIB/libtvm_runtime_cuda.so" && ! -f "$WHEEL_LIB/libtvm_runtime_cuda.so.pypi" ]]; then
    mv "$WHEEL_LIB/libtvm_runtime_cuda.so" "$WHEEL_LIB/libtvm_runtime_cuda.so.pypi"
fi
cp "$SIDECAR" "$WHEEL_LIB/libtvm_runtime_cuda.so"
if ldd "$WHEEL_LIB/libtvm_runtime_cuda.so" | grep -q "not found"; then
    ldd "$WHEEL_LIB/libtvm_runtime_cuda.so" | grep "not found" >&2
    die "unresolved libraries above: add $CUDA_HOME/lib64 to /etc/ld.so.conf.d/ (then sudo ldconfig) or LD_LIBRARY_PATH"
fi

# ---------------------------------------------------------------- 5. check: TVM now sees the GPU
"$PY" - <<'EOF'
import tvm
if not tvm.runtime.enabled("cuda"):
    raise SystemExit("TVM still has no CUDA support: check `ldd` on tvm/lib/libtvm_runtime_cuda.so")
dev = tvm.cuda()
if not dev.exist:
    raise SystemExit("TVM has CUDA support but sees no GPU: is the user in the `video` group?")
print(f"[build-tvm-runtime] ok: TVM {tvm.__version__} sees {dev.device_name}, compute {dev.compute_version}")
EOF
