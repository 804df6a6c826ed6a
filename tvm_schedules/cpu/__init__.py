"""Default CPU schedules for an untuned build: dlight-style rules for the fused TIR functions.

TVM 0.27's llvm pipeline schedules nothing and ``dlight.cpu`` has only GEMV and Reduction rules, so an
untuned CPU build runs every fused function as naive scalar loops (100-300x slower than ONNX Runtime on
these models). These rules give each function a reasonable schedule without tuning:

* :class:`Contraction` (``contraction.py``): matmul / batch_matmul / conv2d (1x1, depthwise, patch
  embedding, strided) with their fused epilogues: register-tiled, vectorized, parallel;
* :class:`RowReduction` (``reduction.py``): layer_norm, softmax, mean: parallel over rows, vectorized
  injective parts;
* :class:`Injective` (``injective.py``): elementwise / reshape / transpose chains: inlined into one loop
  nest, parallel + vectorized.

Each rule is a ``tvm.s_tir.dlight`` ``ScheduleRule`` (usable in ``dl.ApplyDefaultSchedule``); functions
already scheduled (``tirx.is_scheduled``: our CycleFC kernel, tuning records) are left alone.
:func:`apply_default_schedules` applies them in that order and counts what each scheduled.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from ..scheduled import is_scheduled
from .contraction import Contraction
from .injective import Injective
from .isa import cpu_tiles, cpu_vector_lanes
from .reduction import RowReduction

__all__ = ["Contraction", "RowReduction", "Injective", "default_rules", "apply_default_schedules",
           "cpu_tiles", "cpu_vector_lanes"]


def default_rules() -> list[ScheduleRule]:
    """The rules in the order they are tried (the first that applies schedules the function)."""
    return [Contraction(), RowReduction(), Injective()]


class _Counted(ScheduleRule):
    def __init__(self, rule: ScheduleRule, counts: Counter):
        self.rule, self.counts = rule, counts

    def apply(self, func, target, tunable):
        result = self.rule.apply(func, target, tunable)
        if result is not None:
            self.counts[type(self.rule).__name__] += 1
        return result


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                            rules: list[ScheduleRule] | None = None) -> tuple[tvm.IRModule, dict]:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule that fits; return the new module
    and a report: functions scheduled per rule, already scheduled before, and those no rule fit."""
    rules = default_rules() if rules is None else rules
    before = {gv.name_hint: is_scheduled(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    counts: Counter = Counter()
    with target:  # on a clone: ApplyDefaultSchedule also rewrites the module object it is given
        out = dl.ApplyDefaultSchedule(*[_Counted(r, counts) for r in rules])(mod.clone())
    unscheduled = sorted(gv.name_hint for gv, f in out.functions_items()
                         if isinstance(f, tirx.PrimFunc) and not is_scheduled(f))
    report = {"rules": {type(r).__name__: counts[type(r).__name__] for r in rules},
              "already_scheduled": sum(before.values()), "unscheduled": unscheduled}
    return out, report
