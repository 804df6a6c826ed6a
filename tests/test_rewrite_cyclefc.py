"""The CycleFC rewrite: finds every exported CycleFC, leaves look-alikes alone, and stays exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cyclemlp import CycleFC, CycleMLP
from pipeline.runtime import run_library
from pipeline.stages.build import build
from pipeline.tvm_targets import to_tvm_target
from pipeline.stages.verify import verify
from targets import get_target
from tvm_schedules.passes.rewrite_cyclefc import is_cyclic_shift_kernel, rewrite_cyclefc
from conftest import imported_module
from pipeline.stages.reference import OUTPUT_NAMES

X86 = get_target("x86")


class NHWCCycleFC(nn.Module):
    """CycleFC between the NHWC<->NCHW transposes, as CycleMLP's token mixer uses it."""

    def __init__(self, c, o, kernel_size, bias=True):
        super().__init__()
        self.fc = CycleFC(c, o, kernel_size, bias=bias)

    def forward(self, x):
        return self.fc(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class LookAlike(nn.Module):
    """Depthwise conv with a fixed kernel, then a 1x1 conv: CycleFC's shape, other weights."""

    def __init__(self, c, o, shift_kernel):
        super().__init__()
        self.register_buffer("shift_kernel", shift_kernel, persistent=False)
        self.proj = nn.Conv2d(c, o, 1)

    def forward(self, x):
        kh, kw = self.shift_kernel.shape[2:]
        return self.proj(F.conv2d(x, self.shift_kernel, padding=(kh // 2, kw // 2), groups=x.shape[1]))


def compile_and_check(module, input_shape, tmp_path):
    """Export -> simplify -> import -> rewrite -> build -> run; return the rewrite report."""
    torch.manual_seed(0)
    mod, params, inputs, reference = imported_module(module, input_shape, tmp_path)
    mod, params, report = rewrite_cyclefc(mod, params, to_tvm_target(X86))
    build(mod, X86, tmp_path / "lib.so")
    actual = run_library(tmp_path / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)
    verify(reference, {"tvm": actual}, {"tvm": (1e-5, 1e-4)})
    return report, mod


@pytest.mark.parametrize("c,o,kernel_size,hw,bias", [
    (7, 5, (1, 3), (5, 7), True),
    (5, 11, (3, 1), (6, 4), True),
    (8, 8, (1, 5), (3, 9), False),
])
def test_nhwc_site_is_rewritten_and_exact(tmp_path, c, o, kernel_size, hw, bias):
    report, mod = compile_and_check(NHWCCycleFC(c, o, kernel_size, bias), (2, *hw, c), tmp_path)
    assert report["sites"] == 1
    script = mod["main"].script()
    assert "conv2d" not in script and "permute_dims" not in script  # both transposes absorbed


def test_nchw_site_is_rewritten_and_exact(tmp_path):
    report, mod = compile_and_check(CycleFC(6, 4, (3, 1)), (1, 6, 5, 5), tmp_path)
    assert report["sites"] == 1 and "conv2d" not in mod["main"].script()


@pytest.mark.parametrize("make_kernel", [
    lambda k: torch.flip(k, dims=[3]),  # one-hot, but the opposite shift
    lambda k: k * 2,  # the right taps, scaled
    lambda k: torch.randn_like(k),  # an ordinary depthwise conv
])
def test_look_alikes_are_left_alone_and_still_exact(tmp_path, make_kernel):
    shift_kernel = make_kernel(CycleFC(6, 6, (1, 3)).shift_kernel)
    assert not is_cyclic_shift_kernel(shift_kernel.numpy())
    report, mod = compile_and_check(LookAlike(6, 4, shift_kernel), (1, 6, 5, 7), tmp_path)
    assert report["sites"] == 0 and "conv2d" in mod["main"].script()


def test_the_cyclic_shift_kernel_is_recognised():
    for kernel_size in [(1, 3), (3, 1), (1, 5), (7, 1)]:
        assert is_cyclic_shift_kernel(CycleFC(10, 10, kernel_size).shift_kernel.numpy())


def test_every_cyclefc_of_a_cyclemlp_is_rewritten(compiled):
    """A CycleFC is in a fused token mixer or our CycleFC kernel; none is left to TVM's conv lowering."""
    import models

    _, manifest = compiled("test_cyclemlp")
    modules = list(models.create_model("test_cyclemlp").modules())
    count = sum(isinstance(m, CycleFC) for m in modules)
    mixers = sum(isinstance(m, CycleMLP) for m in modules)
    passes = manifest["passes"]
    fused = passes["fuse_cycle_token_mixer"]["sites"]
    assert 0 < fused < mixers  # test_cyclemlp's last stage, 4x4 pixels of 28 channels, is too small to fuse
    assert passes["rewrite_cyclefc"]["sites"] + 2 * fused == count
