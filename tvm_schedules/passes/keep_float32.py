"""Keep chosen layers in float32 under ``relax.transform.ToMixedPrecision`` (run this just before it).

TVM 0.27's ToMixedPrecision takes no list of operators or sites to leave alone (its only options are the
accumulator dtype and fp16 parameter names), but it leaves ``call_tir`` untouched. So each kept binding is
legalized here, ahead of the rest, into the ``call_tir`` of its float32 TIR function; its tensor operands are
passed through an ``astype(float32)`` first, which ToMixedPrecision turns into the cast from whatever float16
value it feeds (it fails on a ``call_tir`` whose operand it made float16). The kept layer's consumers read
float32, which ToMixedPrecision casts down again where it converts them.

Bindings are named by the ONNX import after the ONNX node that produced them (:func:`binding_name`); the
bindings a node's conversion emitted before its result (a Gemm's transpose and bias add, say) carry TVM's
default names and belong to the next named binding.
"""
from __future__ import annotations

import re

import tvm
from tvm import relax

PREFIX = "onnx_"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def binding_name(onnx_node: str) -> str:
    """The name of the binding that holds an ONNX node's (first) result: an identifier, so codegen never sees
    the node name's ``/`` and ``.``."""
    return PREFIX + re.sub(r"\W+", "_", onnx_node).strip("_")


@relax.expr_functor.mutator
class _Legalizer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kept: set[relax.Var]):
        super().__init__(mod)
        self.kept = kept
        self.count = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if binding.var not in self.kept or not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op) \
                or value.op.same_as(_CALL_TIR) or value.op.get_attr("FLegalize") is None:
            return super().visit_var_binding_(binding)
        call = self.visit_expr(value)
        args = [self.builder_.emit(relax.op.astype(a, "float32"))
                if isinstance(a, relax.DataflowVar) and isinstance(a.ty, relax.TensorType) and a.ty.dtype == "float32"
                else a for a in call.args]
        legalized = value.op.get_attr("FLegalize")(self.builder_, relax.Call(call.op, args, call.attrs, call.ty_args))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(legalized)))
        self.count += 1


def keep_float32(mod: tvm.IRModule, names: frozenset[str]) -> tuple[tvm.IRModule, dict]:
    """Legalize, in ``main``, the bindings of the ONNX nodes whose :func:`binding_name` is in ``names``."""
    main = mod["main"]
    kept, pending = set(), []
    for block in main.body.blocks:
        for binding in block.bindings:
            pending.append(binding.var)
            if binding.var.name.startswith(PREFIX):
                if binding.var.name in names:
                    kept.update(pending)
                pending = []
    legalizer = _Legalizer(mod, kept)
    body = legalizer.visit_expr(main.body)
    legalizer.builder_.update_func(legalizer.builder_.get().get_global_var("main"),
                                   relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs))
    return legalizer.builder_.get(), {"nodes": len(names), "legalized_bindings": legalizer.count}
