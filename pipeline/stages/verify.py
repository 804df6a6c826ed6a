"""Stage: compare every runtime's outputs against the PyTorch reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from targets import TargetSpec
from ..emulation import EmulatorUnavailable, run_library_emulated
from ..errors import DegenerateReference, VerificationFailed
from ..runtime import OutputCheck, compare, run_library


def run_onnxruntime(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def run_compiled_library(target: TargetSpec, lib: Path, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                         output_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Run the library where this machine can (natively or emulated); return its outputs and how it ran."""
    import tvm

    if target.runner == "host":
        if not tvm.runtime.device(target.device).exist:
            return None, f"not run here: no {target.device} device on this machine"
        return run_library(lib, target.device, params, inputs, output_names), "ran on this host"
    if target.runner == "qemu-aarch64":
        try:
            return run_library_emulated(lib, params, inputs, output_names), "ran under qemu-aarch64 (user-mode emulation)"
        except EmulatorUnavailable as e:
            return None, f"not run here: {e}"
    return None, f"not run here: {target.name} libraries run on the device only (see `pipeline deploy`)"


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
