"""Bundles, the board-side runner, and deploy over TVM RPC against real servers on 127.0.0.1.

The fixtures start TVM's own RPC tracker and servers (`python -m tvm.exec.rpc_tracker` /
`rpc_server`) on free loopback ports, in their own process groups, and kill the groups afterwards.
The aarch64 "board" is TVM's RPC server in the aarch64 Python of scripts/setup_aarch64_runtime.sh,
under qemu-user; without that set-up its tests skip, saying so.
"""
import contextlib
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import RPC_HOST, RPC_KEY, RpcProcesses, free_port, linker_available, listening, reissue, run_cli
from pipeline import runtime
from pipeline.bundle import BundleError, extract_bundle, make_bundle
from pipeline.deploy import DeployError, DeployTimeout, TargetMismatch, deploy
from pipeline.emulation import EmulatorUnavailable, find_emulator
from pipeline.spec import Board
from pipeline.toolchain import native_runner

HOST = RPC_HOST
TRACKER_KEY = RPC_KEY


def emulated_server(emu, work: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """TVM's RPC server in the emulated aarch64 Python, as a board would run it.

    The server re-executes sys.executable for its worker; without binfmt_misc the host kernel cannot
    exec an aarch64 binary, so sys.executable is made a host script that re-enters qemu (qemu's -0
    sets the guest argv[0], which CPython takes as sys.executable). The setup script's site lacks
    cloudpickle, which the server needs; the host's (pure Python) is put on the path.
    """
    python = work / "python3-aarch64"
    python.write_text(f'#!/bin/sh\nexec "{emu.qemu}" -L "{emu.sysroot}" -0 "$0" "{emu.python}" "$@"\n')
    python.chmod(0o755)
    extra = work / "extra"
    extra.mkdir()
    import cloudpickle

    (extra / "cloudpickle").symlink_to(Path(cloudpickle.__file__).parent)
    env = {**emu.env(), "PYTHONPATH": os.pathsep.join([str(emu.site), str(extra)]), "TMPDIR": str(work)}
    return [str(python), "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port),
            "--port-end", str(port + 1)], env


@pytest.fixture(scope="module")
def boards(rpc, tmp_path_factory):
    """The session's tracker and x86 servers (conftest ``rpc``) and, when emulation is set up, an emulated
    aarch64 server, killed at the end of this module."""
    ports = SimpleNamespace(tracker=rpc.tracker, direct=rpc.direct, tracked=rpc.tracked, aarch64=None, no_aarch64="")
    processes = RpcProcesses(tmp_path_factory.mktemp("rpc-aarch64"))
    try:
        try:
            ports.aarch64 = free_port()
            cmd, emu_env = emulated_server(find_emulator(), processes.work, ports.aarch64)
            processes.start("aarch64", cmd, emu_env)
            processes.wait_for("aarch64", lambda: listening(ports.aarch64), "RPC aarch64")
        except EmulatorUnavailable as e:
            ports.aarch64, ports.no_aarch64 = None, str(e)
        yield ports
    finally:
        processes.close()


@pytest.fixture(scope="module")
def x86(compiled):
    return compiled("test_mixer", "x86")[0]


@pytest.fixture(scope="module")
def aarch64(compiled):
    if not linker_available():
        pytest.skip("no aarch64 linker: run scripts/setup_aarch64_runtime.sh (installs ziglang)")
    return compiled("test_mixer", "aarch64")[0]


def copy_artifact(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def run_runner(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """run.py in a fresh interpreter where importing pipeline (or models/targets) fails: it must not need them."""
    code = ("import runpy, sys\n"
            "sys.modules.update(pipeline=None, models=None, targets=None)\n"
            f"sys.argv = {list(args)!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"} | (env or {}))


# ---------------------------------------------------------------- package + runner

def test_package_makes_one_bundle_whose_runner_needs_only_numpy_and_tvm(x86, tmp_path):
    bundle = tmp_path / "mixer.tar.gz"
    result = run_cli("package", str(x86), "--out", str(bundle))
    assert result.returncode == 0, result.stderr
    with tarfile.open(bundle) as tar:  # gzip, detected
        assert sorted(tar.getnames()) == sorted(["mixer", *(f"mixer/{n}" for n in (
            "manifest.json", "manifest.sha256", "lib.so", "params.npz", "inputs.npz", "outputs.npz", "run.py",
            "runner", *(p.name for p in native_runner.sources())))])
    extracted = extract_bundle(bundle, tmp_path / "board")
    assert (extracted / "run.py").read_text() == Path(runtime.__file__).read_text()

    result = run_runner(str(extracted / "run.py"), "--repeat", "5", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    assert "files match the manifest" in result.stdout and "logits: max_abs" in result.stdout
    assert " ok" in result.stdout and "median" in result.stdout and "p90" in result.stdout
    # the cores it was compiled for (x86: this host's), not TVM's default of half the CPUs; TVM_NUM_THREADS wins
    assert f"{os.cpu_count()} CPU thread(s)" in result.stdout
    result = run_runner(str(extracted / "run.py"), "--repeat", "1", env={"TVM_NUM_THREADS": "1"})
    assert "1 CPU thread(s)" in result.stdout, result.stderr


def test_runner_takes_a_bundle_file_or_a_directory(x86, tmp_path, capsys):
    bundle = make_bundle(x86, tmp_path / "mixer.tar")
    assert runtime.main([str(bundle), "--repeat", "3"]) == 0
    assert runtime.main([str(x86), "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("files match the manifest") == 2 and out.count("latency: median") == 2


def test_runner_fails_with_exit_3_when_outputs_differ(x86, tmp_path, capsys):
    art = copy_artifact(x86, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tolerance"] = {"atol": 1e-12, "rtol": 0.0}  # below float32 rounding: the check must fail
    reissue(art, manifest)
    assert runtime.main([str(art), "--repeat", "1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: outputs differ from the reference: logits:") and "FAILED" in err


# ---------------------------------------------------------------- tampering and unsafe archives

def test_a_modified_file_is_refused_before_anything_loads(x86, tmp_path, capsys):
    art = copy_artifact(x86, tmp_path / "art")
    lib = art / "lib.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 1  # one bit
    lib.write_bytes(bytes(data))
    assert runtime.main([str(art)]) == 2
    err = capsys.readouterr().err
    assert "lib.so does not match its sha256 in the manifest" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError, match="lib.so does not match"):
        make_bundle(art, tmp_path / "b.tar")
    with pytest.raises(BundleError, match="lib.so does not match"):  # refused before connecting: no server there
        deploy(art, Board(HOST, free_port()), timeout=5)


def test_an_artifact_of_another_manifest_schema_is_refused(x86, tmp_path, capsys):
    art = copy_artifact(x86, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "schema": 1}))
    assert runtime.main([str(art)]) == 2
    assert "compile the model again" in capsys.readouterr().err


def test_a_tampered_bundle_or_an_unlisted_file_is_refused(x86, tmp_path, capsys):
    board = extract_bundle(make_bundle(x86, tmp_path / "mixer.tar"), tmp_path / "board")
    params = dict(np.load(board / "params.npz"))
    first = next(iter(params))
    params[first] = params[first] + 1
    np.savez(board / "params.npz", **params)
    (board / "notes.txt").write_text("extra")
    repacked = tmp_path / "repacked.tar"
    with tarfile.open(repacked, "w") as tar:
        tar.add(board, arcname="mixer")
    assert runtime.main([str(repacked)]) == 2
    err = capsys.readouterr().err
    assert "params.npz does not match its sha256" in err and "notes.txt is not listed in the manifest" in err


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def crafted_tar(path: Path, evil: tarfile.TarInfo, payload: bytes = b"pwned") -> Path:
    """A bundle-shaped tar (directory `mixer`) with one hostile member."""
    with tarfile.open(path, "w") as tar:
        tar.addfile(member("mixer", tarfile.DIRTYPE))
        evil.size = len(payload) if evil.isreg() else 0
        tar.addfile(evil, io.BytesIO(payload) if evil.isreg() else None)
    return path


@pytest.mark.parametrize("case", ["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "subdir", "fifo"])
def test_unsafe_members_are_refused_and_nothing_is_written_outside(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = {
        "dotdot": member("../evil"),
        "nested-dotdot": member("mixer/../../outside/evil"),
        "absolute": member(str(outside / "evil")),
        "symlink": member("mixer/lib.so", tarfile.SYMTYPE, str(outside / "evil")),
        "hardlink": member("mixer/lib.so", tarfile.LNKTYPE, "/etc/passwd"),
        "subdir": member("mixer/sub/evil"),
        "fifo": member("mixer/evil", tarfile.FIFOTYPE),
    }[case]
    bundle = crafted_tar(tmp_path / "crafted.tar", evil)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="refusing to extract member"):
        extract_bundle(bundle, dest)
    assert list(dest.iterdir()) == [] and list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.tar", "dest", "outside"]
    assert runtime.main([str(bundle)]) == 2  # the runner on a board refuses it the same way


# ---------------------------------------------------------------- deploy over RPC

def test_deploy_to_a_direct_server(x86, boards, tmp_path):
    result, path = deploy(x86, Board(HOST, boards.direct), warmup=1, repeat=5, timeout=30,
                          json_out=tmp_path / "r.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert result["board"]["arch"] == "x86_64" and result["board"]["device"] == "cpu"
    [check] = result["verify"]["outputs"]
    assert check["name"] == "logits" and check["passed"] and check["max_abs"] < check["atol"]
    latency = result["latency_ms"]
    assert latency["runs"] == 5 and 0 < latency["min_ms"] <= latency["median_ms"] <= latency["p90_ms"]
    assert set(result["timings_s"]) == {"connect", "upload", "load", "copy_in", "first_run", "timing"}


def test_deploy_a_bundle_through_the_tracker_from_the_cli(x86, boards, tmp_path):
    bundle = make_bundle(x86, tmp_path / "mixer.tar")
    result = run_cli("deploy", str(bundle), "--rpc-tracker", f"{HOST}:{boards.tracker}", "--rpc-key", TRACKER_KEY,
                     "--repeat", "5", "--warmup", "1", "--timeout", "30", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "median" in result.stdout and "p90" in result.stdout
    saved = json.loads((tmp_path / "mixer.deploy.json").read_text())  # default: beside the bundle
    assert saved["board"]["tracker_key"] == TRACKER_KEY and saved["verify"]["passed"]


def test_no_server_fails_fast_and_a_silent_one_times_out(x86, boards):
    start = time.monotonic()
    with pytest.raises(DeployError, match="connecting failed") as e:  # refused: no need to wait
        deploy(x86, Board(HOST, free_port()), timeout=30)
    assert not isinstance(e.value, DeployTimeout) and time.monotonic() - start < 10

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind((HOST, 0))
        silent.listen(4)
        start = time.monotonic()
        with pytest.raises(DeployTimeout, match="no answer from .* within 2 s while connecting"):
            deploy(x86, Board(HOST, silent.getsockname()[1]), timeout=2)
        assert time.monotonic() - start < 10
        start = time.monotonic()
        with pytest.raises(DeployTimeout, match="via tracker"):  # a "tracker" that never answers
            deploy(x86, Board(HOST, silent.getsockname()[1], tracker_key=TRACKER_KEY), timeout=2)
        assert time.monotonic() - start < 10

    with pytest.raises(DeployError, match="has no server with key 'nope'.*x86-test"):
        deploy(x86, Board(HOST, boards.tracker, tracker_key="nope"), timeout=10)


def test_cli_timeout_is_one_line(x86, tmp_path):
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(4)
        result = run_cli("deploy", str(x86), "--device", f"{HOST}:{silent.getsockname()[1]}", "--timeout", "2",
                         "--json-out", str(tmp_path / "r.json"), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no answer from" in result.stderr and "raise --timeout" in result.stderr
    assert not (tmp_path / "r.json").exists()


@contextlib.contextmanager
def collector_off():
    """No automatic garbage collection: a session left open by a reference cycle would stay open."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_an_aarch64_artifact_is_refused_by_an_x86_board_which_stays_usable(aarch64, x86, boards, tmp_path):
    board = Board(HOST, boards.direct)
    with collector_off():
        with pytest.raises(TargetMismatch, match="is aarch64 but the board is x86_64"):
            deploy(aarch64, board, timeout=30)
        # deploy ended its session: the server (one session at a time) takes the next one at once
        result, _ = deploy(x86, board, warmup=0, repeat=1, timeout=10, json_out=tmp_path / "r.json")
    assert result["verify"]["passed"]


def test_a_cuda_artifact_is_refused_by_a_board_without_cuda(compiled, boards):
    import tvm

    if tvm.runtime.enabled("cuda") and tvm.cuda().exist:
        pytest.skip("this host has a CUDA GPU: the local server could run it")
    from pipeline.toolchain.cuda_toolchains import find_in_nvidia

    if find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.12") is None:
        pytest.skip("NVRTC 12 missing: cannot build a CUDA artifact here")
    cuda_artifact = compiled("test_mixer", "cuda")[0]
    with pytest.raises(TargetMismatch, match="no cuda support"):
        deploy(cuda_artifact, Board(HOST, boards.direct), timeout=30)


# ---------------------------------------------------------------- an emulated aarch64 board (qemu-user)

def test_aarch64_artifact_on_an_emulated_aarch64_board(aarch64, x86, boards, tmp_path):
    if boards.aarch64 is None:
        pytest.skip(f"aarch64 emulator not set up: {boards.no_aarch64}")
    board = Board(HOST, boards.aarch64)
    with collector_off():
        # Its runtime-only TVM has no LLVM to report the CPU, so a wrong library is caught when the board
        # fails to load it.
        with pytest.raises(TargetMismatch, match="cannot load this x86_64 library"):
            deploy(x86, board, timeout=60, json_out=tmp_path / "x.json")
        result, _ = deploy(make_bundle(aarch64, tmp_path / "arm.tar"), board, warmup=1, repeat=3, timeout=60)
    assert result["verify"]["passed"] and result["latency_ms"]["runs"] == 3
    assert result["board"]["arch"] is None  # a runtime-only TVM cannot say
    assert json.loads((tmp_path / "arm.deploy.json").read_text())["target"] == "aarch64"
