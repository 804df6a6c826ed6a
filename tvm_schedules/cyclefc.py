"""CycleFC as one TensorIR kernel: a per-channel spatial shift folded into the load of a 1x1 projection.

Layout is NHWC: ``x`` (N, H, W, C), ``weight_t`` (C, O) (the 1x1 weight transposed, so O is contiguous),
``bias`` (O,) or None, output (N, H, W, O); ``x`` and ``weight_t`` in the compute dtype, ``bias`` and the output
in ``out_dtype`` (default: the same; float32 around a float16 kernel in ``--fp16`` builds). Channel ``c`` is read at column ``w + s(c)`` for a (1, k)
kernel, or at row ``h + s(c)`` for a (k, 1) kernel, with ``s(c) = (c + k // 2) % k - k // 2`` and zeros
outside the image (the CycleMLP / ``models.cyclemlp.CycleFC`` semantics); then
``out[..., o] = sum_c W[o, c] * shifted[..., c] + b[o]``.

The same kernel with J branches is CycleMLP's whole token mixer (``token_mixer_te``: sfc_h, sfc_w and mlp_c from
one read of the input, mixed by their softmax weights; ``passes.fuse_cycle_token_mixer`` swaps it in).

``schedule_cyclefc(func, target)`` picks a schedule by target kind:

* ``llvm``: a register-tiled GEMM (M = N*H*W pixels, tiled along W; K = C; N = O). Each parallel task
  owns an (mr pixels x nv*vec channels) accumulator tile: a per-task buffer that LLVM keeps in vector
  registers (see ``_CPU_ACC_SCOPE`` for why its scope is "global" and not "local"), zeroed by the
  decomposed init block, updated over C with the rows and vectors unrolled and the lanes vectorized
  (vec = the target's SIMD width, from a small ISA table), then written out by the epilogue block
  (bias add, cast). On x86 the shift is inlined, so each input element is one bounds-checked scalar load
  broadcast against a vector row of ``weight_t``; nothing shifted is materialized. On NEON each task copies its
  rows shifted into a buffer contiguous along C, and the tile reads each row's 4 K values as one vector, FMAs by
  lane (``_schedule_cpu_row_vectors``).
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
from .cpu.common import pow2_divisor
from .cpu.contraction import load_rows_as_vectors
from .cpu.isa import cpu_isa_data, cpu_tiles, cpu_vector_lanes, cpu_vector_registers, gemm_tiles
from .scheduled import mark_scheduled
from .workload import contraction

__all__ = ["cyclefc_te", "cyclefc_primfunc", "token_mixer_te", "token_mixer_primfunc", "schedule_cyclefc",
           "cpu_vector_lanes", "cpu_tiles", "SCHEDULES", "WIDENED_INPUTS", "RULES", "CYCLEFC_RULE",
           "TOKEN_MIXER_RULE", "TOKEN_SQUEEZE_RULE"]

_LOW_PRECISION = ("float16", "bfloat16")
# What the manifest says scheduled these kernels (``schedule_cyclefc``'s ``rule``).
CYCLEFC_RULE, TOKEN_MIXER_RULE, TOKEN_SQUEEZE_RULE = "CycleFC", "CycleMLP token mixer", "CycleMLP token squeeze"
RULES = (CYCLEFC_RULE, TOKEN_MIXER_RULE, TOKEN_SQUEEZE_RULE)


def _normalize_kernel(kernel_size) -> tuple[int, int]:
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(v) for v in kernel_size)
    if min(kh, kw) != 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be (1, k) or (k, 1) with k odd, got {kernel_size}")
    return kh, kw


def _acc_dtype(dtype: str, accumulator: str = "float32") -> str:
    """What a kernel over ``dtype`` inputs accumulates in: ``accumulator`` for float16/bfloat16 (the target's,
    ``TargetSpec.float16_accumulator``: float16 on Arm cores with +fullfp16), else ``dtype``."""
    return accumulator if dtype in _LOW_PRECISION else dtype


def _offsets(kernel_size):
    """``c -> (dy, dx)``: where channel c of a CycleFC with ``kernel_size`` reads ((1, 1): in place)."""
    kh, kw = (1, 1) if tuple(kernel_size) == (1, 1) else _normalize_kernel(kernel_size)
    k = kh * kw  # the long side; the other side is 1
    zero = lambda ci: tirx.const(0, ci.ty)  # noqa: E731
    if k == 1:
        return lambda ci: (zero(ci), zero(ci))
    shift = lambda ci: tirx.floormod(ci + k // 2, k) - k // 2  # noqa: E731
    return (lambda ci: (zero(ci), shift(ci))) if kh == 1 else (lambda ci: (shift(ci), zero(ci)))


def _read_at(x: te.Tensor, b, y, xx, ci, dy, dx):
    """x[b, y + dy, xx + dx, ci], zero outside the image (bounds checked only along a moved axis)."""
    h, w = x.shape[1], x.shape[2]
    moved = [(v + d, extent) for v, d, extent in ((y, dy, h), (xx, dx, w))
             if not (isinstance(d, tirx.IntImm) and d.value == 0)]
    value = x[b, y + dy, xx + dx, ci]
    if not moved:
        return value
    return tirx.if_then_else(tirx.all(*(c for v, e in moved for c in (v >= 0, v < e))), value, tirx.const(0, x.dtype))


def _shifted(x: te.Tensor, kernel_size):
    """``(b, y, x, c) -> x`` read at channel c's CycleFC shift for ``kernel_size`` ((1, 1): unshifted)."""
    offsets = _offsets(kernel_size)
    return lambda b, y, xx, ci: _read_at(x, b, y, xx, ci, *offsets(ci))


