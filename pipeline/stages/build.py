"""Stage: compile the Relax module for the target and export one shared library."""
from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from targets import TargetSpec
from ..errors import BuildError


def tvm_target(spec: TargetSpec) -> tvm.target.Target:
    return tvm.target.Target(spec.tvm_target)


def build(mod: tvm.IRModule, spec: TargetSpec, path: Path) -> Path:
    target = tvm_target(spec)
    try:
        # The target's default pipeline fuses operators; tvm.compile's CPU default does not.
        executable = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
        executable.export_library(str(path))
    except tvm.TVMError as e:
        raise BuildError(f"TVM build for {spec.name} failed: {str(e).splitlines()[0]}") from e
    return path
