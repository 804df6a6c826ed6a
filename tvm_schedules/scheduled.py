"""The mark that says a TIR function is scheduled already: the default schedules, tuning and TVM's own
pipelines leave such a function alone (our hand-written kernels, applied tuning records)."""
from __future__ import annotations

from tvm import tirx

SCHEDULED_ATTR = "tirx.is_scheduled"


def is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR])


def mark_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attr(SCHEDULED_ATTR, True)
