"""CUDA targets: every kernel fits the target's per-block limits, and a kernel that does not is refused."""
import dataclasses

import numpy as np
import pytest
from tvm import relax

import targets
from conftest import CUDA_TARGETS
from pipeline import runtime
from pipeline.errors import BuildError
from pipeline.run import compile_model
from pipeline.spec import BuildSpec
from pipeline.stages.build import build
from pipeline.toolchain.cuda_aot import SPILL_RETRIES
from pipeline.toolchain.kernel_limits import kernel_limit_violations
from pipeline.stages.optimize import optimize
from pipeline.stages.relax_import import import_onnx

# The default suite checks one sm_87 and one sm_72 target; -m slow checks every CUDA target.
DEFAULT_CASES = {("cyclemlp_b1", "jetson-orin-nano"), ("mixer_b16_224", "jetson-agx-xavier")}
CASES = [pytest.param(m, t, marks=() if (m, t) in DEFAULT_CASES else pytest.mark.slow)
         for m in ("cyclemlp_b1", "mixer_b16_224") for t in CUDA_TARGETS]


def check_kernels(manifest, spec):
    cuda = manifest["target"]["build"]["cuda"]
    assert cuda["device_code"] == "cubin" and cuda["arch"] == spec.cuda.arch
    assert cuda["kernels"] and kernel_limit_violations(cuda["kernels"], spec.cuda) == []
    retries = [r.what for r in SPILL_RETRIES]  # per module: none, or the first few in their order
    assert cuda["spill_retries"] and all(done == retries[:len(done)] for done in cuda["spill_retries"])
    for kernel in cuda["kernels"]:
        assert 0 < kernel["registers"] <= spec.cuda.max_registers_per_thread
        assert 0 < kernel["max_threads"] <= spec.cuda.max_threads_per_block


