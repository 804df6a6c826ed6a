"""Run a compiled artifact: the half of the pipeline that runs on a board.

Needs only the Python standard library (3.10+), numpy and the TVM runtime: no compiler, torch, onnx
or other pipeline module, so this one file runs on a board. `python -m pipeline package` copies it
into every bundle as run.py:

    python3 run.py [--repeat N] [--warmup N]                    # inside an extracted bundle
    python3 -m pipeline.runtime BUNDLE_OR_DIR [--repeat N]      # a bundle file, or an artifact directory

It checks the manifest (against manifest.sha256, its build_id, and with --public-key its signature
manifest.sig) and every file against its sha256 in the manifest before loading anything, runs the model with
the reference inputs, compares the outputs with the reference outputs at the tolerance recorded in
the manifest, and prints the latency (median and p90 over --repeat runs after --warmup runs).
Exit status: 0 ok, 1 this machine cannot run it, 2 bad or tampered bundle, 3 outputs differ.

`pipeline deploy` runs the same functions against a board's TVM RPC session.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import numpy as np
except ImportError:  # said as one line by main(): a board without numpy
    np = None

if TYPE_CHECKING:
    import tvm
    from tvm.runtime.vm import VirtualMachine

MANIFEST = "manifest.json"
# 3: build_id over what was built only (BUILD_ID_EXCLUDES), the tolerance beside it, manifest.sha256, pipeline
# version and commit, per-check provenance in verify
MANIFEST_SCHEMA = 3
MANIFEST_SEAL = "manifest.sha256"  # `sha256sum -c manifest.sha256` checks it without Python
SIGNATURE = "manifest.sig"  # optional: an Ed25519 signature of manifest.json's bytes (package --sign)
# What a manifest holds that is not what was built: results of checks, timings, provenance of the file itself.
BUILD_ID_EXCLUDES = ("build_id", "verify", "timings_s", "created_at", "bundle")
RUNNER = "run.py"  # this file, inside a bundle
LIBRARY = "lib.so"
# What a run reads besides the manifest; a bundle carries exactly these, the manifest and the runner.
RUN_FILES = (LIBRARY, "params.npz", "inputs.npz", "outputs.npz")
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*\Z")  # one path component: no "/", no "..", no dotfile


# ---------------------------------------------------------------------------------------------------------------
# Errors and exit codes: the project's whole tree. It is defined here because this file ships alone as a bundle's
# run.py; pipeline.errors re-exports it, and every other error subclasses one of these five.


class PipelineError(Exception):
    """Base of every error reported as one line and a non-zero exit (1: a failure of another kind)."""

    exit_code = 1


class BadInput(PipelineError):
    """What the user gave cannot be used: a name, an option, a file, a bundle, a board of another kind."""

    exit_code = 2


class NumericsFailed(PipelineError):
    """Outputs differ from the reference, or the check could prove nothing."""

    exit_code = 3


class SlowerThanBaseline(PipelineError):
    """A model is slower than its latency baseline."""

    exit_code = 4


class NotJudged(PipelineError):
    """A latency could not be judged (the machine was too busy); rerun."""

    exit_code = 5


class BundleError(BadInput):
    """A bundle or artifact directory that is malformed, unsafe or fails its hash check."""


class RuntimeUnavailable(PipelineError):
    """This TVM runtime cannot run the library here (no TVM, no device support, or no device)."""


@dataclass(frozen=True)
class OutputCheck:
    """One output compared against its reference (the allclose rule, see :func:`compare`)."""

    name: str  # e.g. "tvm/logits", or "logits" on a board
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    # What the rule compares: max |actual - expected| / (atol + rtol |expected|); passing is <= 1 (and all finite).
    allclose: float = float("inf")

    def describe(self) -> str:
        return (f"{self.name}: max_abs {self.max_abs:.3g}, allclose {self.allclose:.3g} of 1 "
                f"(|a-b| <= atol {self.atol:g} + rtol {self.rtol:g} |b|) {'ok' if self.passed else 'FAILED'}")


class VerificationFailed(NumericsFailed):
    """Some outputs differ from the reference beyond tolerance; lists every failure."""

    def __init__(self, failures: list[OutputCheck], summary: str = "numerics check failed"):
        self.failures = failures
        super().__init__(f"{summary}: " + "; ".join(f.describe() for f in failures))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def extract_bundle(bundle: Path, dest: Path) -> Path:
    """Extract a bundle file (.tar, .tar.gz) into ``dest`` (made if missing); return the bundle directory in it.

    Only the layout `pipeline package` writes is accepted: one top directory of regular files with
    plain names. Every member is checked before anything is written; absolute paths, ``..``, links,
    devices and subdirectories are refused, and files are created exclusively inside a directory made
    here, so nothing is ever written outside ``dest``.
    """
    try:
        tar = tarfile.open(bundle, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{bundle} is not a readable bundle ({e}); make one with `python -m pipeline package`") from None
    with tar:
        members = tar.getmembers()
        tops, files = set(), []
        for member in members:
            parts = member.name.split("/")
            plain = all(PLAIN_NAME.match(part) for part in parts)
            if plain and len(parts) == 1 and member.isdir():
                tops.add(parts[0])
            elif plain and len(parts) == 2 and member.isreg():
                tops.add(parts[0])
                files.append(member)
            else:
                kind = "a link" if member.issym() or member.islnk() else "not a plain file in the bundle's directory"
                raise BundleError(f"{bundle}: refusing to extract member {member.name!r} ({kind}); "
                                  "only bundles from `python -m pipeline package` are accepted")
        names = [m.name for m in files]
        if len(tops) != 1 or len(set(names)) != len(names):
            raise BundleError(f"{bundle}: expected one directory of distinct files, found {sorted(tops) or 'none'}; "
                              "only bundles from `python -m pipeline package` are accepted")
        directory = Path(dest) / tops.pop()
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            raise BundleError(f"{directory} already exists; extract into an empty directory") from None
        for member in files:
            with tar.extractfile(member) as src, open(directory / Path(member.name).name, "xb") as dst:
                shutil.copyfileobj(src, dst)
    return directory


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def build_id(manifest: dict) -> str:
    """What identifies a build: the sha256 of everything the manifest says was built (inputs, toolchain, target,
    files, tolerance), not of what was checked or measured afterwards."""
    built = {k: v for k, v in manifest.items() if k not in BUILD_ID_EXCLUDES}
    return hashlib.sha256(canonical_json(built).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Write manifest.json and its seal manifest.sha256 (sha256sum format) into ``directory``; return the manifest
    as read back."""
    text = json.dumps(manifest, indent=2) + "\n"
    (Path(directory) / MANIFEST).write_text(text)
    (Path(directory) / MANIFEST_SEAL).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")
    return json.loads(text)