def _check_channels(x: te.Tensor, c_w) -> None:
    c = x.shape[3]
    if isinstance(c_w, tirx.IntImm) and isinstance(c, tirx.IntImm) and int(c_w) != int(c):
        raise ValueError(f"the weight has C = {c_w} but x has C = {c}")


def cyclefc_te(x: te.Tensor, weight_t: te.Tensor, bias: te.Tensor | None, kernel_size,
               out_dtype: str | None = None, widen: bool = False, accumulator: str = "float32") -> te.Tensor:
    """TE compute of CycleFC in NHWC: returns (N, H, W, O) in ``out_dtype`` (default ``x.dtype``).

    Stages: ``shift`` (injective, the bounds-checked shifted read), with ``widen`` also ``weight`` (the weight in the
    accumulator's type; the shift is then in it too, else in ``x``'s: see ``WIDENED_INPUTS``), ``mm`` (the reduction
    over C, accumulated in ``accumulator`` for float16/bfloat16 inputs) and ``out`` (bias add and cast to
    ``out_dtype``).
    """
    n, h, w, c = x.shape
    _check_channels(x, weight_t.shape[0])
    o = weight_t.shape[1]
    _normalize_kernel(kernel_size)
    acc = _acc_dtype(x.dtype, accumulator)
    shifted = _shifted(x, kernel_size)
    xs = te.compute((n, h, w, c), (lambda *i: shifted(*i).astype(acc)) if widen else shifted, name="shift")
    wt = (te.compute(weight_t.shape, lambda k, oo: weight_t[k, oo].astype(acc), name="widened_weight")
          if widen and weight_t.dtype != acc else weight_t)  # a copy in the same type would be work for nothing
    rk = te.reduce_axis((0, c), name="k")
    mm = te.compute(
        (n, h, w, o),
        lambda b, y, xx, oo: te.sum(xs[b, y, xx, rk].astype(acc) * wt[rk, oo].astype(acc), axis=rk),
        name="mm",
    )
    return _epilogue(mm, None if bias is None else (lambda b, oo: bias[oo]), out_dtype or x.dtype)


def _epilogue(mm: te.Tensor, bias, out_dtype: str) -> te.Tensor:
    """``out`` = mm (+ bias(b, o)), cast to ``out_dtype``."""
    acc = mm.dtype
    if bias is None:
        return te.compute(mm.shape, lambda b, y, xx, oo: mm[b, y, xx, oo].astype(out_dtype), name="out")
    return te.compute(mm.shape, lambda b, y, xx, oo: (mm[b, y, xx, oo] + bias(b, oo).astype(acc)).astype(out_dtype),
                      name="out")


