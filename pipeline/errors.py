"""Typed errors: each a user-facing, one-line message that says what to do next.

The exit-code tree is the class tree (README, "Errors"): every error subclasses one of

    PipelineError       1  a failure of another kind
      BadInput          2  a name, option, file, bundle or board that cannot be used
      NumericsFailed    3  outputs differ from the reference (or the check could prove nothing)
      SlowerThanBaseline 4 a model is slower than its latency baseline
      NotJudged         5  latency not judged (machine too busy; rerun)

(130, interrupted, is the CLI's). The tree is defined in pipeline.runtime, which ships alone as a bundle's
run.py; the errors below are the compile's, each other one lives next to the code that raises it.
"""
from __future__ import annotations

from .runtime import (BadInput, BundleError, NotJudged, NumericsFailed, PipelineError,  # noqa: F401 - re-exported
                      RuntimeUnavailable, SlowerThanBaseline, VerificationFailed)


class UnknownModel(BadInput):
    pass


class UnknownTarget(BadInput):
    pass


class WeightsError(BadInput):
    """A checkpoint that cannot be read or does not fit the model."""


class OutputDirError(BadInput):
    """The artifact directory cannot be written."""


class ExportError(PipelineError):
    """PyTorch -> ONNX export, the ONNX checker or onnxsim failed."""


class BuildError(PipelineError):
    """TVM import, optimization or build failed."""


class DiskFull(PipelineError):
    """No space left where the compile writes (the artifact's directory, or the temporary one TVM builds in)."""


class DegenerateReference(NumericsFailed):
    """The reference outputs do not vary, so comparing against them would prove nothing."""
