"""TIR pass: keep small CPU buffers (register tiles) on the stack, whatever TVM's 1 KiB stack-allocation limit says.

LowerTVMBuiltin (TVM 0.27) turns every CPU allocation of 1 KiB or more (``runtime::kMaxStackAlloca``) into a
TVMBackendAllocWorkspace call, heap memory that LLVM cannot promote to registers. That capped the default
schedules' register tiles at 15 AVX-512 accumulators (960 bytes), a third of the 32 registers: ConvMixer's 1x1
convolution (768 channels, 32x32 pixels, 83-92 % of its time) ran at about half the rate of a 6x4 tile kept in
registers. An allocation annotated ``disable_lower_builtin`` is left as a stack array (LLVM's SROA then keeps a
fully unrolled tile in registers), so this pass annotates every "global"-scope CPU buffer of at most
``STACK_BUFFER_MAX_BYTES``: the register tiles, and the small per-tile buffers beside them, which thereby also
stop paying a workspace call per tile. The bound keeps each stack frame (one per thread in a parallel loop)
small.

Builds use it through the TIR pipeline registered here under ``TIR_PIPELINE`` (TVM's default s_tir pipeline,
then this pass): ``tvm.compile(..., tir_pipeline=TIR_PIPELINE)``.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir.pipeline import default_s_tir_pipeline
from tvm.tirx import compilation_pipeline

__all__ = ["STACK_BUFFER_MAX_BYTES", "TIR_PIPELINE", "small_buffers_on_stack"]

STACK_BUFFER_MAX_BYTES = 4096  # an AVX-512 register file is 2 KiB
TIR_PIPELINE = "tvm_schedules"
_KEEP = "disable_lower_builtin"  # LowerTVMBuiltin leaves an allocation so annotated alone


def _nbytes(buffer: tirx.Buffer) -> int | None:
    count = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        count *= int(extent)
    dtype = tvm.runtime.DataType(buffer.dtype)
    return count * dtype.bits * dtype.lanes // 8


def _on_stack(stmt: tirx.AllocBuffer) -> tirx.AllocBuffer:
    nbytes = _nbytes(stmt.buffer)
    if stmt.buffer.scope() != "global" or nbytes is None or nbytes > STACK_BUFFER_MAX_BYTES or _KEEP in stmt.annotations:
        return stmt
    return tirx.AllocBuffer(stmt.buffer, {**dict(stmt.annotations), _KEEP: tirx.IntImm("bool", 1)})


def _is_cpu(func: tirx.PrimFunc) -> bool:
    target = func.attrs.get("target") if func.attrs is not None else None
    return target is not None and target.kind.name in ("llvm", "c")


@tvm.transform.module_pass(opt_level=0, name="SmallBuffersOnStack")
def small_buffers_on_stack(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Annotate the small "global" buffers of the module's CPU functions to stay on the stack (see module doc)."""
    functions = {gv: tvm_ffi.structural_map(f, [(tirx.AllocBuffer, _on_stack)])
                 if isinstance(f, tirx.PrimFunc) and _is_cpu(f) else f for gv, f in mod.functions_items()}
    return tvm.IRModule(functions, attrs=mod.attrs)


def _pipeline():
    lower, finalize_host, finalize_device = default_s_tir_pipeline()
    return tvm.transform.Sequential([lower, small_buffers_on_stack]), finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _pipeline)
