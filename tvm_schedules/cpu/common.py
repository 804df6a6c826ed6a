"""Helpers shared by the default CPU rules: target checks, access-stride analysis, loop scheduling idioms."""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm_ffi import get_global_func

from .isa import cpu_vector_lanes

_has_if_then_else = get_global_func("s_tir.schedule.HasIfThenElse")

# Below this many iterations a parallel loop costs more (thread-pool wake-up) than it saves.
MIN_PARALLEL_ITERS = 4096


class NotApplicable(Exception):
    """Raised inside a rule when the function is not of the form the rule schedules."""


def is_cpu(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm"


def has_if_then_else(stmt) -> bool:
    return bool(_has_if_then_else(stmt))


def static_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= ``cap`` that divides ``n`` (1 when n is odd)."""
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


_CHILD_FIELDS = ("a", "b", "value", "indices", "args", "condition", "true_value", "false_value", "base", "stride")


def walk(expr, visit) -> None:
    """Call ``visit`` on every sub-expression of ``expr`` (pre-order). TVM 0.27 exposes no TIR expression
    visitor to Python, so this follows the child fields of the expression nodes."""
    stack = [expr]
    while stack:
        node = stack.pop()
        visit(node)
        for field in _CHILD_FIELDS:
            child = getattr(node, field, None)
            if child is None or isinstance(child, str | int | float):
                continue
            if isinstance(child, tvm.ir.expr.Expr):
                stack.append(child)
            elif isinstance(child, list | tuple | tvm_ffi.Array):
                stack.extend(c for c in child if isinstance(c, tvm.ir.expr.Expr))


def tensor_loads(expr) -> list:
    loads = []
    walk(expr, lambda n: loads.append(n) if isinstance(n, tvm.ir.TensorLoad) else None)
    return loads


def uses_var(expr, var) -> bool:
    found = []
    walk(expr, lambda n: found.append(n) if isinstance(n, tirx.Var) and n.same_as(var) else None)
    return bool(found)


def has_div_mod(expr) -> bool:
    found = []
    div_mod = tirx.FloorDiv | tirx.FloorMod | tirx.Div | tirx.Mod
    walk(expr, lambda n: found.append(n) if isinstance(n, div_mod) else None)
    return bool(found)


def buffer_shape(buf) -> list[int]:
    return [int(d) for d in buf.ty.shape]


def numel(buf) -> int:
    n = 1
    for d in buffer_shape(buf):
        n *= d
    return n


def flat_index(indices, shape):
    flat, stride = None, 1
    for idx, dim in zip(reversed(list(indices)), reversed(list(shape))):
        term = idx * stride if stride != 1 else idx
        flat = term if flat is None else flat + term
        stride *= int(dim)
    return flat if flat is not None else tirx.const(0, "int64")


def access_stride(indices, shape, var: tirx.Var) -> int | None:
    """Elements the flattened access moves when ``var`` grows by one: 0 (independent), 1 (contiguous), a
    constant stride, or None when it is not linear in ``var`` (floordiv/floormod of it, say)."""
    flat = flat_index(indices, shape)
    if not uses_var(flat, var):
        return 0
    coeffs = tvm.sym.detect_linear_equation(flat, [var])
    if len(coeffs) != 2 or not isinstance(coeffs[0], tirx.IntImm) or uses_var(coeffs[1], var):
        return None
    return int(coeffs[0])


def vectorize_inner(sch: s_tir.Schedule, loop, lanes: int, min_lanes: int = 4) -> bool:
    """Vectorize ``loop`` (an innermost, data-parallel loop) in chunks of the widest power of two <= ``lanes``
    dividing its extent, so the vector loop never carries a guard (TVM scalarizes guarded vector loops).
    Returns whether it vectorized."""
    extent = static_extent(sch, loop)
    if extent is None:
        return False
    vec = pow2_divisor(extent, lanes)
    if vec < min(min_lanes, lanes):
        return False
    if vec == extent:
        sch.vectorize(loop)
    else:
        _, inner = sch.split(loop, [None, vec])
        sch.vectorize(inner)
    return True


get_sblock_realize = get_global_func("s_tir.schedule.GetSBlockRealize")


def _trivial_loops(sch: s_tir.Schedule, block) -> list | None:
    """The block's loops, one per block iter in iter order, when its binding is trivial; else None."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    values = get_sblock_realize(sch, block).iter_values
    if len(loops) != len(stmt.iter_vars) or any(
            not (isinstance(val, tirx.Var) and val.same_as(sch.get(lp).loop_var)) for val, lp in zip(values, loops)):
        return None
    return loops


def schedule_spatial_block(sch: s_tir.Schedule, block, target: tvm.target.Target) -> None:
    """A root-level data-parallel block as a parallel vector loop nest.

    The loop along which the output is contiguous goes innermost. When the biggest input is contiguous
    along another loop (a transpose, a weight being packed), both are tiled vec x vec so the strided
    side of each vector stays within a few cache lines; otherwise all loops are fused and split into an
    unguarded vector (the widest power of two dividing the total). The outer part runs in parallel when
    there is enough work."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if has_if_then_else(sch.get(block)):  # zero padding: a fill, then a plain copy of the interior
        try:
            fill = sch.decompose_padding(block, loops[0])
        except s_tir.ScheduleError:
            pass
        else:
            schedule_spatial_block(sch, fill, target)
            schedule_spatial_block(sch, block, target)
            return
    stmt = sch.get(block)
    store = stmt.body
    dtype = str(stmt.writes[0].source.ty.dtype) if len(stmt.writes) else "float32"
    lanes = cpu_vector_lanes(target, dtype)
    total = 1
    for lp in loops:
        total *= static_extent(sch, lp) or 0
    trivial = _trivial_loops(sch, block)
    if trivial is not None and isinstance(store, tirx.BufferStore) and total > 0:
        ivs = [iv.var for iv in stmt.iter_vars]
        extent = {iv.var: int(iv.dom.extent) for iv in stmt.iter_vars}
        loop_of = dict(zip(ivs, trivial))
        w_str = {v: access_stride(store.indices, buffer_shape(store.buffer), v) for v in ivs}
        w_iv = next((v for v in ivs if w_str[v] == 1 and extent[v] > 1), None)
        reads = [ld for ld in tensor_loads(store.value) if ld.source.ty.shape]
        big = max(reads, key=lambda ld: numel(ld.source), default=None)
        r_group = []  # iters along which the biggest input is contiguous, innermost first (c, kh, kw of a weight)
        if big is not None and w_iv is not None:
            r_str = {v: access_stride(big.indices, buffer_shape(big.source), v) for v in ivs}
            if r_str[w_iv] not in (0, 1):
                want = 1
                while True:
                    nxt = next((v for v in ivs if r_str[v] == want and extent[v] > 1 and v is not w_iv
                                and all(v is not g for g in r_group)), None)
                    if nxt is None:
                        break
                    r_group.append(nxt)
                    want *= extent[nxt]
        r_extent = 1
        for v in r_group:
            r_extent *= extent[v]
        if w_iv is not None and r_group and extent[w_iv] >= 8 and r_extent >= 8:
            tw, tr = pow2_divisor(extent[w_iv], lanes), pow2_divisor(r_extent, lanes)
            if tw >= 4 and tr >= 4:
                others = [loop_of[v] for v in ivs if v is not w_iv and all(v is not g for g in r_group)]
                group_loops = [loop_of[v] for v in reversed(r_group)]  # outermost (largest stride) first
                sch.reorder(*others, *group_loops, loop_of[w_iv])
                r_loop = sch.fuse(*group_loops) if len(group_loops) > 1 else group_loops[0]
                w_o, w_i = sch.split(loop_of[w_iv], [None, tw])
                r_o, r_i = sch.split(r_loop, [None, tr])
                sch.reorder(*others, r_o, w_o, r_i, w_i)
                outer = sch.fuse(*others, r_o, w_o)
                sch.vectorize(w_i)
                if total >= MIN_PARALLEL_ITERS:
                    sch.parallel(outer)
                return
        if w_iv is not None and not sch.get(loop_of[w_iv]).same_as(sch.get(trivial[-1])):
            sch.reorder(*[loop_of[v] for v in ivs if v is not w_iv], loop_of[w_iv])
        loops = sch.get_loops(block)
    inner_extent = static_extent(sch, loops[-1]) or 0
    vec = pow2_divisor(inner_extent, lanes) if inner_extent > 0 else 1
    if len(loops) > 1 and (vec >= min(8, lanes) or vec == inner_extent >= 4):
        # the innermost loop alone gives a good vector: keep it, so its ramps stay plain (fusing a 24-wide
        # row into the rest would turn every vector index into a div/mod of a ramp)
        outer_part, lane = sch.split(loops[-1], [None, vec]) if vec < inner_extent else (None, loops[-1])
        rest = [*loops[:-1], *([outer_part] if outer_part is not None else [])]
        fused = sch.fuse(*rest) if len(rest) > 1 else rest[0]
        sch.vectorize(lane)
        if total >= MIN_PARALLEL_ITERS:
            sch.parallel(fused)
        return
    contiguous = _fused_write_is_contiguous(sch, block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    vec = pow2_divisor(total, lanes) if total > 0 and contiguous else 1
    if vec >= min(4, lanes) and total >= vec:
        outer, inner = sch.split(fused, [None, vec]) if vec < total else (None, fused)
        sch.vectorize(inner)
        if outer is not None and total >= MIN_PARALLEL_ITERS:
            sch.parallel(outer)
    elif total >= MIN_PARALLEL_ITERS:
        sch.parallel(fused)


def _fused_write_is_contiguous(sch: s_tir.Schedule, block) -> bool:
    """Whether fusing the block's loops walks its output contiguously (else a vector of the fused loop would
    be a scatter with div/mod indices: a padded interior, say)."""
    loops = _trivial_loops(sch, block)
    stmt = sch.get(block)
    if loops is None or not isinstance(stmt.body, tirx.BufferStore):
        return False
    want = 1
    for iv in reversed(list(stmt.iter_vars)):
        if access_stride(stmt.body.indices, buffer_shape(stmt.body.buffer), iv.var) != want:
            return False
        want *= int(iv.dom.extent)
    return True


def root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))
