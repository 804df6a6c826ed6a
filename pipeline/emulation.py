"""Run a compiled aarch64 library on this x86 host: `pipeline.runtime.run_library` inside an aarch64
CPython 3.11 under qemu-user, with the aarch64 TVM runtime wheel (and an aarch64 program, such as a bundle's
native runner, against that wheel's runtime libraries: :meth:`Emulator.program`).

``scripts/setup_aarch64_runtime.sh`` prepares the emulator (one directory, ``pipeline.paths.aarch64_root()``). Arrays cross over as ``.npz`` files
in a temporary directory; the emulated side imports only numpy, the TVM runtime and
``pipeline.runtime`` (found through PYTHONPATH = this repository). Results are an emulation
(correctness), not timings of a board.

Only the standard library and numpy are imported here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import paths
from .errors import PipelineError
from .runtime import THREADS_ENV
from .toolchain import elf

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # import ~2-4 s (runtime-only TVM), then the emulated model run
_REPO = Path(__file__).resolve().parent.parent  # the directory that holds the `pipeline` package

# Runs inside the emulated interpreter: argv[1] is the exchange directory.
_WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from pipeline.runtime import run_library
work = sys.argv[1]
with open(work + "/spec.json") as f:
    spec = json.load(f)
def load(name):
    with np.load(f"{work}/{name}.npz", allow_pickle=False) as z:
        return {key: z[f"arr_{i}"] for i, key in enumerate(spec[name])}
params, inputs = load("params"), load("inputs")
t1 = time.perf_counter()
outs = run_library(spec["lib"], spec["device"], params, inputs, tuple(spec["outputs"]))
t2 = time.perf_counter()
np.savez(work + "/outputs.npz", *[outs[key] for key in spec["outputs"]])
with open(work + "/timing.json", "w") as f:
    json.dump({"import_s": t1 - t0, "run_s": t2 - t1}, f)
"""


class EmulatorUnavailable(PipelineError):
    """qemu-user or the aarch64 userland is not set up on this host."""


class EmulationError(PipelineError):
    """The emulated run failed or timed out."""


@dataclass(frozen=True)
class Emulator:
    qemu: Path
    sysroot: Path
    site: Path

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    @property
    def runtime_only(self) -> bool:
        """The setup script deleted libtvm_compiler.so: TVM must load with TVM_USE_RUNTIME_LIB=1."""
        return not (self.site / "tvm" / "lib" / "libtvm_compiler.so").exists()

    def program(self, executable: Path | str, *args: str) -> list[str]:
        """The command that runs an aarch64 executable (linked against glibc) with the sysroot's libraries."""
        return [str(self.qemu), "-L", str(self.sysroot), str(executable), *args]

    def command(self, *args: str) -> list[str]:
        return self.program(self.python, *args)

    def env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "QEMU_LD_PREFIX": str(self.sysroot),
            "PYTHONPATH": os.pathsep.join([str(self.site), str(_REPO)]),
            "PYTHONNOUSERSITE": "1",
            "PYTHONSAFEPATH": "1",
            "PYTHONDONTWRITEBYTECODE": "1",  # never write (aarch64-side) bytecode into the repository
            "OPENBLAS_NUM_THREADS": "1",
            THREADS_ENV: os.environ.get(THREADS_ENV, "1"),  # a shared host: one core unless asked
        }
        if self.runtime_only:
            env["TVM_USE_RUNTIME_LIB"] = "1"
        return env


