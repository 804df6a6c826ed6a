"""Run a flattened chain of Linear layers on its N-D input, so what follows it fuses into its last matmul.

The ONNX export writes a Linear on (B, T, C) as ``reshape -> (B*T, C)``, ``Gemm``, ``reshape -> (B, T, N)``; an MLP
(fc1, GELU, fc2) is one such chain between two reshapes. FuseOps fuses a matmul with the elementwise and broadcast
ops after it, but not across a reshape, so the residual add after every channel MLP was a kernel of its own (16 of
mixer_s16_224's 77 CUDA launches per inference). A chain whose every op works row by row (matmuls by a 2-D weight,
elementwise ops with scalars or per-column vectors) computes the same on the N-D tensor: the reshape in is dropped,
the chain's ops are re-emitted on (B, T, .), and each reshape back to (B, T, .) becomes its input. CUDA launches
per inference: mixer_s16_224 77 -> 69, resmlp_12_224 88 -> 76. A token MLP's chain, between two transposes, runs
unflattened too; ``cancel_chain_transposes`` then runs it by columns without them, and its residual add fuses as well.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from .graph_match import Bindings, has_shape, is_call, rewritten_main, shape

_RESHAPE = tvm.ir.Op.get("relax.reshape")


def find_chains(func: relax.Function) -> tuple[dict[relax.Var, relax.Expr], set[relax.Var]]:
    """(reshape in -> its N-D input, reshapes back) of every chain that can run on its N-D input."""
    graph = Bindings(func, set())
    inputs, outputs = {}, set()
    for var, value in graph.value.items():
        if not is_call(value, _RESHAPE) or len(shape(var)) != 2:
            continue
        x = value.args[0]
        if not has_shape(x) or len(shape(x)) < 3:
            continue
        lead, rows = shape(x)[:-1], shape(var)[0]
        if math.prod(lead) != rows or shape(x)[-1] != shape(var)[1]:
            continue

        def is_end(user: relax.Var) -> bool:
            return (is_call(graph.value[user], _RESHAPE) and has_shape(user)
                    and shape(user) == (*lead, shape(user)[-1]))

        found = graph.row_wise_chain(var, (rows,), is_end)
        if found is not None:
            inputs[var] = x
            outputs |= found[1]
    return inputs, outputs


@relax.expr_functor.mutator
class _Unflatten(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, inputs: dict, outputs: set):
        super().__init__(mod)
        self.inputs, self.outputs = inputs, outputs

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.inputs:
            self.set_var_remap(binding.var, self.visit_expr(self.inputs[binding.var]))
        elif binding.var in self.outputs:
            self.set_var_remap(binding.var, self.visit_expr(binding.value.args[0]))
        else:
            super().visit_var_binding_(binding)


def unflatten_linear_chains(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target,
                            dtype: str | None = None, keep: frozenset[str] = frozenset(), accumulator: str = "float32"
                            ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Every flattened row-wise chain of ``main`` on its N-D input; the module, the same params, and a report."""
    func = mod["main"]
    inputs, outputs = find_chains(func)
    if not inputs:
        return mod, params, {"chains": 0}
    rewriter = _Unflatten(mod, inputs, outputs)
    module = rewritten_main(rewriter, func)
    return relax.transform.DeadCodeElimination(["main"])(module), params, {"chains": len(inputs)}
