"""Default CUDA schedules: our rules first, then dlight's, each function marked with the rule that took it.

TVM's CUDA pipeline schedules with ``dl.ApplyDefaultSchedule(gpu.Matmul, GEMV, Reduction, GeneralReduction,
Fallback)``, which has no convolution rule. The optimize stage applies this list instead (the build pipeline's
own pass then finds everything scheduled):

* :class:`DepthwiseConv2d` (``depthwise_conv.py``): depthwise k x k convs (ConvMixer), shared-memory window;
* :class:`TensorCoreMatmul` (``tensor_core_matmul.py``): every float16 conv or matmul with N, K >= 64 and M >= 32
  on tensor cores (dlight's tensorizing schedule, which ``gpu.Matmul`` calls only when all three are above 64);
* dlight's ``gpu.Matmul`` takes the other strided and patch-embedding convs (its reindexed operands are the
  im2col tile in shared memory, never materialized in global memory) and every other matmul with M, N > 1;
* then dlight's GEMV / Reduction / GeneralReduction / Fallback for the rest (matrix-vector products,
  norms, softmax, elementwise).
"""
from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from ..apply import apply_rules
from .depthwise_conv import DepthwiseConv2d
from .tensor_core_matmul import TensorCoreMatmul

__all__ = ["DepthwiseConv2d", "TensorCoreMatmul", "default_rules", "apply_default_schedules"]


def default_rules() -> list[ScheduleRule]:
    """The rules in the order they are tried (the first that applies schedules the function)."""
    return [DepthwiseConv2d(), TensorCoreMatmul(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                            rules: list[ScheduleRule] | None = None) -> tuple[tvm.IRModule, dict]:
    return apply_rules(mod, target, default_rules() if rules is None else rules)
