"""Making TVM's CUDA codegen runtime available on a build host without a CUDA driver.

The apache-tvm wheel's CUDA runtime (libtvm_runtime_cuda.so) needs libcuda.so.1. On a host without a driver
it is silently not loaded, and tvm.compile then stores CUDA *source* in the library, leaving compilation to the
board at load time. :func:`ensure_cuda_codegen_runtime` loads libcudart.so.13 (pip nvidia-cuda-runtime) and,
where no driver is present, a stub libcuda.so.1 built here with the C compiler, then TVM's CUDA runtime
itself: that registers ``ffi.Module.create.cuda``, so codegen hands every CUDA source to the compile callback
(pipeline.toolchain.cuda_aot). Everything here works after ``import tvm`` already happened.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import paths
from . import elf
from .cuda_toolchains import CudaToolchainError, find_in_nvidia, pinned


def _has_cuda_codegen_runtime() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _build_libcuda_stub(symbols: list[str]) -> Path:
    """Build (once, cached) a libcuda.so.1 whose functions all report CUDA_ERROR_NO_DEVICE.

    It only has to satisfy the dynamic linker for libtvm_runtime_cuda.so: nothing here
    launches kernels. The symbol list comes from that library's own imports.
    """
    body = ["typedef int CUresult;"]
    for s in symbols:
        if s in ("cuGetErrorName", "cuGetErrorString"):
            body.append(f'CUresult {s}(CUresult e, const char **p) {{ if (p) *p = '
                        f'"CUDA_ERROR_NO_DEVICE (libcuda stub from pipeline.toolchain.cuda_runtime)"; return 0; }}')
        else:
            body.append(f"CUresult {s}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}")
    code = "\n".join(body) + "\n"
    out = paths.cuda_stub_dir() / hashlib.sha256(code.encode()).hexdigest()[:16] / "libcuda.so.1"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise CudaToolchainError(
            "building the libcuda.so.1 stub needs a C compiler (gcc); apt-get install gcc"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, tmp_so = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(code)
        r = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_so), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CudaToolchainError(f"building the libcuda.so.1 stub failed: {r.stderr.strip()}")
        os.replace(tmp_so, out)  # atomic: concurrent first uses never see half a file
    return out


def load_cudart13() -> None:
    lib = find_in_nvidia("cu13/lib/libcudart.so.13")
    try:
        ctypes.CDLL(str(lib) if lib else "libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise CudaToolchainError(
            "TVM's CUDA runtime (libtvm_runtime_cuda.so) needs libcudart.so.13; "
            f"pip install {pinned('nvidia-cuda-runtime')}"
        ) from None


def load_driver_or_stub(runtime_dir: Path) -> bool:
    """Load libcuda.so.1: the driver, or where there is none a stub that reports no device. True: the stub."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver wins
        return False
    except OSError:
        imports = elf.undefined_symbols((runtime_dir / "libtvm_runtime_cuda.so").read_bytes())
        driver_syms = sorted(s for s in imports if s.startswith("cu") and not s.startswith("cuda"))
        ctypes.CDLL(str(_build_libcuda_stub(driver_syms)), mode=ctypes.RTLD_GLOBAL)
        return True


def ensure_cuda_codegen_runtime() -> None:
    """Make `ffi.Module.create.cuda` available in this process, after `import tvm`.

    Loading order matters: the dynamic linker satisfies libtvm_runtime_cuda.so's NEEDED
    libcudart.so.13 / libcuda.so.1 with libraries already loaded under those sonames.
    """
    import tvm  # noqa: F401  (loads libtvm_runtime, which the CUDA runtime needs)
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if _has_cuda_codegen_runtime():
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    load_cudart13()
    if load_driver_or_stub(runtime_dir):
        # Keep builds outside aot_cuda() as they were without a driver: CUDA source kept
        # in the library, compiled on the board.
        os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as e:
        raise CudaToolchainError(f"cannot load TVM's CUDA runtime library: {e}") from None
    if not _has_cuda_codegen_runtime():
        raise CudaToolchainError("libtvm_runtime_cuda.so loaded but registered no CUDA module factory")
