"""What a new user trips over: one clear line (never a traceback) for bad weights, a full disk, a library of another
machine, wrong inputs, a board without numpy or TVM; regress that writes nothing it did not measure; a lean
artifact; a CLI that starts fast and says its version."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from conftest import run_cli
from pipeline import runtime
from pipeline.errors import BadInput, RuntimeUnavailable


def assert_one_line(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_weights_holding_nan_or_inf_are_refused_when_loaded(tmp_path):
    state = models.create_model("test_mixer").state_dict()
    state["head.weight"][0, 0] = float("nan")
    state["stem.proj.bias"][1] = float("inf")
    torch.save(state, tmp_path / "w.pth")
    result = run_cli("compile", "--model", "test_mixer", "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "a"))
    assert_one_line(result, 2, "NaN or Inf in 2 tensor(s)", "head.weight", "stem.proj.bias")
    assert not (tmp_path / "a").exists()


def test_a_full_disk_is_said_as_such(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = run_cli("compile", "--model", "test_mixer", "--out", str(mnt / "a"))
        assert_one_line(result, 1, "no space left on device in", str(mnt))
        assert list(mnt.iterdir()) == []  # nothing half-written left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_artifact_keeps_the_unsimplified_export_only_when_asked(tmp_path):
    assert run_cli("compile", "--model", "test_resmlp", "--out", str(tmp_path / "lean")).returncode == 0
    assert run_cli("compile", "--model", "test_resmlp", "--out", str(tmp_path / "full"), "--keep-export").returncode == 0
    assert not (tmp_path / "lean" / "model.onnx").exists() and (tmp_path / "lean" / "model.sim.onnx").exists()
    assert "model.onnx" in json.loads((tmp_path / "full" / "manifest.json").read_text())["files"]


def test_a_library_of_another_cpu_is_named_as_such(compiled):
    artifact, _ = compiled("test_mixer", "aarch64")
    with pytest.raises(RuntimeUnavailable, match="is an aarch64 library and this machine is x86_64"):
        runtime.load_vm(artifact / "lib.so", "cpu")


def test_wrong_inputs_name_the_input_and_both_shapes(compiled):
    artifact, manifest = compiled("test_mixer")
    params, inputs, _ = runtime.load_arrays(artifact, manifest)
    wrong = {"input": inputs["input"][:, :, :31].astype(np.float64)}
    with pytest.raises(BadInput, match=r"input 'input' must be float32 \(1, 3, 32, 32\), not float64 \(1, 3, 31, 32\)"):
        runtime.run_library(artifact / "lib.so", "cpu", params, wrong, ("logits",), manifest=manifest)
    out = runtime.run_library(artifact / "lib.so", "cpu", params, inputs, ("logits",), manifest=manifest)
    assert out["logits"].shape == (1, 10)


@pytest.mark.parametrize("missing, says", [("numpy", "needs numpy and the TVM runtime"),
                                           ("tvm", "cannot import TVM's runtime")])
def test_a_board_without_numpy_or_tvm_gets_one_line(compiled, tmp_path, missing, says):
    artifact, _ = compiled("test_mixer")
    run_py = Path(runtime.__file__)
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['run.py', {str(artifact)!r}]; "
            f"runpy.run_path({str(run_py)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line(result, 1, says)


def test_a_cuda_library_on_an_x86_machine_without_cuda_says_what_this_machine_needs(compiled, tmp_path):
    # A runtime-only TVM (as on a board) and no CUDA driver: not the Jetson advice, this machine's.
    artifact, _ = compiled("test_mixer", "cuda")
    code = ("import os; os.environ['TVM_USE_RUNTIME_LIB'] = '1'\n"
            "from pathlib import Path\nfrom pipeline import runtime\n"
            f"try:\n    runtime.load_vm(Path({str(artifact / 'lib.so')!r}), 'cuda')\n"
            "except runtime.RuntimeUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1]).stdout
    if "finds no cuda device" in out:
        pytest.skip("TVM's CUDA runtime loads on this machine (a driver is present)")
    assert "has no cuda support" in out and "libcudart.so.13" in out and "jetson" not in out, out


def test_regress_update_that_could_not_record_writes_nothing(compiled, tmp_path):
    import tvm

    from pipeline.bench import Budget
    from pipeline.regress import regress, verdict_error

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copytree(compiled("test_mixer")[0], artifacts / "test_mixer-x86")
    # Two rounds are fewer quiet samples than a median needs: what a busy machine gives.
    comparisons, _, path = regress(["test_mixer"], "x86", root=tmp_path / "baselines", artifacts=artifacts,
                                   update=True, budget=Budget(max_rounds=2, max_seconds=5, pause_ms=0),
                                   threads=tvm.get_global_func("runtime.NumThreads")())  # this process's pool
    assert [c.verdict.status for c in comparisons] == ["unrecorded"]
    assert not path.exists() and verdict_error(comparisons, "x86").exit_code == 5


def test_version_help_and_listings():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("pipeline ")
    targets = json.loads(run_cli("list-targets", "--json").stdout)
    assert targets["jetson-orin-nano"]["tvm_target"] == "nvidia/jetson-orin-nano"
    assert "cortex-a78ae" in run_cli("list-targets").stdout  # the Jetsons' host CPU, not cut at 80 columns
    assert "[-fp16]" in run_cli("compile", "--help").stdout


def test_help_does_not_import_torch():
    code = "import sys; from pipeline.cli import cli; print('torch' in sys.modules, 'tvm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False",
                                                                                                          "False"]


def test_deploy_records_the_boards_thread_count(compiled, rpc, tmp_path):
    from pipeline.deploy import deploy
    from pipeline.spec import Board

    result, _ = deploy(compiled("test_mixer")[0], Board("127.0.0.1", rpc.direct), warmup=0, repeat=2, timeout=30,
                       json_out=tmp_path / "r.json")
    assert result["threads"] >= 1 and json.loads((tmp_path / "r.json").read_text())["threads"] == result["threads"]


def test_a_median_never_rests_on_a_few_lucky_samples():
    from pipeline.bench import headline

    lucky = [1.0] + [5.0] * 7  # one fast sample among slow ones: a busy machine
    stats = headline(lucky, min_quiet=8)
    assert stats["basis"].startswith("all samples") and stats["quiet"] == 1 and stats["median"] == 5.0
    calm = [1.0, 1.02, 1.01, 1.03, 1.0, 1.01, 1.02, 1.0, 1.5]
    stats = headline(calm, min_quiet=8)
    assert stats["basis"] == "quiet samples" and stats["n"] == 8 and stats["median"] < 1.05


def test_one_device_check_names_what_is_missing():
    """runtime.device_problem: the check behind loading here, deploy, offline timing and tune."""
    from types import SimpleNamespace

    from pipeline.runtime import device_problem

    orin = SimpleNamespace(exist=True, compute_version="8.7")
    assert device_problem("cuda", True, orin, "the board's TVM runtime", "sm_87") is None
    assert device_problem("cuda", True, orin, "the board's TVM runtime") is None  # any arch
    assert device_problem("cuda", False, orin, "the board's TVM runtime", "sm_87") == (
        "runtime", "the board's TVM runtime has no cuda support")
    assert device_problem("cuda", True, SimpleNamespace(exist=False), "R", "sm_87") == ("device", "R finds no cuda device")
    assert device_problem("cuda", True, orin, "R", "sm_72") == (
        "arch", "R finds a GPU of compute capability 8.7 (sm_87), but the code is compiled for sm_72")
