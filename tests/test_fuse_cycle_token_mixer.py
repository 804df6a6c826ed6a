"""The fused CycleMLP token mixer: found where the model has one, left alone where anything differs, and as exact
as the unfused graph against the PyTorch module, on odd shapes."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from models.cyclemlp import CycleMLP
from pipeline.run import compile_model
from pipeline.runtime import run_library
from pipeline.spec import BuildSpec
from pipeline.stages.build import build
from pipeline.stages.optimize import lower
from pipeline.stages.verify import verify
from pipeline.tvm_targets import to_tvm_target
from targets import get_target
from tvm_schedules.passes.fuse_cycle_token_mixer import fuse_cycle_token_mixer, read_mask
from tvm_schedules.passes.rewrite_cyclefc import rewrite_cyclefc
from conftest import imported_module
from pipeline.stages.reference import OUTPUT_NAMES

X86 = get_target("x86")


class MixerAndBranch(nn.Module):
    """The mixer's output plus its sfc_h branch: that branch has a use outside the mixer."""

    def __init__(self, dim):
        super().__init__()
        self.mixer = CycleMLP(dim)

    def forward(self, x):
        return self.mixer(x) + self.mixer.sfc_h(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def mixer(dim: int, qkv_bias: bool = False, seed: int = 0) -> nn.Module:
    """A token mixer whose softmax weights differ per channel (random, not the near-uniform ones of a fresh init)."""
    torch.manual_seed(seed)
    module = CycleMLP(dim, qkv_bias=qkv_bias).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def rewrite(module, input_shape, tmp_path, dtype=None):
    mod, params, inputs, reference = imported_module(module, input_shape, tmp_path, seed=1)
    mod, params, report = fuse_cycle_token_mixer(mod, params, to_tvm_target(X86), dtype)
    mod, params, _ = rewrite_cyclefc(mod, params, to_tvm_target(X86), dtype)
    return mod, params, report, inputs, reference


def run(mod, params, inputs, tmp_path):
    build(mod, X86, tmp_path / "lib.so")
    return run_library(tmp_path / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)


@pytest.mark.parametrize("dim,hw,batch,qkv_bias", [(9, (5, 7), 2, False), (16, (6, 3), 1, True), (8, (1, 9), 1, False)],
                         ids=["9ch-5x7-b2", "16ch-6x3-qkv_bias", "8ch-1x9"])
def test_mixer_is_one_kernel_and_exact(tmp_path, dim, hw, batch, qkv_bias):
    mod, params, report, inputs, reference = rewrite(mixer(dim, qkv_bias), (batch, *hw, dim), tmp_path)
    assert report["sites"] == 1 and report["branches"] == [3]
    script = mod["main"].script()
    # no branch is computed on its own: no conv, no CycleFC kernel, the mlp_c weight only inside the stacked one
    assert "conv2d" not in script and "cyclefc" not in script and "cycle_token_mixer" in script
    assert not any(name.startswith(("sfc_", "mlp_c")) for name in params)
    verify(reference, {"tvm": run(mod, params, inputs, tmp_path)}, {"tvm": (1e-5, 1e-4)})


def test_wrong_branch_weights_are_caught(tmp_path):
    """The check can fail: swapping the two CycleFC directions in the stacked weight breaks the result."""
    dim = 12
    mod, params, _, inputs, reference = rewrite(mixer(dim), (1, 5, 6, dim), tmp_path)
    [name] = [n for n in params if n.endswith(".weight") and params[n].shape == (3 * dim, dim)]
    w = params[name]
    params[name] = np.concatenate([w[dim:2 * dim], w[:dim], w[2 * dim:]])
    out = run(mod, params, inputs, tmp_path)[OUTPUT_NAMES[0]]
    assert float(np.abs(out - reference[OUTPUT_NAMES[0]]).max()) > 1e-2


def test_branch_used_elsewhere_is_left_unfused(tmp_path):
    torch.manual_seed(0)
    module = MixerAndBranch(8).eval()
    mod, params, report, inputs, reference = rewrite(module, (1, 4, 5, 8), tmp_path)
    assert report["sites"] == 0 and "cyclefc" in mod["main"].script()  # the CycleFC rewrite still takes the sites
    verify(reference, {"tvm": run(mod, params, inputs, tmp_path)}, {"tvm": (1e-5, 1e-4)})


def test_float16_mixer_accumulates_in_float32(tmp_path):
    dim = 16
    mod, params, report, inputs, reference = rewrite(mixer(dim, seed=3), (1, 7, 5, dim), tmp_path, dtype="float16")
    assert report["dtype"] == "float16"
    assert [str(a.dtype) for a in params.values() if a.shape == (3 * dim, dim)] == ["float16"]  # the stacked weight
    out = run(mod, params, inputs, tmp_path)[OUTPUT_NAMES[0]]
    ref = reference[OUTPUT_NAMES[0]]
    # float16 inputs and weights (2**-11 relative each), float32 sums: far inside the fp16 tolerance, far from 0
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert 1e-6 < err < 5e-3


def test_read_mask_matches_the_shift():
    # kernel 3: channel 0 reads in place, channel 1 at +1 (never column 0), channel 2 at -1 (never the last)
    mask = read_mask(4, 3, 3)
    assert mask[:, 0].tolist() == [1, 1, 1, 1]
    assert mask[:, 1].tolist() == [0, 1, 1, 1]
    assert mask[:, 2].tolist() == [1, 1, 1, 0]


def test_a_layer_kept_in_float32_keeps_its_mixer_unfused(tmp_path):
    """--keep-fp32 on a CycleFC inside a mixer: that mixer is left to the default lowering, which keeps the layer in
    float32 (our float16 kernel would not), and its CycleFC to TVM's conv; the other mixers are fused."""
    spec = BuildSpec(model="test_cyclemlp", target="x86", fp16=True)
    _, plain = compile_model(spec, tmp_path / "plain")
    _, kept = compile_model(BuildSpec(**{**spec.__dict__, "keep_fp32": ("network.2.0.attn.sfc_h",)}), tmp_path / "kept")
    def sites(manifest):  # (fused mixers, CycleFCs to our CycleFC kernel)
        return manifest["passes"]["fuse_cycle_token_mixer"]["sites"], manifest["passes"]["rewrite_cyclefc"]["sites"]

    (fused, cyclefcs), kept_sites = sites(plain), sites(kept)
    # one mixer fewer; the other CycleFC of that mixer to our float16 CycleFC kernel, the kept one to TVM's conv
    assert fused >= 2 and kept_sites == (fused - 1, cyclefcs + 1)
    assert kept["passes"]["keep_float32"]["legalized_bindings"] >= 2  # the kept CycleFC's shift and projection
    assert kept["verify"]["passed"]


@pytest.mark.parametrize("target,rewrites_as_for,shape,sites", [
    ("x86", None, (1, 8, 8, 64), 1), ("jetson-orin-nano", None, (1, 8, 8, 64), 0),
    ("x86", "jetson-orin-nano", (1, 8, 8, 64), 0), ("x86", None, (1, 7, 7, 64), 0)],
    ids=["x86", "cuda-launches", "cuda-host-twin", "x86-small-image"])
def test_where_the_mixer_is_fused(tmp_path, target, rewrites_as_for, shape, sites):
    """Not on CUDA (TARGET_KINDS: it would launch more kernels there; a CUDA build's host twin does as the build
    does), nor on an image of fewer pixels than channels (MIN_PIXELS_PER_CHANNEL: 49 < 64); 64 pixels of 64
    channels are fused on x86."""
    mod, params, _, _ = imported_module(mixer(64), shape, tmp_path)
    twin_of = get_target(rewrites_as_for) if rewrites_as_for else None
    _, _, reports = lower(mod, params, get_target(target), rewrites_as_for=twin_of)
    assert reports["fuse_cycle_token_mixer"].get("sites", 0) == sites
