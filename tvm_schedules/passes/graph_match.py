"""What the graph rewrites read off ``main``'s bindings: each variable's value and users, shapes, op kinds."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tvm
from tvm import relax

_MATMUL = tvm.ir.Op.get("relax.matmul")
_BINARY = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("add", "subtract", "multiply", "divide"))
_UNARY = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("erf", "tanh", "sigmoid", "exp", "nn.relu", "nn.gelu",
                                                            "nn.silu", "astype"))


def shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def is_call(value, op) -> bool:
    return isinstance(value, relax.Call) and value.op.same_as(op)


def axes(call: relax.Call) -> list[int] | None:
    return None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]


def has_shape(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and expr.ty.shape is not None


def row_operand(expr: relax.Expr, columns: int) -> bool:
    """A scalar, or a vector along the last axis: the same for every row."""
    if not has_shape(expr):
        return False
    dims = shape(expr)
    return len(dims) == 0 or (len(dims) <= 2 and math.prod(dims[:-1]) == 1 and dims[-1] in (1, columns))


def row_wise(var: relax.Var, value: relax.Expr, chain: set, lead: tuple[int, ...]) -> bool:
    """``var = value`` computes each row of its (*lead, n) result from the same row of its operands in ``chain``
    (each (*lead, .)): a matmul by a 2-D weight, a unary op, a binary op whose other operands are ``row_operand``s."""
    if not (isinstance(value, relax.Call) and has_shape(var) and shape(var)[:-1] == lead):
        return False
    if is_call(value, _MATMUL):
        a, w = value.args
        return a in chain and w not in chain and len(shape(w)) == 2
    args = [a for a in value.args if isinstance(a, relax.Expr) and isinstance(a.ty, relax.TensorType)]
    if any(is_call(value, op) for op in _UNARY):
        return len(args) == 1 and args[0] in chain
    if any(is_call(value, op) for op in _BINARY):
        ins = [a for a in args if a in chain]
        others = [a for a in args if a not in chain]
        return bool(ins) and all(shape(a)[:-1] == lead for a in ins) and all(
            row_operand(o, shape(ins[0])[-1]) for o in others)
    return False


class Bindings:
    """``main``'s bindings: ``value[var]``, ``users[var]`` (None stands for the function's result)."""

    def __init__(self, func: relax.Function, param_names: set[str]):
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.value = {b.var: b.value for b in bindings}
        self.order = [b.var for b in bindings]  # program order: a binding's operands come before it
        self.position = {b.var: i for i, b in enumerate(bindings)}
        self.operands = {b.var: set(relax.analysis.free_vars(b.value)) for b in bindings}
        self.users: dict[relax.Var, list[relax.Var | None]] = {}
        for b in bindings:
            for used in self.operands[b.var]:
                self.users.setdefault(used, []).append(b.var)
        for used in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(used, []).append(None)
        self.param_names = param_names

    def only_user(self, var) -> relax.Var | None:
        found = self.users.get(var, [])
        return found[0] if len(found) == 1 and found[0] is not None else None

    def upstream(self, roots, stop) -> set[relax.Var]:
        """The bindings ``roots`` are computed from, up to (not into) the expressions in ``stop``."""
        seen, todo = set(), [r for r in roots if isinstance(r, relax.Var)]
        while todo:
            var = todo.pop()
            if var in seen or var not in self.value or any(var.same_as(s) for s in stop):
                continue
            seen.add(var)
            todo += list(relax.analysis.free_vars(self.value[var]))
        return seen

    def row_wise_chain(self, start: relax.Var, lead: tuple[int, ...], is_end: Callable[[relax.Var], bool]
                       ) -> tuple[set[relax.Var], set[relax.Var]] | None:
        """The row-wise bindings (``row_wise``) computed from ``start`` ((*lead, .), a member), and the ends: the
        bindings reading the chain for which ``is_end`` holds; None when anything else reads a member, when the
        function returns one, or when there are no ends or no members but ``start``."""
        chain, ends = {start}, set()
        for var in self.order[self.position[start] + 1:]:
            if chain.isdisjoint(self.operands[var]):
                continue
            if is_end(var):
                ends.add(var)
            elif row_wise(var, self.value[var], chain, lead):
                chain.add(var)
            else:
                return None
        if not ends or len(chain) == 1 or any(None in self.users.get(v, []) for v in chain):
            return None
        return chain, ends

    def is_param(self, expr, ndim: int) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.param_names and len(shape(expr)) == ndim


def rewritten_main(rewriter: relax.PyExprMutator, func: relax.Function) -> tvm.IRModule:
    """The rewriter's module with ``main`` (``func``) replaced by its rewritten body (the kernels it added beside)."""
    body = rewriter.visit_expr(func.body)
    rewriter.builder_.update_func(rewriter.builder_.get().get_global_var("main"),
                                  relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
    return rewriter.builder_.get()


def with_new_params(mod: tvm.IRModule, params: dict[str, np.ndarray],
                    added: dict[str, tuple[relax.Var, np.ndarray]]) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """``mod`` (a rewriter's module, ``main`` rewritten) with dead bindings removed, the weights ``main`` no longer
    reads dropped from its parameters and the ``added`` (name -> (var, array)) appended; the module and its params
    in call order."""
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    used = {v.name for v in relax.analysis.free_vars(main.body)}
    weights = [p for p in main.params[num_input:] if p.name in used]
    mod["main"] = relax.Function([*main.params[:num_input], *weights, *(var for var, _ in added.values())],
                                 main.body, main.ret_ty, main.is_pure, main.attrs)
    new_params = {p.name: params[p.name] for p in weights}
    new_params.update({name: array for name, (_, array) in added.items()})
    return mod, new_params


__all__ = ["Bindings", "axes", "has_shape", "is_call", "row_operand", "row_wise", "rewritten_main", "shape", "with_new_params"]
