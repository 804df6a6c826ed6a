"""Deploy an artifact to a board over TVM RPC: check, upload, load, verify on the device, time.

SECURITY: a TVM RPC server runs whatever library is uploaded to it and writes files where it is
told, so anyone who can reach its port can run code on the board. Start it only on a trusted
network, bound to a trusted interface (127.0.0.1 with an SSH tunnel, a private LAN or USB-network
address), never to 0.0.0.0 on a network you do not control.

The board runs TVM's RPC server (`python3 -m tvm.exec.rpc_server --host ADDR --port PORT`,
optionally `--tracker HOST:PORT --key KEY`). This side verifies every file's sha256, refuses a
library the board cannot run where the session can tell (the CPU architecture from the board's
LLVM when its TVM has one, otherwise from the board failing to load it; a CUDA artifact on a board
whose TVM runtime has no CUDA or no GPU), then runs the model with the reference inputs through a
Relax VirtualMachine on the board, compares the outputs, and times it with the VM's time_evaluator
on the board. Each exchange with the board is bounded by a timeout.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import runtime
from .bundle import open_artifact, stem
from .errors import BadInput, PipelineError
from .spec import Board
from .toolchain import elf

if TYPE_CHECKING:
    import numpy as np
    from tvm.rpc import RPCSession

DEFAULT_TIMEOUT_S = 60.0
TRIPLE_ARCH = {"arm64": "aarch64"}  # other spellings of the same architecture in triples
SERVER_HINT = "on the board: python3 -m tvm.exec.rpc_server --host ADDR --port PORT (ADDR: a trusted interface)"


class DeployError(PipelineError):
    """The board could not be reached, or a step on it failed."""


class DeployTimeout(DeployError):
    """The board (or tracker) did not answer within the timeout."""


class TargetMismatch(DeployError, BadInput):
    """The artifact was built for another kind of board."""


def _reason(error: BaseException) -> str:
    """The last line of an error (TVM's RPC errors put the remote message last), without TVM's check prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", lines[-1])[:300] if lines else type(error).__name__


@contextlib.contextmanager
def remote_step(what: str, board: Board, seconds: float, hint: str = "") -> Iterator[None]:
    """Bound one exchange with the board by ``seconds``; a TVM or socket error becomes a DeployError.

    TVM's RPC client waits in C++ socket calls that have no timeout; a signal interrupts them and
    TVM then runs the handler, whose exception unwinds the call. So this uses SIGALRM and works
    only in the main thread.
    """
    def expire(_signum, _frame):
        raise DeployTimeout(f"no answer from {board} within {seconds:g} s while {what}; check that the board and "
                            f"its RPC server are up and reachable, or raise --timeout")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except (RuntimeError, OSError) as e:
        raise DeployError(f"{what} failed ({board}): {_reason(e)}{'; ' + hint if hint else ''}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def connect(board: Board, timeout: float) -> RPCSession:
    from tvm import rpc

    with remote_step("connecting", board, timeout, hint=SERVER_HINT):
        if board.tracker_key is None:
            return rpc.connect(board.host, board.port)
        tracker = rpc.connect_tracker(board.host, board.port)
        keys = {info["key"].removeprefix("server:") for info in tracker.summary()["server_info"]}
        if board.tracker_key not in keys:
            raise DeployError(f"the tracker at {board.host}:{board.port} has no server with key {board.tracker_key!r} "
                              f"(it has: {', '.join(sorted(keys)) or 'none'}); start one with "
                              f"--tracker {board.host}:{board.port} --key {board.tracker_key}")
        return tracker.request(board.tracker_key, max_retry=1)


def board_arch(remote: RPCSession) -> str | None:
    """The board CPU's architecture from its TVM's LLVM, or None when its TVM has no LLVM (runtime only)."""
    try:
        get_triple = remote.get_function("target.llvm_get_system_triple")
    except AttributeError:
        return None
    arch = get_triple().split("-")[0]
    return TRIPLE_ARCH.get(arch, arch)


def check_board(remote: RPCSession, board: Board, directory: Path, manifest: dict, timeout: float) -> str | None:
    """Refuse an artifact the board cannot run, where the session can tell; return the board's arch if known."""
    lib_arch = elf.arch_name(elf.machine(directory / runtime.LIBRARY))
    target, device = manifest["target"]["name"], manifest["target"]["device"]
    with remote_step("asking the board what it runs", board, timeout):
        arch = board_arch(remote)
        if arch is not None and arch != lib_arch:
            raise TargetMismatch(f"the library of this {target} artifact is {lib_arch} but the board is {arch}; "
                                 f"compile for the board's target (python -m pipeline list-targets)")
        if device != "cpu":
            built_for = manifest["target"].get("build", {}).get("cuda", {}).get("arch")
            problem = runtime.device_problem(device, bool(remote.get_function("runtime.RuntimeEnabled")(device)),
                                             remote.device(device), "the board's TVM runtime", built_for)
            if problem is not None:
                remedy = {"runtime": "on a Jetson build it against the board's CUDA "
                                     "(scripts/build_tvm_runtime_on_jetson.sh)",
                          "device": "check the board's driver (nvidia-smi)",
                          "arch": "compile for the board's target (python -m pipeline list-targets, --cuda-arch)"}
                raise TargetMismatch(f"{problem[1]}, needed by this {target} artifact; {remedy[problem[0]]}")
    return arch


def run_on_board(remote: RPCSession, board: Board, directory: Path, manifest: dict, arch: str | None, *,
                 warmup: int, repeat: int, timeout: float) -> dict:
    """Upload, load, run once and check the outputs, then time; return the checks, latency and step times."""
    params, inputs, reference = runtime.load_arrays(directory, manifest)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str, what: str, limit: float = timeout) -> Iterator[None]:
        start = time.perf_counter()
        with remote_step(what, board, limit):
            yield
        seconds[name] = time.perf_counter() - start

    vm, dev = _load_on_board(remote, directory, manifest, arch, step)
    with step("copy_in", "copying inputs and params to the board"):
        args = runtime.to_device([*inputs.values(), *params.values()], dev)
    with step("first_run", "running the model"):
        outputs = runtime.run_vm(vm, args, tuple(reference))
        threads = remote.get_function("runtime.NumThreads")()  # the pool is sized at the first run
    checks = runtime.require_outputs_match(outputs, reference, manifest)
    # The board is busy for about (warmup + repeat) runs here; the timeout bounds the silence beyond that.
    with step("timing", f"timing {repeat} runs", timeout + 2 * (warmup + repeat) * seconds["first_run"]):
        latency = runtime.latency_stats(runtime.time_vm(vm, dev, args, warmup, repeat))
    return {"checks": checks, "latency": latency, "seconds": seconds, "threads": threads}


def _load_on_board(remote: RPCSession, directory: Path, manifest: dict, arch: str | None, step):
    """Upload and load the library of ``directory`` on the board, each under ``step``; return its VM and device."""
    from tvm.runtime.vm import VirtualMachine

    with step("upload", f"uploading {runtime.LIBRARY}"):
        remote.upload(str(directory / runtime.LIBRARY))
    with step("load", f"loading {runtime.LIBRARY}"):
        try:
            library = remote.load_module(runtime.LIBRARY)
        except RuntimeError as e:
            if arch is not None:
                raise
            lib_arch = elf.arch_name(elf.machine(directory / runtime.LIBRARY))
            raise TargetMismatch(f"the board cannot load this {lib_arch} library ({_reason(e)}); its CPU is probably "
                                 f"not {lib_arch}: compile for the board's target (python -m pipeline list-targets)") from None
        dev = remote.device(manifest["target"]["device"])
        return VirtualMachine(library, dev), dev


def outputs_on_board(board: Board, directory: Path, manifest: dict, params: dict[str, np.ndarray],
                     inputs: dict[str, np.ndarray], output_names: tuple[str, ...], timeout: float
                     ) -> dict[str, np.ndarray]:
    """Run the library of ``directory`` (``manifest``: its target and build report) once on ``board``; return its
    outputs, unchecked (``diagnose`` compares them layer by layer)."""
    remote = connect(board, timeout)
    arch = check_board(remote, board, directory, manifest, timeout)

    @contextlib.contextmanager
    def step(_name: str, what: str) -> Iterator[None]:
        with remote_step(what, board, timeout):
            yield

    vm, dev = _load_on_board(remote, directory, manifest, arch, step)
    with step("run", "running the model"):
        return runtime.run_vm(vm, runtime.to_device([*inputs.values(), *params.values()], dev), output_names)


def verify_on_board(board: Board, directory: Path, manifest: dict, *, warmup: int, repeat: int,
                    timeout: float) -> dict:
    """Connect, check that the board can run the artifact, run it there: run_on_board's result plus the arch.

    Every object of the RPC session lives in here and in the functions it calls (see deploy).
    """
    start = time.perf_counter()
    remote = connect(board, timeout)
    connect_s = time.perf_counter() - start
    arch = check_board(remote, board, directory, manifest, timeout)
    run = run_on_board(remote, board, directory, manifest, arch, warmup=warmup, repeat=repeat, timeout=timeout)
    return {**run, "arch": arch, "seconds": {"connect": connect_s, **run["seconds"]}}


def default_json_path(path: Path) -> Path:
    """Beside the artifact directory or bundle: NAME.deploy.json (inside it, it would fail the hash check)."""
    path = Path(path).resolve()
    return path.with_name(f"{stem(path)}.deploy.json")


def deploy(path: Path, board: Board, *, warmup: int = 3, repeat: int = 50, timeout: float = DEFAULT_TIMEOUT_S,
           json_out: Path | None = None, public_key: Path | None = None) -> tuple[dict, Path]:
    """Verify ``path`` (an artifact directory or bundle; with ``public_key``, signed by its owner) on ``board``;
    write the result as JSON; return it and its path."""
    import tvm

    with open_artifact(path, public_key) as (directory, manifest):
        failure = None
        try:
            run = verify_on_board(board, directory, manifest, warmup=warmup, repeat=repeat, timeout=timeout)
        except PipelineError as e:
            failure = e.with_traceback(None)  # its frames hold the session's objects: keep the message only
            failure.__context__ = None
        # End the RPC session now, not whenever Python's collector runs: TVM keeps remote objects in
        # reference cycles of its own, and TVM's server serves one session at a time.
        gc.collect()
        if failure is not None:
            raise failure
    result = {
        "artifact": str(Path(path).resolve()),
        "model": manifest["model"]["name"],
        "target": manifest["target"]["name"],
        "build_id": manifest["build_id"],
        "board": {"address": f"{board.host}:{board.port}", "tracker_key": board.tracker_key,
                  "arch": run["arch"],  # None: a runtime-only TVM does not say (the library loaded, though)
                  "device": manifest["target"]["device"]},
        "verify": {"passed": True, "reference": "pytorch", "outputs": [asdict(c) for c in run["checks"]]},
        "latency_ms": run["latency"],
        # The board's TVM thread pool, sized by TVM_NUM_THREADS in its rpc_server's environment (run.py uses the
        # target's cores): compare latencies only at equal thread counts.
        "threads": run["threads"],
        "warmup": warmup,
        "timings_s": {k: round(v, 3) for k, v in run["seconds"].items()},
        "client": {"tvm": tvm.__version__},
    }
    json_out = Path(json_out) if json_out is not None else default_json_path(path)
    try:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise DeployError(f"cannot write {json_out}: {e.strerror}; choose another --json-out") from None
    return result, json_out
