"""Weight-only computation runs once at compile time (tvm_schedules.passes.fold_weight_transforms): the CPU
contraction rule's weight copies into panels and the transposes of weights leave the library, the weights are
transformed instead, and the library computes the same outputs from them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tvm import relax

import targets
from pipeline.tvm_targets import to_tvm_target
from pipeline.stages.optimize import lower_to_fused_tir
from tvm_schedules.cpu import apply_default_schedules
from tvm_schedules.passes.fold_weight_transforms import fold_weight_transforms
from test_cpu_rules import prim_funcs, run, scripts

HOST = to_tvm_target(targets.get_target("x86"))
RNG = np.random.default_rng(0)


def mlp(tokens: int, dim: int, hidden: int, num_input: int = 1):
    """x -> Linear(dim, hidden) -> GELU -> Linear(hidden, dim), weights as torch stores them ((out, in): the
    importer's transposes included), as a Relax function whose weights follow ``num_input`` inputs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, tokens, dim), "float32"))
    shapes = {"fc1.weight": (hidden, dim), "fc1.bias": (hidden,), "fc2.weight": (dim, hidden), "fc2.bias": (dim,)}
    w = {name: relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in shapes.items()}
    with bb.function("main", [x, *w.values()], attrs={"num_input": num_input}):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w["fc1.weight"])) + w["fc1.bias"])
            h = bb.emit(relax.op.nn.gelu(h))
            out = bb.emit_output(relax.op.matmul(h, relax.op.permute_dims(w["fc2.weight"])) + w["fc2.bias"])
        bb.emit_func_output(out)
    params = {name: RNG.uniform(-1, 1, shape).astype("float32") for name, shape in shapes.items()}
    return lower_to_fused_tir(bb.get()), params


def torch_mlp(x, params):
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    h = torch.nn.functional.gelu(torch.from_numpy(x) @ p["fc1.weight"].T + p["fc1.bias"])
    return (h @ p["fc2.weight"].T + p["fc2.bias"]).numpy()


@pytest.mark.parametrize("tokens, dim, hidden", [(49, 64, 256), (7, 48, 80)])
def test_weight_layouts_are_folded_into_the_weights(tokens, dim, hidden):
    mod, params = mlp(tokens, dim, hidden)
    assert {name: f.attrs.get("layout_free_buffers") for name, f in prim_funcs(mod).items()
            if "matmul" in name} == {"fused_matmul_add_gelu": [1, 2], "fused_matmul1_add1": [1, 2]}
    scheduled, _ = apply_default_schedules(mod, HOST)
    assert "meta_schedule.layout_rewrite_preproc" in scripts(scheduled)  # the rule reads weights in panels

    folded, new_params, report = fold_weight_transforms(scheduled, params, HOST)

    assert report["layout_copies"] >= 2 and report["transformed"] >= 2, report
    assert "meta_schedule.layout_rewrite_preproc" not in scripts(folded)  # no weight copy left per call
    assert [gv.name_hint for gv in folded.get_global_vars() if gv.name_hint.startswith("main")] == ["main"]
    packed = [name for name in new_params if name.endswith(":transformed")]
    assert {name.split(":")[0] for name in packed} == {"fc1.weight", "fc2.weight"}
    assert all(new_params[name].ndim == 3 for name in packed)  # [columns // panel, rows, panel]
    main = folded["main"]
    assert [tuple(int(d) for d in p.ty.shape) for p in main.params[1:]] == [v.shape for v in new_params.values()]

    x = RNG.uniform(-1, 1, (1, tokens, dim)).astype("float32")
    got = run(folded, [x, *new_params.values()])
    np.testing.assert_allclose(got, torch_mlp(x, params), rtol=1e-4, atol=1e-4)


def test_a_module_without_weights_is_left_alone():
    mod, _ = mlp(7, 48, 80, num_input=5)  # the "weights" are inputs: nothing may be computed ahead
    scheduled, _ = apply_default_schedules(mod, HOST)
    assert "meta_schedule.layout_rewrite_preproc" not in scripts(scheduled)
    folded, new_params, report = fold_weight_transforms(scheduled, {}, HOST)
    assert report == {"transformed": 0} and new_params == {}
    assert set(prim_funcs(folded)) == set(prim_funcs(scheduled))


def test_compiled_models_ship_folded_weights(compiled):
    out, manifest = compiled("test_mixer")
    report = manifest["passes"]["fold_weight_transforms"]
    assert report["layout_copies"] >= 1 and report["transformed"] >= 1
    params = np.load(out / "params.npz")
    assert list(params) == manifest["params"] and any(name.endswith(":transformed") for name in params)
    assert manifest["verify"]["passed"]