@pytest.mark.parametrize("model,target", CASES)
def test_kernels_fit_the_target(compiled, model, target):
    _, manifest = compiled(model, target)
    check_kernels(manifest, targets.get_target(target))
    if model.startswith("cyclemlp"):
        assert any(k["name"].startswith("cyclefc") for k in manifest["target"]["build"]["cuda"]["kernels"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mixer_s16_224", "gmlp_s16_224"])
def test_a_module_that_spills_at_O3_is_compiled_again_at_O2(model, tmp_path):
    """float16 on sm_87: the channel fc2 with its residual add spilled 8 bytes at ptxas -O3 (128 registers, the cap
    of its 512-thread block, so one block per SM changes nothing), which failed the build; at -O2 it fits."""
    spec = targets.get_target("jetson-orin-nano")
    _, manifest = compile_model(BuildSpec(model=model, target=spec.name, fp16=True), tmp_path / "a")
    check_kernels(manifest, spec)
    assert [r.what for r in SPILL_RETRIES] in manifest["target"]["build"]["cuda"]["spill_retries"]


def test_a_kernel_that_spills_for_two_blocks_per_sm_gets_the_registers_of_one(tmp_path):
    """A float16 tensor-core matmul of cyclemlp_b1's stage 1 (3136x64x64) on sm_72: with TVM's __launch_bounds__(512)
    ptxas took 64 registers and spilled 8 bytes (which failed `--target cuda --cuda-arch sm_72 --fp16`); it is
    compiled again with (512, 1) and fits. The one-matmul module builds in seconds where the model takes minutes."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3136, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64, 64), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            gv = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(gv)
    spec = targets.get_target("cuda").with_cuda_arch("sm_72")
    mod, _, _ = optimize(bb.get(), {"w": np.zeros((64, 64), "float32")}, spec, fp16=True)
    cuda = build(mod, spec, tmp_path / "lib.so")["cuda"]
    matmul = next(k for k in cuda["kernels"] if k["name"] == "matmul_kernel")
    assert matmul["rule"] == "TensorCoreMatmul" and matmul["local_bytes"] == 0 and matmul["registers"] > 64
    assert cuda["spill_retries"] == [[SPILL_RETRIES[0].what]]
    assert kernel_limit_violations(cuda["kernels"], spec.cuda) == []


def test_a_kernel_over_the_limits_is_refused(compiled, tmp_path):
    out, _ = compiled("test_mixer")
    tight = dataclasses.replace(targets.get_target("cuda"), name="tight-cuda",
                                cuda=dataclasses.replace(targets.get_target("cuda").cuda, max_registers_per_thread=8,
                                                         max_threads_per_block=64))
    mod, params = import_onnx(out / "model.sim.onnx", {"input": (1, 3, 32, 32)})
    mod, _, _ = optimize(mod, params, tight)
    with pytest.raises(BuildError, match="exceed tight-cuda's limits"):
        build(mod, tight, tmp_path / "lib.so")


def test_dynamic_shared_memory_counts_against_the_opt_in_limit_and_must_be_known():
    # a kernel's static and dynamic shared memory together, on the arch's opt-in limit (sm_72: 96 KiB)
    spec = targets.get_target("jetson-agx-xavier").cuda
    kernel = {"name": "k", "registers": 32, "shared_bytes": 1024, "local_bytes": 0, "max_threads": 256}
    assert kernel_limit_violations([{**kernel, "dynamic_shared_bytes": 96 * 1024 - 1024}], spec) == []
    assert kernel_limit_violations([{**kernel, "dynamic_shared_bytes": 96 * 1024 - 1023}], spec) == [
        "k: shared_bytes 1024 + dynamic_shared_bytes 97281 > 98304 (sm_72's opt-in limit per block)"]
    assert kernel_limit_violations([{**kernel, "dynamic_shared_bytes": None}], spec) == [
        "k: dynamic shared memory is not a constant, cannot be checked"]


def test_fp16_records_its_tolerance(tmp_path):
    out, manifest = compile_model(BuildSpec(model="test_cyclemlp", target="x86", fp16=True), tmp_path / "a")
    [tvm_check] = [c for c in manifest["verify"]["outputs"] if c["name"].startswith("tvm/")]
    assert tvm_check["atol"] == 1e-2 and tvm_check["passed"] and tvm_check["max_abs"] > 1e-6  # really float16
    assert manifest["passes"]["precision"].startswith("float16")
    # our kernels compute in float16 too: the token mixer's and the CycleFC's (the last stage's, not fused)
    assert manifest["passes"]["fuse_cycle_token_mixer"]["dtype"] == manifest["passes"]["rewrite_cyclefc"]["dtype"] \
        == "float16"
    _, cuda_manifest = compile_model(BuildSpec(model="test_mixer", target="cuda", cuda_arch="sm_75", fp16=True),
                                     tmp_path / "b")
    assert cuda_manifest["target"]["build"]["cuda"]["arch"] == "sm_75"
    # Not run here (no GPU), yet the board's run.py must hold it to float16's tolerance, not float32's.
    assert cuda_manifest["verify"]["compiled_library"].startswith("not run here")
    assert runtime.tolerances(cuda_manifest) == {"logits": (1e-2, 1e-2)}


@pytest.mark.parametrize("name", CUDA_TARGETS)
def test_every_cuda_target_names_a_toolchain_that_compiles_its_arch(name):
    from pipeline.toolchain.cuda_toolchains import TOOLCHAINS, arch_problem

    cuda = targets.get_target(name).cuda
    assert cuda.toolchain in TOOLCHAINS, f"{name}: no CUDA toolchain {cuda.toolchain!r}"
    assert arch_problem(cuda.arch, TOOLCHAINS[cuda.toolchain]) is None


def test_toolchain_pins_are_pyprojects():
    """The CUDA packages are pinned once, in pyproject.toml; the toolchains read the pins from there."""
    import tomllib
    from pathlib import Path

    from pipeline.toolchain.cuda_toolchains import TOOLCHAINS, pinned

    dependencies = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    for toolchain in TOOLCHAINS.values():
        for package in toolchain.pip_packages:
            assert "==" not in package, f"{toolchain.name} pins {package} itself"
            assert pinned(package) in dependencies, f"{package} is not pinned in pyproject.toml"
