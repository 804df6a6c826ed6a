"""Fold weight-only computation into the weights: run it once at compile time instead of on every call.

What a model does to its weights before using them (a CPU kernel's weight copy into the panel layout it
streams, see ``tvm_schedules.cpu.contraction``; a transpose the importer left on a weight; a float16 cast in
``--fp16`` builds) depends on the weights alone. TVM's own passes find it:
``SplitLayoutRewritePreproc`` moves each kernel's ``meta_schedule.layout_rewrite_preproc`` copy into a
function of its own, and ``LiftTransformParams`` gathers every binding that depends only on ``main``'s
weight parameters (those after ``num_input``) into ``main_transform_params``. That function is built for
this machine's CPU and run here on the weights; the library keeps ``main`` alone and takes the
transformed weights, which the artifact ships in params.npz.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

TRANSFORM = "main_transform_params"


def _sources(transform: relax.Function) -> dict[relax.Var, set[int]]:
    """For every variable bound in the transform, the indices of the weights it is computed from."""
    model_params = transform.params[0]
    sources: dict = {}
    for block in transform.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(model_params):
                sources[binding.var] = {int(value.index)}
            else:
                sources[binding.var] = set().union(*(sources.get(v, set()) for v in relax.analysis.free_vars(value)))
    return sources


def _output_names(transform: relax.Function, weight_names: list[str]) -> list[str]:
    """A name per transformed weight: its source's when it passes through unchanged, else derived from it."""
    body = transform.body.body
    if body.same_as(transform.params[0]):  # nothing transformed
        return list(weight_names)
    sources = _sources(transform)
    (output,) = [b.value for blk in transform.body.blocks for b in blk.bindings if b.var.same_as(body)]
    fields = output.fields  # LiftTransformParams returns a tuple
    names: list[str] = []
    for field in fields:
        binding = next((b.value for blk in transform.body.blocks for b in blk.bindings if b.var.same_as(field)), None)
        srcs = sorted(sources.get(field, set()))
        base = "+".join(weight_names[i] for i in srcs) or "constant"
        name = base if isinstance(binding, relax.TupleGetItem) else f"{base}:transformed"
        while name in names:
            name += "'"
        names.append(name)
    return names


def fold_weight_transforms(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target
                           ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Return ``mod`` without its weight-only computation, the weights with it applied, and a report."""
    if not params:
        return mod, params, {"transformed": 0}
    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    if TRANSFORM not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, params, {"transformed": 0}
    layout_copies = sum(gv.name_hint.endswith("_weight_prepack") for gv in mod.get_global_vars())
    transform_mod, main_mod = (
        relax.transform.DeadCodeElimination([keep])(
            tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != drop}))
        for keep, drop in ((TRANSFORM, "main"), ("main", TRANSFORM)))

    host = tvm.target.Target({"kind": "llvm"})  # this machine, whatever the model's target
    vm = relax.VirtualMachine(tvm.compile(transform_mod, host), tvm.cpu())
    weights = [tvm.runtime.tensor(value, tvm.cpu()) for value in params.values()]
    outputs = vm[TRANSFORM](tuple(weights))
    outputs = list(outputs) if isinstance(outputs, (list, tuple, tvm_ffi.Array)) else [outputs]
    names = _output_names(mod[TRANSFORM], list(params))
    main = main_mod["main"]
    num_input = int(main.attrs["num_input"])
    if len(outputs) != len(main.params) - num_input:
        raise RuntimeError(f"{TRANSFORM} returned {len(outputs)} weights; main takes {len(main.params) - num_input}")
    new_params = {name: out.numpy() for name, out in zip(names, outputs, strict=True)}
    report = {"transformed": sum(name.endswith(":transformed") for name in names), "layout_copies": layout_copies,
              "weights": {"before": len(params), "after": len(new_params)}}
    return main_mod, new_params, report
