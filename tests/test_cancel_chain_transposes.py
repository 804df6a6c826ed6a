"""A row-wise chain between two transposes runs by columns on the untransposed tensor: the transposes go, the residual
add fuses into the last matmul, results unchanged."""
from functools import partial

import pytest
import torch
import torch.nn as nn

from pipeline.runtime import run_library
from pipeline.stages import optimize as optimize_stage
from pipeline.stages.build import build
from pipeline.stages.reference import OUTPUT_NAMES
from pipeline.stages.verify import verify
from pipeline.tvm_targets import to_tvm_target
from targets import get_target
from tvm_schedules.passes.cancel_chain_transposes import cancel_chain_transposes
from tvm_schedules.passes.unflatten_linear_chains import unflatten_linear_chains
from conftest import imported_module

X86 = get_target("x86")


class TokenMlp(nn.Module):
    """x + fc2(gelu(fc1(x^T)))^T on (B, T, C): an MLP-Mixer token MLP and its residual add."""

    def __init__(self, tokens=7, hidden=9, bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(tokens, hidden, bias=bias), nn.Linear(hidden, tokens, bias=bias)
        self.act = nn.GELU()

    def hidden(self, x):
        return self.fc1(x.transpose(1, 2))

    def forward(self, x):
        return x + self.fc2(self.act(self.hidden(x))).transpose(1, 2)


class EscapingMember(TokenMlp):
    """The hidden activation is also read outside the chain (its mean), so the chain cannot change its layout."""

    def forward(self, x):
        h = self.hidden(x)
        return x + self.fc2(self.act(h)).transpose(1, 2) + h.mean()


class TwoChainsInARow(TokenMlp):
    """The first chain's transpose back opens a second chain: only the first runs by columns (the second would read
    the first one's member in the layout it no longer has)."""

    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(5, 6)

    def forward(self, x):
        return self.fc3(self.hidden(x).transpose(1, 2)).transpose(1, 2)


def rewritten(module, tmp_path, keep=frozenset()):
    """A ``module()`` imported (batch 2, 7 tokens, 5 channels), unflattened as on CUDA, then this pass."""
    torch.manual_seed(0)
    tmp_path.mkdir(exist_ok=True)
    mod, params, inputs, reference = imported_module(module(), (2, 7, 5), tmp_path, seed=3)
    target = to_tvm_target(X86)
    mod, params, _ = unflatten_linear_chains(mod, params, target)
    return (*cancel_chain_transposes(mod, params, target, None, keep), inputs, reference)


@pytest.mark.parametrize("module, transposes_left", [(TokenMlp, 0), (partial(TokenMlp, bias=False), 0),
                                                     (TwoChainsInARow, 1)], ids=["bias", "no bias", "two in a row"])
def test_the_chain_runs_by_columns_and_stays_exact(module, transposes_left, tmp_path):
    out, params, report, inputs, reference = rewritten(module, tmp_path)
    assert report == {"chains": 1, "transposes": 2}
    assert out["main"].script().count("permute_dims") == transposes_left
    build(out, X86, tmp_path / "lib.so")
    verify(reference, {"tvm": run_library(tmp_path / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)},
           {"tvm": (1e-5, 1e-4)})


def test_a_chain_whose_member_escapes_or_is_kept_is_left_alone(tmp_path):
    assert rewritten(EscapingMember, tmp_path / "escapes")[2] == {"chains": 0}
    out, _, report, _, _ = rewritten(TokenMlp, tmp_path / "kept")
    kept = next(b.var.name for block in out["main"].body.blocks for b in block.bindings if "matmul" in str(b.value))
    assert report["chains"] == 1 and rewritten(TokenMlp, tmp_path / "keep", frozenset({kept}))[2] == {"chains": 0}


def test_the_transposes_go_and_the_residual_add_fuses_on_cuda(tmp_path, monkeypatch):
    torch.manual_seed(0)
    mod, params, _, _ = imported_module(TokenMlp(), (1, 7, 5), tmp_path, seed=3)
    cuda = get_target("jetson-orin-nano")
    launches, functions = {}, {}
    for label, passes in (("after", optimize_stage.GRAPH_PASSES),
                          ("before", tuple(p for p in optimize_stage.GRAPH_PASSES if p[0] is not cancel_chain_transposes))):
        monkeypatch.setattr(optimize_stage, "GRAPH_PASSES", passes)
        opt, built_params, _ = optimize_stage.optimize(mod, params, cuda)
        launches[label] = build(opt, cuda, tmp_path / f"{label}.so")["cuda"]["per_inference"]["kernel_launches"]
        functions[label] = [gv.name_hint for gv in opt.get_global_vars()]
    assert not any("transpose" in name for name in functions["after"]), functions["after"]
    # fc2, its bias and the residual add: one function; the transpose in and the one back were kernels of their own
    assert any(n.startswith("fused_matmul") and n.count("add") >= 2 for n in functions["after"]), functions["after"]
    assert launches["after"] < launches["before"], launches
