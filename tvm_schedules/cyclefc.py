"""CycleFC as one TensorIR kernel: a per-channel spatial shift folded into the load of a 1x1 projection.

Layout is NHWC: ``x`` (N, H, W, C), ``weight_t`` (C, O) (the 1x1 weight transposed, so O is contiguous),
``bias`` (O,) or None, output (N, H, W, O). Channel ``c`` is read at column ``w + s(c)`` for a (1, k)
kernel, or at row ``h + s(c)`` for a (k, 1) kernel, with ``s(c) = (c + k // 2) % k - k // 2`` and zeros
outside the image (the CycleMLP / ``models.cyclemlp.CycleFC`` semantics); then
``out[..., o] = sum_c W[o, c] * shifted[..., c] + b[o]``.

``schedule_cyclefc(func, target)`` picks a schedule by target kind:

* ``llvm``: a register-tiled GEMM (M = N*H*W rows tiled along W, K = C, N = O). The (mr x nv*vec)
  accumulator tile lives in a ``local`` buffer and is unrolled; the O axis is vectorized with the
  target's SIMD width; the outer tiles run in parallel; bias and the final cast are the epilogue of
  each tile. The shift is inlined, so each A element is a bounds-checked scalar load that is broadcast
  against a vector row of ``weight_t``.
* ``cuda``: dlight's ``gpu.Matmul`` rule (one kernel, the shift inlined into the shared-memory load),
  with a manual thread-tiled schedule as the fallback.
"""
from __future__ import annotations

import numpy as np  # noqa: F401  (kept for callers that build inputs; the module itself needs only tvm)
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

__all__ = ["cyclefc_te", "cyclefc_primfunc", "schedule_cyclefc", "cpu_vector_lanes", "SCHEDULES"]

_LOW_PRECISION = ("float16", "bfloat16")


def _normalize_kernel(kernel_size) -> tuple[int, int]:
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(v) for v in kernel_size)
    if min(kh, kw) != 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be (1, k) or (k, 1) with k odd, got {kernel_size}")
    return kh, kw


def _acc_dtype(dtype: str) -> str:
    return "float32" if dtype in _LOW_PRECISION else dtype


