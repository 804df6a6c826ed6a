"""End-to-end compiles: real export, onnxsim, TVM build, and runs on this host or under qemu."""
import json
import re

import numpy as np
import pytest

import models
import targets
from conftest import ALL_TARGETS, DEFAULT_FULL_SIZE, FULL_SIZE_MODELS, TEST_MODELS
from pipeline.toolchain.elf import machine as elf_machine
from pipeline.toolchain.cubin import cubin_info, cuda_device_code_format
from pipeline.runtime import sha256_file
from pipeline.tvm_targets import to_tvm_target

# model.onnx, the unsimplified export, only with --keep-export
EXPECTED_FILES = {"model.sim.onnx", "lib.so", "params.npz", "inputs.npz", "outputs.npz"}
ELF_MACHINE = {None: 62, "aarch64-linux-gnu": 183}  # x86-64 host, or the cross triple


def library_runs_here(spec: targets.TargetSpec) -> bool:
    """CPU libraries run here, natively or under qemu (CI runs scripts/setup_aarch64_runtime.sh); GPU ones don't."""
    return spec.device == "cpu"


def check_artifact(out, manifest):
    spec = targets.get_target(manifest["target"]["name"])
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest, name
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["verify"]["passed"]
    runtimes = {c["name"].split("/")[0] for c in manifest["verify"]["outputs"]}
    if library_runs_here(spec):
        assert runtimes == {"tvm", "onnxruntime"} and manifest["verify"]["compiled_library"].startswith("ran")
        assert manifest["verify"]["library_verified"]
    else:  # its host twin ran instead, and the library is not called verified
        assert runtimes == {"tvm-host", "onnxruntime"} and manifest["verify"]["compiled_library"].startswith("not run")
        assert not manifest["verify"]["library_verified"]
    assert elf_machine(out / "lib.so") == ELF_MACHINE[spec.cross_triple]
    assert manifest["target"]["build"]["python_only_builtins"] == []  # so the bundle's native runner can run it
    if spec.cuda:
        assert cuda_device_code_format(out / "lib.so") == "cubin"  # machine code, not source for the board to JIT
        cuda = manifest["target"]["build"]["cuda"]
        assert cuda["arch"] == spec.cuda.arch and cuda["kernels"]
    # nothing but the artifact was left beside it
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def _builds_like_an_earlier_target(name: str) -> bool:
    """A GPU target with the TVM target of one listed before it but for its host's core count (jetson-orin-nx has
    the Orin Nano's, jetson-xavier-nx the AGX Xavier's): the same kernels and host code, under another name."""
    def device_code(spec):
        return spec.cuda is not None and re.sub(r'"num-cores":\d+', "", str(to_tvm_target(spec)))

    codes = [device_code(t) for t in targets.list_targets()]
    code = device_code(targets.get_target(name))
    return bool(code) and codes.index(code) < ALL_TARGETS.index(name)


# Such a target compiles test_cyclemlp (our kernels) by default, the other test variants under -m slow (the default
# suite's budget).
COMPILE_CASES = [pytest.param(model, target, marks=pytest.mark.slow if model != "test_cyclemlp"
                              and _builds_like_an_earlier_target(target) else ())
                 for model in TEST_MODELS for target in ALL_TARGETS]


@pytest.mark.parametrize("model,target", COMPILE_CASES)
def test_every_test_variant_compiles_for_every_target(compiled, model, target):
    out, manifest = compiled(model, target)
    check_artifact(out, manifest)
    assert manifest["model"]["name"] == model and manifest["target"]["name"] == target
    assert manifest["params"] == list(np.load(out / "params.npz").files)


def test_compile_one_full_size_model(compiled):
    check_artifact(*compiled(DEFAULT_FULL_SIZE))


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(set(FULL_SIZE_MODELS) - {DEFAULT_FULL_SIZE}))
def test_compile_full_size(compiled, model):
    check_artifact(*compiled(model))


def test_cuda_cubins_are_for_the_target_arch(compiled):
    for name in ("cuda", "jetson-agx-xavier"):
        out, manifest = compiled("test_mixer", name)
        from pipeline.toolchain.cubin import cuda_device_code
        [(fmt, cubin)] = cuda_device_code(out / "lib.so")
        assert fmt == "cubin" and cubin_info(cubin)["arch"] == targets.get_target(name).cuda.arch


def test_every_registered_model_and_target_is_compiled_by_a_test():
    assert set(TEST_MODELS) | set(FULL_SIZE_MODELS) == set(models.list_models())
    assert set(ALL_TARGETS) == {t.name for t in targets.list_targets()}  # all parametrize the test above
