"""aarch64: cross-link with zig (pip ziglang) or Debian's cross g++, run under qemu-user.

The build-and-run tests need `scripts/setup_aarch64_runtime.sh` (qemu-user, an aarch64 Python
userland with the aarch64 TVM runtime wheel, ziglang); without it they skip, saying so.
"""
import sys

import numpy as np
import pytest

import targets
from conftest import aarch64_linker, emulator_available, linker_available
from pipeline import paths
from pipeline.emulation import EmulationError, EmulatorUnavailable, find_emulator, run_library_emulated
from pipeline.toolchain import cross_link
from pipeline.toolchain.cross_link import CrossLinkError
from pipeline.toolchain.elf import EM_AARCH64, machine as elf_machine
from pipeline.toolchain.fma_loops import analyze_library, find_objdump

SETUP = "scripts/setup_aarch64_runtime.sh"
NOT_SET_UP = f"aarch64 emulator not set up: run {SETUP} as root (qemu-user, aarch64 Python + TVM runtime, ziglang)"
AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a72"}


# ---------------------------------------------------------------- linker selection (no toolchain needed)

def test_no_linker_is_a_typed_error_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(cross_link, "zig_command", lambda: None)
    monkeypatch.setattr(cross_link.shutil, "which", lambda name: None)
    with pytest.raises(CrossLinkError) as e:
        aarch64_linker()
    msg = str(e.value)
    assert "pip install ziglang" in msg and "g++-aarch64-linux-gnu" in msg and SETUP in msg
    assert not linker_available()


def test_debian_cross_gcc_is_the_fallback(monkeypatch):
    monkeypatch.setattr(cross_link, "zig_command", lambda: None)
    monkeypatch.setattr(cross_link.shutil, "which", lambda name: f"/usr/bin/{name}" if name.endswith("-g++") else None)
    fcompile = aarch64_linker()
    assert fcompile.linker == "/usr/bin/aarch64-linux-gnu-g++"
    assert fcompile.output_format == "so" and fcompile.get_target_triple() == "aarch64-linux-gnu"
    with pytest.raises(CrossLinkError, match="pip install ziglang"):
        aarch64_linker(prefer="zig")


def test_zig_is_preferred_and_caches_in_a_stable_place(monkeypatch, tmp_path):
    monkeypatch.setattr(cross_link, "zig_command", lambda: [sys.executable, "-m", "ziglang"])
    monkeypatch.setenv("PIPELINE_ZIG_CACHE_DIR", str(tmp_path / "zig"))
    fcompile = aarch64_linker()
    assert fcompile.linker == "zig (aarch64-linux-gnu.2.28)"
    assert paths.zig_cache_dir() == tmp_path / "zig"
    monkeypatch.delenv("PIPELINE_ZIG_CACHE_DIR")
    monkeypatch.delenv("PIPELINE_CACHE_DIR", raising=False)  # the tests' isolated cache (conftest)
    assert paths.zig_cache_dir().parts[-3:] == (".cache", "pipeline", "zig")


def test_missing_emulator_is_a_typed_error_naming_the_setup_script(tmp_path):
    assert not emulator_available(tmp_path)
    with pytest.raises(EmulatorUnavailable, match=SETUP):
        find_emulator(tmp_path)


def test_emulation_refuses_a_library_that_is_not_aarch64(tmp_path):
    x86_lib = tmp_path / "x86.so"
    x86_lib.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + (3).to_bytes(2, "little") + (62).to_bytes(2, "little"))
    assert elf_machine(x86_lib) == 62  # an x86-64 ELF header
    with pytest.raises(EmulationError, match="not an aarch64 library"):
        run_library_emulated(x86_lib, {}, {}, ("y",), root=tmp_path)


# ---------------------------------------------------------------- build for aarch64, link, run under qemu

