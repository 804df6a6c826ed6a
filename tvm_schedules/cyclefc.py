"""CycleFC as one TensorIR kernel: a per-channel spatial shift folded into the load of a 1x1 projection.

Layout is NHWC: ``x`` (N, H, W, C), ``weight_t`` (C, O) (the 1x1 weight transposed, so O is contiguous),
``bias`` (O,) or None, output (N, H, W, O); ``x`` and ``weight_t`` in the compute dtype, ``bias`` and the output
in ``out_dtype`` (default: the same; float32 around a float16 kernel in ``--fp16`` builds). Channel ``c`` is read at column ``w + s(c)`` for a (1, k)
kernel, or at row ``h + s(c)`` for a (k, 1) kernel, with ``s(c) = (c + k // 2) % k - k // 2`` and zeros
outside the image (the CycleMLP / ``models.cyclemlp.CycleFC`` semantics); then
``out[..., o] = sum_c W[o, c] * shifted[..., c] + b[o]``.

``schedule_cyclefc(func, target)`` picks a schedule by target kind:

* ``llvm``: a register-tiled GEMM (M = N*H*W pixels, tiled along W; K = C; N = O). Each parallel task
  owns an (mr pixels x nv*vec channels) accumulator tile: a per-task buffer that LLVM keeps in vector
  registers (see ``_CPU_ACC_SCOPE`` for why its scope is "global" and not "local"), zeroed by the
  decomposed init block, updated over C with the rows and vectors unrolled and the lanes vectorized
  (vec = the target's SIMD width, from a small ISA table), then written out by the epilogue block
  (bias add, cast). The shift is inlined, so each input element is one bounds-checked scalar load
  broadcast against a vector row of ``weight_t``; nothing shifted is materialized.
* ``cuda``: our ``TensorCoreMatmul`` where it applies (float16 with C and O >= 64: wmma tiles, float32
  accumulators), else dlight's ``gpu.Matmul`` rule (one kernel: shared-memory tiles with the shift inlined into
  the input's shared-memory load, bias and cast fused into the register-tile write-back), with a manual
  thread-tiled schedule as the fallback if neither matches.
"""
from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

# The ISA table, vector widths and register-tile choice are shared with the default CPU rules
# (tvm_schedules/cpu/isa.py; CPU_ACC_SCOPE there says why an accumulator tile is "global", not "local").
from .cpu.isa import CPU_ACC_SCOPE as _CPU_ACC_SCOPE
from .cpu.isa import cpu_tiles, cpu_vector_lanes, cpu_vector_registers
from .scheduled import mark_scheduled
from .workload import contraction

__all__ = ["cyclefc_te", "cyclefc_primfunc", "schedule_cyclefc", "cpu_vector_lanes", "cpu_tiles", "SCHEDULES"]

_LOW_PRECISION = ("float16", "bfloat16")


def _normalize_kernel(kernel_size) -> tuple[int, int]:
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(v) for v in kernel_size)
    if min(kh, kw) != 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be (1, k) or (k, 1) with k odd, got {kernel_size}")
    return kh, kw


def _acc_dtype(dtype: str) -> str:
    return "float32" if dtype in _LOW_PRECISION else dtype


def cyclefc_te(x: te.Tensor, weight_t: te.Tensor, bias: te.Tensor | None, kernel_size,
               out_dtype: str | None = None) -> te.Tensor:
    """TE compute of CycleFC in NHWC: returns (N, H, W, O) in ``out_dtype`` (default ``x.dtype``).

    Stages: ``shift`` (injective, the bounds-checked shifted read; inlined by every schedule here),
    ``mm`` (the reduction over C, accumulated in float32 for float16/bfloat16 inputs) and ``out``
    (bias add and cast to ``out_dtype``).
    """
    n, h, w, c = x.shape
    c_w, o = weight_t.shape
    if isinstance(c_w, tirx.IntImm) and isinstance(c, tirx.IntImm) and int(c_w) != int(c):
        raise ValueError(f"weight_t is (C, O) = {tuple(weight_t.shape)} but x has C = {c}")
    kh, kw = _normalize_kernel(kernel_size)
    k = kh * kw  # the long side; the other side is 1
    along_w = kh == 1
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    out_dtype = out_dtype or dtype

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
            (n, h, w, o), lambda b, y, xx, oo: (mm[b, y, xx, oo] + bias[oo].astype(acc)).astype(out_dtype), name="out"
        )
    return te.compute((n, h, w, o), lambda b, y, xx, oo: mm[b, y, xx, oo].astype(out_dtype), name="out")