def read_manifest(directory: Path, public_key: Path | None = None) -> dict:
    """The manifest of ``directory``, once it is intact: its sha256 matches manifest.sha256 and its build_id its
    content; with ``public_key`` (PEM, Ed25519) also its signature manifest.sig."""
    path = Path(directory) / MANIFEST
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise BundleError(f"{directory} has no readable {MANIFEST} ({e}); give an artifact directory or a bundle "
                          "from `python -m pipeline package`") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BundleError(f"{directory}: its manifest has schema {found}, this runtime reads schema {MANIFEST_SCHEMA}; "
                          "compile the model again with this version of pipeline")
    try:
        sealed = (Path(directory) / MANIFEST_SEAL).read_text().split()[0]
    except (OSError, IndexError):
        raise BundleError(f"{directory} has no {MANIFEST_SEAL}, so its manifest cannot be checked; "
                          "use an intact copy (or compile it again)") from None
    if hashlib.sha256(data).hexdigest() != sealed or manifest.get("build_id") != build_id(manifest):
        raise BundleError(f"{path} was modified after the build (it does not match {MANIFEST_SEAL} or its build_id); "
                          "use an intact copy (or compile it again)")
    if public_key is not None:
        verify_signature(Path(directory), data, public_key)
    return manifest


def verify_signature(directory: Path, data: bytes, public_key: Path) -> None:
    """BundleError unless manifest.sig is an Ed25519 signature of ``data`` by ``public_key``'s private key."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise RuntimeUnavailable("checking a signature needs the `cryptography` package: pip install cryptography") from None
    try:
        key = load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the public key {public_key} ({e}); give an Ed25519 public key in PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{public_key} is not an Ed25519 public key")
    try:
        key.verify((directory / SIGNATURE).read_bytes(), data)
    except FileNotFoundError:
        raise BundleError(f"{directory} is not signed (no {SIGNATURE}) but a public key was given; "
                          "sign it with `python -m pipeline package --sign KEY`") from None
    except InvalidSignature:
        raise BundleError(f"{directory}/{SIGNATURE} is not a signature of its manifest by {public_key}: "
                          "the bundle was changed, or signed with another key") from None


def verify_files(directory: Path, manifest: dict) -> None:
    """Raise BundleError unless every file in ``directory`` is one the manifest lists, with its sha256.

    The manifest, its seal and signature and the runner are the only files it does not list; the files a run
    needs must be there.
    """
    expected = {**manifest.get("files", {}), **manifest.get("bundle", {}).get("files", {})}
    problems = [f"{name} is missing" for name in RUN_FILES if not (Path(directory) / name).exists()]
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_symlink() or not entry.is_file():
            problems.append(f"{entry.name} is not a regular file")
        elif entry.name in (MANIFEST, MANIFEST_SEAL, SIGNATURE, RUNNER):
            continue
        elif entry.name not in expected:
            problems.append(f"{entry.name} is not listed in the manifest")
        elif sha256_file(entry) != expected[entry.name]:
            problems.append(f"{entry.name} does not match its sha256 in the manifest (modified or corrupted)")
    if problems:
        raise BundleError(f"{directory} fails its manifest check: " + "; ".join(problems)
                          + "; use an intact copy (or compile it again)")


def load_arrays(directory: Path, manifest: dict) -> tuple[dict[str, np.ndarray], ...]:
    """(params, inputs, reference outputs), each in the order the manifest lists them (the call order)."""
    order = {"params.npz": manifest["params"], "inputs.npz": [t["name"] for t in manifest["inputs"]],
             "outputs.npz": [t["name"] for t in manifest["outputs"]]}
    arrays = []
    for file, names in order.items():
        with np.load(Path(directory) / file, allow_pickle=False) as z:
            arrays.append({name: z[name] for name in names})
    return tuple(arrays)


def tolerances(manifest: dict) -> dict[str, tuple[float, float]]:
    """(atol, rtol) per output name: what the compiled library is held to (the variant's float32 or float16
    tolerance), also where the compile could not run it (a CUDA library built on a machine without a GPU)."""
    tolerance = manifest["tolerance"]
    return {output["name"]: (tolerance["atol"], tolerance["rtol"]) for output in manifest["outputs"]}


def compare(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Pass iff |actual - expected| <= atol + rtol * |expected| everywhere (numpy.allclose) and all finite.

    The one rule of the project: the compile's verify stage, bench, deploy and a board's run.py apply it alike.
    max_rel divides by max(|expected|, atol) so near-zero references do not blow it up.
    """
    if actual.shape != expected.shape:
        return OutputCheck(name, tuple(actual.shape), float("inf"), float("inf"), atol, rtol, False)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    magnitude = np.abs(expected.astype(np.float64))
    passed = bool(np.all(diff <= atol + rtol * magnitude)) and bool(np.all(np.isfinite(actual)))
    max_abs = float(np.max(diff)) if diff.size else 0.0
    max_rel = float(np.max(diff / np.maximum(magnitude, atol))) if diff.size else 0.0
    allclose = float(np.max(diff / (atol + rtol * magnitude))) if diff.size else 0.0
    return OutputCheck(name, tuple(expected.shape), max_abs, max_rel, atol, rtol, passed,
                       allclose if np.all(np.isfinite(actual)) else float("inf"))


