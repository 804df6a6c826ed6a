"""Stage: compile the Relax module for the target and export one shared library.

CUDA device code is compiled here, ahead of time, to cubins for the target's arch with the
toolchain its driver accepts (pipeline.toolchain.cuda_aot); libraries for another CPU are linked with a
cross linker (pipeline.toolchain.cross_link). The report says which builtins that only TVM's Python provides the
library calls (pipeline.toolchain.native_runner): a bundle's native runner runs it only when there are none.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from pathlib import Path

import tvm
from tvm import relax, tirx

from targets import CudaSpec, TargetSpec
from tvm_schedules.cyclefc import RULES as CYCLEFC_RULES
from tvm_schedules.cuda.tensor_core_matmul import has_tensor_cores, large_enough
from tvm_schedules.scheduled import scheduled_by
from tvm_schedules.passes.small_buffers_on_stack import TIR_PIPELINE
from ..errors import BuildError
from ..toolchain import dynamic_shared
from ..toolchain.cross_link import cross_linker
from ..toolchain.cuda_aot import CompiledCuda, CudaToolchainError, aot_cuda
from ..toolchain.kernel_limits import kernel_limit_violations, with_dynamic_shared_bytes
from ..toolchain.native_runner import python_only_builtins
from ..toolchain.sass import SassUnavailable, ptx_tensor_core_ops, tensor_core_ops
from ..tvm_targets import to_tvm_target


# Rules that schedule a conv or matmul as a contraction (tiles in shared memory and registers); a matrix-vector
# product (M or N = 1) may also go to dlight's reduction rules. Anything else (Fallback, GeneralReduction: one
# thread per output or per row) is a schedule gap.
CONTRACTION_RULES = frozenset({"DepthwiseConv2d", "TensorCoreMatmul", "dlight.gpu.Matmul", *CYCLEFC_RULES, "tuning record"})
VECTOR_RULES = frozenset({"dlight.gpu.GEMV", "dlight.gpu.Reduction"})
_CALL = re.compile(r"\s*call\s+(\S+)\s")  # a VM call instruction, as Executable.as_text() prints it
# TVM names a function's device kernels after it: f_kernel, f_kernel_1, ...
_KERNEL_SUFFIX = re.compile(r"_kernel(_\d+)?$")


def schedule_gaps(kernels: list[dict], cuda: CudaSpec) -> list[str]:
    """Kernels of convs and matmuls left to a generic rule, and float16 ones large enough for tensor cores (what
    our TensorCoreMatmul takes: tensor_core_matmul.large_enough) without tensor-core instructions."""
    gaps = []
    for k in kernels:
        shape = k.get("contraction")
        if shape is None:
            continue
        vector = min(shape["m"], shape["n"]) == 1 and shape["op"] == "matmul"
        if k["rule"] not in CONTRACTION_RULES and not (vector and k["rule"] in VECTOR_RULES):
            gaps.append(f"{k['name']}: {shape['op']} scheduled by {k['rule']}")
        wants_tensor_cores = shape["dtype"] == "float16" and large_enough(shape) and has_tensor_cores(cuda.arch)
        if wants_tensor_cores and k.get("tensor_cores") is False:
            gaps.append(f"{k['name']}: float16 {shape['op']} {shape['m']}x{shape['n']}x{shape['k']} without tensor cores")
    return gaps


def _launches(executable) -> Counter:
    """How many times one inference calls each TIR function: the call instructions of the built VM program
    (main and the CUDA-graph capture functions, each run once per inference), not the call_tir sites of the
    module built, of which the build turns some (pure reshapes) into views."""
    return Counter(m[1] for line in executable.as_text().splitlines() if (m := _CALL.match(line)))


def describe_kernels(mod: tvm.IRModule, executable, kernels: list[dict], compiled: list[CompiledCuda]
                     ) -> tuple[list[dict], dict]:
    """Each kernel with the function it came from, the rule that scheduled it, its contraction shape and
    whether its SASS has tensor-core instructions (where the SASS cannot be read here: its PTX); and the launches
    per inference."""
    marks = {gv.name_hint: scheduled_by(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    try:
        ops = {name: o for out in compiled for name, o in tensor_core_ops(out.cubin).items()}
        sass_note = "read with cuobjdump -sass"
    except SassUnavailable as e:
        ops = {name: o for out in compiled for name, o in ptx_tensor_core_ops(out.ptx).items()}
        sass_note = (f"not read: {e}; tensor_cores read from the PTX ptxas compiled (wmma.mma / mma.sync / wgmma, "
                     "which it compiles to tensor-core instructions alone)")
    calls = _launches(executable)
    out = []
    for k in kernels:
        function = _KERNEL_SUFFIX.sub("", k["name"])
        rule, shape = marks.get(function, (None, None))
        out.append({**k, "function": function, "rule": rule or "dlight (build pipeline)", "contraction": shape,
                    "launches": calls[function],
                    "tensor_core_ops": ops.get(k["name"], []), "tensor_cores": bool(ops.get(k["name"]))})
    return out, {"kernel_launches": sum(k["launches"] for k in out), "sass": sass_note}


def pass_config(target: TargetSpec) -> dict:
    """PassContext config of the target's build: CUDA graph capture where the target asks for it."""
    return {"relax.backend.use_cuda_graph": True} if target.cuda is not None and target.cuda.cuda_graph else {}


