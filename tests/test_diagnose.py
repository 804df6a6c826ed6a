"""diagnose names the first layer that diverges, exactly; --keep-fp32 and --fp16 auto keep just what must be float32.

Real builds throughout: the wrong rewrite is a real Relax pass added to the compile's graph passes, the overflowing
model a real checkpoint.
"""
import json
import re

import numpy as np
import onnx
import pytest
import torch
import tvm
from tvm import relax

from conftest import RPC_HOST, DEFAULT_FULL_SIZE, TEST_MODELS, emulator_available, linker_available, run_cli
from pipeline.diagnose import LayersDiverged, compile_diagnosed, compile_fp16_auto, diagnose
from pipeline.errors import BadInput, VerificationFailed
from pipeline.run import compile_model
from pipeline.spec import Board, BuildSpec
from pipeline.stages import optimize
from pipeline.stages.layers import keep_float32_layers, module_kinds
from pipeline.stages.model import load_model

_LAYER_NORM = tvm.ir.Op.get("relax.nn.layer_norm")
# test_mixer's LayerNorms in execution order: blocks.0.norm1, blocks.0.norm2, blocks.1.norm1, blocks.1.norm2, norm
WRONG_SITE, WRONG_LAYER = 2, "blocks.1.norm1"


@relax.expr_functor.mutator
class _WrongEpsilon(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.seen = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_LAYER_NORM):
            self.seen += 1
            if self.seen - 1 == WRONG_SITE:
                a = call.attrs
                return relax.op.nn.layer_norm(*call.args, axes=list(a.axes), epsilon=10.0, center=a.center,
                                              scale=a.scale)
        return call


def wrong_layer_norm_epsilon(mod, params, target, dtype, keep, accumulator):
    """A deliberately wrong rewrite: the third LayerNorm gets epsilon 10 (the model's is 1e-6)."""
    rewriter = _WrongEpsilon(mod)
    main = rewriter.visit_expr(mod["main"])
    out = mod.clone()
    out["main"] = main
    return out, params, {"sites": 1}


@pytest.fixture
def wrong_rewrite(monkeypatch):
    monkeypatch.setattr(optimize, "GRAPH_PASSES", (*optimize.GRAPH_PASSES, (wrong_layer_norm_epsilon, None)))


def test_a_wrong_rewrite_is_named_exactly(wrong_rewrite):
    result = diagnose(BuildSpec(model="test_mixer", target="x86"))
    first = result.first_divergent
    assert first is not None and first.layer == WRONG_LAYER and first.kind == "LayerNorm"
    before = result.layers[:first.index]
    assert before and all(c.passed for c in before)  # what runs before it is untouched
    assert not result.output.passed
    with pytest.raises(LayersDiverged, match=WRONG_LAYER):
        result.raise_if_diverged()


def test_a_wrong_rewrite_is_named_on_a_board_over_rpc(wrong_rewrite, rpc):
    """The probe build runs on the board's TVM RPC server (here an x86 one on 127.0.0.1), as deploy reaches it."""
    board = Board(RPC_HOST, rpc.direct)
    result = diagnose(BuildSpec(model="test_mixer", target="x86"), board=board, timeout=60)
    assert f"ran on the board {board}" in result.ran
    assert result.first_divergent is not None and result.first_divergent.layer == WRONG_LAYER


