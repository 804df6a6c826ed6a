"""Injective: elementwise / broadcast / reshape / transpose functions as parallel vector loops (CPU)."""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from .base import CPURule
from .common import NotApplicable, schedule_spatial_block


class Injective(CPURule):
    """Functions made only of data-parallel blocks: inline what can be inlined (so a reshape + transpose +
    add chain becomes one loop nest), then each remaining block gets its loops fused, split into an
    unguarded vector of the widest power of two dividing the total, and the rest run in parallel."""

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            raise NotApplicable
        for info in try_inline(sch, list(infos)):
            schedule_spatial_block(sch, info.block_rv, target)
        return sch
