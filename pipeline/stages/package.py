"""Stage: write the artifact's data files and its manifest, the manifest last."""
from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from models import ModelCfg
from targets import TargetSpec
from ..runtime import MANIFEST_SCHEMA, OutputCheck, sha256_file  # the runtime's: a board hashes alike
from ..spec import canonical_json, sha256_bytes

TOOLCHAIN_PACKAGES = ("torch", "onnx", "onnxsim", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "numpy")


def toolchain_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in TOOLCHAIN_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def tensor_specs(arrays: dict[str, np.ndarray]) -> list[dict]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()]


def write_artifact(work: Path, *, model_name: str, cfg: ModelCfg, batch: int, weights: dict, target: TargetSpec,
                   inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], params: dict[str, np.ndarray],
                   checks: list[OutputCheck], tolerance: tuple[float, float], library_run: str, passes: dict,
                   build_report: dict,
                   timings: dict[str, float]) -> dict:
    """Save inputs/outputs/params beside the ONNX files and library already in ``work``; write manifest.json."""
    np.savez(work / "inputs.npz", **inputs)
    np.savez(work / "outputs.npz", **reference)
    np.savez(work / "params.npz", **params)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "model": {"name": model_name, **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("atol", "rtol")},
                  "batch": batch, "weights": weights},
        "target": {"name": target.name, "tvm_target": target.tvm_target, "tvm_host": target.tvm_host,
                   "device": target.device, "build": build_report},
        "toolchain": toolchain_versions(),
        "inputs": tensor_specs(inputs),
        "outputs": tensor_specs(reference),
        "params": list(params),  # the library's weight arguments, in call order
        "files": {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()},
        "passes": {step: report for step, report in passes.items() if step != "tuning"},
        "tuning": passes["tuning"],  # optimize's apply step: database, records applied, to which functions
        "verify": {"passed": all(c.passed for c in checks), "reference": "pytorch", "compiled_library": library_run,
                   "tolerance": {"atol": tolerance[0], "rtol": tolerance[1]},  # what the library is held to
                   "outputs": [dataclasses.asdict(c) for c in checks]},
    }
    manifest["build_id"] = sha256_bytes(canonical_json(manifest).encode())
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}  # outside build_id: varies per run
    text = json.dumps(manifest, indent=2) + "\n"
    (work / "manifest.json").write_text(text)
    return json.loads(text)
