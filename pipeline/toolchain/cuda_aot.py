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

from .cubin import LAUNCH_BOUNDS, kernel_resources, launch_bounds
from .cuda_runtime import ensure_cuda_codegen_runtime
from .cuda_toolchains import CudaToolchain, CudaToolchainError, UnknownToolchain, arch_problem, get_toolchain
from .nvrtc import nvrtc


@dataclass(frozen=True)
class SpillRetry:
    """A way to compile a module whose code uses local memory again."""

    what: str  # as the manifest records it
    options: tuple[str, ...] = ()  # added to NVRTC's
    one_block_per_sm: bool = False  # the spilling kernels' __launch_bounds__(N) becomes (N, 1)


# A module whose code uses local memory is compiled again with each retry in turn, each added to those before; the
# first without local memory is kept, else the one with the least (else the first compile).
SPILL_RETRIES = (
    # With __launch_bounds__(N) alone, ptxas may cap registers so that two blocks fit an SM: a float16 tensor-core
    # matmul (cyclemlp_b1's 3136x64x64) on sm_72, 512 threads, 64 registers and 8 bytes spilled; at (512, 1) 92
    # registers and none. Its 73 KiB of shared memory let only one block on an sm_72 SM anyway.
    SpillRetry("__launch_bounds__(N, 1) for the kernels that spilled", one_block_per_sm=True),
    # -O3 can spill where -O2 does not: mixer_s16_224's float16 channel fc2 with its residual add on sm_87, at the
    # 128-register cap of a 512-thread block (one per SM already): 8 bytes of local memory at -O3, none at -O2.
    SpillRetry("ptxas -O2", options=("--ptxas-options=-O2",)),
)


@dataclass
class CompiledCuda:
    cubin: bytes
    ptx: str  # what ptxas compiled the cubin from
    source: str  # the CUDA C++ compiled: TVM's, or a SpillRetry's edit of it
    log: str  # NVRTC/ptxas log (ptxas -v resource lines included)
    retries: tuple[SpillRetry, ...] = ()  # the SPILL_RETRIES it was compiled with

    def kernel_resources(self) -> list[dict]:
        return kernel_resources(self.cubin, launch_bounds(self.source))

    def local_bytes(self) -> int:
        return sum(k["local_bytes"] for k in self.kernel_resources())


@dataclass
class AotSession:
    arch: str
    toolchain: CudaToolchain
    compiler_version: str  # the NVRTC version actually used
    outputs: list[CompiledCuda] = field(default_factory=list)


def _one_block_per_sm(source: str, kernels: set[str]) -> str:
    return LAUNCH_BOUNDS.sub(
        lambda m: f"__launch_bounds__({m[1]}, 1){m[3]}" if m[4] in kernels and m[2] is None else m[0], source)


def compile_with_fewest_spills(compiler, source: str, arch: str) -> CompiledCuda:
    """``source`` compiled for ``arch``, and again with SPILL_RETRIES while its code uses local memory."""
    cubin, ptx, log = compiler.compile(source, arch)
    best = tried = CompiledCuda(cubin, ptx, source, log)
    for retry in SPILL_RETRIES:
        if not best.local_bytes():
            break
        spilled = {k["name"] for k in tried.kernel_resources() if k["local_bytes"]}
        edited = _one_block_per_sm(tried.source, spilled) if retry.one_block_per_sm else tried.source
        retries = (*tried.retries, retry)
        cubin, ptx, log = compiler.compile(edited, arch, tuple(o for r in retries for o in r.options))
        tried = CompiledCuda(cubin, ptx, edited, log, retries)
        if tried.local_bytes() < best.local_bytes():
            best = tried
    return best


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
            compiled = compile_with_fewest_spills(compiler, source, arch)
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