def cyclefc_primfunc(n, h, w, c, o, kernel_size, dtype="float32", has_bias=True, name="cyclefc",
                     out_dtype: str | None = None) -> tirx.PrimFunc:
    """Static-shape PrimFunc ``name(x, weight_t, [bias,] out)`` of :func:`cyclefc_te` (unscheduled).

    Extents are int64, as in the functions LegalizeOps makes: FuseTIR fuses this kernel with its consumers
    (a float16 kernel's cast back, say) and refuses a buffer it maps onto one of theirs with other index types.
    """
    n, h, w, c, o = (tirx.IntImm("int64", int(v)) for v in (n, h, w, c, o))
    x = te.placeholder((n, h, w, c), dtype, name="x")
    wt = te.placeholder((c, o), dtype, name="weight_t")
    b = te.placeholder((o,), out_dtype or dtype, name="bias") if has_bias else None
    y = cyclefc_te(x, wt, b, kernel_size, out_dtype)
    args = [x, wt] + ([b] if has_bias else []) + [y]
    return te.create_prim_func(args).with_attr("global_symbol", name)


# ----------------------------------------------------------------------------------------------------------------
# CPU


def _schedule_cpu(func: tirx.PrimFunc, target: tvm.target.Target, tile: tuple[int, int] | None = None):
    """Loops: parallel(N*H * W/mr * O/(nv*vec)) { init tile; for c: unroll mr { unroll nv { vector vec } };
    epilogue tile }. ``tile`` = (mr, nv) overrides :func:`cpu_tiles` (for experiments)."""
    sch = Schedule(func)
    sch.compute_inline(sch.get_sblock("shift"))  # the shift becomes the guarded load inside the GEMM
    mm, out = sch.get_sblock("mm"), sch.get_sblock("out")
    b, y, xx, oo, kk = sch.get_loops(mm)
    w, o = int(sch.get(xx).extent), int(sch.get(oo).extent)
    acc = _acc_dtype(str(func.params[0].dtype))
    lanes, nregs = cpu_vector_lanes(target, acc), cpu_vector_registers(target)
    convert = acc != str(func.params[0].dtype)
    mr, nv, vec = cpu_tiles(w, o, lanes, nregs, tvm.runtime.DataType(acc).bits // 8, convert)
    if tile is not None:
        mr, nv = tile
    xo, xi = sch.split(xx, [None, mr])
    o_o, o_v, o_l = sch.split(oo, [None, nv, vec])
    sch.reorder(b, y, xo, o_o, kk, xi, o_v, o_l)
    outer = sch.fuse(b, y, xo, o_o)
    sch.parallel(outer)  # one task per (image row, W tile, O tile)
    sch.reverse_compute_at(out, outer, preserve_unit_loops=True)  # epilogue per tile
    sch.set_scope(mm, 0, _CPU_ACC_SCOPE)  # (mr, nv*vec) accumulator tile, see _CPU_ACC_SCOPE
    sch.vectorize(o_l)
    sch.unroll(o_v)
    sch.unroll(xi)
    sch.decompose_reduction(mm, kk)  # zero-init of the tile before the C loop; it keeps the loop kinds
    # epilogue: acc + bias, cast, store; same tile shape
    ex, eo = sch.get_loops(out)[-2:]
    eov, eol = sch.split(eo, [None, vec])
    sch.vectorize(eol)
    sch.unroll(eov)
    sch.unroll(ex)
    return sch.mod["main"]


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def _schedule_cuda_manual(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Thread-tiled CUDA schedule without shared memory (the fallback when dlight does not match).

    Block = (one image row, 8 pixels along W, 64 channels along O); thread = 2 pixels x 2 channels with
    threadIdx.x running along O (coalesced weight loads and output stores); 128 threads per block; the
    accumulators live in registers ("local"); ragged edges are guarded by the split predicates.
    """
    sch = Schedule(func)
    sch.compute_inline(sch.get_sblock("shift"))
    mm, out = sch.get_sblock("mm"), sch.get_sblock("out")
    b, y, xx, oo, kk = sch.get_loops(mm)
    xo, ty, xi = sch.split(xx, [None, 4, 2])
    oo_o, oi, tx = sch.split(oo, [None, 2, 32])
    sch.reorder(b, y, xo, oo_o, ty, tx, kk, xi, oi)
    blk = sch.fuse(b, y, xo, oo_o)
    sch.bind(blk, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(out, tx, preserve_unit_loops=True)
    sch.set_scope(mm, 0, "local")
    sch.unroll(xi)
    sch.unroll(oi)
    sch.decompose_reduction(mm, kk)
    return sch.mod["main"]


def _schedule_cuda(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Tensor cores or dlight ``gpu.Matmul``: shared-memory tiles, the shift inlined into the shared-memory load
    of the input and the bias/cast fused into the write-back, all in one kernel."""
    from tvm.s_tir import dlight as dl

    from .cuda.tensor_core_matmul import TensorCoreMatmul

    with target:
        sch = TensorCoreMatmul().apply(func, target, False) or dl.gpu.Matmul().apply(func, target, False)
    if sch is None:
        return _schedule_cuda_manual(func, target)
    if isinstance(sch, list | tuple):
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
    return mark_scheduled(scheduled.with_attr("global_symbol", name), "CycleFC", contraction(func))
