"""The mark that says a TIR function is scheduled already: the default schedules, tuning and TVM's own
pipelines leave such a function alone (our hand-written kernels, applied tuning records). Beside it, what
scheduled the function (a rule's name, "CycleFC", "tuning record") and the shape of its contraction
(``workload.contraction``), which the build reports and checks per kernel."""
from __future__ import annotations

from tvm import tirx

SCHEDULED_ATTR = "tirx.is_scheduled"
RULE_ATTR = "tvm_schedules.rule"
CONTRACTION_ATTR = "tvm_schedules.contraction"


def is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR])


def mark_scheduled(func: tirx.PrimFunc, rule: str | None = None, contraction: dict | None = None) -> tirx.PrimFunc:
    func = func.with_attr(SCHEDULED_ATTR, True)
    if rule is not None:
        func = func.with_attr(RULE_ATTR, rule)
    if contraction is not None:
        func = func.with_attr(CONTRACTION_ATTR, contraction)
    return func


def scheduled_by(func: tirx.PrimFunc) -> tuple[str | None, dict | None]:
    """(rule, contraction) as marked, Python values; (None, None) for a function scheduled unmarked."""
    attrs = func.attrs if func.attrs is not None else {}
    rule = str(attrs[RULE_ATTR]) if RULE_ATTR in attrs else None
    shape = attrs[CONTRACTION_ATTR] if CONTRACTION_ATTR in attrs else None
    if shape is not None:
        shape = {str(k): (str(v) if isinstance(v, str) else int(v)) for k, v in shape.items()}
    return rule, shape
