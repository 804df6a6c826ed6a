"""Apply a list of schedule rules to every unscheduled function of a module, recording which rule took each.

The first rule that applies schedules the function (as ``dl.ApplyDefaultSchedule`` does); the function then
carries the rule's name and, where it has one, the shape of its contraction (``scheduled.RULE_ATTR``,
``scheduled.CONTRACTION_ATTR``), so the build can say per kernel what scheduled it, and check that no conv or
matmul was left to a generic rule. Used for the CPU and the CUDA default rules alike.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from .scheduled import is_scheduled, mark_scheduled
from .workload import contraction


def rule_name(rule: ScheduleRule) -> str:
    """dlight's rules by their dlight path ("dlight.gpu.Matmul"), ours by class name."""
    module = type(rule).__module__
    if module.startswith("tvm.s_tir.dlight."):
        return f"dlight.{module.split('.')[3]}.{type(rule).__name__}"
    return type(rule).__name__


class _Recorded(ScheduleRule):
    def __init__(self, rule: ScheduleRule, counts: Counter):
        self.rule, self.name, self.counts = rule, rule_name(rule), counts

    def apply(self, func, target, tunable):
        result = self.rule.apply(func, target, tunable)
        if result is None:
            return None
        sch = result[0] if isinstance(result, list | tuple) else result
        # ApplyDefaultSchedule keeps sch.mod["main"]: the marks go there (it adds tirx.is_scheduled itself)
        sch.mod["main"] = mark_scheduled(sch.mod["main"], self.name, contraction(func))
        self.counts[self.name] += 1
        return sch


def apply_rules(mod: tvm.IRModule, target: tvm.target.Target, rules: list[ScheduleRule]
                ) -> tuple[tvm.IRModule, dict]:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule that fits; return the new module
    and a report: functions scheduled per rule, already scheduled before, and those no rule fit."""
    before = {gv.name_hint: is_scheduled(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    counts: Counter = Counter()
    with target:  # on a clone: ApplyDefaultSchedule also rewrites the module object it is given
        out = dl.ApplyDefaultSchedule(*[_Recorded(r, counts) for r in rules])(mod.clone())
    unscheduled = sorted(gv.name_hint for gv, f in out.functions_items()
                         if isinstance(f, tirx.PrimFunc) and not is_scheduled(f))
    report = {"rules": {rule_name(r): counts[rule_name(r)] for r in rules},
              "already_scheduled": sum(before.values()), "unscheduled": unscheduled}
    return out, report
