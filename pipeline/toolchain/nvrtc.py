"""NVRTC through ctypes: no cuda-bindings needed, and two NVRTC majors can sit in one process because
their sonames differ."""
from __future__ import annotations

import ctypes

from .cuda_toolchains import CudaToolchain, CudaToolchainError, find_in_nvidia


class Nvrtc:
    def __init__(self, tc: CudaToolchain):
        self.tc = tc
        lib_dir = find_in_nvidia("cuda_nvrtc/lib")
        try:
            if lib_dir and (lib_dir / tc.nvrtc_lib).exists():
                # libnvrtc dlopens its builtins by soname; preloading by path makes that
                # work without LD_LIBRARY_PATH.
                ctypes.CDLL(str(lib_dir / tc.nvrtc_builtins), mode=ctypes.RTLD_GLOBAL)
                self.lib = ctypes.CDLL(str(lib_dir / tc.nvrtc_lib))
            else:
                self.lib = ctypes.CDLL(tc.nvrtc_lib)  # a system CUDA install, if any
        except OSError as e:
            raise CudaToolchainError(
                f"{tc.name}: cannot load {tc.nvrtc_lib} ({e}); {tc.install_hint()}"
            ) from None
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"
        if self.version != tc.version:
            raise CudaToolchainError(
                f"{tc.name} is pinned to NVRTC {tc.version} but {tc.nvrtc_lib} is "
                f"{self.version}; {tc.install_hint()}"
            )
        self.includes = []
        for rel in tc.include_dirs:
            inc = find_in_nvidia(rel)
            if inc is None:
                raise CudaToolchainError(
                    f"{tc.name}: headers nvidia/{rel} missing; {tc.install_hint()}"
                )
            self.includes.append(str(inc))

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CudaToolchainError(f"{what} failed: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(self, source: str, arch: str, extra_options: tuple[str, ...] = ()) -> tuple[bytes, str, str]:
        """Compile CUDA C++ to a cubin for `arch` (sm_XY), with `extra_options` after ours. Returns (cubin, the PTX
        ptxas compiled it from, NVRTC log)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), _NVRTC_PREAMBLE.encode() + source.encode(),
                                        b"tvm_kernels.cu", 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            # Mirrors TVM's own NVRTC options (tvm/support/nvcc.py); ptxas -v puts the
            # per-kernel resource summary in the log.
            opts = [f"--gpu-architecture={arch}", "-default-device", "--use_fast_math",
                    "--device-int128", "--ptxas-options=-v", *self.tc.options, *extra_options,
                    *(f"-I{p}" for p in self.includes),
                    "-D__NV_SILENCE_DEPRECATION_BEGIN=", "-D__NV_SILENCE_DEPRECATION_END=",
                    "-D__NV_SILENCE_HOST_DEPRECATION_BEGIN=", "-D__NV_SILENCE_HOST_DEPRECATION_END=",
                    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
            copts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), copts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                raise CudaToolchainError(f"NVRTC {self.version} failed for {arch}:\n{log[-4000:]}")
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            out = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return out.raw, ptx.value.decode(errors="replace"), log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


# TVM's generated source covers cstdint/type_traits under __CUDACC_RTC__; INFINITY needs
# host <math.h>, which NVRTC lacks (same fix as tvm/support/nvcc.py).
_NVRTC_PREAMBLE = """#include <cuda/std/limits>
#ifndef INFINITY
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
"""

_NVRTC_CACHE: dict[str, Nvrtc] = {}


_LOADED: dict[str, Nvrtc] = {}


def nvrtc(toolchain: CudaToolchain) -> Nvrtc:
    """The toolchain's NVRTC, loaded once per process."""
    if toolchain.name not in _LOADED:
        _LOADED[toolchain.name] = Nvrtc(toolchain)
    return _LOADED[toolchain.name]
