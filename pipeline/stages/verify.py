"""Stage: compare every runtime's outputs against the PyTorch reference, saying for each what ran where.

The runtimes: ONNX Runtime on the simplified graph (float32: a witness of the export, not of our compiler); the
compiled library where this machine can run it (natively, or aarch64 under qemu-user); and where it cannot (a
CUDA library on a machine without a GPU), its *host twin*: the same imported module through the same optimize
stage (our rewrites, the same float16 mixed precision) built for this host's CPU and run here, which checks all
but the CUDA schedules and code generation.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import targets
from targets import TargetSpec
from ..emulation import EmulatorUnavailable, find_emulator, run_library_emulated
from ..errors import DegenerateReference, VerificationFailed
from ..runtime import OutputCheck, compare, run_library
from .build import build
from .optimize import optimize

# The build host's own target: where the twin of a library that cannot run here is built and run.
HOST_TARGET = "x86"


def run_onnxruntime(path: Path, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """ONNX Runtime's outputs on ``path`` and what ran."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, inputs), strict=True))
    return outputs, f"ONNX Runtime {ort.__version__} (CPU) on {path.name}, the float32 graph, on this host"


def run_host_twin(mod, params: dict[str, np.ndarray], fp16: bool, inputs: dict[str, np.ndarray],
                  output_names: tuple[str, ...], keep_fp32: frozenset[str], target: TargetSpec
                  ) -> tuple[dict[str, np.ndarray], str]:
    """The imported module ``mod`` optimized and built for this host's CPU, with the graph rewrites ``target``'s
    build makes, run here; its outputs and what ran."""
    host = targets.get_target(HOST_TARGET)
    twin, twin_params, _ = optimize(mod, params, host, fp16, keep_fp32, rewrites_as_for=target)
    with tempfile.TemporaryDirectory(prefix="pipeline-twin-") as tmp:
        build(twin, host, Path(tmp) / "twin.so")
        outputs = run_library(Path(tmp) / "twin.so", host.device, twin_params, inputs, output_names)
    precision = ", float16 mixed precision" if fp16 else ""
    return outputs, (f"host twin: the same module through the same optimize stage (our rewrites as for {target.name}"
                     f"{precision}) built for this host's CPU ({HOST_TARGET}) and run here; not the target's schedules "
                     "or code generation")


def why_not_run_here(target: TargetSpec) -> str | None:
    """Why this machine cannot run ``target``'s libraries (None: it can, natively or emulated)."""
    import tvm

    if target.runner == "host":
        return None if tvm.runtime.device(target.device).exist else f"no {target.device} device on this machine"
    if target.runner == "qemu-aarch64":
        try:
            find_emulator()
        except EmulatorUnavailable as e:
            return str(e)
        return None
    return f"{target.name} libraries run on the device only (see `pipeline deploy`)"


def run_compiled_library(target: TargetSpec, lib: Path, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                         output_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Run the library where this machine can (natively or emulated); return its outputs and how it ran."""
    reason = why_not_run_here(target)
    if reason is not None:
        return None, f"not run here: {reason}"
    if target.runner == "host":
        return run_library(lib, target.device, params, inputs, output_names), "ran on this host"
    return run_library_emulated(lib, params, inputs, output_names), "ran under qemu-aarch64 (user-mode emulation)"


def check_reference_varies(reference: dict[str, np.ndarray]) -> None:
    """A constant reference (e.g. a zero classifier head) would let any comparison pass."""
    flat = [name for name, v in reference.items() if v.size < 2 or float(np.ptp(v)) == 0.0]
    if flat:
        raise DegenerateReference(
            f"reference output(s) {', '.join(flat)} are constant, so the numerics check could not fail; "
            "re-draw the zero-initialised weights or load a real checkpoint")


def verify(reference: dict[str, np.ndarray], candidates: dict[str, dict[str, np.ndarray]],
           tolerances: dict[str, tuple[float, float]]) -> list[OutputCheck]:
    """Check every output of every candidate runtime against its (atol, rtol) with pipeline.runtime's rule, the one
    a board applies; raise one error listing all failures."""
    check_reference_varies(reference)
    checks = [
        compare(f"{runtime}/{name}", outputs.get(name, np.empty(0)), expected, *tolerances[runtime])
        for runtime, outputs in candidates.items()
        for name, expected in reference.items()
    ]
    failures = [c for c in checks if not c.passed]
    if failures:
        raise VerificationFailed(failures)
    return checks
