"""Ahead-of-time CUDA compilation on a build host without a GPU: cubins, not CUDA source, in every library.

Without this, TVM on a driverless host stores CUDA *source* in the library and leaves compilation to the board
at load time (pipeline.toolchain.cuda_runtime says why). Inside :func:`aot_cuda`, TVM's codegen runtime is
loaded (with a stub driver where none is present) and our ``tvm_callback_cuda_compile`` runs the chosen
toolchain's NVRTC (pipeline.toolchain.nvrtc) for the chosen arch and returns a cubin. The board's driver must
accept that cubin, which is why the toolchain is picked by the board's CUDA major (JetPack 6: 12, JetPack 5: 11).

Outside an ``aot_cuda`` block, builds keep TVM's default GPU-less behaviour (source in the library): once the
runtime was loaded on a driverless host, TVM_COMPILE_FORCE_FALLBACK=1 is set, which TVM's codegen reads at
each build.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

from .cubin import kernel_resources, launch_bounds
from .cuda_runtime import ensure_cuda_codegen_runtime
from .cuda_toolchains import CudaToolchain, CudaToolchainError, UnknownToolchain, arch_problem, get_toolchain
from .nvrtc import nvrtc


# ptxas's default optimization (-O3) can spill where -O2 does not: mixer_s16_224's channel fc2 with its residual add,
# float16 on sm_87, under the register cap of its 512-thread block used 128 registers and 8 bytes of local memory
# at -O3, 82 registers and none at -O2. A module whose -O3 code uses local memory is compiled again with these
# options, and the result is kept if it uses less.
SPILL_RETRY_OPTIONS = ("--ptxas-options=-O2",)


@dataclass
class CompiledCuda:
    cubin: bytes
    source: str  # the CUDA C++ TVM generated
    log: str  # NVRTC/ptxas log (ptxas -v resource lines included)
    options: tuple[str, ...] = ()  # what was passed besides the toolchain's options (SPILL_RETRY_OPTIONS or none)

    def kernel_resources(self) -> list[dict]:
        return kernel_resources(self.cubin, launch_bounds(self.source))


@dataclass
class AotSession:
    arch: str
    toolchain: CudaToolchain
    compiler_version: str  # the NVRTC version actually used
    outputs: list[CompiledCuda] = field(default_factory=list)


def _local_bytes(compiled: CompiledCuda) -> int:
    return sum(k["local_bytes"] for k in compiled.kernel_resources())


@contextlib.contextmanager
def aot_cuda(arch: str, toolchain: str = "nvrtc-12") -> Iterator[AotSession]:
    """Within this block, CUDA builds produce cubins for `arch`, compiled by `toolchain`.

    Use it around `tvm.compile(mod, cuda_target)`; the target's arch should be the same
    (it decides what TVM's codegen may emit). Each compiled cubin is appended to the
    yielded session's `outputs`. `export_library` may happen inside or after the block:
    the cubin is already in the executable.
    """
    import tvm
    import tvm_ffi

    try:
        tc = get_toolchain(toolchain)
    except UnknownToolchain as e:
        raise CudaToolchainError(str(e)) from None
    problem = arch_problem(arch, tc)
    if problem:
        raise CudaToolchainError(problem)
    compiler = nvrtc(tc)
    ensure_cuda_codegen_runtime()
    session = AotSession(arch=arch, toolchain=tc, compiler_version=compiler.version)
    errors: list[CudaToolchainError] = []

    def compile_callback(code):
        source = str(code)
        try:
            # tvm.compile does not enter the target, but a caller's `with target:` shows it.
            target = tvm.target.Target.current(allow_none=True)
            target_arch = getattr(target, "arch", None) if target is not None else None
            if isinstance(target_arch, str) and target_arch and target_arch != arch:
                raise CudaToolchainError(f"aot_cuda({arch!r}) used for a target with arch {target_arch!r}")
            cubin, log = compiler.compile(source, arch)
            compiled = CompiledCuda(cubin, source, log)
            spilled = _local_bytes(compiled)
            if spilled:
                cubin, log = compiler.compile(source, arch, SPILL_RETRY_OPTIONS)
                retry = CompiledCuda(cubin, source, log, SPILL_RETRY_OPTIONS)
                if _local_bytes(retry) < spilled:
                    compiled = retry
        except CudaToolchainError as e:
            errors.append(e)  # crossing TVM's FFI turns it into a RuntimeError
            raise
        session.outputs.append(compiled)
        return bytearray(compiled.cubin)  # what TVM's own callback returns

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    old_env = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "0"
    try:
        yield session
    except Exception as e:
        if errors and not isinstance(e, CudaToolchainError):
            raise errors[-1] from e
        raise
    finally:
        if old_env is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old_env
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")
