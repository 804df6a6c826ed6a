"""Inference batch_norm as one multiply-add per element: its statistics folded into a scale and a shift at compile time.

DecomposeOpsForInference writes ``batch_norm(x, gamma, beta, mean, var)`` as ``(x - mean) / sqrt(var + eps) * gamma +
beta`` with the statistics as weights (parameters, not constants, so nothing folds): every element paid a square root
and a division (ConvMixer: in the epilogue of every convolution), and the tuple batch_norm returns stopped FuseOps,
so the residual add after each depthwise block was a kernel of its own (32 per convmixer_768_32 inference). Here it
becomes ``x * scale + shift``, ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` computed in
float64 and shipped as two new parameters shaped to broadcast along the normalized axis.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .graph_match import Bindings, rewritten_main, shape, with_new_params

_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")


def find_batch_norms(func: relax.Function, param_names: set[str], keep: frozenset[str] = frozenset()
                     ) -> dict[relax.Var, relax.Call]:
    """{the normalized output (``bn[0]``): its batch_norm call} for every batch_norm whose statistics and affine
    weights are parameters or constants, whose other outputs nothing reads, and none of whose bindings is named in ``keep``."""
    graph = Bindings(func, param_names)
    found = {}
    for var, value in graph.value.items():
        if not (isinstance(value, relax.Call) and value.op.same_as(_BATCH_NORM)):
            continue
        if not all(graph.is_param(a, 1) or isinstance(a, tvm.ir.Constant) for a in value.args[1:]):
            continue
        users = graph.users.get(var, [])
        items = [u for u in users if u is not None and isinstance(graph.value[u], relax.TupleGetItem)]
        outputs = [u for u in items if graph.value[u].index == 0]
        unread = all(graph.value[u].index == 0 or not graph.users.get(u) for u in items)  # the batch statistics
        if len(items) == len(users) and outputs and unread and not any(v.name in keep for v in (var, *outputs)):
            found.update({out: value for out in outputs})
    return found


def scale_and_shift(call: relax.Call, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The batch_norm's per-channel (scale, shift), shaped to broadcast along its axis of its input."""
    gamma, beta, mean, var = (a.value.numpy().astype("float64") if isinstance(a, tvm.ir.Constant)
                              else params[a.name].astype("float64") for a in call.args[1:])
    attrs = call.attrs
    scale = 1.0 / np.sqrt(var + float(attrs.epsilon))
    if attrs.scale:
        scale = scale * gamma
    shift = -mean * scale + (beta if attrs.center else 0.0)
    ndim = len(shape(call.args[0]))
    axis = int(attrs.axis) % ndim
    broadcast = [1] * ndim
    broadcast[axis] = scale.size
    dtype = str(call.args[0].ty.dtype)
    return scale.reshape(broadcast).astype(dtype), shift.reshape(broadcast).astype(dtype)


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, sites: dict[relax.Var, relax.Call], params: dict[str, np.ndarray]):
        super().__init__(mod)
        self.sites, self.params = sites, params
        self.added: dict[str, tuple[relax.Var, np.ndarray]] = {}

    def factors(self, bn: relax.Call, output: str) -> tuple[relax.Var, relax.Var]:
        names = (f"{output}.scale", f"{output}.shift")
        if names[0] not in self.added:
            for name, array in zip(names, scale_and_shift(bn, self.params)):
                self.added[name] = (relax.Var(name, relax.TensorType(array.shape, str(array.dtype))), array)
        return tuple(self.added[name][0] for name in names)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        bn = self.sites.get(binding.var)
        if bn is None:
            return super().visit_var_binding_(binding)
        scale, shift = self.factors(bn, binding.var.name)
        x = self.visit_expr(bn.args[0])
        folded = self.builder_.emit(relax.op.add(relax.op.multiply(x, scale), shift), name_hint=binding.var.name)
        self.set_var_remap(binding.var, folded)


def fold_batch_norm(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target,
                    dtype: str | None = None, keep: frozenset[str] = frozenset(), accumulator: str = "float32"
                    ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Fold every batch_norm of ``main`` with parameter statistics (but those with a binding in ``keep``) into a
    multiply-add; the module, its params in call order, and a report."""
    func = mod["main"]
    sites = find_batch_norms(func, set(params), keep)
    if not sites:
        return mod, params, {"sites": 0}
    folder = _Folder(mod, sites, params)
    module = rewritten_main(folder, func)
    new_mod, new_params = with_new_params(module, params, folder.added)
    return new_mod, new_params, {"sites": len(set(sites.values()))}