def check_outputs(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], manifest: dict,
                  prefix: str = "") -> list[OutputCheck]:
    """Compare every reference output with the library's, at the manifest's tolerances (names: ``prefix + name``)."""
    limits = tolerances(manifest)
    return [compare(prefix + name, outputs.get(name, np.empty(0)), expected, *limits[name])
            for name, expected in reference.items()]


def require_outputs_match(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], manifest: dict,
                          prefix: str = "", summary: str = "numerics check failed") -> list[OutputCheck]:
    """:func:`check_outputs`, raising one VerificationFailed that lists every failing output."""
    checks = check_outputs(outputs, reference, manifest, prefix)
    failures = [c for c in checks if not c.passed]
    if failures:
        raise VerificationFailed(failures, summary)
    return checks


THREADS_ENV = "TVM_NUM_THREADS"  # read once, when TVM's thread pool starts (at a process's first parallel run)


def use_threads(threads: int) -> None:
    """Size TVM's thread pool in this process (before its first run): left alone, TVM takes half the CPUs on x86."""
    os.environ[THREADS_ENV] = str(threads)


def _load_device_runtime(device: str) -> None:
    """Load TVM's runtime library for ``device`` (libtvm_runtime_cuda.so beside libtvm_runtime.so), if any.

    ``import tvm`` loads it only with the compiler library: a runtime-only TVM (no libtvm_compiler.so, or
    TVM_USE_RUNTIME_LIB=1, as boards run it) skips its device backends. Loading it registers the device;
    a library that does not load (no CUDA on this machine, or another CUDA major) leaves it unregistered.
    """
    import ctypes

    import tvm

    runtime_lib = getattr(tvm.base, "_LOADED_LIBS", {}).get("tvm_runtime")
    if runtime_lib is None:
        return
    path = os.path.join(os.path.dirname(os.path.realpath(runtime_lib._name)), f"libtvm_runtime_{device}.so")
    try:
        tvm.base._LOADED_LIBS[f"tvm_runtime_{device}"] = ctypes.CDLL(path, ctypes.RTLD_LOCAL)
    except OSError:
        pass


