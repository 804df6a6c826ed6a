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
:func:`apply_default_schedules` applies them in that order, marks each function with the rule that took it
and counts what each scheduled.
"""
from __future__ import annotations

import tvm
from tvm.s_tir.dlight.base import ScheduleRule

from ..apply import apply_rules
from .contraction import Contraction
from .injective import Injective
from .isa import cpu_tiles, cpu_vector_lanes
from .reduction import RowReduction

__all__ = ["Contraction", "RowReduction", "Injective", "default_rules", "apply_default_schedules",
           "cpu_tiles", "cpu_vector_lanes"]


def default_rules() -> list[ScheduleRule]:
    """The rules in the order they are tried (the first that applies schedules the function)."""
    return [Contraction(), RowReduction(), Injective()]


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                            rules: list[ScheduleRule] | None = None) -> tuple[tvm.IRModule, dict]:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule that fits (``apply.apply_rules``:
    the report counts what each rule scheduled)."""
    return apply_rules(mod, target, default_rules() if rules is None else rules)
