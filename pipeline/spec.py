"""What a command is asked to do: the build (BuildSpec, resolved to its target) and the board it talks to."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import targets
from .errors import BadInput, UnknownTarget
from .toolchain.cuda_toolchains import arch_problem, get_toolchain


@dataclass(frozen=True)
class BuildSpec:
    model: str
    target: str
    batch: int = 1
    weights: Path | None = None  # a state_dict checkpoint; None means seeded random weights
    seed: int = 0  # seeds random weights and the reference inputs
    cuda_arch: str | None = None  # overrides the generic cuda target's arch
    fp16: bool = False  # compute in float16 (inputs, outputs and params stay float32 at the boundary)
    keep_export: bool = False  # keep model.onnx, the unsimplified export (model.sim.onnx is what was compiled)
    # With fp16: layers computed in float32 all the same, as module paths, fnmatch patterns or kinds
    # (pipeline.stages.layers.keep_float32_layers)
    keep_fp32: tuple[str, ...] = ()


class BadCudaArch(BadInput):
    """--cuda-arch for a target without a choice of GPU, or an arch its toolchain cannot compile for."""


def resolve_target(spec: BuildSpec) -> targets.TargetSpec:
    """The target ``spec`` builds for, its ``--cuda-arch`` applied and checked before any work is done."""
    try:
        target = targets.get_target(spec.target)
    except targets.UnknownTargetError as e:
        raise UnknownTarget(str(e)) from None
    if spec.fp16 and not target.float16_arithmetic:
        raise BadInput(f"{target.name} ({target.description}) has no float16 arithmetic (no +fullfp16): --fp16 would "
                       "widen every operation to float32 and back; compile without --fp16")
    if spec.keep_fp32 and not spec.fp16:
        raise BadInput("--keep-fp32 keeps layers in float32 in a float16 build: add --fp16")
    if spec.cuda_arch is None:
        return target
    try:
        target = target.with_cuda_arch(spec.cuda_arch)
    except ValueError as e:
        raise BadCudaArch(str(e)) from None
    problem = arch_problem(target.cuda.arch, get_toolchain(target.cuda.toolchain))
    if problem:
        raise BadCudaArch(f"--cuda-arch: {problem}")
    return target


@dataclass(frozen=True)
class Board:
    """A TVM RPC server at host:port, or, with ``tracker_key``, the server a tracker at host:port assigns."""

    host: str
    port: int
    tracker_key: str | None = None

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}"
        return where if self.tracker_key is None else f"key {self.tracker_key!r} via tracker {where}"
