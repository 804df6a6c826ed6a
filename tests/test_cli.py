"""The command line: help, listings, and one-line errors (never a traceback) for bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
from conftest import run_cli


@pytest.mark.parametrize("command", [[], ["compile"], ["list-models"], ["list-targets"]])
def test_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_list_models_names_every_registered_model():
    result = run_cli("list-models", "--json")
    assert result.returncode == 0
    assert set(models.list_models()) <= set(result.stdout.split('"'))


def test_list_targets():
    result = run_cli("list-targets")
    assert result.returncode == 0 and "x86" in result.stdout


def assert_one_line_error(result, *fragments, code=2):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_model_suggests_close_names():
    assert_one_line_error(run_cli("compile", "--model", "cyclemlp_b6"), "unknown model 'cyclemlp_b6'", "did you mean cyclemlp_b5")


def test_unknown_target():
    assert_one_line_error(run_cli("compile", "--model", "test_mixer", "--target", "x68"), "unknown target 'x68'", "x86")


def test_batch_must_be_positive():
    assert_one_line_error(run_cli("compile", "--model", "test_mixer", "--batch", "0"), "--batch")


def test_missing_weights_file(tmp_path):
    result = run_cli("compile", "--model", "test_mixer", "--weights", str(tmp_path / "nope.pth"),
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "cannot read weights file")
    assert not (tmp_path / "a").exists()


def test_garbage_weights_file(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    result = run_cli("compile", "--model", "test_mixer", "--weights", str(tmp_path / "w.pth"),
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "is not a PyTorch state_dict checkpoint")


def test_weights_of_another_model(tmp_path):
    torch.save(models.create_model("test_resmlp").state_dict(), tmp_path / "w.pth")
    result = run_cli("compile", "--model", "test_mixer", "--weights", str(tmp_path / "w.pth"),
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "does not fit this model", "missing keys")


def test_wrong_shaped_weights(tmp_path):
    state = models.create_model("test_mixer").state_dict()
    state["head.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "w.pth")
    result = run_cli("compile", "--model", "test_mixer", "--weights", str(tmp_path / "w.pth"),
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "shape mismatches", "head.weight (3, 3)")


def test_cyclemlp_offsets_that_are_no_shift(tmp_path):
    state = models.create_model("test_cyclemlp").state_dict()
    key = next(k for k in state if k.endswith(".offset"))
    state[key] = state[key] + 0.5  # CycleFC only samples whole pixels
    torch.save(state, tmp_path / "w.pth")
    result = run_cli("compile", "--model", "test_cyclemlp", "--weights", str(tmp_path / "w.pth"),
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "does not fit test_cyclemlp", "offsets must be integers")
    assert not (tmp_path / "a").exists()


def test_output_dir_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli("compile", "--model", "test_mixer", "--out", str(tmp_path / "file" / "a"))
    assert_one_line_error(result, "cannot write to", "--out")


def test_refuses_to_overwrite_a_directory_that_is_not_an_artifact(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    result = run_cli("compile", "--model", "test_mixer", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "is not an artifact")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"


def test_compile_with_a_checkpoint_and_replace_an_artifact(tmp_path):
    model = models.create_model("test_gmlp")
    torch.nn.init.normal_(model.head.weight, std=0.05)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    out = tmp_path / "art"
    for _ in range(2):  # the second run replaces the first artifact in place
        result = run_cli("compile", "--model", "test_gmlp", "--weights", str(tmp_path / "w.pth"), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "tvm/logits" in result.stderr and f"artifact: {out}" in result.stdout
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["weights"]["source"] == "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "w.pth"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_compile_leaves_no_artifact(tmp_path, sig):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compile", "--model", "test_cyclemlp", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    deadline = time.time() + 60
    while not any(p.name.startswith(".art.partial-") and any(p.glob("model*.onnx")) for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "compile never started writing"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert list(tmp_path.iterdir()) == []  # the partial directory was removed too
    else:  # kill -9 cannot clean up; what remains is hidden and has no manifest
        assert all(p.name.startswith(".art.partial-") and not (p / "manifest.json").exists() for p in tmp_path.iterdir())


def test_cuda_arch_only_for_the_generic_cuda_target():
    result = run_cli("compile", "--model", "test_mixer", "--target", "jetson-orin-nano", "--cuda-arch", "sm_75")
    assert_one_line_error(result, "fixed GPU architecture")
    result = run_cli("compile", "--model", "test_mixer", "--target", "rpi4", "--cuda-arch", "sm_87")
    assert_one_line_error(result, "rpi4 has no GPU")


@pytest.mark.parametrize("arch, says", [("sm_120", "cannot compile for sm_120"), ("sm87", "must look like 'sm_87'"),
                                        ("sm_20", "cannot compile for sm_20")])
def test_unsupported_cuda_arch_is_bad_input_refused_before_any_work(tmp_path, arch, says):
    start = time.monotonic()
    result = run_cli("compile", "--model", "test_mixer", "--target", "cuda", "--cuda-arch", arch,
                     "--out", str(tmp_path / "a"))
    assert_one_line_error(result, says, code=2)  # bad input; it was exit 1 after a whole build (~11 s)
    assert not (tmp_path / "a").exists() and time.monotonic() - start < 10


@pytest.mark.parametrize("target", ["rpi4", "aarch64"])
def test_fp16_is_refused_where_the_cpu_has_no_float16_arithmetic(tmp_path, target):
    result = run_cli("compile", "--model", "test_mixer", "--target", target, "--fp16", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "has no float16 arithmetic", "compile without --fp16")
    assert not (tmp_path / "a").exists()