def token_mixer_te(x: te.Tensor, weight: te.Tensor, scale: te.Tensor | None, bias: te.Tensor | None, branches,
                   out_dtype: str | None = None, accumulator: str = "float32") -> te.Tensor:
    """CycleMLP's mixed branches as one contraction: ``out[b, p, o] = sum_j scale[b, j, o] * (shift_j(x)[b, p, :]
    @ weight[j])[o] + bias[b, o]``, NHWC.

    ``weight`` (J*C, O): the branches' projections, each transposed to (C, O), stacked; ``branches``: J kernel sizes, a CycleFC's (1, k) or
    (k, 1), or (1, 1) for an unshifted branch (``mlp_c``); ``scale`` (N, J, O): the branch weights (CycleMLP's
    softmax over branches, per image and output channel); ``bias`` (N, O): the scaled branch biases, summed.
    The scale rides on the weight (block ``scaled_weight``, inlined by every schedule: on a CPU one multiply per
    weight vector and k step, on a GPU one per element loaded into shared memory), so the branches share one
    accumulator and nothing but ``out`` is written. Stages: ``shift`` (N, H, W, J, C), ``scaled_weight``
    (N, J, C, O), ``mm`` (reduction over J and C), ``out``.

    With ``x`` of shape (N, H, W, J, C), branch j reads ``x[..., j, :]`` (unshifted branches only) and with
    ``scale`` None the weights are read as they are: the same kernel, on the same weight, computes the mixer's
    squeeze (the branches' pixel means projected, ``fuse_cycle_token_mixer``).
    """
    per_branch = len(x.shape) == 5
    if per_branch and any(tuple(k) != (1, 1) for k in branches):
        raise ValueError("an input per branch (N, H, W, J, C) is read unshifted: every kernel size must be (1, 1)")
    n, h, w, c = (*x.shape[:3], x.shape[-1])
    nb, o = len(branches), weight.shape[1]
    if int(weight.shape[0]) != nb * int(c):
        raise ValueError(f"weight is {tuple(weight.shape)}, not (J*C, O) for J = {nb} branches and C = {c}")
    dtype, acc = x.dtype, _acc_dtype(x.dtype, accumulator)
    nb = tirx.IntImm(str(c.ty), nb) if isinstance(c, tirx.IntImm) else nb  # index types alike (int64 in ours)
    offsets = [_offsets(k) for k in branches]

    def shift(b, y, xx, j, ci):
        if per_branch:
            return x[b, y, xx, j, ci]
        # one guarded load at the branch's offsets, picked as integers (a CPU schedule unrolls j, which folds them;
        # a choice between loads made the GPU kernel spill on NVRTC 11.8)
        dy, dx = offsets[-1](ci)
        for i in range(int(nb) - 2, -1, -1):
            dy_i, dx_i = offsets[i](ci)
            dy, dx = tirx.Select(j == i, dy_i, dy), tirx.Select(j == i, dx_i, dx)
        return _read_at(x, b, y, xx, ci, dy, dx)

    # widened as shifted: the NEON schedule materializes the shifted rows, converted once there (the kernel is a CPU
    # one, the x86 schedule inlines the shift: the same conversion per load)
    xs = te.compute((n, h, w, nb, c), lambda *i: shift(*i).astype(acc), name="shift")
    if scale is None:
        ws = lambda b, j, ci, oo: weight[j * c + ci, oo]  # noqa: E731
    else:
        # in the accumulator's type: rounded back to float16, each weight vector took two more conversions and a
        # register (cyclemlp_b5's float16 token mixer spilled on rpi5)
        scaled = te.compute((n, nb, c, o), lambda b, j, ci, oo:
                            weight[j * c + ci, oo].astype(acc) * scale[b, j, oo].astype(acc), name="scaled_weight")
        ws = lambda b, j, ci, oo: scaled[b, j, ci, oo]  # noqa: E731
    rj, rc = te.reduce_axis((0, nb), name="j"), te.reduce_axis((0, c), name="k")
    mm = te.compute(
        (n, h, w, o),
        lambda b, y, xx, oo: te.sum(xs[b, y, xx, rj, rc].astype(acc) * ws(b, rj, rc, oo).astype(acc), axis=[rj, rc]),
        name="mm",
    )
    return _epilogue(mm, None if bias is None else (lambda b, oo: bias[b, oo]), out_dtype or dtype)


