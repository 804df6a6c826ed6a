"""What the graph rewrites read off ``main``'s bindings: each variable's value and users, shapes, op kinds."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def is_call(value, op) -> bool:
    return isinstance(value, relax.Call) and value.op.same_as(op)


def axes(call: relax.Call) -> list[int] | None:
    return None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]


class Bindings:
    """``main``'s bindings: ``value[var]``, ``users[var]`` (None stands for the function's result)."""

    def __init__(self, func: relax.Function, param_names: set[str]):
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.value = {b.var: b.value for b in bindings}
        self.users: dict[relax.Var, list[relax.Var | None]] = {}
        for b in bindings:
            for used in relax.analysis.free_vars(b.value):
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

    def is_param(self, expr, ndim: int) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.param_names and len(shape(expr)) == ndim


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


__all__ = ["Bindings", "axes", "is_call", "shape", "with_new_params"]
