"""How many bytes of dynamic shared memory each CUDA kernel is launched with, read from the host code TVM lowers.

A kernel's "shared.dyn" buffers (dlight's MatmulTensorization tiles) are one ``extern __shared__`` array that its
cubin does not size (so the cubin's ``.nv.shared`` sections show none of it): the host passes the bytes at each
launch, as the last launch value of its ``tirx.call_ffi_kernel`` call (launch tag ``tirx.use_dyn_shared_memory``),
a constant where shapes are static. With an LLVM host (every target of ours) that call becomes a packed call into
TVM's CUDA module, whose launcher (``CUDAWrappedFunc``, src/backend/cuda/runtime/cuda_module.cc) raises the
kernel's ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` to that size when it is 48 KiB or more: a kernel may
use up to its GPU's opt-in per-block limit (static + dynamic, ``targets.CudaSpec.max_shared_bytes_optin``), and
one above it fails at launch ("Failed to set the allowed dynamic shared memory size").
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx import compilation_pipeline

DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"
_KERNEL_CALL = tvm.ir.Op.get("tirx.call_ffi_kernel")
_names = itertools.count()


def dynamic_shared_bytes(mod: tvm.IRModule) -> dict[str, int | None]:
    """kernel name -> dynamic shared bytes it is launched with (None: not a constant), for every kernel launch
    of the host functions of a module lowered past SplitHostDevice that passes dynamic shared memory."""
    found: dict[str, int | None] = {}

    def visit(call):
        if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(_KERNEL_CALL)):
            return
        tags = list(call.attrs.launch_params)
        if tags and tags[-1] == DYNAMIC_SHARED_TAG:
            size = call.args[-1]
            found[str(call.args[0].value)] = int(size) if isinstance(size, tirx.IntImm) else None

    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func, (tvm.ir.expr.Call, visit))
    return found


@contextlib.contextmanager
def recording(tir_pipeline: str) -> Iterator[tuple[str, dict[str, int | None]]]:
    """A TIR pipeline, registered for the block, that is ``tir_pipeline`` and records :func:`dynamic_shared_bytes`
    of what it lowered into the yielded dict: ``tvm.compile(..., tir_pipeline=name)``."""
    base_lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline(tir_pipeline)
    recorded: dict[str, int | None] = {}

    @tvm.transform.module_pass(opt_level=0, name="RecordDynamicSharedBytes")
    def record(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        recorded.update(dynamic_shared_bytes(mod))
        return mod

    name = f"{tir_pipeline}+dynamic_shared_{next(_names)}"
    compilation_pipeline.register_tir_pipeline(
        name, lambda: (tvm.transform.Sequential([base_lower, record]), finalize_host, finalize_device))
    try:
        yield name, recorded
    finally:
        compilation_pipeline.PIPELINE_MAP.pop(name, None)
