"""Run a flattened chain of Linear layers on its N-D input, so what follows it fuses into its last matmul.

The ONNX export writes a Linear on (B, T, C) as ``reshape -> (B*T, C)``, ``Gemm``, ``reshape -> (B, T, N)``; an MLP
(fc1, GELU, fc2) is one such chain between two reshapes. FuseOps fuses a matmul with the elementwise and broadcast
ops after it, but not across a reshape, so the residual add after every channel MLP was a kernel of its own (16 of
mixer_s16_224's 77 CUDA launches per inference). A chain whose every op works row by row (matmuls by a 2-D weight,
elementwise ops with scalars or per-column vectors) computes the same on the N-D tensor: the reshape in is dropped,
the chain's ops are re-emitted on (B, T, .), and each reshape back to (B, T, .) becomes its input. CUDA launches
per inference: mixer_s16_224 77 -> 69, resmlp_12_224 88 -> 76 (the token MLPs' residual adds stay apart: a
transpose sits between them and the matmul).
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from .graph_match import Bindings, is_call, shape

# The TVM target kinds the optimize stage runs it for: where kernels are launches. On this x86 host mixer_s16_224
# ran as fast either way (18.4 vs 18.3 ms, interleaved), and CPU tuning records are keyed by the fused functions.
TARGET_KINDS = frozenset({"cuda"})

_RESHAPE = tvm.ir.Op.get("relax.reshape")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_BINARY = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("add", "subtract", "multiply", "divide"))
_UNARY = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("erf", "tanh", "sigmoid", "exp", "nn.relu", "nn.gelu",
                                                            "nn.silu", "astype"))


def _row_operand(expr, columns: int) -> bool:
    """A scalar, or a vector along the last axis: the same for every row."""
    dims = shape(expr) if isinstance(expr.ty, relax.TensorType) and expr.ty.shape is not None else None
    return dims is not None and (len(dims) == 0 or (len(dims) <= 2 and math.prod(dims[:-1]) == 1
                                                     and dims[-1] in (1, columns)))


def _row_wise(value, chain: set, rows: int) -> bool:
    """``value`` computes each row of its (rows, n) result from the same row of its chain operands."""
    if not isinstance(value, relax.Call):
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
        return bool(ins) and all(shape(a)[0] == rows for a in ins) and all(
            _row_operand(o, shape(ins[0])[-1]) for o in others)
    return False


def find_chains(func: relax.Function) -> tuple[dict[relax.Var, relax.Expr], set[relax.Var]]:
    """(reshape in -> its N-D input, reshapes back) of every chain that can run on its N-D input."""
    graph = Bindings(func, set())
    order = list(graph.value)  # bindings in program order: a chain op's operands come before it
    operands = {var: set(relax.analysis.free_vars(value)) for var, value in graph.value.items()}  # once, not per chain
    inputs, outputs = {}, set()
    for start, var in enumerate(order):
        value = graph.value[var]
        if not is_call(value, _RESHAPE) or len(shape(var)) != 2:
            continue
        x = value.args[0]
        if not isinstance(x.ty, relax.TensorType) or x.ty.shape is None or len(shape(x)) < 3:
            continue
        lead, rows = shape(x)[:-1], shape(var)[0]
        if math.prod(lead) != rows or shape(x)[-1] != shape(var)[1]:
            continue
        chain, ends = {var}, set()
        for user in order[start + 1:]:
            used = graph.value[user]
            if chain.isdisjoint(operands[user]):
                continue
            tensor = isinstance(user.ty, relax.TensorType) and user.ty.shape is not None
            if tensor and is_call(used, _RESHAPE) and shape(user) == (*lead, shape(user)[-1]):
                ends.add(user)
            elif tensor and len(shape(user)) == 2 and shape(user)[0] == rows and _row_wise(used, chain, rows):
                chain.add(user)
            else:
                break
        else:
            escapes = any(None in graph.users.get(v, []) for v in chain)
            if ends and len(chain) > 1 and not escapes:
                inputs[var] = x
                outputs |= ends
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
                            dtype: str | None = None, keep: frozenset[str] = frozenset()
                            ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Every flattened row-wise chain of ``main`` on its N-D input; the module, the same params, and a report."""
    func = mod["main"]
    inputs, outputs = find_chains(func)
    if not inputs:
        return mod, params, {"chains": 0}
    rewriter = _Unflatten(mod, inputs, outputs)
    body = rewriter.visit_expr(func.body)
    rewriter.builder_.update_func(rewriter.builder_.get().get_global_var("main"),
                                  relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
    return relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get()), params, {"chains": len(inputs)}
