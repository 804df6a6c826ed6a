"""Depthwise k x k conv2d (NCHW, groups = channels; any stride and padding) with its fused epilogue, on CUDA.

dlight has no convolution rule for CUDA: a depthwise conv went to ``gpu.GeneralReduction`` or
``gpu.Fallback``, one thread per output reading its k x k window from global memory (ConvMixer's 7x7 and 9x9
convs ran 2.5-5.6x slower than cuDNN). Here:

* one thread block per (image, channel, band of ``ty`` output rows and ``tx * vx`` columns); the band's
  input window, zero padding included (the padding block is computed into it), and the channel's k x k
  weights are copied into shared memory by all the block's threads;
* each thread computes ``vx`` adjacent outputs of one row in registers, the k x k loop unrolled, so one
  window row read from shared memory feeds ``vx`` accumulators;
* the epilogue (bias, BN, GELU, residual add, cast: whatever was fused) runs per thread on its registers.

Tile extents divide the output (no partial tiles, so no shared-memory region ever reaches past the padded
input). :data:`SERIAL` runs the same loop nest unbound on the CPU, which is how the schedule's arithmetic is
checked on a host without a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from ..cpu.common import NotApplicable, pow2_divisor, static_extent
from ..scheduled import is_scheduled
from ..workload import contraction, match_mac

logger = logging.getLogger("tvm_schedules.cuda")

MAX_THREADS = 256  # per block: 8 warps keep an SM busy with a few blocks and stay far below every target's 1024
MAX_VX = 4  # outputs per thread along a row: 4 accumulators, one window row reused 4 times
WARP = 32


@dataclass(frozen=True)
class Hardware:
    """Where the loop nest runs: bound to CUDA threads with the tiles in shared memory and registers, or
    serially with every buffer in global memory (a CPU build of the same arithmetic)."""
    bind: bool
    shared: str
    local: str


CUDA = Hardware(bind=True, shared="shared", local="local")
SERIAL = Hardware(bind=False, shared="global", local="global")


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _is_depthwise(func: tirx.PrimFunc) -> bool:
    shape = contraction(func)
    return shape is not None and shape["op"] == "conv2d" and shape["n"] == 1 and shape["batch"] > 1


def schedule_depthwise(func: tirx.PrimFunc, hw: Hardware = CUDA) -> s_tir.Schedule:
    """The schedule above for a legalized (fused) NCHW depthwise conv2d; NotApplicable if it is not one."""
    if not _is_depthwise(func):
        raise NotApplicable
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)  # also drops unit iters: the conv block becomes (image, channel, y, x, ry, rx)
    reductions = [i for i in infos or [] if not i.is_injective()]
    if len(reductions) != 1:
        raise NotApplicable
    main = reductions[0].block_rv
    position = infos.index(reductions[0])
    block = sch.get(main)
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in block.iter_vars)
    if not (kinds.endswith("SSSRR") and kinds.count("R") == 2) or len(sch.get_loops(main)) != len(kinds):
        raise NotApplicable
    store, loads = match_mac(block)
    spatial_vars = [iv.var for iv in block.iter_vars[-4:-2]]
    data = next((ld for ld in loads if any(v.same_as(s) for i in ld.indices
                                           for v in tirx.analysis.undefined_vars(i) for s in spatial_vars)), None)
    weight = next((ld for ld in loads if ld is not data), None)
    if data is None or weight is None:
        raise NotApplicable

    # Producers: the one writing the conv's input (zero padding) becomes the shared-memory window; the
    # rest (copies, casts) are inlined.
    window = None
    for info in reversed(infos[:position]):
        if any(w.source.same_as(data.source) for w in sch.get(info.block_rv).writes):
            window = info.block_rv
        else:
            try:
                sch.compute_inline(info.block_rv)
            except s_tir.ScheduleError:
                raise NotApplicable from None
    # Consumers: inlined into the last one, which then runs per thread on the accumulators.
    pending = [info.block_rv for info in infos[position + 1:]]
    progress = True
    while progress:
        progress = False
        for rv in list(pending):
            try:
                sch.compute_inline(rv)
            except s_tir.ScheduleError:
                continue
            pending.remove(rv)
            progress = True
    consumers = list(sch.get_consumers(main))
    if len(consumers) == 1 and not any(store.buffer.same_as(b) for b in sch.mod["main"].params):
        epilogue = consumers[0]
        sch.set_scope(main, 0, hw.local)
    elif not consumers:
        epilogue = sch.cache_write(main, 0, hw.local)
    else:
        raise NotApplicable
    reads = [r.source for r in sch.get(main).reads]
    if window is None:  # no padding: the window is a copy of the input itself
        window = sch.cache_read(main, next(i for i, b in enumerate(reads) if b.same_as(data.source)), hw.shared)
    else:
        sch.set_scope(window, 0, hw.shared)
    weights = sch.cache_read(main, next(i for i, b in enumerate(reads) if b.same_as(weight.source)), hw.shared)

    *outer, yy, xx, ry, rx = sch.get_loops(main)
    height, width = static_extent(sch, yy), static_extent(sch, xx)
    vx = pow2_divisor(width, MAX_VX)
    tx = _largest_divisor(width // vx, WARP)
    ty = _largest_divisor(height, MAX_THREADS // tx)
    xo, tx_loop, xi = sch.split(xx, [None, tx, vx])
    yo, ty_loop = sch.split(yy, [None, ty])
    sch.reorder(*outer, yo, xo, ty_loop, tx_loop, ry, rx, xi)
    tile = sch.fuse(*outer, yo, xo)
    sch.reverse_compute_at(epilogue, tx_loop, preserve_unit_loops=True)
    for stage in (window, weights):  # cooperative copies: every thread of the block takes a share
        sch.compute_at(stage, tile, preserve_unit_loops=True)
        copy = sch.fuse(*sch.get_loops(stage)[1:])
        _, cy, cx = sch.split(copy, [None, ty, tx])
        if hw.bind:
            sch.bind(cy, "threadIdx.y")
            sch.bind(cx, "threadIdx.x")
    if hw.bind:
        sch.bind(tile, "blockIdx.x")
        sch.bind(ty_loop, "threadIdx.y")
        sch.bind(tx_loop, "threadIdx.x")
    for loop in (ry, rx, xi):
        sch.unroll(loop)
    sch.decompose_reduction(main, ry)
    return sch


class DepthwiseConv2d(GPUScheduleRule):
    """:func:`schedule_depthwise` as a dlight rule (None where it does not fit, so the next rule tries)."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or is_scheduled(func):
            return None
        try:
            return schedule_depthwise(func, CUDA)
        except NotApplicable:
            return None
        except RuntimeError as e:  # a primitive refused (ScheduleError): leave it to the next rule
            logger.debug("DepthwiseConv2d did not schedule %s: %s", func.attrs.get("global_symbol", "?"),
                         str(e).splitlines()[:1])
            return None