def find_emulator(root: Path | str | None = None) -> Emulator:
    """The emulator prepared by the setup script under ``root``; EmulatorUnavailable says what is missing."""
    root = Path(root).expanduser() if root is not None else paths.aarch64_root()
    hint = f"run {paths.SETUP_SCRIPT} as root (it installs into {paths.AARCH64_ENV}={root})"
    try:
        recorded = json.loads((root / "runtime.json").read_text())
    except (OSError, ValueError):
        raise EmulatorUnavailable(f"no aarch64 emulator set up in {root}: {hint}") from None
    qemu_candidates = [recorded.get("qemu"), shutil.which("qemu-aarch64-static"), shutil.which("qemu-aarch64")]
    qemu = next((Path(q) for q in qemu_candidates if q and os.access(q, os.X_OK)), None)
    if qemu is None:
        raise EmulatorUnavailable(f"qemu-aarch64 is not installed: {hint}")
    emu = Emulator(qemu=qemu, sysroot=root / "sysroot", site=root / "site")
    if not emu.python.is_file():
        raise EmulatorUnavailable(f"no aarch64 python at {emu.python}: {hint}")
    if not (emu.site / "tvm" / "__init__.py").is_file():
        raise EmulatorUnavailable(f"no aarch64 TVM wheel in {emu.site}: {hint}")
    return emu


def _save(path: Path, arrays: list[np.ndarray]) -> None:
    np.savez(path, *[np.asarray(a) for a in arrays])  # not ascontiguousarray: it turns 0-d into 1-d


def run_python_emulated(args: list[str], cwd: Path, root: Path | str | None = None, *,
                        timeout: float = DEFAULT_TIMEOUT_S, what: str = "script") -> subprocess.CompletedProcess:
    """``python3 ARGS`` in the emulated aarch64 Python (numpy and the TVM runtime importable), in ``cwd``.
    EmulatorUnavailable (not set up) or EmulationError (it failed, or exceeded ``timeout``)."""
    emu = find_emulator(root)
    try:
        proc = subprocess.run(emu.command(*args), env=emu.env(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise EmulationError(f"emulated run of {what} exceeded {timeout:g} s (qemu killed)") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise EmulationError(f"emulated run of {what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def run_library_emulated(lib_path: Path | str, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                         output_names: tuple[str, ...] | list[str], root: Path | str | None = None, *,
                         timeout: float = DEFAULT_TIMEOUT_S, timings: dict[str, float] | None = None,
                         ) -> dict[str, np.ndarray]:
    """`pipeline.runtime.run_library(lib_path, "cpu", params, inputs, output_names)` on emulated aarch64.

    ``lib_path`` must be an aarch64 ELF shared object (exported with
    ``pipeline.toolchain.cross_link.cross_linker("aarch64-linux-gnu")``). ``timings``, when given, receives ``import_s``
    (emulated start-up + imports), ``run_s`` (load + one run) and ``total_s``.
    Raises EmulatorUnavailable (not set up) or EmulationError (the run failed or exceeded ``timeout``).
    """
    lib_path = Path(lib_path).resolve()
    try:
        machine = elf.machine(lib_path)
    except (OSError, ValueError) as e:
        raise EmulationError(f"cannot run {lib_path}: {e}") from e
    if machine != elf.EM_AARCH64:
        raise EmulationError(f"{lib_path} is not an aarch64 library (ELF e_machine {machine}, want {elf.EM_AARCH64})")
    find_emulator(root)  # before any work
    output_names = tuple(output_names)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipeline-emu-") as tmp:
        work = Path(tmp)
        (work / "spec.json").write_text(json.dumps({
            "lib": str(lib_path), "device": "cpu",
            "params": list(params), "inputs": list(inputs), "outputs": list(output_names),
        }))
        _save(work / "params.npz", list(params.values()))
        _save(work / "inputs.npz", list(inputs.values()))
        run_python_emulated(["-c", _WORKER, str(work)], work, root, timeout=timeout, what=lib_path.name)
        with np.load(work / "outputs.npz", allow_pickle=False) as z:
            outputs = {name: z[f"arr_{i}"] for i, name in enumerate(output_names)}
        measured = json.loads((work / "timing.json").read_text())
    measured["total_s"] = time.perf_counter() - start
    log.info("emulated aarch64 run of %s: %.1f s (imports %.1f s, load+run %.2f s)", lib_path.name,
             measured["total_s"], measured["import_s"], measured["run_s"])
    if timings is not None:
        timings.update(measured)
    return outputs
