"""Stage: compile the Relax module for the target and export one shared library.

CUDA device code is compiled here, ahead of time, to cubins for the target's arch with the
toolchain its driver accepts (pipeline.cuda_aot); libraries for another CPU are linked with a
cross linker (pipeline.cross_link).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import tvm
from tvm import relax

from targets import CudaSpec, TargetSpec
from ..cross_link import cross_linker
from ..cuda_aot import CudaToolchainError, aot_cuda
from ..errors import BuildError


def tvm_target(spec: TargetSpec) -> tvm.target.Target:
    return tvm.target.Target(spec.tvm_target, host=spec.tvm_host)


def kernel_limit_violations(kernels: list[dict], cuda: CudaSpec) -> list[str]:
    limits = (("registers", cuda.max_registers_per_thread), ("shared_bytes", cuda.max_shared_bytes),
              ("max_threads", cuda.max_threads_per_block), ("local_bytes", 0))
    return [f"{k['name']}: {what} {k[what]} > {limit}"
            for k in kernels for what, limit in limits if k[what] is not None and k[what] > limit]


def build(mod: tvm.IRModule, spec: TargetSpec, path: Path) -> dict:
    """Write the library to ``path``; return what the manifest records about the build."""
    target = tvm_target(spec)
    linker = cross_linker(spec.cross_triple) if spec.cross_triple else None  # fails fast when none is installed
    device_code = aot_cuda(spec.cuda.arch, spec.cuda.toolchain) if spec.cuda else contextlib.nullcontext()
    try:
        with device_code as cuda_session:
            # The target's default pipeline fuses operators (and schedules GPU kernels with dlight);
            # tvm.compile's CPU default does not fuse.
            executable = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
        executable.export_library(str(path), fcompile=linker)
    except CudaToolchainError as e:
        raise BuildError(f"{spec.name}: {e}") from None
    except RuntimeError as e:  # TVM's FFI errors (InternalError, ...) are RuntimeErrors
        raise BuildError(f"TVM build for {spec.name} failed: {str(e).splitlines()[0]}") from e
    report = {"tvm_target": str(target), "linker": linker.linker if linker else "host C compiler (TVM default)"}
    if cuda_session is not None:
        kernels = [k for out in cuda_session.outputs for k in out.kernel_resources()]
        violations = kernel_limit_violations(kernels, spec.cuda)
        if violations:
            raise BuildError(f"{len(violations)} CUDA kernel(s) exceed {spec.name}'s limits: " + "; ".join(violations[:5]))
        report["cuda"] = {
            "device_code": "cubin", "arch": spec.cuda.arch, "compiler": cuda_session.toolchain.compiler,
            "toolchain": cuda_session.toolchain.name, "compiler_version": cuda_session.compiler_version,
            "min_driver": cuda_session.toolchain.min_driver, "supported": spec.cuda.supported,
            "limits": {"max_threads_per_block": spec.cuda.max_threads_per_block,
                       "max_shared_bytes": spec.cuda.max_shared_bytes,
                       "max_registers_per_thread": spec.cuda.max_registers_per_thread},
            "kernels": kernels,
        }
    return report