# What to install where the runtime's CUDA backend does not load: the PyPI wheels' libtvm_runtime_cuda.so needs
# libcudart.so.13 and a driver for CUDA 13; a Jetson (JetPack 5/6: CUDA 11/12) needs TVM's runtime built on it.
DEVICE_RUNTIME_HINT = {
    "aarch64": "on a Jetson, build TVM's runtime against the board's CUDA (scripts/build_tvm_runtime_on_jetson.sh, "
               "see docs/deploy.md)",
}.get(platform.machine(), "the PyPI wheel's CUDA runtime needs libcudart.so.13 (pip install nvidia-cuda-runtime) "
                          "and an NVIDIA driver for CUDA 13; with an older CUDA, build TVM's runtime against it")


def device_problem(device: str, enabled: bool, dev, runtime_name: str, arch: str | None = None
                   ) -> tuple[str, str] | None:
    """Why the TVM runtime ``runtime_name`` (this machine's, or a board's over RPC) cannot run code for ``device``
    compiled for the CUDA ``arch`` (None: any), as (kind, one line), kind "runtime", "device" or "arch"; or None.

    The one check behind loading a library here, deploying to a board, timing candidates and tuning; each caller
    adds what to do."""
    if not enabled:
        return "runtime", f"{runtime_name} has no {device} support"
    if not dev.exist:
        return "device", f"{runtime_name} finds no {device} device"
    if arch is not None and cuda_arch(dev.compute_version) != arch:
        return "arch", (f"{runtime_name} finds a GPU of compute capability {dev.compute_version} "
                        f"({cuda_arch(dev.compute_version)}), but the code is compiled for {arch}")
    return None


def open_device(device: str, arch: str | None = None) -> tvm.runtime.Device:
    """The TVM runtime's ``device`` ("cpu", "cuda") here, a GPU of ``arch`` if given; RuntimeUnavailable when this
    runtime has no support for it or finds no such device."""
    try:
        import tvm
    except ImportError as e:
        raise RuntimeUnavailable(f"cannot import TVM's runtime ({e}); install it (see docs/deploy.md)") from None
    if not tvm.runtime.enabled(device):
        _load_device_runtime(device)
    dev = tvm.runtime.device(device)
    problem = device_problem(device, tvm.runtime.enabled(device), dev, f"this TVM runtime ({tvm.__file__})", arch)
    if problem is not None:
        # The PyPI aarch64 wheel links libcudart.so.13; on a CUDA 12 board (JetPack 6) it loads
        # without CUDA and says nothing, so say it here.
        remedy = {"runtime": DEVICE_RUNTIME_HINT, "device": "check the driver (nvidia-smi)",
                  "arch": "compile for this GPU's target (python -m pipeline list-targets, --cuda-arch)"}
        raise RuntimeUnavailable(f"{problem[1]}; {remedy[problem[0]]}")
    return dev


