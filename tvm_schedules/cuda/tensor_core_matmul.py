"""Tensor cores for every float16 conv or matmul whose N and K reach 64 and M 32, including the ones dlight's
``gpu.Matmul`` leaves on CUDA cores.

``dl.gpu.Matmul`` tensorizes only when every non-batch extent (I, J, K of its normalized matmul) is above 64
(``minimal_tensorize_threshold`` in tvm/s_tir/dlight/gpu/matmul.py): CycleMLP's stage 1 (64 channels: its
CycleFC projections, channel-MLP fc2 and the 7x7/s4 stem with N = 64) and stage 4 (7x7 = 49 pixels) stayed on
CUDA cores. The tensorizing schedule it calls, ``MatmulTensorization`` (wmma 16x16x16 fragments, float32
accumulators where the contraction accumulates in float32), pads I and J to its 128 x 128 block tile and K to
64 in shared memory, so it takes any extent. The padding is symmetric in M and N: a tile with M (or N) rows
real does M/128 of its MMA work usefully, so tensor cores win while their float16 MMA rate is more than 128/M
times the CUDA cores' FMA rate. For N and K the minimum stays 64 (at most half padding, as it was; N could go
lower by the same argument, untried: cyclemlp_b1 and mixer_s16_224 have N from 32 to 63 only with M = 1).
M, the pixel / token side, goes down to 32: at least a quarter of the work is real, which needs a rate ratio above
4; the datasheet ratios of dense float16 tensor-core to float32 CUDA-core throughput are about 8 on V100 (125 vs
15.7 TFLOPS) and 16 on A100 (312 vs 19.5); not measured here (no GPU), and not known here for Orin's sm_87. M = 16
would need 8, no margin: left to ``gpu.Matmul``. cyclemlp_b1's extents below 64 are M = 49 (7x7 pixels, stage 4; N
and K 512 to 2880) and M = 1 (matrix-vector products).
"""
from __future__ import annotations

import tvm
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization, check_sm_version

from ..workload import contraction

# The smallest N and K, and the smallest M, that go to tensor cores (module docstring); the build holds every
# float16 contraction this large to tensor-core instructions in its SASS (pipeline.stages.build.schedule_gaps).
MIN_EXTENT = 64
MIN_M = 32


def has_tensor_cores(arch: str) -> bool:
    """wmma: Volta (sm_70) and later."""
    return check_sm_version(arch) >= 70


def large_enough(shape: dict) -> bool:
    """Whether a contraction (workload.contraction's shape) is large enough for tensor cores."""
    return shape["m"] >= MIN_M and min(shape["n"], shape["k"]) >= MIN_EXTENT


class TensorCoreMatmul(ScheduleRule):
    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tvm.tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        if not has_tensor_cores(str(target.attrs.get("arch", ""))):
            return None
        shape = contraction(func)
        if shape is None or shape["dtype"] != "float16" or not large_enough(shape):
            return None
        return MatmulTensorization().apply(func, target, tunable)
