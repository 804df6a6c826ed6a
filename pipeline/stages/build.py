"""Stage: compile the Relax module for the target and export one shared library.

CUDA device code is compiled here, ahead of time, to cubins for the target's arch with the
toolchain its driver accepts (pipeline.toolchain.cuda_aot); libraries for another CPU are linked with a
cross linker (pipeline.toolchain.cross_link). The report says which builtins that only TVM's Python provides the
library calls (pipeline.toolchain.native_runner): a bundle's native runner runs it only when there are none.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import tvm
from tvm import relax

from targets import CudaSpec, TargetSpec
from ..errors import BuildError
from ..toolchain.cross_link import cross_linker
from ..toolchain.cuda_aot import CudaToolchainError, aot_cuda
from ..toolchain.native_runner import python_only_builtins
from ..tvm_targets import to_tvm_target


def kernel_limit_violations(kernels: list[dict], cuda: CudaSpec) -> list[str]:
    limits = (("registers", cuda.max_registers_per_thread), ("shared_bytes", cuda.max_shared_bytes),
              ("max_threads", cuda.max_threads_per_block), ("local_bytes", 0))
    return [f"{k['name']}: {what} {k[what]} > {limit}"
            for k in kernels for what, limit in limits if k[what] is not None and k[what] > limit]


def build(mod: tvm.IRModule, target: TargetSpec, path: Path) -> dict:
    """Write the library to ``path``; return what the manifest records about the build."""
    tvm_target = to_tvm_target(target)
    linker = cross_linker(target.cross_triple) if target.cross_triple else None  # fails fast when none is installed
    device_code = aot_cuda(target.cuda.arch, target.cuda.toolchain) if target.cuda else contextlib.nullcontext()
    try:
        with device_code as cuda_session:
            # The target's default pipeline fuses operators (and schedules GPU kernels with dlight);
            # tvm.compile's CPU default does not fuse.
            executable = tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target))
        executable.export_library(str(path), fcompile=linker)
    except CudaToolchainError as e:
        raise BuildError(f"{target.name}: {e}") from None
    except RuntimeError as e:  # TVM's FFI errors (InternalError, ...) are RuntimeErrors
        raise BuildError(f"TVM build for {target.name} failed: {str(e).splitlines()[0]}") from e
    report = {"tvm_target": str(tvm_target), "linker": linker.linker if linker else "host C compiler (TVM default)",
              # builtins only TVM's Python has: none, or the bundle's native runner cannot run the library
              "python_only_builtins": python_only_builtins(path)}
    if cuda_session is not None:
        kernels = [k for out in cuda_session.outputs for k in out.kernel_resources()]
        violations = kernel_limit_violations(kernels, target.cuda)
        if violations:
            raise BuildError(f"{len(violations)} CUDA kernel(s) exceed {target.name}'s limits: " + "; ".join(violations[:5]))
        report["cuda"] = {
            "device_code": "cubin", "arch": target.cuda.arch, "compiler": cuda_session.toolchain.compiler,
            "toolchain": cuda_session.toolchain.name, "compiler_version": cuda_session.compiler_version,
            "min_driver": cuda_session.toolchain.min_driver, "jetpack": target.cuda.jetpack,
            "limits": {"max_threads_per_block": target.cuda.max_threads_per_block,
                       "max_shared_bytes": target.cuda.max_shared_bytes,
                       "max_registers_per_thread": target.cuda.max_registers_per_thread},
            "kernels": kernels,
        }
    return report
