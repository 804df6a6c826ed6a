"""Name the blocks of each fused TIR function after the function alone, not after the model's Relax variables.

LegalizeOps names some blocks after the Relax variable they read (``lv1420_red``, ``lv3_mean``), so one
workload in two models (cyclemlp_b1's last mean pooling is cyclemlp_b2's) has blocks of other names.
MetaSchedule finds a workload by its structure, but a tuning record's trace finds blocks by name: a record
tuned in one model did not replay in the other. Each ``lv<N>`` becomes ``lv<k>``, k counting the distinct
variables in the order their blocks appear in the function.
"""
from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import s_tir, tirx

_RELAX_VAR = re.compile(r"lv\d+")


def _canonical_blocks(func: tirx.PrimFunc) -> tirx.PrimFunc:
    numbers: dict[str, str] = {}

    def rename(block: s_tir.SBlock) -> s_tir.SBlock:
        name = _RELAX_VAR.sub(lambda m: numbers.setdefault(m.group(0), f"lv{len(numbers)}"), block.name_hint)
        if name == block.name_hint:
            return block
        return s_tir.SBlock(block.iter_vars, block.reads, block.writes, name, block.body, block.init,
                            block.alloc_buffers, block.match_buffers, block.annotations, block.span)

    return tvm_ffi.structural_map(func, [(s_tir.SBlock, rename)], order="pre")


def canonicalize_block_names(mod: tvm.IRModule) -> tvm.IRModule:
    out = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            out.update_func(gv, _canonical_blocks(func))
    return out