@pytest.fixture(scope="module")
def aarch64_build(tmp_path_factory):
    """A tiny conv + MLP net with two outputs: torch reference, then ONNX -> Relax -> aarch64 .so."""
    if not linker_available() and not emulator_available():
        pytest.skip(NOT_SET_UP)
    import torch
    import torch.nn as nn
    import tvm
    from tvm import relax

    from pipeline.stages.export import export_onnx
    from pipeline.stages.relax_import import import_onnx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8 * 8 * 8)
            self.fc1 = nn.Linear(8 * 8 * 8, 32)
            self.fc2 = nn.Linear(32, 10)
            self.scale = nn.Parameter(torch.tensor(1.5))  # a 0-d weight: must cross over as 0-d

        def forward(self, x):
            feat = torch.nn.functional.gelu(self.fc1(self.norm(torch.relu(self.conv(x)).flatten(1))))
            return (self.fc2(feat) * self.scale).softmax(-1), feat

    torch.manual_seed(0)
    model = Net().eval()
    inputs = {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)}
    output_names = ("probs", "features")
    with torch.no_grad():
        reference = {n: t.numpy() for n, t in zip(output_names, model(torch.from_numpy(inputs["image"])))}

    work = tmp_path_factory.mktemp("aarch64")
    onnx_path = export_onnx(model, inputs, output_names, 17, work / "net.onnx")
    mod, params = import_onnx(onnx_path, {k: v.shape for k, v in inputs.items()})
    assert any(v.ndim == 0 for v in params.values())
    target = tvm.target.Target(AARCH64_TARGET)
    executable = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
    lib = work / "net.so"
    executable.export_library(str(lib), fcompile=aarch64_linker())
    return lib, params, inputs, output_names, reference


def test_export_is_an_aarch64_shared_object(aarch64_build):
    lib = aarch64_build[0]
    head = lib.read_bytes()[:18]
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[16] == 3  # 64-bit, ET_DYN
    assert elf_machine(lib) == EM_AARCH64 == 183


def test_runs_under_emulation_and_matches_torch(aarch64_build):
    if not emulator_available():
        pytest.skip(NOT_SET_UP)
    lib, params, inputs, output_names, reference = aarch64_build
    timings = {}
    outputs = run_library_emulated(lib, params, inputs, output_names, timings=timings)
    assert list(outputs) == list(output_names)
    for name in output_names:
        assert outputs[name].shape == reference[name].shape and outputs[name].dtype == np.float32
        err = float(np.abs(outputs[name] - reference[name]).max())
        assert err <= 1e-5, f"{name}: max abs {err:.3g}"
    assert np.ptp(reference["probs"]) > 0.01  # the reference is not degenerate
    assert timings["total_s"] < 120, timings


def test_emulated_failure_is_reported_with_the_remote_error(aarch64_build):
    if not emulator_available():
        pytest.skip(NOT_SET_UP)
    lib, params, inputs, output_names, _ = aarch64_build
    wrong = {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in inputs.items()}  # batch 1 for a batch-2 build
    with pytest.raises(EmulationError, match="failed"):
        run_library_emulated(lib, params, wrong, output_names)


# ---------------------------------------------------------------- --fp16 on the boards with float16 arithmetic

@pytest.mark.parametrize("target", [t.name for t in targets.list_targets()
                                    if t.runner == "qemu-aarch64" and t.float16_arithmetic])
def test_fp16_board_build_computes_in_float16_and_verifies_under_qemu(target, tmp_path):
    """compile --fp16 for rpi5 / jetson-orin-cpu: the library's FMAs are float16 (``fmla v.8h``) and it ran under
    qemu against PyTorch within the variant's fp16 tolerance (compile_model raises when an output is outside it)."""
    if not emulator_available() or not linker_available():
        pytest.skip(NOT_SET_UP)
    if find_objdump() is None:
        pytest.skip("llvm-objdump not installed (apt-get install llvm)")
    import models
    from pipeline.run import compile_model
    from pipeline.spec import BuildSpec

    out, manifest = compile_model(BuildSpec(model="test_mixer", target=target, fp16=True), tmp_path / "a")
    verify = manifest["verify"]
    assert verify["passed"] and verify["library_verified"] and "qemu-aarch64" in verify["compiled_library"]
    cfg = models.get_model_cfg("test_mixer")
    (library,) = [check for check in verify["outputs"] if check["name"].startswith("tvm/")]
    assert (library["atol"], library["rtol"]) == (cfg.fp16_atol, cfg.fp16_rtol)
    assert analyze_library(out / "lib.so").fmla_by_arrangement["8h"] > 0
