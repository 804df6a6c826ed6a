import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import models
import targets
from pipeline.run import compile_model
from pipeline.spec import BuildSpec

TEST_MODELS = models.list_models("test_*")
FULL_SIZE_MODELS = models.list_models(include_test=False)
# The one full-size model the default suite compiles end to end; the rest run under -m slow.
DEFAULT_FULL_SIZE = "cyclemlp_b1"
ALL_TARGETS = [t.name for t in targets.list_targets()]
CUDA_TARGETS = [t.name for t in targets.list_targets() if t.cuda]


def imported_module(module, input_shape, tmp_path, seed: int = 0):
    """A torch module through export, onnxsim and the Relax import, as compile's front end does: (mod, params,
    inputs, PyTorch's outputs on them)."""
    import numpy as np

    from pipeline.stages.export import export_onnx
    from pipeline.stages.reference import OUTPUT_NAMES, run_torch
    from pipeline.stages.relax_import import import_onnx
    from pipeline.stages.simplify import simplify_onnx

    module = module.eval()
    inputs = {"input": np.random.default_rng(seed).standard_normal(input_shape, dtype=np.float32)}
    reference = run_torch(module, inputs)
    export_onnx(module, inputs, OUTPUT_NAMES, 17, tmp_path / "m.onnx")
    simplify_onnx(tmp_path / "m.onnx", tmp_path / "s.onnx")
    mod, params = import_onnx(tmp_path / "s.onnx", {"input": input_shape})
    return mod, params, inputs, reference


def run_cli(*args: str, **kwargs):
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, encoding="utf-8", **kwargs)


def reissue(directory: Path, manifest: dict) -> None:
    """Write ``manifest`` as a compile would have (build_id and seal renewed): another build, not a tampered one."""
    from pipeline import runtime

    manifest["build_id"] = runtime.build_id(manifest)
    runtime.write_manifest(directory, manifest)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Compile (model, target) once per session; returns (artifact dir, manifest)."""
    cache: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(model: str, target: str = "x86") -> tuple[Path, dict]:
        if (model, target) not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"{model}-{target}"
            cache[(model, target)] = compile_model(BuildSpec(model=model, target=target), out)
        return cache[(model, target)]

    return get


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Tests must not pick up a developer's own caches (a tuning database above all): PIPELINE_CACHE_DIR is a
    fresh directory, and so is the directory of shipped tuning records. What scripts/setup_aarch64_runtime.sh prepared once for this machine (the emulated aarch64
    userland, zig's compiler cache) is kept, by pinning its own variable to where it is now."""
    from pipeline import paths

    mp = pytest.MonkeyPatch()
    mp.setenv(paths.AARCH64_ENV, str(paths.aarch64_root()))
    mp.setenv(paths.ZIG_ENV, str(paths.zig_cache_dir()))
    mp.setenv(paths.CACHE_ENV, str(tmp_path_factory.mktemp("pipeline-cache")))
    mp.setenv(paths.SHIPPED_ENV, str(tmp_path_factory.mktemp("shipped-records")))  # none, unless a test adds some
    yield
    mp.undo()


def assert_consistent(path: Path) -> int:
    """The tuning database at ``path`` loads and every record's trace applies to the workload its line points at;
    returns the number of records."""
    import tvm
    from pipeline.tuning.database import open_database

    database = open_database(path)
    assert database.unreplayable == 0  # a record written against the wrong workload line would not replay
    records = database.get_all_tuning_records()
    for record in records:
        schedule = tvm.s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(schedule, remove_postproc=False)  # fails on another workload's trace
    return len(records)


# ---------------------------------------------------------------- toolchains the set-up script provides

def aarch64_linker(prefer: str | None = None):
    from pipeline.toolchain.cross_link import cross_linker

    return cross_linker("aarch64-linux-gnu", prefer=prefer)


def linker_available() -> bool:
    from pipeline.toolchain.cross_link import CrossLinkError

    try:
        aarch64_linker()
    except CrossLinkError:
        return False
    return True


def emulator_available(root=None) -> bool:
    from pipeline.emulation import EmulatorUnavailable, find_emulator

    try:
        find_emulator(root)
    except EmulatorUnavailable:
        return False
    return True


# ---------------------------------------------------------------- TVM RPC tracker and servers on loopback

RPC_HOST = "127.0.0.1"
RPC_KEY = "x86-test"
RPC_START_TIMEOUT_S = 90  # servers import TVM first (seconds; tens under qemu on a busy host)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((RPC_HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """True when something LISTENs on 127.0.0.1:port (read from /proc: connecting would disturb TVM's server)."""
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything in its group (workers included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def tracker_keys(port: int) -> set[str]:
    from tvm import rpc

    return {info["key"] for info in rpc.connect_tracker(RPC_HOST, port).summary()["server_info"]}


class RpcProcesses:
    """TVM's RPC tracker and servers (`python -m tvm.exec.rpc_tracker` / `rpc_server`) on free loopback ports.

    Each runs in its own process group and is killed with it: TVM's server forks a worker that keeps
    listening on the port when only the server's own PID is killed.
    """

    def __init__(self, work: Path):
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "TMPDIR": str(work)}  # the servers' per-session directories

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log(name), "wb") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=env or self.env, start_new_session=True)

    def start_tvm(self, name: str, module: str, port: int, *args: str) -> int:
        self.start(name, [sys.executable, "-m", f"tvm.exec.{module}", "--host", RPC_HOST, "--port", str(port),
                          "--port-end", str(port + 1), *args])
        return port

    def wait_for(self, name: str, ready, what: str, timeout: float = RPC_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n{self.log(name).read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not ready after {timeout} s:\n{self.log(name).read_text()[-2000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        for proc in self.procs.values():
            kill_group(proc)


@pytest.fixture(scope="session")
def rpc(tmp_path_factory):
    """A tracker, an x86 server to connect to directly, and one registered with the tracker under RPC_KEY;
    all started at once, all killed at the end. ``rpc.processes.log(name)`` is a server's output."""
    processes = RpcProcesses(tmp_path_factory.mktemp("rpc"))
    try:
        tracker = processes.start_tvm("tracker", "rpc_tracker", free_port())
        direct = processes.start_tvm("direct", "rpc_server", free_port())
        tracked = processes.start_tvm("tracked", "rpc_server", free_port(), "--tracker", f"{RPC_HOST}:{tracker}",
                                      "--key", RPC_KEY)
        for name, port in (("tracker", tracker), ("direct", direct), ("tracked", tracked)):
            processes.wait_for(name, lambda port=port: listening(port), f"RPC {name}")
        processes.wait_for("tracked", lambda: f"server:{RPC_KEY}" in tracker_keys(tracker),
                           "registration with the tracker")
        yield SimpleNamespace(tracker=tracker, direct=direct, tracked=tracked, key=RPC_KEY, processes=processes)
    finally:
        processes.close()
