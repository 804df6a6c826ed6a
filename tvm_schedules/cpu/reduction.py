"""RowReduction: layer_norm, softmax, mean and other row-wise reductions with their injective neighbours (CPU)."""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

from .base import CPURule
from .common import (MIN_PARALLEL_ITERS, NotApplicable, access_stride, buffer_shape, get_sblock_realize,
                     pow2_divisor, static_extent, tensor_loads, uses_var, vectorize_inner)
from .isa import cpu_vector_lanes, cpu_vector_registers

# A channel loop of at most this many vector steps is unrolled whole by LLVM (64 channels on NEON: 16).
UNROLLED_CHANNEL_STEPS = 16
# The most rows normalized per channel panel (see RowReduction._channel_panel_rows).
PANEL_ROWS = 8


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


class RowReduction(CPURule):
    """Functions with reduction blocks (sum, max, mean...) that all share leading spatial axes: one parallel
    loop over those rows (from the last block), every other block computed per row under it, the
    injective ones vectorized along their innermost axis. A reduction along a contiguous row is split by
    the vector width and rfactored, so a row is summed as one vector of partial sums and then 16 scalars
    (layer_norm over 196x512 here: 0.2 -> 0.03 ms); other reductions (a mean over strided tokens) run
    serially along the row.

    Like dlight's ``cpu.Reduction``, but vectors are never guarded (TVM scalarizes guarded vector loops),
    row sums are vectorized, and tiny functions stay serial."""

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule:
        try:
            return self._schedule(func, target, channel_panels=True)
        except s_tir.ScheduleError:  # rows that compute_at cannot block: one row at a time
            return self._schedule(func, target, channel_panels=False)

    def _schedule(self, func: tirx.PrimFunc, target: tvm.target.Target, channel_panels: bool) -> s_tir.Schedule:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(info.is_injective() for info in infos):
            raise NotApplicable
        infos = try_inline_contiguous_spatial(sch, infos)
        if not infos or any(set(info.dom_kind()) - {"S", "R"} for info in infos):
            raise NotApplicable
        rows = min(_leading_spatial(info.dom_kind()) for info in infos)
        if rows == 0:
            raise NotApplicable
        # Reductions along a contiguous row: rfactor by a vector width, so each row is reduced as a
        # vector of partial results (then one short scalar sum), not a scalar dependency chain.
        partials = [rf for info in infos if not info.is_injective()
                    for rf in [self._vector_partials(sch, info.block_rv, target)] if rf is not None]
        last = infos[-1]
        loops = sch.get_loops(last.block_rv)
        # Reductions across rows (a mean over strided tokens): the rows are the vector, summed side by side; the
        # vector is split off the last row axis alone, so its lanes stay that axis' (not a fused index's).
        columns = None if partials else self._column_vector(sch, infos, rows, loops[rows - 1], target)
        row_loops = loops[:rows]
        if columns is not None:
            row_loops = [*loops[:rows - 1], sch.split(loops[rows - 1], [None, columns])[0]]
            partials = [(info.block_rv, info.block_rv, columns) for info in infos if not info.is_injective()]
        row_loop = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
        block_rows = self._channel_panel_rows(sch, last, rows, target) if channel_panels and columns is None else None
        if block_rows:
            row_loop, rows_in_block = sch.split(row_loop, [None, block_rows])
        work = 1
        for info in infos:
            n = 1
            for d in info.dom():
                n *= d if isinstance(d, int) else 1 << 20
            work += n
        if (static_extent(sch, row_loop) or 2) > 1 and work >= MIN_PARALLEL_ITERS:
            sch.parallel(row_loop)
        for info in reversed(infos[:-1]):
            for rf in partials:
                if sch.get(rf[1]).same_as(sch.get(info.block_rv)):
                    sch.compute_at(info.block_rv, row_loop, preserve_unit_loops=True)
                    if columns is None:
                        sch.compute_at(rf[0], row_loop, preserve_unit_loops=True)
                    break
            else:
                sch.compute_at(info.block_rv, row_loop, preserve_unit_loops=True)
        for rf, _, vec in partials:  # loops below the row: the reduction outside, the vector of partials inside
            stmt = sch.get(rf)
            values = get_sblock_realize(sch, rf).iter_values
            kinds = {}
            for lp in sch.get_loops(rf):
                users = [iv for iv, val in zip(stmt.iter_vars, values) if uses_var(val, sch.get(lp).loop_var)]
                if len(users) == 1:
                    kinds[lp] = users[0].iter_type
            # The partials' loop, of the vector's extent: compute_at leaves unit loops of the row's iters here too
            # (vectorizing one of those vectorized nothing: layer_norm's sums ran as scalar chains).
            lanes_loop = [lp for lp, kind in kinds.items()
                          if kind == tirx.IterVar.DataPar and static_extent(sch, lp) == vec][-1]
            reduce_loops = [lp for lp, kind in kinds.items() if kind == tirx.IterVar.CommReduce]
            sch.reorder(*reduce_loops, lanes_loop)
            sch.vectorize(lanes_loop)
            sch.decompose_reduction(rf, reduce_loops[0])
        for info in infos:
            if not info.is_injective():
                continue
            inner = sch.get_loops(info.block_rv)[-1]
            if not sch.get(inner).same_as(sch.get(row_loop)):
                stmt = sch.get(info.block_rv)
                dtype = str(stmt.writes[0].source.ty.dtype) if len(stmt.writes) else "float32"
                vectorize_inner(sch, inner, cpu_vector_lanes(target, dtype))
        if block_rows:  # per block of rows: each channel panel's weights loaded once, then the rows under it
            channel_outer = sch.get_loops(last.block_rv)[-2]
            sch.reorder(channel_outer, rows_in_block)
            sch.unroll(rows_in_block)
        return sch

    @staticmethod
    def _channel_panel_rows(sch, last, rows: int, target) -> int | None:
        """Rows per block when the last block (a layer norm's normalize) reads per-channel operands (weight, bias)
        that fill the vector registers while its channel loop is short: LLVM unrolls that loop whole and hoists
        the operands out of the row loop, which spills them (64-channel layer norm on NEON: 32 vectors, 19 stack
        accesses per row; 128 channels cast to float16: 127). Then blocks of rows are normalized channel panel by
        panel, rows innermost (on x86, gmlp_s16's 196x256 on the 2-core Zen 5 here, interleaved: 0.0167 -> 0.0142
        ms)."""
        if not last.is_injective():
            return None
        stmt = sch.get(last.block_rv)
        row_vars = [iv.var for iv in stmt.iter_vars[:rows]]
        store = stmt.body
        if not isinstance(store, tirx.BufferStore) or len(stmt.iter_vars) != rows + 1:
            return None
        lanes = cpu_vector_lanes(target, str(store.buffer.ty.dtype))
        channels = int(stmt.iter_vars[-1].dom.extent)
        per_channel = [ld for ld in tensor_loads(store.value)
                       if not any(uses_var(idx, v) for idx in ld.indices for v in row_vars)]
        register_file = cpu_vector_registers(target) * cpu_vector_lanes(target) * 4
        operand_bytes = sum(channels * tvm.runtime.DataType(str(ld.source.ty.dtype)).bits // 8 for ld in per_channel)
        if channels // lanes > UNROLLED_CHANNEL_STEPS or operand_bytes < register_file:
            return None
        # a block within one image row, so that each block's rows stay a rectangle for compute_at
        extent = int(stmt.iter_vars[rows - 1].dom.extent)
        # fewer rows when the output's vector is computed in several float32 registers (a float16 cast's 8 lanes)
        most = max(1, PANEL_ROWS * cpu_vector_lanes(target) // lanes)
        block = next(r for r in range(min(most, extent), 0, -1) if extent % r == 0)
        return block if block > 1 else None

    @staticmethod
    def _column_vector(sch, infos, rows: int, last_row_loop, target) -> int | None:
        """The vector width for summing rows side by side, when every reduction reads its rows with a stride and
        the last row axis contiguously (a mean over tokens of [tokens, channels]); else None."""
        lanes, vec = None, None
        for info in infos:
            if info.is_injective():
                continue
            stmt = sch.get(info.block_rv)
            store = stmt.body
            if not isinstance(store, tirx.BufferStore) or len(stmt.iter_vars) <= rows:
                return None
            lanes = cpu_vector_lanes(target, str(store.buffer.ty.dtype))
            last_row, reduced = stmt.iter_vars[rows - 1].var, [iv.var for iv in stmt.iter_vars[rows:]]
            for ld in tensor_loads(store.value):
                if ld.source.same_as(store.buffer):
                    continue
                shape = buffer_shape(ld.source)
                if access_stride(ld.indices, shape, last_row) not in (0, 1) or \
                        any(access_stride(ld.indices, shape, r) in (1, None) for r in reduced):
                    return None
        extent = static_extent(sch, last_row_loop)
        vec = pow2_divisor(extent, lanes) if lanes and extent else 1
        return vec if vec >= min(4, lanes or 4) and extent // vec >= 2 else None

    @staticmethod
    def _vector_partials(sch, block, target):
        """rfactor the innermost reduction loop of ``block`` by the vector width when the row is contiguous;
        returns (rf block, block, vector width) or None."""
        stmt = sch.get(block)
        loops = sch.get_loops(block)
        if not loops or stmt.iter_vars[-1].iter_type != tirx.IterVar.CommReduce or len(loops) != len(stmt.iter_vars):
            return None
        var = stmt.iter_vars[-1].var
        extent = static_extent(sch, loops[-1])
        store = stmt.body
        if extent is None or not isinstance(store, tirx.BufferStore):
            return None
        lanes = cpu_vector_lanes(target, str(store.buffer.ty.dtype))
        vec = pow2_divisor(extent, lanes)
        loads = [ld for ld in tensor_loads(store.value) if not ld.source.same_as(store.buffer)]
        strides = [access_stride(ld.indices, buffer_shape(ld.source), var) for ld in loads]
        if vec < min(4, lanes) or extent < 2 * vec or 1 not in strides or any(st not in (0, 1) for st in strides):
            return None
        _, inner = sch.split(loops[-1], [None, vec])
        # the partials last in their buffer: a block of rows (channel panels) keeps each row's vector contiguous
        return sch.rfactor(inner, factor_axis=len(store.buffer.shape)), block, vec
