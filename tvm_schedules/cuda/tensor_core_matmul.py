"""Tensor cores for every float16 conv or matmul whose M, N and K reach 64, including the 64-wide ones dlight's
``gpu.Matmul`` leaves on CUDA cores.

``dl.gpu.Matmul`` tensorizes only when every non-batch extent (I, J, K of its normalized matmul) is above 64
(``minimal_tensorize_threshold`` in tvm/s_tir/dlight/gpu/matmul.py): CycleMLP's stage 1 (64 channels: its
CycleFC projections, channel-MLP fc2 and the 7x7/s4 stem with N = 64) stayed on CUDA cores. The tensorizing
schedule it calls, ``MatmulTensorization`` (wmma 16x16x16 fragments, float32 accumulators where the
contraction accumulates in float32), pads I and J to its 128 x 128 block tile and K to 64 in shared memory, so
it takes any extent; from 64 on, at most half of a tile's MMA work is padding, which tensor cores still do
faster than CUDA cores do the real work. Below that the padding outweighs the gain: left to ``gpu.Matmul``.
"""
from __future__ import annotations

import tvm
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization, check_sm_version

from ..workload import contraction

# The smallest M, N and K that go to tensor cores; the build holds every float16 contraction this large to
# tensor-core instructions in its SASS (pipeline.stages.build.schedule_gaps).
MIN_EXTENT = 64


def has_tensor_cores(arch: str) -> bool:
    """wmma: Volta (sm_70) and later."""
    return check_sm_version(arch) >= 70


class TensorCoreMatmul(ScheduleRule):
    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        if not isinstance(func, tvm.tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        if not has_tensor_cores(str(target.attrs.get("arch", ""))):
            return None
        shape = contraction(func)
        if shape is None or shape["dtype"] != "float16" or min(shape["m"], shape["n"], shape["k"]) < MIN_EXTENT:
            return None
        return MatmulTensorization().apply(func, target, tunable)
