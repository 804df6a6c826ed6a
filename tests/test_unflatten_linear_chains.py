"""Flattened Linear chains run on their N-D input: what follows fuses into the last matmul, results unchanged."""
import pytest
import torch
import torch.nn as nn

from pipeline.runtime import run_library
from pipeline.stages.build import build
from pipeline.stages.optimize import optimize
from pipeline.stages.relax_import import import_onnx
from pipeline.stages.verify import verify
from pipeline.tvm_targets import to_tvm_target
from targets import get_target
from tvm_schedules.passes.unflatten_linear_chains import unflatten_linear_chains
from conftest import imported_module
from pipeline.stages.reference import OUTPUT_NAMES

X86 = get_target("x86")


class ResidualMlp(nn.Module):
    """x + fc2(gelu(fc1(x))) on (B, T, C): the chain a residual add follows."""

    def __init__(self, c=12, hidden=20):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(c, hidden), nn.Linear(hidden, c), nn.GELU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class MeanOverRows(ResidualMlp):
    """Flattened by hand, with a mean over the rows in between: not row by row, so left alone."""

    def forward(self, x):
        b, t, c = x.shape
        h = self.fc1(x.reshape(b * t, c))
        h = h - h.mean(dim=0, keepdim=True)  # every row of the result reads every row
        return x + self.fc2(self.act(h)).reshape(b, t, c)


def imported(module, shape, tmp_path):
    torch.manual_seed(0)
    return imported_module(module, shape, tmp_path, seed=2)


def test_chain_runs_on_its_input_and_stays_exact(tmp_path):
    mod, params, inputs, reference = imported(ResidualMlp(), (2, 5, 12), tmp_path)
    assert "reshape" in mod["main"].script()
    out, params, report = unflatten_linear_chains(mod, params, to_tvm_target(X86))
    assert report == {"chains": 1} and "reshape" not in out["main"].script()
    build(out, X86, tmp_path / "lib.so")
    verify(reference, {"tvm": run_library(tmp_path / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)},
           {"tvm": (1e-5, 1e-4)})


def test_a_chain_that_is_not_row_wise_is_left_alone(tmp_path):
    mod, params, _, _ = imported(MeanOverRows(), (2, 5, 12), tmp_path)
    _, _, report = unflatten_linear_chains(mod, params, to_tvm_target(X86))
    assert report == {"chains": 0}


@pytest.mark.parametrize("model", ["test_mixer"])
def test_the_residual_add_fuses_into_the_matmul(model, tmp_path, compiled):
    out, _ = compiled(model)
    mod, params = import_onnx(out / "model.sim.onnx", {"input": (1, 3, 32, 32)})
    for target in (get_target("jetson-orin-nano"), X86):
        opt, _, reports = optimize(mod, params, target)
        assert reports["unflatten_linear_chains"]["chains"] > 0
        # a channel MLP's fc2, its bias and the residual add: one fused function
        names = [gv.name_hint for gv in opt.get_global_vars()]
        assert any(n.startswith("fused_matmul") and n.count("add") >= 2 for n in names), (target.name, names)
