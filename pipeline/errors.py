"""Typed errors. Each one is a user-facing, one-line message that says what to do next."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class PipelineError(Exception):
    """Base of every error the CLI reports as one line and a non-zero exit."""

    exit_code = 1


class UnknownModel(PipelineError):
    exit_code = 2


class UnknownTarget(PipelineError):
    exit_code = 2


class WeightsError(PipelineError):
    """A checkpoint that cannot be read or does not fit the model."""

    exit_code = 2


class OutputDirError(PipelineError):
    """The artifact directory cannot be written."""

    exit_code = 2


class ExportError(PipelineError):
    """PyTorch -> ONNX export, the ONNX checker or onnxsim failed."""


class BuildError(PipelineError):
    """TVM import, optimization or build failed."""


@dataclass(frozen=True)
class OutputCheck:
    """One output compared against its reference."""

    name: str  # e.g. "tvm/logits" or "onnxruntime/logits"
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool

    def describe(self) -> str:
        from .runtime import describe  # the board-side runner prints checks the same way

        return describe(dataclasses.asdict(self))


class VerificationFailed(PipelineError):
    """Some outputs differ from the PyTorch reference beyond tolerance; lists every failure."""

    exit_code = 3

    def __init__(self, failures: list[OutputCheck]):
        self.failures = failures
        super().__init__("numerics check failed: " + "; ".join(f.describe() for f in failures))


class DegenerateReference(PipelineError):
    """The reference outputs do not vary, so comparing against them would prove nothing."""

    exit_code = 3
