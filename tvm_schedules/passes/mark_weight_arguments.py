"""Mark, on each fused TIR function, which of its arguments are model weights (``layout_free_buffers``).

A schedule may read such an argument in another layout at no cost per call: the copy into that layout is
computed once, at compile time (``fold_weight_transforms``). MetaSchedule's RewriteLayout reads the same
attribute. Weights are ``main``'s parameters after its ``num_input`` inputs, constants, and what is computed
from them alone (a weight's transpose, which ``fold_weight_transforms`` computes at compile time too).

TVM's ``relax.transform.AttachAttrLayoutFreeBuffers`` does this too, but re-adds every function under a new
name (``fused_matmul_add1`` becomes ``fused_matmul_add11``): names users see in tuning progress, ``--tasks``
patterns and manifests. This pass keeps the functions' names; a function called at several sites keeps only
the arguments that are weights at every one of them.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

ATTR = "layout_free_buffers"


def mark_weight_arguments(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    if main.attrs is None or "num_input" not in main.attrs:
        return mod
    weights = list(main.params[int(main.attrs["num_input"]):])
    is_weight = lambda expr: isinstance(expr, tvm.ir.Constant) or any(expr.same_as(w) for w in weights)  # noqa: E731
    call_tir = tvm.ir.Op.get("relax.call_tir")
    marked: dict[str, set[int]] = {}
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and call.op.same_as(call_tir):
                free = {i for i, arg in enumerate(call.args[1].fields) if is_weight(arg)}
                name = call.args[0].name_hint
                marked[name] = marked[name] & free if name in marked else free
            if all(is_weight(v) for v in relax.analysis.free_vars(call)):
                weights.append(binding.var)  # computed from weights alone (a transpose): lifted out as one
    out = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and marked.get(gv.name_hint):
            out.update_func(gv, func.with_attr(ATTR, sorted(marked[gv.name_hint])))
    return out