def _int64(*values):
    return [tirx.IntImm("int64", int(v)) for v in values]


def cyclefc_primfunc(n, h, w, c, o, kernel_size, dtype="float32", has_bias=True, name="cyclefc",
                     out_dtype: str | None = None, widen: bool = False, accumulator: str = "float32") -> tirx.PrimFunc:
    """Static-shape PrimFunc ``name(x, weight_t, [bias,] out)`` of :func:`cyclefc_te` (unscheduled).

    Extents are int64, as in the functions LegalizeOps makes: FuseTIR fuses this kernel with its consumers
    (a float16 kernel's cast back, say) and refuses a buffer it maps onto one of theirs with other index types.
    """
    n, h, w, c, o = _int64(n, h, w, c, o)
    x = te.placeholder((n, h, w, c), dtype, name="x")
    wt = te.placeholder((c, o), dtype, name="weight_t")
    b = te.placeholder((o,), out_dtype or dtype, name="bias") if has_bias else None
    y = cyclefc_te(x, wt, b, kernel_size, out_dtype, widen, accumulator)
    args = [x, wt] + ([b] if has_bias else []) + [y]
    return te.create_prim_func(args).with_attr("global_symbol", name)


def token_mixer_primfunc(n, h, w, c, o, branches, dtype="float32", has_bias=True, name="cycle_token_mixer",
                         out_dtype: str | None = None, squeeze: bool = False, accumulator: str = "float32"
                         ) -> tirx.PrimFunc:
    """Static-shape PrimFunc ``name(x, weight, scale, [bias,] out)`` of :func:`token_mixer_te` (unscheduled);
    ``scale`` and ``bias`` in ``out_dtype`` (the graph's), ``x`` and ``weight`` in ``dtype``. ``squeeze``: the
    mixer's squeeze instead, ``name(x (N, H, W, J, C), weight, [bias,] out)``, unshifted and unscaled."""
    out_dtype = out_dtype or dtype
    n, h, w, c, o, nb = _int64(n, h, w, c, o, len(branches))
    x = te.placeholder((n, h, w, nb, c) if squeeze else (n, h, w, c), dtype, name="x")
    wt = te.placeholder((nb * c, o), dtype, name="weight")
    scale = None if squeeze else te.placeholder((n, nb, o), out_dtype, name="scale")
    b = te.placeholder((n, o), out_dtype, name="bias") if has_bias else None
    y = token_mixer_te(x, wt, scale, b, branches, out_dtype, accumulator)
    args = [x, wt] + ([scale] if scale is not None else []) + ([b] if has_bias else []) + [y]
    return te.create_prim_func(args).with_attr("global_symbol", name)


# ----------------------------------------------------------------------------------------------------------------
# CPU


