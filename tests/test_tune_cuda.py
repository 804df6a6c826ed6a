"""Tuning CUDA targets without a GPU here: candidates are cubins for the target's arch (built here with our NVRTC
toolchain, cross-linked for a Jetson's aarch64 host), and a board that cannot run them is refused before any trial.
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from pipeline.toolchain import cuda_toolchains, elf
from pipeline.toolchain.cubin import cubin_info, cuda_device_code

TASK = "fused_matmul2_add6_add3"  # test_mixer's channel fc2, bias and residual add (fused on CUDA: unflatten_linear_chains)
TIMEOUT_S = 300


def tune_cli(*args: str, cache):
    return subprocess.run([sys.executable, "-m", "pipeline", "tune", "--model", "test_mixer", "--trials", "1",
                           "--tasks", TASK, *args], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, "PIPELINE_CACHE_DIR": str(cache)}, timeout=TIMEOUT_S)


def toolchain_missing(name: str) -> bool:
    from pipeline.toolchain.nvrtc import nvrtc

    try:
        nvrtc(cuda_toolchains.get_toolchain(name))
    except cuda_toolchains.CudaToolchainError:
        return True
    return False


@pytest.mark.parametrize("target, arch, toolchain", [
    ("jetson-orin-nano", "sm_87", "nvrtc-12"),
    pytest.param("jetson-xavier-nx", "sm_72", "nvrtc-11", marks=pytest.mark.slow),  # 40 s: the default suite's budget
])
def test_cuda_candidates_are_cubins_for_the_targets_arch(tmp_path, target, arch, toolchain):
    if toolchain_missing(toolchain):
        pytest.skip(f"{toolchain} missing: pip install {' '.join(cuda_toolchains.TOOLCHAINS[toolchain].pip_packages)}")
    result = tune_cli("--target", target, "--export-candidates", str(tmp_path / "gpu.tar"), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "gpu.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    batch = json.loads((tmp_path / "gpu" / "batch.json").read_text())
    assert batch["device"] == "cuda" and batch["cuda_arch"] == arch  # the board's script checks its GPU against it
    libraries = sorted((tmp_path / "gpu").glob("*.so"))
    assert len(libraries) == len(batch["candidates"]) == 2  # one search candidate, the default schedule
    for library in libraries:
        assert elf.machine(library) == elf.EM_AARCH64  # the Jetson's host code, cross-linked
        code = cuda_device_code(library)
        assert code and all(fmt == "cubin" and cubin_info(cubin)["arch"] == arch for fmt, cubin in code)


def test_a_candidate_over_the_targets_limits_fails_to_build():
    """MetaSchedule's builder function holds every kernel to the target's limits: 256 threads per block build for
    Orin, and fail, named, for a GPU that allows 128."""
    if toolchain_missing("nvrtc-12"):
        pytest.skip("nvrtc-12 missing")
    import dataclasses

    import tvm
    from tvm import s_tir, te

    from pipeline.tuning.measure import CandidateOverLimits, _build
    from pipeline.tvm_targets import to_tvm_target
    from targets import get_target

    spec = get_target("jetson-orin-nano")
    x = te.placeholder((4096,), name="x")
    sch = s_tir.Schedule(te.create_prim_func([x, te.compute((4096,), lambda i: x[i] * 2.0, name="y")]))
    blocks, threads = sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 256])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    mod, target = sch.mod, to_tvm_target(spec)
    _build(mod, target, None, cuda=spec.cuda)
    with pytest.raises(CandidateOverLimits, match=r"max_threads 256 > 128"):
        _build(mod, target, None, cuda=dataclasses.replace(spec.cuda, max_threads_per_block=128))


def test_a_board_without_cuda_is_refused_before_any_trial(rpc, tmp_path):
    # The loopback server's TVM (this host's wheel, no libcuda) has no CUDA: one line, exit 2, nothing uploaded.
    server_log = rpc.processes.log("tracked")
    before = len(server_log.read_text())  # the session's server: other tests' trials are in its log already
    result = tune_cli("--target", "jetson-orin-nano", "--db", str(tmp_path / "db"),
                      "--rpc-tracker", f"127.0.0.1:{rpc.tracker}", "--rpc-key", rpc.key, cache=tmp_path / "cache")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the board under key {rpc.key!r}'s TVM runtime has no cuda support: every jetson-orin-nano trial "
        "would fail; on a Jetson build TVM's runtime against the board's CUDA (scripts/build_tvm_runtime_on_jetson.sh)")
    assert "candidate.so" not in server_log.read_text()[before:]
    assert not (tmp_path / "db").exists() or not (tmp_path / "db" / "database_tuning_record.json").exists()