def cuda_arch(compute_version: str) -> str:
    """A device's compute capability ("8.7", as TVM reports it) as the arch CUDA code is compiled for ("sm_87")."""
    return "sm_" + compute_version.replace(".", "")


def load_module(lib_path: Path) -> tvm.runtime.Module:
    import tvm

    built_for, here = elf_arch(lib_path), platform.machine()
    if built_for not in (here, None):  # dlopen would say "cannot open shared object file", which misleads
        raise RuntimeUnavailable(f"{lib_path} is an {built_for} library and this machine is {here}; "
                                 "run it on the board it was compiled for, or compile for this machine")
    try:
        return tvm.runtime.load_module(str(lib_path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise RuntimeUnavailable(f"cannot load {lib_path} here ({reason}); was it compiled for this machine?") from None


def load_vm(lib_path: Path, device: str) -> tuple[VirtualMachine, tvm.runtime.Device]:
    dev = open_device(device)
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(load_module(lib_path), dev), dev


ELF_ARCHS = {62: "x86_64", 183: "aarch64"}  # e_machine -> the architecture as LLVM triples and uname spell it


def elf_machine(path: Path | str) -> int:
    """The ELF header's e_machine (183 = aarch64, 62 = x86-64); ValueError if ``path`` is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def elf_arch(path: Path | str) -> str | None:
    """The CPU architecture a shared library was built for, or None when ``path`` is no ELF file."""
    try:
        machine = elf_machine(path)
    except (OSError, ValueError):
        return None
    return ELF_ARCHS.get(machine, f"ELF machine {machine}")


def to_device(arrays: list[np.ndarray], dev: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    """Copy arrays to ``dev`` (a local device, or a board's through an RPC session)."""
    import tvm

    return [tvm.runtime.tensor(a, dev) for a in arrays]


def run_vm(vm: VirtualMachine, args: list[tvm.runtime.Tensor], output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Run "main" once and copy its outputs here (one tensor, or a tuple of them), read item by item with the VM's
    own functions: a tuple returned over RPC is a remote object that cannot be iterated here.

    Not VirtualMachine.get_outputs: it makes a reference cycle (a recursive closure over the VM) that would keep
    an RPC session, and so the board's one-session-at-a-time server, busy until Python's garbage collector
    happens to run.
    """
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    arity, get = vm.module["get_output_arity"]("main"), vm.module["get_output"]
    outs = [get("main")] if arity == -1 else [get("main", i) for i in range(arity)]  # -1: one tensor
    if len(outs) != len(output_names):
        raise ValueError(f"the library returns {len(outs)} output(s), not the {len(output_names)} expected")
    return {name: t.numpy() for name, t in zip(output_names, outs)}


def time_vm(vm: VirtualMachine, dev: tvm.runtime.Device, args: list[tvm.runtime.Tensor], warmup: int,
            repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` runs of "main" after ``warmup`` untimed runs, timed where it runs."""
    vm.set_input("main", *args)
    for _ in range(warmup):
        vm.invoke_stateful("main")
    return list(vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat)("main").results)


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "runs": len(seconds)}


def argument_problems(manifest: dict, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> list[str]:
    """How ``inputs`` and ``params`` differ from what the library takes (the manifest's I/O specs and params)."""
    problems = [f"input {name!r} is missing" for name in (t["name"] for t in manifest["inputs"]) if name not in inputs]
    for spec in manifest["inputs"]:
        given = inputs.get(spec["name"])
        if given is not None and (list(np.shape(given)) != spec["shape"] or str(np.asarray(given).dtype) != spec["dtype"]):
            problems.append(f"input {spec['name']!r} must be {spec['dtype']} {tuple(spec['shape'])}, "
                            f"not {np.asarray(given).dtype} {tuple(np.shape(given))}")
    problems += [f"unexpected input {name!r}" for name in inputs if name not in {t["name"] for t in manifest["inputs"]}]
    if list(params) != manifest["params"]:
        problems.append(f"params must be the {len(manifest['params'])} arrays of params.npz, in the manifest's order")
    return problems


def run_library(lib_path: Path, device: str, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                output_names: tuple[str, ...], manifest: dict | None = None) -> dict[str, np.ndarray]:
    """Run the library once. With the artifact's ``manifest``, wrong inputs are a BadInput naming them."""
    problems = argument_problems(manifest, params, inputs) if manifest is not None else []
    if problems:
        raise BadInput(f"{lib_path}: " + "; ".join(problems))
    vm, dev = load_vm(lib_path, device)
    return run_vm(vm, to_device([*inputs.values(), *params.values()], dev), output_names)


def target_cores(manifest: dict) -> int | None:
    """The CPU cores the library was compiled for: its LLVM target's (or CUDA target's host's) num-cores."""
    for spec in (manifest["target"]["tvm_target"], manifest["target"].get("tvm_host")):
        if isinstance(spec, dict) and spec.get("kind") == "llvm" and spec.get("num-cores"):
            return int(spec["num-cores"])
    return None


def run_bundle(directory: Path, warmup: int, repeat: int, public_key: Path | None = None) -> dict:
    """Check, run, compare and time the artifact in ``directory``; VerificationFailed if the outputs are wrong.

    TVM's thread pool gets the cores the library was compiled for, unless TVM_NUM_THREADS says otherwise:
    left alone, TVM takes half the CPUs on x86 (it assumes two hyperthreads per core), 1 on a 2-vCPU host.
    """
    manifest = read_manifest(directory, public_key)
    verify_files(directory, manifest)  # before anything is loaded
    params, inputs, reference = load_arrays(directory, manifest)
    vm, dev = load_vm(Path(directory) / LIBRARY, manifest["target"]["device"])
    import tvm  # loaded by load_vm: it says what to install when it is not there
    args = to_device([*inputs.values(), *params.values()], dev)
    cores, unset = target_cores(manifest), THREADS_ENV not in os.environ
    if cores and unset:
        use_threads(cores)  # read when the pool starts, at the first run below
    try:
        checks = require_outputs_match(run_vm(vm, args, tuple(reference)), reference, manifest,
                                       summary="outputs differ from the reference")
    finally:
        if cores and unset:
            del os.environ[THREADS_ENV]
    return {"manifest": manifest, "checks": checks, "latency": latency_stats(time_vm(vm, dev, args, warmup, repeat)),
            "threads": tvm.get_global_func("runtime.NumThreads")()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="a bundle file (.tar, .tar.gz) or an artifact directory; default: this file's directory")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--public-key", type=Path, default=None, metavar="PEM",
                        help="refuse the bundle unless manifest.sig is its signature by this Ed25519 key "
                             "(needs the cryptography package)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if np is None:
        print(f"error: {parser.prog} needs numpy and the TVM runtime: pip install numpy apache-tvm "
              "(on a Jetson, see docs/deploy.md)", file=sys.stderr)
        return RuntimeUnavailable.exit_code
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as tmp:
            directory = args.bundle if args.bundle.is_dir() else extract_bundle(args.bundle, Path(tmp))
            report = run_bundle(directory, args.warmup, args.repeat, args.public_key)
            signed = (directory / SIGNATURE).exists()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    manifest, latency = report["manifest"], report["latency"]
    signature = ("signature checked" if args.public_key else "signed, signature not checked (no --public-key)"
                 if signed else "not signed")
    print(f"{manifest['model']['name']} for {manifest['target']['name']} (build {manifest['build_id'][:16]}): "
          f"manifest intact, files match the manifest, {signature}")
    for check in report["checks"]:
        print(check.describe())
    print(f"latency: median {latency['median_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms over {latency['runs']} runs "
          f"after {args.warmup} warm-up, on {manifest['target']['device']}, {report['threads']} CPU thread(s) "
          f"({time.perf_counter() - start:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
