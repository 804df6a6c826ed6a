"""Inference batch_norm folds into a multiply-add: no square root per element, the residual add after it fused, and
the result as exact against PyTorch as before."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.runtime import run_library
from pipeline.stages.build import build
from pipeline.stages.optimize import lower, optimize
from pipeline.stages.reference import OUTPUT_NAMES
from pipeline.stages.verify import VerificationFailed, verify
from pipeline.tvm_targets import to_tvm_target
from targets import get_target
from tvm_schedules.passes.fold_batch_norm import fold_batch_norm
from conftest import imported_module

X86 = get_target("x86")


class DepthwiseBlock(nn.Module):
    """ConvMixer's residual depthwise block: x + BN(GELU(conv_dw(x)))."""

    def __init__(self, channels=6, kernel=3, affine=True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, groups=channels, padding="same")
        self.norm = nn.BatchNorm2d(channels, affine=affine)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.norm(self.act(self.conv(x)))


def block(**kwargs) -> nn.Module:
    """Statistics and affine weights far from the fresh 0/1, so a wrong fold cannot pass."""
    torch.manual_seed(0)
    module = DepthwiseBlock(**kwargs).eval()
    with torch.no_grad():
        module.norm.running_mean.normal_(0, 1)
        module.norm.running_var.uniform_(0.2, 3)
        if module.norm.affine:
            module.norm.weight.normal_(0, 1)
            module.norm.bias.normal_(0, 1)
    return module


def run(mod, params, inputs, tmp_path):
    build(mod, X86, tmp_path / "lib.so")
    return run_library(tmp_path / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_batch_norm_folds_and_stays_exact(tmp_path, affine):
    mod, params, inputs, reference = imported_module(block(affine=affine), (2, 6, 5, 7), tmp_path, seed=1)
    folded, new_params, report = fold_batch_norm(mod, params, to_tvm_target(X86))
    assert report == {"sites": 1}
    assert "batch_norm" not in folded["main"].script()
    statistics = {a.name for a in mod["main"].params if a.name.startswith("norm.")}
    assert statistics and not statistics & set(new_params)  # shipped as the scale and shift instead
    outputs = run(folded, new_params, inputs, tmp_path)
    verify(reference, {"tvm": outputs}, {"tvm": (1e-5, 1e-4)})
    # the check can fail: a scale off by 1 % is caught
    scale = next(name for name in new_params if name.endswith(".scale"))
    wrong = {**new_params, scale: new_params[scale] * 1.01}
    with pytest.raises(VerificationFailed):
        verify(reference, {"tvm": run_library(tmp_path / "lib.so", "cpu", wrong, inputs, OUTPUT_NAMES)},
               {"tvm": (1e-5, 1e-4)})


@pytest.mark.parametrize("target", ["x86", "jetson-orin-nano"])
def test_the_residual_add_fuses_into_the_convolution(tmp_path, target):
    mod, params, _, _ = imported_module(block(), (1, 6, 5, 7), tmp_path)
    lowered, _, reports = lower(mod, params, get_target(target))
    assert reports["fold_batch_norm"] == {"sites": 1}
    functions = [gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint != "main"]
    convs = [name for name in functions if "conv2d" in name]
    assert len(convs) == 1 and "sqrt" not in convs[0], functions
    # conv, bias, GELU, the folded BN's multiply-add and the residual add: one function; nothing else reads x
    assert not [name for name in functions if name.startswith("add")], functions


def test_a_kept_batch_norm_is_left_alone(tmp_path):
    mod, params, _, _ = imported_module(block(), (1, 6, 5, 7), tmp_path)
    names = {b.var.name for b in mod["main"].body.blocks[0].bindings if "batch_norm" in str(b.value)[:20]}
    assert names
    _, same, report = fold_batch_norm(mod, params, to_tvm_target(X86), keep=frozenset(names))
    assert report == {"sites": 0} and same is params