def _schedule_cpu(func: tirx.PrimFunc, target: tvm.target.Target, tile: tuple[int, int] | None = None):
    """Loops: parallel(N*H * W/mr * O/(nv*vec)) { init tile; [unroll J {] for c: unroll mr { unroll nv { vector vec
    } } [}]; epilogue tile }. The token mixer's branch loop J is unrolled, so each branch's shift is a fixed load
    and its scale vectors are loop-invariant in c (hoisted, nv more registers). ``tile`` = (mr, nv) overrides
    :func:`cpu_tiles` (for experiments)."""
    if cpu_isa_data(target).row_registers:
        scheduled = _schedule_cpu_row_vectors(func, target, tile)
        if scheduled is not None:
            return scheduled
    sch = _inline_producers(func)
    mm, out = sch.get_sblock("mm"), sch.get_sblock("out")
    b, y, xx, oo, *reduction = sch.get_loops(mm)
    w, o = int(sch.get(xx).extent), int(sch.get(oo).extent)
    acc = str(sch.get(mm).writes[0].source.dtype)
    lanes, nregs = cpu_vector_lanes(target, acc), cpu_vector_registers(target)
    convert = acc != str(func.params[0].dtype)
    mr, nv, vec = cpu_tiles(w, o, lanes, nregs, tvm.runtime.DataType(acc).bits // 8, convert,
                            scaled=len(reduction) > 1)
    if tile is not None:
        mr, nv = tile
    xo, xi = sch.split(xx, [None, mr])
    o_o, o_v, o_l = sch.split(oo, [None, nv, vec])
    sch.reorder(b, y, xo, o_o, *reduction, xi, o_v, o_l)
    outer = sch.fuse(b, y, xo, o_o)
    sch.parallel(outer)  # one task per (image row, W tile, O tile)
    sch.reverse_compute_at(out, outer, preserve_unit_loops=True)  # epilogue per tile
    sch.set_scope(mm, 0, _CPU_ACC_SCOPE)  # (mr, nv*vec) accumulator tile, see _CPU_ACC_SCOPE
    sch.vectorize(o_l)
    sch.unroll(o_v)
    sch.unroll(xi)
    for branch in reduction[:-1]:
        sch.unroll(branch)
    sch.decompose_reduction(mm, reduction[0])  # zero-init of the tile before the reduction; it keeps the loop kinds
    # epilogue: acc + bias, cast, store; same tile shape
    ex, eo = sch.get_loops(out)[-2:]
    eov, eol = sch.split(eo, [None, vec])
    sch.vectorize(eol)
    sch.unroll(eov)
    sch.unroll(ex)
    return sch.mod["main"]


def _schedule_cpu_row_vectors(func: tirx.PrimFunc, target: tvm.target.Target, tile: tuple[int, int] | None = None):
    """On a core whose by-element FMA reads a tile row's K values from one vector register (NEON:
    ``CpuIsa.row_registers``), the shifted rows are materialized: each parallel task (one image row, mr pixels)
    copies its pixels' shifted inputs, bounds-checked, into a buffer contiguous along C, once for all its output
    tiles; then the tile reads each row's ``k_unroll`` values as one vector (``fmla v.4s, v.4s, v.s[i]``) with no
    guard in the loop. The token mixer's branch weights are multiplied into the weight once per call, not once
    per tile and step. Inlined (the x86 schedule), the guarded scalar loads and the per-step scaling left
    CycleMLP's kernels on rpi5 at 0.2-0.5 fmla per instruction with the border's branches inside the loop.
    None when C does not divide by the K unroll, or the shifted rows are not in the accumulator's type (a float16
    CycleFC kernel built without ``widen``)."""
    isa = cpu_isa_data(target)
    sch = Schedule(func)
    mm, out, shift = sch.get_sblock("mm"), sch.get_sblock("out"), sch.get_sblock("shift")
    b, y, xx, oo, *reduction = sch.get_loops(mm)
    w, o, c = (int(sch.get(lp).extent) for lp in (xx, oo, reduction[-1]))
    acc = str(sch.get(mm).writes[0].source.dtype)
    if c % isa.k_unroll or str(sch.get(shift).writes[0].source.dtype) != acc:
        return None  # a float16 CycleFC's rows would be widened element by element in the loop
    acc_bytes = tvm.runtime.DataType(acc).bits // 8
    vec = pow2_divisor(o, cpu_vector_lanes(target, acc))
    mr, nv = tile or gemm_tiles(w, o, vec, cpu_vector_registers(target), acc_bytes, isa)
    xo, xi = sch.split(xx, [None, mr])
    o_o, o_v, o_l = sch.split(oo, [None, nv, vec])
    ko, ki = sch.split(reduction[-1], [None, isa.k_unroll])
    sch.reorder(b, y, xo, o_o, *reduction[:-1], ko, ki, xi, o_v, o_l)
    task = sch.fuse(b, y, xo)
    sch.parallel(task)
    sch.compute_at(shift, task, preserve_unit_loops=True)
    sch.reverse_compute_at(out, o_o, preserve_unit_loops=True)
    sch.set_scope(mm, 0, _CPU_ACC_SCOPE)
    sch.vectorize(o_l)
    sch.unroll(o_v)
    sch.unroll(xi)
    sch.unroll(ki)
    for branch in reduction[:-1]:
        sch.unroll(branch)
    _b, _y, _x, o_iter, *_, k_iter = sch.get(mm).iter_vars  # as its loops: (b, y, x, o, [j,] k)
    load_rows_as_vectors(sch, mm, o_iter.var, k_iter.var, ko)  # the shifted rows, as the default CPU rules read theirs
    sch.decompose_reduction(mm, (reduction[:-1] or [ko])[0])
    ex, eo = sch.get_loops(out)[-2:]
    eov, eol = sch.split(eo, [None, vec])
    sch.vectorize(eol)
    sch.unroll(eov)
    sch.unroll(ex)
    names = {sch.get(rv).name_hint for rv in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in {"scaled_weight", "widened_weight"} & names:  # once per call: parallel over its rows, vectors along O
        *rows_, so = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(*rows_) if len(rows_) > 1 else rows_[0])
        _, so_l = sch.split(so, [None, vec])
        sch.vectorize(so_l)
    return sch.mod["main"]


