"""Run a row-wise chain between two transposes by columns on the untransposed tensor: both transposes go.

A token MLP (MLP-Mixer, ResMLP, gMLP), once ``unflatten_linear_chains`` has dropped its reshapes, is

    t = permute_dims(x, [0, 2, 1])              x: (B, T, C), t: (B, C, T)
    h = matmul(t, W1) + b1 -> GELU -> matmul(., W2) + b2        row by row: (B, C, T')
    y = permute_dims(h, [0, 2, 1])              (B, T, C), then the residual add

each transpose a kernel of its own, and the add after ``y`` could not fuse into the last matmul. Row i of ``h`` is
column i of ``y``, so the chain computes ``y`` itself on ``x`` by columns: ``matmul(t', W)`` becomes
``matmul(W^T, x')`` (W^T a new parameter), a vector along the last axis ([N] or [1, N]) becomes an (N, 1) column (a
new parameter, or a constant), scalars and unary ops stay, and each transpose back is the chain's value. Then the
residual add fuses into the last matmul. CUDA launches per inference: see the README's optimize stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .graph_match import Bindings, axes, has_shape, is_call, rewritten_main, shape, with_new_params

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_MATMUL = tvm.ir.Op.get("relax.matmul")


def swaps_last_two(call: relax.Call) -> bool:
    ndim = len(shape(call.args[0])) if has_shape(call.args[0]) else 0
    order = axes(call) if axes(call) is not None else list(reversed(range(ndim)))
    return ndim >= 2 and order == [*range(ndim - 2), ndim - 1, ndim - 2]


@dataclass(frozen=True)
class Chain:
    opening: relax.Var  # permute_dims(x, swap of the last two axes)
    x: relax.Expr
    members: frozenset[relax.Var]  # the opening and the row-wise bindings computed from it
    closings: frozenset[relax.Var]  # the transposes back


def _by_columns(operand: relax.Expr, param_names: set[str]) -> bool:
    """An operand from outside the chain that has a column form: one element (itself), or a parameter or constant."""
    return (isinstance(operand, tvm.ir.Constant) or (isinstance(operand, relax.Var) and operand.name in param_names)
            or (has_shape(operand) and math.prod(shape(operand)) == 1))


def find_chains(func: relax.Function, param_names: set[str], keep: frozenset[str] = frozenset()) -> list[Chain]:
    """Every row-wise chain of ``main`` between two transposes whose outside operands have a column form; but those
    with a binding named in ``keep`` (layers kept in float32: left for ``keep_float32``)."""
    graph = Bindings(func, param_names)

    def is_end(user: relax.Var) -> bool:
        return is_call(graph.value[user], _PERMUTE) and swaps_last_two(graph.value[user])

    chains, claimed = [], set()
    for var, value in graph.value.items():
        if not (is_call(value, _PERMUTE) and swaps_last_two(value)) or value.args[0] in claimed:
            continue  # (an earlier chain's member is rewritten by columns: not the input this chain would read)
        found = graph.row_wise_chain(var, shape(var)[:-1], is_end)
        if found is None:
            continue
        members, closings = found
        outside = [a for m in members - {var} for a in graph.value[m].args if a not in members]
        if any(v.name in keep for v in members | closings) or not all(_by_columns(a, param_names) for a in outside):
            continue
        chains.append(Chain(var, value.args[0], frozenset(members), frozenset(closings)))
        claimed |= members
    return chains


@relax.expr_functor.mutator
class _ByColumns(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, chains: list[Chain], params: dict[str, np.ndarray]):
        super().__init__(mod)
        self.inputs = {c.opening: c.x for c in chains}
        self.members = frozenset().union(*(c.members for c in chains))
        self.closings = frozenset().union(*(c.closings for c in chains))
        self.params = params
        self.transposed: dict[relax.Var, tuple[relax.Var, np.ndarray]] = {}  # parameter -> its new transpose

    def column(self, operand: relax.Expr) -> relax.Expr:
        """``operand`` by columns: a matmul's weight (K, N) as (N, K), a vector [N] or (1, N) as (N, 1)."""
        if has_shape(operand) and math.prod(shape(operand)) == 1:
            return operand
        if isinstance(operand, tvm.ir.Constant):
            return relax.const(np.ascontiguousarray(np.atleast_2d(operand.value.numpy()).T))
        if operand not in self.transposed:
            array = np.ascontiguousarray(np.atleast_2d(self.params[operand.name]).T)
            self.transposed[operand] = (relax.Var(f"{operand.name}.T", relax.TensorType(array.shape, str(array.dtype))),
                                        array)
        return self.transposed[operand][0]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        if var in self.inputs:
            self.set_var_remap(var, self.visit_expr(self.inputs[var]))
        elif var in self.closings:
            self.set_var_remap(var, self.visit_expr(value.args[0]))
        elif var in self.members:
            args = [self.visit_expr(a) if a in self.members else self.column(a) for a in value.args]
            if is_call(value, _MATMUL):
                args = args[::-1]  # (t W)^T = W^T t^T
            call = relax.Call(value.op, args, value.attrs, value.ty_args)
            self.set_var_remap(var, self.builder_.emit(call, name_hint=var.name))
        else:
            super().visit_var_binding_(binding)


def cancel_chain_transposes(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target,
                            dtype: str | None = None, keep: frozenset[str] = frozenset(), accumulator: str = "float32"
                            ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Every row-wise chain of ``main`` between two transposes (but those with a binding in ``keep``) by columns on
    the untransposed tensor; the module, its params in call order (the transposed ones last), and a report."""
    func = mod["main"]
    chains = find_chains(func, set(params), keep)
    if not chains:
        return mod, params, {"chains": 0}
    rewriter = _ByColumns(mod, chains, params)
    module = rewritten_main(rewriter, func)
    added = {var.name: (var, array) for var, array in rewriter.transposed.values()}
    new_mod, new_params = with_new_params(module, params, added)
    return new_mod, new_params, {"chains": len(chains), "transposes": sum(len(c.closings) + 1 for c in chains)}