def test_a_failing_compile_names_the_first_divergent_layer(wrong_rewrite, tmp_path):
    with pytest.raises(VerificationFailed, match=f"diagnosed: first divergent layer {WRONG_LAYER} \\(LayerNorm"):
        compile_diagnosed(BuildSpec(model="test_mixer", target="x86"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_failing_compile_points_to_diagnose(wrong_rewrite, tmp_path):
    with pytest.raises(VerificationFailed, match="python -m pipeline diagnose --model test_mixer --target x86"):
        compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "out")


@pytest.mark.parametrize("model", TEST_MODELS)
def test_a_passing_float16_build_reports_no_divergent_layer(model):
    result = diagnose(BuildSpec(model=model, target="x86", fp16=True))
    assert result.first_divergent is None and result.output.passed, result.table()
    assert len(result.layers) >= 5 and result.layers[-1].layer == "head"
    result.raise_if_diverged()


@pytest.mark.slow
def test_a_full_size_float16_build_that_passes_reports_no_divergent_layer():
    result = diagnose(BuildSpec(model=DEFAULT_FULL_SIZE, target="x86", fp16=True))
    assert result.output.passed and result.first_divergent is None, result.table()


def test_a_cuda_target_is_diagnosed_with_its_host_twin():
    result = diagnose(BuildSpec(model="test_mixer", target="cuda"))
    assert "host twin" in result.ran and "cannot run here" in result.ran
    assert result.first_divergent is None


@pytest.mark.skipif(not (emulator_available() and linker_available()), reason="aarch64 emulator not set up")
def test_an_aarch64_target_is_diagnosed_under_qemu():
    result = diagnose(BuildSpec(model="test_mixer", target="aarch64"))
    assert "qemu" in result.ran and result.first_divergent is None


# ---------------------------------------------------------------- float16 that overflows in one place

OVERFLOWING = "blocks.1.mlp_channels"  # test_gmlp: fc1's v half feeds the spatial gating unit's LayerNorm


@pytest.fixture(scope="module")
def overflowing_gmlp(tmp_path_factory):
    """test_gmlp whose second block's fc1 writes values past float16's 65504 into the half (v) that the gating
    unit's LayerNorm normalises: everything else stays in range."""
    model, _, _ = load_model("test_gmlp", None, seed=0)
    state = model.state_dict()
    weight, bias = state[f"{OVERFLOWING}.fc1.weight"], state[f"{OVERFLOWING}.fc1.bias"]
    half = weight.shape[0] // 2
    weight[half:] *= 1e6
    bias[half:] *= 1e6
    path = tmp_path_factory.mktemp("weights") / "overflowing.pt"
    torch.save(state, path)
    return BuildSpec(model="test_gmlp", target="x86", weights=path, fp16=True)


def test_overflowing_float16_fails_and_auto_keeps_just_that_part(overflowing_gmlp, tmp_path):
    result = diagnose(overflowing_gmlp)
    first = result.first_divergent
    assert first is not None and first.layer.startswith(OVERFLOWING + ".") and first.inf + first.nan > 0
    with pytest.raises(VerificationFailed):
        compile_model(overflowing_gmlp, tmp_path / "plain")
    out, manifest = compile_fp16_auto(overflowing_gmlp, tmp_path / "auto")
    kept = manifest["passes"]["kept_float32"]
    assert [k["layer"] for k in kept] == [f"{OVERFLOWING}.fc1"], kept  # where it overflows, and nothing else
    assert all("--fp16 auto" in k["why"] for k in kept)
    assert manifest["verify"]["library_verified"]
    assert "float16" in manifest["passes"]["precision"]


def test_auto_leaves_a_passing_model_in_float16(tmp_path):
    _, manifest = compile_fp16_auto(BuildSpec(model="test_mixer", target="x86"), tmp_path / "auto")
    assert "kept_float32" not in manifest["passes"] and "float16" in manifest["passes"]["precision"]


# ---------------------------------------------------------------- --keep-fp32

def test_keep_fp32_selects_by_path_pattern_and_kind(compiled):
    out, _ = compiled("test_mixer")
    graph = onnx.load(str(out / "model.sim.onnx")).graph
    kinds = module_kinds(load_model("test_mixer", None, seed=0)[0])
    norms = keep_float32_layers(graph, kinds, ("LayerNorm",)).layers
    assert sorted(norms) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert sorted(keep_float32_layers(graph, kinds, ("blocks.1.*fc1",)).layers) == [
        "blocks.1.mlp_channels.fc1", "blocks.1.mlp_tokens.fc1"]
    assert set(keep_float32_layers(graph, kinds, ("blocks.0",)).layers) >= {"blocks.0.norm1", "blocks.0.mlp_tokens.fc2"}
    with pytest.raises(BadInput, match="nowhere"):
        keep_float32_layers(graph, kinds, ("nowhere",))


def test_keep_fp32_changes_the_build_and_its_id(tmp_path):
    spec = BuildSpec(model="test_mixer", target="x86", fp16=True)
    _, plain = compile_model(spec, tmp_path / "plain")
    _, kept = compile_model(BuildSpec(**{**spec.__dict__, "keep_fp32": ("LayerNorm",)}), tmp_path / "kept")
    assert [k["layer"] for k in kept["passes"]["kept_float32"]][0] == "blocks.0.norm1"
    assert kept["passes"]["keep_float32"]["legalized_bindings"] >= 5
    assert kept["build_id"] != plain["build_id"]
    with pytest.raises(BadInput, match="--fp16"):
        compile_model(BuildSpec(model="test_mixer", target="x86", keep_fp32=("norm",)), tmp_path / "no")


def test_diagnose_cli_writes_json(tmp_path):
    path = tmp_path / "d.json"
    proc = run_cli("diagnose", "--model", "test_convmixer", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["first_divergent"] is None and data["layers"] and "ran on this host" in data["ran"]
    assert np.isfinite([c["max_abs"] for c in data["layers"]]).all()


def test_tune_tunes_the_layers_kept_in_float32_as_compile_builds_them():
    from pipeline.tune import tuning_module

    def dtypes(mod):  # of the fused functions' buffers
        return {dtype for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
                for dtype in re.findall(r'T\.Buffer\(\(.*?\), "(\w+)"\)', f.script())}

    plain = tuning_module(BuildSpec(model="test_mixer", target="x86", fp16=True))
    kept = tuning_module(BuildSpec(model="test_mixer", target="x86", fp16=True, keep_fp32=("Linear",)))
    assert "float32" in dtypes(kept) and len(dtypes(kept)) > 1  # kept layers in float32 beside float16 ones
    assert {gv.name_hint for gv in plain.get_global_vars()} != {gv.name_hint for gv in kept.get_global_vars()}
