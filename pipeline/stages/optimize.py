"""Stage: everything between import and build: our graph rewrites, then lowering to fused TIR
functions (the units MetaSchedule tunes), where tuning records and default schedules apply."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from targets import TargetSpec
from tvm_schedules.passes.rewrite_cyclefc import rewrite_cyclefc
from .build import tvm_target

# Each graph pass: (mod, params, tvm target) -> (mod, params, report). Applied to every model, in order.
GRAPH_PASSES = (rewrite_cyclefc,)


def lower_to_fused_tir(mod: tvm.IRModule) -> tvm.IRModule:
    """Legalize operators to TIR and fuse them, as the targets' default pipelines do first.

    Tuning tasks are extracted from, and records applied to, exactly these fused functions.
    """
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)


def optimize(mod: tvm.IRModule, params: dict[str, np.ndarray], target: TargetSpec, fp16: bool = False
             ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Return the optimized module, the params it still needs, and a report per step."""
    reports = {}
    for graph_pass in GRAPH_PASSES:
        mod, params, reports[graph_pass.__name__] = graph_pass(mod, params, tvm_target(target))
    if fp16:
        # After our rewrites: their kernels keep float32 (ToMixedPrecision leaves call_tir alone).
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
        reports["precision"] = "float16 (ToMixedPrecision: conv/matmul inputs and accumulators in float16)"
    return lower_to_fused_tir(mod), params, reports
