"""Stage: our graph rewrites between import and build (tuning records will slot in here)."""
from __future__ import annotations

import numpy as np
import tvm

from targets import TargetSpec
from tvm_schedules.passes.rewrite_cyclefc import rewrite_cyclefc
from .build import tvm_target

# Each pass: (mod, params, tvm target) -> (mod, params, report). Applied to every model, in this order.
GRAPH_PASSES = (rewrite_cyclefc,)


def optimize(mod: tvm.IRModule, params: dict[str, np.ndarray], target: TargetSpec
             ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Return the rewritten module, the params it still needs, and each pass's report by name."""
    reports = {}
    for graph_pass in GRAPH_PASSES:
        mod, params, reports[graph_pass.__name__] = graph_pass(mod, params, tvm_target(target))
    return mod, params, reports
