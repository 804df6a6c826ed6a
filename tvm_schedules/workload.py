"""What a fused TIR function computes, as far as scheduling cares: its one multiply-accumulate block, if any.

``match_mac`` finds ``C[s] = C[s] + A[.] * B[.]`` (casts allowed) in a block; :func:`contraction` sizes it as a
GEMM (batch x M x N x K, extents of the block's iters by which operand reads them) and says whether it is a
conv2d (an operand index adds a spatial and a reduction iter: ``y * stride + ry``) or a matmul. Schedule rules
use the match; the build checks each CUDA kernel against this shape (a conv or matmul left to a generic rule,
a large float16 contraction without tensor cores).
"""
from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir, tirx



def _strip_cast(e):
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def match_mac(block) -> tuple[tirx.BufferStore, list] | None:
    """``C[s] = C[s] + A[.] * B[.]`` (casts anywhere on A, B or the product) -> (store, [A, B])."""
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return None
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    for acc, prod in ((value.a, value.b), (value.b, value.a)):
        acc = _strip_cast(acc)
        if not (isinstance(acc, tvm.ir.TensorLoad) and acc.source.same_as(store.buffer)
                and all(tvm_ffi.structural_equal(x, y) for x, y in zip(acc.indices, store.indices))):
            continue
        prod = _strip_cast(prod)
        if not isinstance(prod, tirx.Mul):
            return None
        a, b = _strip_cast(prod.a), _strip_cast(prod.b)
        if isinstance(a, tvm.ir.TensorLoad) and isinstance(b, tvm.ir.TensorLoad):
            return store, [a, b]
        return None
    return None


def _uses(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def contraction(func: tirx.PrimFunc) -> dict | None:
    """{"op": "conv2d" | "matmul", "dtype", "batch", "m", "n", "k"} of the function's multiply-accumulate
    block (an unscheduled fused function: one block with an init), or None if it has none.

    batch: spatial iters both operands read (a depthwise conv's channel); m: those only the first reads;
    n: only the second; k: the reduction iters.
    """
    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root"))]
    except (RuntimeError, ValueError):  # not a flat fused function (already scheduled, say)
        return None
    for block in blocks:
        match = match_mac(block) if block.init is not None else None
        if match is None or not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in block.iter_vars):
            continue
        _, (a, b) = match
        reads = [[iv for iv in block.iter_vars if any(_uses(i, iv.var) for i in ld.indices)] for ld in (a, b)]
        spatial = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        reduce_ = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]

        def extent(ivs) -> int:
            return math.prod(int(iv.dom.extent) for iv in ivs)

        in_a = [iv for iv in spatial if any(iv.same_as(x) for x in reads[0])]
        in_b = [iv for iv in spatial if any(iv.same_as(x) for x in reads[1])]
        both = [iv for iv in in_a if any(iv.same_as(x) for x in in_b)]
        windowed = any(_uses(i, s.var) and _uses(i, r.var)
                       for ld in (a, b) for i in ld.indices for s in spatial for r in reduce_)
        return {"op": "conv2d" if windowed else "matmul", "dtype": str(a.source.dtype), "batch": extent(both),
                "m": extent([iv for iv in in_a if iv not in both]), "n": extent([iv for iv in in_b if iv not in both]),
                "k": extent(reduce_)}
    return None
