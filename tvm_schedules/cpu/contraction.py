"""Contraction: a register-tiled, vectorized, parallel schedule for matmul, batch_matmul and conv2d on CPU.

What it matches: a fused function with exactly one reduction block of the form ``C[s] += A[.] * B[.]``
(casts allowed), any number of injective producers (padding, reshapes) and consumers (bias, GELU, BN, add,
cast...). That covers dense/matmul with either operand transposed, token-mixing batch matmuls, and NCHW
conv2d: 1x1, depthwise k x k, strided patch embeddings and overlapping strided convs.

How it schedules (the model is the CycleFC kernel's CPU schedule, ``tvm_schedules.cyclefc``):

* **vector axis v**: a spatial iter along which one operand is contiguous (stride 1) and the other is
  broadcast (stride 0): ``n`` for ``A[m,k] B[k,n]``, the pixel column for a 1x1 or depthwise conv. When
  no iter is like that, or the best one only allows a narrow vector (``N = 196`` on AVX-512 gives 4
  lanes), one operand is *packed*: copied once per call into a buffer whose last dim is v (weights
  ``W[f,c,kh,kw]`` -> ``[c,kh,kw,f]`` for a patch-embedding or strided conv, ``B[n,k]`` -> ``[k,n]`` for a
  transposed weight). The vector width is the widest power of two <= the SIMD width dividing v's extent,
  so vector lanes never need a guard.
* **row axis u**: another spatial iter, preferably one the vector operand does not depend on (so each
  vector load feeds mr FMAs), else the one closest to contiguous in the output. A narrow vector axis
  continued contiguously by its outer neighbour (an NCHW image row: y then x) is fused with it.
* **register tile** mr rows x nv vectors (``isa.gemm_tiles``: most FMAs per operand load that fit the
  vector registers and the 1 KiB stack-allocation limit): loops ``parallel(outer spatial tiles) { zero
  tile; for reduction: unroll mr { unroll nv { vector vec } } ; epilogue on the tile }``. The accumulator
  tile is a "global"-scope buffer allocated inside the parallel loop, which LLVM keeps in registers
  (``isa.CPU_ACC_SCOPE`` says why not "local"). Rows that do not divide are guarded (a predicate on the
  unrolled rows, never on vector lanes). The parallel tiles run rows-outside or vector-tiles-outside,
  whichever re-reads less operand data.
* **epilogue**: injective consumers are inlined into one block that is computed per tile
  (``reverse_compute_at``), reading the accumulators while they are hot, vectorized along the output's
  contiguous axis or else the accumulator's (GELU's erf is made vectorizable by ``fast_math``); when that
  is not possible the result goes through a cache_write tile and the remaining consumers run as parallel
  vector loops.
* producers with conditions (zero padding) are materialized once, as a fill plus a vectorized interior
  copy, instead of being inlined into the inner loop; plain copies and elementwise producers are inlined.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .base import CPURule, logger
from .common import (MIN_PARALLEL_ITERS, NotApplicable, access_stride, buffer_shape, get_sblock_realize, has_div_mod,
                     has_if_then_else, numel, pow2_divisor, root_blocks, schedule_spatial_block, static_extent,
                     tensor_loads, uses_var)
from .isa import (CPU_ACC_SCOPE, MAX_STACK_ALLOCA_BYTES, cpu_isa_data, cpu_vector_lanes, cpu_vector_registers,
                  gemm_tiles)
from ..workload import match_mac

# Pack an operand (one copy per call) only when that widens the vector by at least this factor, or when
# nothing can be vectorized without it.
_PACK_GAIN = 2


# An activation read as the tile's vectors is copied once per call into panels one tile wide (``_activation_panels``)
# when its rows along the reduction are at least this far apart and at least this many row tiles read each panel.
PANEL_MIN_STRIDE_BYTES = 1024
PANEL_MIN_ROW_TILES = 8

# The longest sliding reduction (a kernel height) unrolled for its overlapping windows (``_sliding_reduction``).
MAX_SLIDE_UNROLL = 16

# LLVM's aarch64 backend unrolls a loop of this many unrolled-K tile steps or fewer whole, loading every step's row
# vectors at once (seen at 2 and 3 steps, not at 4): such a loop is fused with the reduction loop outside it, or, when
# a partial step follows it, its tile counts every step's row vectors (ConvMixer-1024's 14x14 patches, 3 steps of 4
# and a partial one: sized as one step, that tile spilled 66 per loop in float16).
LLVM_UNROLLED_STEPS = 3

# A block annotated with this copies a weight into the layout a kernel reads (relax SplitLayoutRewritePreproc).
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"


@dataclass
class _Operand:
    load: tvm.ir.TensorLoad
    strides: dict  # iter var -> access stride (None: not constant)

    def with_dim_last(self, dim: int, iters) -> _Operand:
        """The strides the operand will have once copied with ``dim`` last (the load stays the original)."""
        order = [d for d in range(len(self.load.indices)) if d != dim] + [dim]
        indices = [self.load.indices[d] for d in order]
        shape = [buffer_shape(self.load.source)[d] for d in order]
        return _Operand(self.load, {iv.var: access_stride(indices, shape, iv.var) for iv in iters})


def _layout_free_buffers(func: tirx.PrimFunc) -> list:
    """The parameters Relax marked as model weights (relax.transform.AttachAttrLayoutFreeBuffers)."""
    indices = func.attrs.get("layout_free_buffers", []) if func.attrs is not None else []
    return [func.params[int(i)] for i in indices]


@dataclass
class _Plan:
    v: tirx.Var  # vector axis
    vec: int
    pack: int | None  # index into operands of the one to pack, or None
    pack_dim: int | None  # the dim of that operand indexed by v


def _pure_index_dim(load, var: tirx.Var) -> int | None:
    """The one dim of ``load`` indexed by exactly ``var``, with no other dim using it; else None."""
    dims = [i for i, idx in enumerate(load.indices) if uses_var(idx, var)]
    if len(dims) == 1 and isinstance(load.indices[dims[0]], tirx.Var) and load.indices[dims[0]].same_as(var):
        return dims[0]
    return None


def load_rows_as_vectors(sch, main, v, k, k_outer) -> None:
    """Copy the broadcast operand's k_unroll values of each tile row of block ``main`` (the block's iter vars ``v``
    along the tile's vectors, ``k`` along the reduction, by name) into a small "global" buffer per step
    of ``k_outer`` (a vector copy, when the operand is contiguous along ``k``): LLVM keeps the
    buffer in registers, one vector per row, and its FMAs read them by lane (``fmla v.4s, v.4s, v.s[i]``)
    instead of loading each scalar again (28 ``ldr s`` per 56 fmla in mixer_s16's 7x2 rpi5 tile)."""
    block = sch.get(main)
    store, loads = match_mac(block)
    var = {iv.var.name: iv.var for iv in block.iter_vars}
    v, k = var[v.name], var[k.name]
    for load in loads:
        strides = (access_stride(load.indices, buffer_shape(load.source), v),
                   access_stride(load.indices, buffer_shape(load.source), k))
        if strides != (0, 1):  # a weight in row panels (contiguous along rows) is read as it is
            continue
        read_index = next(i for i, r in enumerate(block.reads) if r.source.same_as(load.source))
        rows = sch.cache_read(main, read_index, CPU_ACC_SCOPE)
        depth = 1 + [sch.get(lp).same_as(sch.get(k_outer)) for lp in sch.get_loops(main)].index(True)
        sch.compute_at(rows, k_outer, preserve_unit_loops=True)
        # the copy's loop along k innermost: a weight's unit dims (a 1x1 conv's [o, c, 1, 1]) left it outside a
        # vectorized unit loop, and its 4 values were loaded one by one (ConvMixer's 1x1 convs on rpi5: 32 ldr s
        # per 64 fmla, 0.60 fmla per instruction)
        loops = sch.get_loops(rows)[depth:]  # compute_at made one per dim of the operand, in order
        k_dim = _pure_index_dim(load, k)
        inner = loops[k_dim] if k_dim is not None else loops[-1]
        row_loops = [lp for lp in loops if not sch.get(lp).same_as(sch.get(inner))]
        sch.reorder(*row_loops, inner)
        for loop in row_loops:
            sch.unroll(loop)
        sch.vectorize(inner)
        return


def _in_loop_order(dims: list[int], indices, reduce_order) -> list[int]:
    """``dims`` with those indexed by exactly one of ``reduce_order``'s vars permuted among their own places into
    that order (the others stay where they are)."""
    rank = {d: position for d in dims for position, var in enumerate(reduce_order)
            if isinstance(indices[d], tirx.Var) and indices[d].same_as(var)}
    ranked = iter(sorted(rank, key=rank.get))
    return [next(ranked) if d in rank else d for d in dims]


def _windows_overlap(op: _Operand, iv, u_iv) -> bool:
    """Whether the windows that neighbouring rows ``u_iv`` read of ``op`` along reduction ``iv`` overlap: a
    convolution's kernel axis, where row u reads u * stride + k, with stride < kernel size."""
    step, row_step, ext = op.strides.get(iv.var), op.strides.get(u_iv.var), int(iv.dom.extent)
    return bool(step) and bool(row_step) and ext > 1 and row_step % step == 0 and row_step // step < ext


def _is_affine_copy(block) -> bool:
    """An injective producer worth inlining into the inner loop: no condition, no div/mod indexing."""
    return not has_if_then_else(block) and not has_div_mod(block.body.value)


class Contraction(CPURule):
    """Register-tiled GEMM-like schedule for matmul / batch_matmul / conv2d with fused epilogues (CPU)."""

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule:
        try:
            return self._schedule(func, target, force_cache_write=False)
        except s_tir.ScheduleError as e:  # e.g. the epilogue cannot follow the tile: accumulate into a cache
            logger.debug("Contraction: retrying with cache_write: %s", str(e).splitlines()[0:1])
            return self._schedule(func, target, force_cache_write=True)

    # ------------------------------------------------------------------------------------------------------

    def _schedule(self, func: tirx.PrimFunc, target: tvm.target.Target, force_cache_write: bool):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            raise NotApplicable
        reductions = [i for i in infos if not i.is_injective()]
        if len(reductions) != 1 or set(reductions[0].dom_kind()) - {"S", "R"}:
            raise NotApplicable
        main_info = reductions[0]
        main = main_info.block_rv
        if match_mac(sch.get(main)) is None or any(not isinstance(d, int) for d in main_info.dom()):
            raise NotApplicable
        position = infos.index(main_info)

        # 1. producers: inline plain copies / elementwise ops; padding and reshapes stay materialized.
        for info in reversed(infos[:position]):
            if _is_affine_copy(sch.get(info.block_rv)):
                try:
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    pass
        # 2. consumers: inline the epilogue chain into its last block(s).
        pending = list(infos[position + 1:])
        progress = True
        while progress:
            progress = False
            for info in list(pending):
                try:
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    continue
                pending.remove(info)
                progress = True

        block = sch.get(main)
        store, loads = match_mac(block)
        out_buffer = store.buffer
        is_param_output = any(out_buffer.same_as(b) for b in sch.mod["main"].params)
        consumers = list(sch.get_consumers(main))
        if force_cache_write or is_param_output or len(consumers) != 1:
            epilogue = sch.cache_write(main, 0, CPU_ACC_SCOPE)
        else:
            epilogue = consumers[0]
            sch.set_scope(main, 0, CPU_ACC_SCOPE)

        # 3. axes: vector axis (packing an operand if that pays), row axis.
        iters = list(block.iter_vars)
        spatial = [iv for iv in iters if iv.iter_type == tirx.IterVar.DataPar]
        reduce_ = [iv for iv in iters if iv.iter_type == tirx.IterVar.CommReduce]
        loops = dict(zip([iv.var for iv in iters], main_info.get_loops()))
        acc_dtype = str(out_buffer.ty.dtype)
        lanes = cpu_vector_lanes(target, acc_dtype)
        operands = [_Operand(ld, {iv.var: access_stride(ld.indices, buffer_shape(ld.source), iv.var) for iv in iters})
                    for ld in loads]
        out_strides = {iv.var: access_stride(store.indices, buffer_shape(out_buffer), iv.var) for iv in spatial}
        plan = self._choose_vector_axis(spatial, operands, out_strides, lanes)
        if plan.pack is not None:  # planned here, copied below once the tile width is known
            operands[plan.pack] = operands[plan.pack].with_dim_last(plan.pack_dim, iters)
        v_iv = next(iv for iv in spatial if iv.var.same_as(plan.v))
        u_iv = self._choose_row_axis(spatial, v_iv, operands, out_strides)
        # The accumulator tile is ours: lay it out (rows..., vector) so each vector is contiguous.
        acc_dim = _pure_index_dim(match_mac(sch.get(main))[0], v_iv.var)
        ndim = len(store.indices)
        if acc_dim is not None and acc_dim != ndim - 1:
            order = [d for d in range(ndim) if d != acc_dim] + [acc_dim]
            sch.transform_layout(main, ("write", 0), lambda *idx: [idx[d] for d in order])

        # A narrow vector axis whose outer neighbour continues it contiguously everywhere (an NCHW image
        # row: y then x) is fused with it: 16x16 pixels become one 256-wide axis, room for nv > 1.
        w_iv = self._widen_vector_axis(iters, v_iv, u_iv, operands, out_strides, acc_dim == ndim - 1 or acc_dim is None)
        # The accumulator indexed by that fused pixel too: indexed by (y, x), the region CompactBufferAllocation gave a
        # tile of 8 pixels at 16x16 was 17 rows tall, a 4 KiB buffer with a moving offset that LLVM left in memory on
        # NEON (a load and a store per fmla: ConvMixer's 1x1 convs 0.31 fmla per instruction, now 0.80; x86 A/B on
        # the Zen 5 here, 768x32x32 and 1024x16x16 with GELU: 0.99x and 1.02x).
        if w_iv is not None:
            acc = match_mac(sch.get(main))[0]
            dv, dw = _pure_index_dim(acc, v_iv.var), _pure_index_dim(acc, w_iv.var)
            if dv is not None and dw == dv - 1:
                width = int(v_iv.dom.extent)
                sch.transform_layout(main, ("write", 0),
                                     lambda *idx: [*idx[:dw], idx[dw] * width + idx[dv], *idx[dv + 1:]])

        # 4. register tile and loop nest.
        acc_bytes = max(1, tvm.runtime.DataType(acc_dtype).bits // 8)
        v_ext = int(v_iv.dom.extent) * (int(w_iv.dom.extent) if w_iv is not None else 1)
        u_ext = int(u_iv.dom.extent) if u_iv is not None else 1
        vec = pow2_divisor(v_ext, lanes) if w_iv is not None else plan.vec
        isa = cpu_isa_data(target)
        weights = _layout_free_buffers(sch.mod["main"])
        streams_weight = any(op.strides.get(v_iv.var) == 1 and any(op.load.source.same_as(w) for w in weights)
                             for op in operands)  # the vector operand is a weight: see isa.MAX_STACK_ALLOCA_BYTES
        # a broadcast operand read by row vectors (below) keeps its rows contiguous along the last reduction axis
        reordered = []  # the reduction vars in their new loop order, if they were reordered for the rows' reads
        if isa.row_registers and reduce_:
            in_order = reduce_
            reduce_ = self._rows_read_along_last(reduce_, operands, v_iv.var, isa.k_unroll)
            reordered = [iv.var for iv in reduce_] if reduce_ != in_order else []
        slide = self._sliding_reduction(reduce_, u_iv, operands, v_iv.var)
        if slide is not None:
            reduce_ = [iv for iv in reduce_ if iv is not slide] + [slide]
        k_unroll = 1 if not reduce_ or slide is not None else pow2_divisor(int(reduce_[-1].dom.extent), isa.k_unroll)
        k_tail = 0  # reduction steps after the last full unroll, run as a loop of their own
        if (isa.row_registers and reduce_ and slide is None and k_unroll < isa.k_unroll
                and int(reduce_[-1].dom.extent) >= 2 * isa.k_unroll
                and any(op.strides[v_iv.var] == 0 and op.strides[reduce_[-1].var] == 1 for op in operands)):
            # Rows contiguous along a reduction that does not divide by the unroll (Mixer-S/32's token MLP, 49 tokens):
            # unrolled over its largest multiple, the rest after it, as MLAS's kernels do. Unrolled by 1, each row's
            # value was loaded alone (8 ldr s per 16 fmla in mixer_s32's 8x2 rpi5 tile: 0.55 fmla per instruction).
            k_unroll, k_tail = isa.k_unroll, int(reduce_[-1].dom.extent) % isa.k_unroll
        tile_isa = isa
        if isa.row_registers and reduce_ and k_unroll == 1 and slide is None:
            # No reduction axis to read the rows along as vectors. Neighbouring rows' overlapping windows must not be
            # innermost, where LLVM keeps the overlapping values live across the unrolled loop (cyclemlp_b1's 7x7/s4
            # stem, kx innermost: 35 input values for an 8-row tile, 18 stack accesses per loop on rpi5).
            reduce_ = self._window_overlap_outside(reduce_, u_iv, operands, v_iv.var)
            reordered = [iv.var for iv in reduce_] if reduce_ != in_order else []
            if acc_bytes < 4 or not any(op.strides[v_iv.var] == 0 and op.strides[reduce_[-1].var] == 1
                                        for op in operands):
                # each row's value is then broadcast and used at once, as on x86: the rows take no register each
                # (where a row's float32 values are contiguous, LLVM loads them as vectors and keeps them, as row
                # registers; float16 ones it loads one by one, since a by-element fmla .8h reads v0-v15 only:
                # ConvMixer's 7x7/s7 stem, 8x2 with 8 ldr h per 16 fmla, 0.62 fmla per instruction)
                tile_isa = replace(isa, k_unroll=1, row_registers=False)
        rows_read_along = reduce_[-1].var if isa.row_registers and reduce_ else None
        full_steps = int(reduce_[-1].dom.extent) // k_unroll if reduce_ and k_unroll > 1 else 0  # (+ the partial one)
        mr, nv = gemm_tiles(u_ext, v_ext, vec, cpu_vector_registers(target), acc_bytes, tile_isa,
                            MAX_STACK_ALLOCA_BYTES - 1 if streams_weight else None,
                            int(slide.dom.extent) if slide is not None else 0,
                            full_steps + 1 if k_tail and full_steps <= LLVM_UNROLLED_STEPS else 1)
        tile = {v_iv.var: nv * vec if w_iv is None else vec}
        if u_iv is not None:
            tile[u_iv.var] = mr
        self._pack_operands(sch, main, operands, plan, u_iv.var if u_iv is not None else None, tile, rows_read_along,
                            reordered)
        if u_iv is not None and reduce_ and -(-u_ext // mr) >= PANEL_MIN_ROW_TILES:
            self._activation_panels(sch, main, operands, plan, w_iv, v_iv, nv * vec, reduce_[-1].var)
        v_loop = sch.fuse(loops[w_iv.var], loops[v_iv.var]) if w_iv is not None else loops[v_iv.var]
        logger.debug("Contraction: vector %s%s (%d lanes) x rows %s, tile %dx%d, packed operand %s",
                     v_iv.var.name, f"*{w_iv.var.name}" if w_iv is not None else "", vec,
                     u_iv.var.name if u_iv is not None else "-", mr, nv, plan.pack)
        v_outer, v_nv, v_lane = sch.split(v_loop, [None, nv, vec])
        tile_loops = [v_nv, v_lane]
        if u_iv is not None:
            u_outer, u_inner = sch.split(loops[u_iv.var], [None, mr])
            tile_loops.insert(0, u_inner)
        outer = []  # (iter, its loop outside the tile), in iteration order
        for iv in spatial:
            if iv is w_iv:
                continue
            if iv is v_iv:
                outer.append((iv, v_outer))
            elif u_iv is not None and iv is u_iv:
                outer.append((iv, u_outer))
            else:
                outer.append((iv, loops[iv.var]))
        outer = [loop for _, loop in self._order_outer(outer, v_iv, u_iv, operands, mr, (v_ext, nv * vec))]
        reduce_loops = [loops[iv.var] for iv in reduce_]
        sch.reorder(*outer, *reduce_loops, *tile_loops)
        if slide is not None:  # innermost of the reduction loops, and unrolled: see _sliding_reduction
            sch.unroll(reduce_loops[-1])
        if k_unroll > 1:  # unrolled inside the tile loops, so each row's broadcasts load as one vector
            reduce_loops[-1:] = sch.split(reduce_loops[-1], [None, k_unroll])
            sch.unroll(reduce_loops[-1])
            if isa.row_registers and not k_tail and len(reduce_loops) > 2 and full_steps <= LLVM_UNROLLED_STEPS:
                # resmlp_big_24's 8x8 patch conv (kx = 2 steps of 4) held 14 row vectors beside its 7x3 tile: 9 stack
                # accesses per loop on rpi5. Fused with the reduction loop outside it, the loop is too long to unroll.
                reduce_loops[-3:-1] = [sch.fuse(reduce_loops[-3], reduce_loops[-2])]
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        work = 1
        for d in main_info.dom():
            work *= d
        if work >= MIN_PARALLEL_ITERS * 16:  # multiply-adds: below this, waking the thread pool costs more
            sch.parallel(fused)
        sch.reverse_compute_at(epilogue, fused, preserve_unit_loops=True)
        if vec > 1:
            sch.vectorize(v_lane)
        sch.unroll(v_nv)
        if u_iv is not None:
            sch.unroll(tile_loops[0])
        if k_tail:  # the last, partial step in a loop of its own, so the full steps' loop has no guard
            sch.decompose_reduction(main, reduce_loops[0])  # first: loop_partition crashes on a loop holding a copy
            reduce_loops[-2], _partial = sch.loop_partition(reduce_loops[-2], [full_steps, None])
            (main,) = sch.get_child_blocks(reduce_loops[-2])  # the full steps' update; the partial one is a copy
        if k_unroll > 1 and isa.row_registers:
            load_rows_as_vectors(sch, main, v_iv.var, reduce_[-1].var, reduce_loops[-2])
        if reduce_ and not k_tail:
            sch.decompose_reduction(main, reduce_loops[0])
        self._schedule_epilogue(sch, epilogue, lanes, match_mac(sch.get(main))[0].buffer)

        # 5. whatever is left at the root (padding, packing, other outputs): parallel vector loops.
        tile_nest = sch.get(fused)
        for blk in root_blocks(sch):
            blk_loops = sch.get_loops(blk)
            if not blk_loops or sch.get(blk_loops[0]).same_as(tile_nest):
                continue
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(blk).iter_vars):
                continue
            schedule_spatial_block(sch, blk, target)
        return sch

    # ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _choose_vector_axis(spatial, operands, out_strides, lanes) -> _Plan:
        candidates = []
        for iv in spatial:
            ext = int(iv.dom.extent)
            if ext < 2:
                continue
            strides = [op.strides[iv.var] for op in operands]
            if any(s is None for s in strides):
                continue
            width = pow2_divisor(ext, lanes)
            out_contig = out_strides.get(iv.var) == 1
            if set(strides) <= {0, 1} and 1 in strides:
                candidates.append((width, 1, out_contig, ext, _Plan(iv.var, width, None, None)))
                continue
            bad = [i for i, s in enumerate(strides) if s not in (0, 1)]
            if len(bad) == 1:
                dim = _pure_index_dim(operands[bad[0]].load, iv.var)
                if dim is not None:
                    candidates.append((width, 0, out_contig, ext, _Plan(iv.var, width, bad[0], dim)))
        if not candidates:
            raise NotApplicable
        direct = [c for c in candidates if c[1]]
        packed = [c for c in candidates if not c[1]]
        best_direct = max(direct, key=lambda c: c[:4]) if direct else None
        best_packed = max(packed, key=lambda c: c[:4]) if packed else None
        if best_direct is not None and (best_packed is None or best_packed[0] < _PACK_GAIN * best_direct[0]):
            return best_direct[4]
        return best_packed[4]

    @staticmethod
    def _sliding_reduction(reduce_, u_iv, operands, v):
        """The reduction iter that slides with the row axis in the vector operand's index (a convolution's ky, where
        output row y reads input row y * stride + ky) when the windows of neighbouring rows overlap (stride < kernel
        height), or None. Unrolled innermost, the tile's rows read each input row once: LLVM merges the loads of
        equal y * stride + ky (ConvMixer's 7x7 depthwise conv, 8-row tiles: 14 input-row loads per kx step, not 56;
        768 channels at 32x32, the block with its epilogue, on the Zen 5 here with another job running: 1 thread 1.28 -> 0.70
        ms, 2 threads 0.98 -> 0.44 ms)."""
        if u_iv is None:
            return None
        for op in operands:
            if op.strides.get(v) != 1:
                continue
            for iv in reduce_:
                if int(iv.dom.extent) <= MAX_SLIDE_UNROLL and _windows_overlap(op, iv, u_iv):
                    return iv
        return None

    @staticmethod
    def _window_overlap_outside(reduce_, u_iv, operands, v):
        """The reduction iters in loop order, with the innermost moved out when neighbouring rows' windows overlap
        along it in a broadcast operand (a strided conv's kx, where output column x reads input column
        x * stride + kx): the last iter without such an overlap goes innermost instead (ky)."""
        broadcast = [op for op in operands if op.strides.get(v) == 0]
        if u_iv is None or not any(_windows_overlap(op, reduce_[-1], u_iv) for op in broadcast):
            return reduce_
        inner = next((iv for iv in reversed(reduce_) if not any(_windows_overlap(op, iv, u_iv) for op in broadcast)),
                     None)
        return reduce_ if inner is None else [iv for iv in reduce_ if iv is not inner] + [inner]

    @staticmethod
    def _rows_read_along_last(reduce_, operands, v, k_unroll: int):
        """The reduction iters in loop order, with the one the tile rows are read along (as vectors of ``k_unroll``
        values, ``load_rows_as_vectors``) last: the last one when its extent divides by ``k_unroll``, else the
        first that does and that indexes one dim of every broadcast operand (a strided 3x3 conv: the input channels,
        not kw = 3, whose rows would be loaded scalar by scalar and spill: 18 stack accesses per loop in
        cyclemlp_b1's downsampling convs on rpi5)."""
        def fits(iv):
            return int(iv.dom.extent) % k_unroll == 0 and all(
                _pure_index_dim(op.load, iv.var) is not None for op in operands if op.strides[v] == 0)
        if fits(reduce_[-1]):
            return reduce_
        chosen = next((iv for iv in reduce_ if fits(iv)), None)
        return reduce_ if chosen is None else [iv for iv in reduce_ if iv is not chosen] + [chosen]

    @staticmethod
    def _pack_operands(sch, main, operands: list[_Operand], plan: _Plan, rows, tile: dict, rows_read_along=None,
                       reduce_order=()) -> None:
        """Copy operands into the layout the tile reads; ``rows``: the row axis' var (or None), ``tile``:
        iter var -> tile extent along it (the vector axis' tile width, the row axis' rows).

        A weight of the model (a ``layout_free_buffers`` parameter) is laid out in panels one tile wide,
        ``[v // width, ..., v % width]`` along the axis the tile reads it by (the vector axis when it is the
        vector operand, the rows when it is broadcast), so the reduction loop streams it contiguously
        (mixer_s32's 4 MB channel-MLP weights do not stay in cache between calls: 1.41 ms cold vs 0.97 hot in
        the row-major layout). Its copy is a layout-rewrite preprocessing block, which
        ``fold_weight_transforms`` moves out of the library and runs once at compile time. Other operands
        that need packing (``plan.pack``) are copied with the vector dim last, once per call. With
        ``rows_read_along`` (a reduction axis), a broadcast operand is laid out with that axis last instead (a
        weight at compile time; an activation once per call, when the reduction loops were reordered for it), since
        each tile row is read as vectors along it.
        Given ``reduce_order`` (the reduction loops, reordered), the dims an operand indexes by reduction vars are
        laid out in that order, so a weight's panel streams.
        """
        weights = _layout_free_buffers(sch.mod["main"])
        for i, op in enumerate(operands):
            layout = None  # (dim, panel width or None for "dim last", folded at compile time)
            is_weight = any(op.load.source.same_as(w) for w in weights)
            # the vector operand is read along v, a broadcast one along the rows
            axis = plan.v if op.strides[plan.v] == 1 else rows if op.strides[plan.v] == 0 else None
            if axis is rows and rows_read_along is not None:
                axis = None
                dim = _pure_index_dim(op.load, rows_read_along)
                if op.strides[rows_read_along] != 1 and dim is not None and (is_weight or reduce_order):
                    layout = (dim, None, is_weight)
            if axis is not None and is_weight:
                dim = _pure_index_dim(op.load, axis)
                if dim is not None and tile[axis] > 1 and buffer_shape(op.load.source)[dim] % tile[axis] == 0:
                    layout = (dim, tile[axis], True)
            if layout is None and i == plan.pack:
                layout = (plan.pack_dim, None, False)
            if layout is None:
                continue
            dim, width, folded = layout
            block = sch.get(main)
            read_index = next(k for k, r in enumerate(block.reads) if r.source.same_as(op.load.source))
            copy = sch.cache_read(main, read_index, "global")
            order = _in_loop_order([d for d in range(len(op.load.indices)) if d != dim], op.load.indices, reduce_order)
            if width is None:
                sch.transform_layout(main, ("read", read_index), lambda *idx: [*(idx[d] for d in order), idx[dim]])
            else:
                sch.transform_layout(main, ("read", read_index),
                                     lambda *idx: [idx[dim] // width, *(idx[d] for d in order), idx[dim] % width])
            if folded:
                sch.annotate(copy, LAYOUT_REWRITE_PREPROC, True)

    @staticmethod
    def _activation_panels(sch, main, operands, plan, w_iv, v_iv, width: int, k) -> None:
        """Copy the vector operand, when it is an activation whose rows along the reduction ``k`` lie far apart, into
        panels ``[p // width, ..., p % width]`` along its (widened) vector axis p, once per call: each tile then
        streams its panel contiguously. A 1x1 conv over an NCHW image reads a 64-pixel row per input channel, one
        image plane (1-4 KiB) apart: the hardware prefetchers do not follow that, every channel step met a new page.
        ConvMixer's 1x1 conv, 2 threads on the Zen 5 here, copy included: 1024 channels at 16x16 1.64 -> 1.35 ms,
        768 at 32x32 3.14-3.21 -> 2.99-3.17 ms."""
        weights = _layout_free_buffers(sch.mod["main"])
        for i, op in enumerate(operands):
            if op.strides.get(v_iv.var) != 1 or i == plan.pack or any(op.load.source.same_as(w) for w in weights):
                continue
            elem_bytes = tvm.runtime.DataType(str(op.load.source.ty.dtype)).bits // 8
            if (op.strides.get(k) or 0) * elem_bytes < PANEL_MIN_STRIDE_BYTES:
                continue
            dv = _pure_index_dim(op.load, v_iv.var)
            dw = _pure_index_dim(op.load, w_iv.var) if w_iv is not None else None
            if dv is None or (w_iv is not None and dw != dv - 1):
                continue
            shape = buffer_shape(op.load.source)
            extent = shape[dv] * (shape[dw] if dw is not None else 1)
            if extent % width:
                continue
            block = sch.get(main)
            read_index = next(n for n, r in enumerate(block.reads) if r.source.same_as(op.load.source))
            sch.cache_read(main, read_index, "global")
            kept = [d for d in range(len(shape)) if d not in (dv, dw)]
            inner = shape[dv]

            def panels(*idx):
                p = idx[dv] if dw is None else idx[dw] * inner + idx[dv]
                return [p // width, *(idx[d] for d in kept), p % width]

            sch.transform_layout(main, ("read", read_index), panels)
            return


    @staticmethod
    def _choose_row_axis(spatial, v_iv, operands, out_strides):
        vector_ops = [op for op in operands if op.strides[v_iv.var] == 1]
        best = None
        for iv in spatial:
            if iv is v_iv or int(iv.dom.extent) < 2:
                continue
            reuse = all(op.strides[iv.var] == 0 for op in vector_ops)
            stride = out_strides.get(iv.var)
            key = (reuse, -(stride if stride is not None else 1 << 40), int(iv.dom.extent))
            if best is None or key > best[0]:
                best = (key, iv)
        return best[1] if best else None

    @staticmethod
    def _widen_vector_axis(iters, v_iv, u_iv, operands, out_strides, acc_last):
        i = next(k for k, iv in enumerate(iters) if iv is v_iv)
        if i == 0 or not acc_last:
            return None
        w_iv = iters[i - 1]
        v_ext = int(v_iv.dom.extent)
        if (w_iv.iter_type != tirx.IterVar.DataPar or w_iv is u_iv or int(w_iv.dom.extent) < 2 or v_ext >= 64
                or out_strides.get(v_iv.var) != 1 or out_strides.get(w_iv.var) != v_ext):
            return None
        for op in operands:
            sv, sw = op.strides[v_iv.var], op.strides[w_iv.var]
            if not ((sv == 1 and sw == v_ext) or (sv == 0 and sw == 0)):
                return None
        return w_iv

    @staticmethod
    def _order_outer(outer, v_iv, u_iv, operands, rows, cols):
        """Parallel tiles in iteration order, or with the row tiles inside the vector tiles when that moves
        less data: rows outside re-read the whole vector operand once per row tile, vector tiles outside
        re-read the whole broadcast operand once per vector tile (the panels reused meanwhile stay in
        cache). E.g. ConvMixer's 1x1 conv (W 4 MB broadcast, X 1 MB vector, 1024 x 256 outputs, tile
        2 x 64): 512 MB rows-outside vs 17 MB vector-tiles-outside."""
        if u_iv is None:
            return outer
        vector_bytes = sum(numel(op.load.source) for op in operands if op.strides[v_iv.var] == 1)
        broadcast_bytes = sum(numel(op.load.source) for op in operands if op.strides[v_iv.var] != 1)
        rows_outside = -(-int(u_iv.dom.extent) // rows) * vector_bytes + broadcast_bytes
        vectors_outside = -(-cols[0] // cols[1]) * broadcast_bytes + vector_bytes
        iu = next(i for i, (iv, _) in enumerate(outer) if iv is u_iv)
        iv_ = next(i for i, (iv, _) in enumerate(outer) if iv is v_iv)
        if (vectors_outside < rows_outside) == (iu < iv_):
            outer = list(outer)
            outer[iu], outer[iv_] = outer[iv_], outer[iu]
        return outer

    @staticmethod
    def _schedule_epilogue(sch, epilogue, lanes, acc_buffer):
        """The per-tile epilogue: vectorized along the output's contiguous axis when the tile is wide enough
        there, else along the accumulator's vector axis (strided stores, but the GELU math in vectors),
        the other tile loops unrolled."""
        loops = sch.get_loops(epilogue)[1:]  # below the fused parallel loop: the tile
        if not loops:
            return
        stmt = sch.get(epilogue)
        values = get_sblock_realize(sch, epilogue).iter_values
        loop_vars = [sch.get(lp).loop_var for lp in loops]
        iter_of_loop = {}
        for i, lv in enumerate(loop_vars):
            users = [iv.var for iv, val in zip(stmt.iter_vars, values) if uses_var(val, lv)]
            if len(users) == 1:
                iter_of_loop[i] = users[0]
        store = stmt.body
        out_contig = acc_contig = None
        acc_loads = [ld for ld in tensor_loads(store.value) if ld.source.same_as(acc_buffer)]
        for i, var in iter_of_loop.items():
            if access_stride(store.indices, buffer_shape(store.buffer), var) == 1:
                out_contig = i
            if acc_loads and all(access_stride(ld.indices, buffer_shape(ld.source), var) == 1 for ld in acc_loads):
                acc_contig = i
        extents = [static_extent(sch, lp) or 1 for lp in loops]
        chosen = None
        for cand in (out_contig, acc_contig, len(loops) - 1):
            if cand is not None and pow2_divisor(extents[cand], lanes) >= min(8 if cand == out_contig else 4, lanes):
                chosen = cand
                break
        if chosen is not None:
            if chosen != len(loops) - 1:
                sch.reorder(*[lp for i, lp in enumerate(loops) if i != chosen], loops[chosen])
            vec = pow2_divisor(extents[chosen], lanes)
            if vec < extents[chosen]:
                _, lane = sch.split(loops[chosen], [None, vec])
                sch.vectorize(lane)
            else:
                sch.vectorize(loops[chosen])
        for i, lp in enumerate(loops):
            if i != chosen and extents[i] > 1:
                sch.unroll(lp)
