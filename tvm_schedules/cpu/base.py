"""The base of the default CPU rules: a dlight ``ScheduleRule`` for llvm targets that skips functions already
scheduled, makes the function's math vectorizable, and turns "this rule does not fit" into ``None``."""
from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from ..scheduled import is_scheduled
from .common import NotApplicable, is_cpu
from .fast_math import vectorizable_math

logger = logging.getLogger("tvm_schedules.cpu")


class CPURule(ScheduleRule):
    """Subclasses implement ``schedule(func, target) -> Schedule`` and raise ``NotApplicable`` when the
    function is not theirs. A schedule primitive refusing (ScheduleError) also means "not applicable":
    default schedules must never break a build, and the function then stays as it was."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or is_scheduled(func):
            return None
        try:
            return self.schedule(vectorizable_math(func), target)
        except NotApplicable:
            return None
        except RuntimeError as e:  # ScheduleError, InternalError from a primitive
            logger.debug("%s did not schedule %s: %s", type(self).__name__, _name(func), str(e).splitlines()[0:1])
            return None
        except Exception:  # a bug in a rule: leave the function unscheduled rather than fail the build
            logger.warning("%s failed on %s; left unscheduled", type(self).__name__, _name(func), exc_info=True)
            return None

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return is_cpu(target)

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule:
        raise NotImplementedError


def _name(func: tirx.PrimFunc) -> str:
    return str(func.attrs.get("global_symbol", "?")) if func.attrs is not None else "?"
