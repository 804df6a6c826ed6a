"""Stage: write the artifact's data files and its manifest, the manifest last."""
from __future__ import annotations

import dataclasses
import platform
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from models import ModelCfg
from targets import TargetSpec
from .. import paths, version
# The runtime's, so that a board checks the manifest and hashes alike.
from ..runtime import MANIFEST_SCHEMA, OutputCheck, build_id, sha256_file, write_manifest

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


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez``, byte for byte the same for the same arrays (savez stamps each member with the time), so
    that the files' sha256s, and with them the build_id, identify what was built."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def write_artifact(work: Path, *, model_name: str, cfg: ModelCfg, batch: int, weights: dict, target: TargetSpec,
                   inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], params: dict[str, np.ndarray],
                   checks: list[OutputCheck], ran: dict[str, str], library_run: str, tolerance: tuple[float, float],
                   passes: dict, build_report: dict, timings: dict[str, float]) -> dict:
    """Save inputs/outputs/params beside the ONNX files and library already in ``work``; write manifest.json.

    ``ran``: per runtime checked, what ran where (the verify stage's words); ``library_run``: whether and where
    the compiled library itself ran.
    """
    save_npz(work / "inputs.npz", inputs)
    save_npz(work / "outputs.npz", reference)
    save_npz(work / "params.npz", params)
    tuning = dict(passes["tuning"])  # optimize's apply step: database, records applied, to which functions
    tuning["database"] = paths.portable(tuning["database"])  # the manifest ships to boards: no build-host path
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "pipeline": version.describe(),
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
        "tuning": tuning,
        "tolerance": {"atol": tolerance[0], "rtol": tolerance[1]},  # what the library's outputs are held to
    }
    manifest["build_id"] = build_id(manifest)  # what was built; what follows is what was checked, and when
    library_checked = [c for c in checks if c.name.startswith("tvm/")]
    manifest["verify"] = {
        "reference": f"PyTorch {manifest['toolchain']['torch']} eager, float32, on this host's CPU",
        "passed": all(c.passed for c in checks),  # every check that ran
        "compiled_library": library_run,
        "library_verified": bool(library_checked) and all(c.passed for c in library_checked),
        "checks": ran,
        "outputs": [dataclasses.asdict(c) for c in checks],
    }
    manifest["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return write_manifest(work, manifest)