def _inline_producers(func: tirx.PrimFunc) -> Schedule:
    """The shift becomes the guarded load inside the GEMM, the token mixer's scaling a multiply on the weight."""
    sch = Schedule(func)
    names = {sch.get(rv).name_hint for rv in sch.get_child_blocks(sch.get_sblock("root"))}
    for producer in ("shift", "scaled_weight", "widened_weight"):
        if producer in names:
            sch.compute_inline(sch.get_sblock(producer))
    return sch


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def _schedule_cuda_manual(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Thread-tiled CUDA schedule without shared memory (the fallback when dlight does not match).

    Block = (one image row, 8 pixels along W, 64 channels along O); thread = 2 pixels x 2 channels with
    threadIdx.x running along O (coalesced weight loads and output stores); 128 threads per block; the
    accumulators live in registers ("local"); ragged edges are guarded by the split predicates.
    """
    sch = _inline_producers(func)
    mm, out = sch.get_sblock("mm"), sch.get_sblock("out")
    b, y, xx, oo, *reduction = sch.get_loops(mm)
    xo, ty, xi = sch.split(xx, [None, 4, 2])
    oo_o, oi, tx = sch.split(oo, [None, 2, 32])
    sch.reorder(b, y, xo, oo_o, ty, tx, *reduction, xi, oi)
    blk = sch.fuse(b, y, xo, oo_o)
    sch.bind(blk, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(out, tx, preserve_unit_loops=True)
    sch.set_scope(mm, 0, "local")
    sch.unroll(xi)
    sch.unroll(oi)
    sch.decompose_reduction(mm, reduction[0])
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
# Target kinds whose CycleFC kernel widens its input and weight to the accumulator's type (``cyclefc_primfunc(widen=)``):
# the NEON schedule materializes the shifted rows and the weight in float32 once per call; on CUDA the float16
# operands feed the tensor cores. (The token mixer, a CPU kernel only, always widens; its weight is scaled anyway.)
WIDENED_INPUTS = frozenset({"llvm"})


def schedule_cyclefc(func: tirx.PrimFunc, target, rule: str = CYCLEFC_RULE) -> tirx.PrimFunc:
    """Schedule a :func:`cyclefc_primfunc` or :func:`token_mixer_primfunc` for ``target`` (by target kind) and
    mark it scheduled by ``rule`` (the name the manifest lists it under)."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    try:
        fn = SCHEDULES[target.kind.name]
    except KeyError:
        raise ValueError(f"no CycleFC schedule for target kind {target.kind.name!r}; have {sorted(SCHEDULES)}") from None
    name = func.attrs.get("global_symbol", "cyclefc") if func.attrs is not None else "cyclefc"
    scheduled = fn(func, target)
    return mark_scheduled(scheduled.with_attr("global_symbol", name), rule, contraction(func))