def build(mod: tvm.IRModule, target: TargetSpec, path: Path) -> dict:
    """Write the library to ``path``; return what the manifest records about the build."""
    tvm_target = to_tvm_target(target)
    linker = cross_linker(target.cross_triple) if target.cross_triple else None  # fails fast when none is installed
    device_code = aot_cuda(target.cuda.arch, target.cuda.toolchain) if target.cuda else contextlib.nullcontext()
    try:
        with device_code as cuda_session, dynamic_shared.recording(TIR_PIPELINE) as (tir_pipeline, dynamic_bytes):
            # The target's default pipeline fuses operators (and schedules GPU kernels with dlight);
            # tvm.compile's CPU default does not fuse.
            with tvm.transform.PassContext(config=pass_config(target)):
                executable = tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target),
                                         tir_pipeline=tir_pipeline)
        executable.export_library(str(path), fcompile=linker)
    except CudaToolchainError as e:
        raise BuildError(f"{target.name}: {e}") from None
    except RuntimeError as e:  # TVM's FFI errors (InternalError, ...) are RuntimeErrors
        raise BuildError(f"TVM build for {target.name} failed: {str(e).splitlines()[0]}") from e
    report = {"tvm_target": str(tvm_target), "linker": linker.linker if linker else "host C compiler (TVM default)",
              # builtins only TVM's Python has: none, or the bundle's native runner cannot run the library
              "python_only_builtins": python_only_builtins(path)}
    if cuda_session is not None:
        kernels = with_dynamic_shared_bytes([k for out in cuda_session.outputs for k in out.kernel_resources()],
                                            dynamic_bytes)
        violations = kernel_limit_violations(kernels, target.cuda)
        if violations:
            raise BuildError(f"{len(violations)} CUDA kernel(s) exceed {target.name}'s limits: " + "; ".join(violations[:5]))
        kernels, per_inference = describe_kernels(mod, executable, kernels, cuda_session.outputs)
        report["cuda"] = {
            "device_code": "cubin", "arch": target.cuda.arch, "compiler": cuda_session.toolchain.compiler,
            "toolchain": cuda_session.toolchain.name, "compiler_version": cuda_session.compiler_version,
            # per CUDA module, what it was compiled again with because its code spilled (cuda_aot.SPILL_RETRIES)
            "spill_retries": [[r.what for r in out.retries] for out in cuda_session.outputs],
            "min_driver": cuda_session.toolchain.min_driver, "jetpack": target.cuda.jetpack,
            "limits": {"max_threads_per_block": target.cuda.max_threads_per_block,
                       "max_shared_bytes": target.cuda.max_shared_bytes,
                       "max_shared_bytes_optin": target.cuda.max_shared_bytes_optin,
                       "max_registers_per_thread": target.cuda.max_registers_per_thread},
            "kernels": kernels,
            "per_inference": {**per_inference, "cuda_graph": target.cuda.cuda_graph},
            "schedule_gaps": schedule_gaps(kernels, target.cuda),
        }
    return report