def cyclefc_te(x: te.Tensor, weight_t: te.Tensor, bias: te.Tensor | None, kernel_size) -> te.Tensor:
    """TE compute of CycleFC in NHWC: returns (N, H, W, O).

    Stages: ``shift`` (injective, the bounds-checked shifted read; inlined by every schedule here),
    ``mm`` (the reduction over C, accumulated in float32 for float16/bfloat16 inputs) and ``out``
    (bias add and cast back to ``x.dtype``).
    """
    n, h, w, c = x.shape
    c_w, o = weight_t.shape
    if int(c_w) != int(c):
        raise ValueError(f"weight_t is (C, O) = {tuple(weight_t.shape)} but x has C = {c}")
    kh, kw = _normalize_kernel(kernel_size)
    k = kh * kw  # the long side; the other side is 1
    along_w = kh == 1
    dtype = x.dtype
    acc = _acc_dtype(dtype)

    def shifted(b, y, xx, ci):
        s = tirx.floormod(ci + k // 2, k) - k // 2
        if along_w:
            yy, x2 = y, xx + s
            inside = tirx.all(x2 >= 0, x2 < w)
        else:
            yy, x2 = y + s, xx
            inside = tirx.all(yy >= 0, yy < h)
        return tirx.if_then_else(inside, x[b, yy, x2, ci], tirx.const(0, dtype))

    xs = te.compute((n, h, w, c), shifted, name="shift")
    rk = te.reduce_axis((0, c), name="k")
    mm = te.compute(
        (n, h, w, o),
        lambda b, y, xx, oo: te.sum(xs[b, y, xx, rk].astype(acc) * weight_t[rk, oo].astype(acc), axis=rk),
        name="mm",
    )
    if bias is not None:
        return te.compute(
            (n, h, w, o), lambda b, y, xx, oo: (mm[b, y, xx, oo] + bias[oo].astype(acc)).astype(dtype), name="out"
        )
    return te.compute((n, h, w, o), lambda b, y, xx, oo: mm[b, y, xx, oo].astype(dtype), name="out")


def cyclefc_primfunc(n, h, w, c, o, kernel_size, dtype="float32", has_bias=True, name="cyclefc") -> tirx.PrimFunc:
    """Static-shape PrimFunc ``name(x, weight_t, [bias,] out)`` of :func:`cyclefc_te` (unscheduled)."""
    x = te.placeholder((n, h, w, c), dtype, name="x")
    wt = te.placeholder((c, o), dtype, name="weight_t")
    b = te.placeholder((o,), dtype, name="bias") if has_bias else None
    y = cyclefc_te(x, wt, b, kernel_size)
    args = [x, wt] + ([b] if has_bias else []) + [y]
    return te.create_prim_func(args).with_attr("global_symbol", name)


# ----------------------------------------------------------------------------------------------------------------
# CPU


# SIMD lanes of 32-bit floats, and the number of vector registers, by ISA level.
_CPU_ISA = {"avx512": (16, 32), "avx2": (8, 16), "neon": (4, 32), "sse": (4, 16)}
# -mcpu -> ISA level (anything not listed falls back to -mattr, then the triple).
_MCPU_ISA = {
    "x86-64-v4": "avx512", "skylake-avx512": "avx512", "cascadelake": "avx512", "cooperlake": "avx512",
    "icelake-server": "avx512", "icelake-client": "avx512", "sapphirerapids": "avx512", "znver4": "avx512",
    "znver5": "avx512", "x86-64-v3": "avx2", "haswell": "avx2", "broadwell": "avx2", "skylake": "avx2",
    "znver1": "avx2", "znver2": "avx2", "znver3": "avx2", "alderlake": "avx2",
}


def _cpu_isa(target: tvm.target.Target) -> str:
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu in _MCPU_ISA:
        return _MCPU_ISA[mcpu]
    mattr = [str(a) for a in (target.attrs.get("mattr", None) or [])]
    if "+avx512f" in mattr:
        return "avx512"
    if "+avx2" in mattr:
        return "avx2"
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")) or "+neon" in mattr or target.attrs.get("feature.is_aarch64", False):
        return "neon"
    return "sse"


def cpu_vector_lanes(target: tvm.target.Target, dtype: str = "float32") -> int:
    """SIMD lanes for ``dtype`` elements of the accumulator on this target (from the small table above)."""
    lanes32 = _CPU_ISA[_cpu_isa(target)][0]
    return max(1, lanes32 * 32 // tvm.runtime.DataType(dtype).bits)


def _largest_divisor(n: int, candidates) -> int | None:
    for v in candidates:
        if v <= n and n % v == 0:
            return v
    return None


def _cpu_tiles(w: int, o: int, lanes: int, nregs: int) -> tuple[int, int, int]:
    """(mr, nv, vec): mr output pixels along W x nv vectors of vec lanes along O."""
    vec = _largest_divisor(o, [lanes >> i for i in range(lanes.bit_length())]) or 1
    nvec = o // vec
    budget = nregs - 4  # accumulators; leave room for B vectors and the broadcast A
    nv_max = max(1, min(4, budget // 4))
    nv = _largest_divisor(nvec, range(nv_max, 0, -1)) or 1
    mr_max = max(1, budget // nv)
    mr_max = min(mr_max, 8, w)
    mr = _largest_divisor(w, range(mr_max, (mr_max + 1) // 2 - 1, -1)) or mr_max
    return mr, nv, vec


def _schedule_cpu(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    sch = Schedule(func)
    sch.compute_inline(sch.get_sblock("shift"))
    mm, out = sch.get_sblock("mm"), sch.get_sblock("out")
    b, y, xx, oo, kk = sch.get_loops(mm)
    w = int(sch.get(xx).extent)
    o = int(sch.get(oo).extent)
    acc = sch.get(mm).writes[0].buffer.dtype
    lanes, nregs = cpu_vector_lanes(target, str(acc)), _CPU_ISA[_cpu_isa(target)][1]
    mr, nv, vec = _cpu_tiles(w, o, lanes, nregs)
    xo, xi = sch.split(xx, [None, mr])
    o_o, o_v, o_l = sch.split(oo, [None, nv, vec])
    sch.reorder(b, y, xo, o_o, kk, xi, o_v, o_l)
    outer = sch.fuse(b, y, xo, o_o)
    sch.parallel(outer)
    sch.reverse_compute_at(out, outer, preserve_unit_loops=True)
    sch.set_scope(mm, 0, "local")
    init = sch.decompose_reduction(mm, kk)
    # accumulator tile: rows unrolled, vectors unrolled, lanes vectorized
    for blk in (init, mm):
        loops = sch.get_loops(blk)
        sch.vectorize(loops[-1])
        for lp in loops[-3:-1]:
            sch.unroll(lp)
    # epilogue (bias + cast) on the same tile
    eb, ey, ex, eo = sch.get_loops(out)[-4:]
    eov, eol = sch.split(eo, [None, vec])
    sch.vectorize(eol)
    sch.unroll(eov)
    sch.unroll(ex)
    return sch.mod["main"]


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def _schedule_cuda(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    from tvm.s_tir import dlight as dl

    with target:
        sch = dl.gpu.Matmul().apply(func, target, False)
    if sch is None:
        raise RuntimeError("dlight gpu.Matmul did not match CycleFC")
    if isinstance(sch, list):
        sch = sch[0]
    return sch.mod["main"]


SCHEDULES = {"llvm": _schedule_cpu, "cuda": _schedule_cuda}


def schedule_cyclefc(func: tirx.PrimFunc, target) -> tirx.PrimFunc:
    """Schedule a :func:`cyclefc_primfunc` for ``target`` (by target kind) and mark it scheduled."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    try:
        fn = SCHEDULES[target.kind.name]
    except KeyError:
        raise ValueError(f"no CycleFC schedule for target kind {target.kind.name!r}; have {sorted(SCHEDULES)}") from None
    name = func.attrs.get("global_symbol", "cyclefc") if func.attrs is not None else "cyclefc"
    scheduled = fn(func, target)
    return scheduled.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
