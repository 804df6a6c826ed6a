"""Replace CycleFC's export form with a call to our CycleFC kernel.

CycleFC exports as standard ONNX (see models/cyclemlp.py): a depthwise conv whose constant
kernel is the one-hot cyclic shift, then a 1x1 conv and a bias add, usually between an
NHWC->NCHW and an NCHW->NHWC transpose. After import that is

    xt = permute_dims(x, [0, 3, 1, 2])                      (optional)
    s  = conv2d(xt, ONE_HOT, groups=C, padding=k//2)
    y  = conv2d(s, W)                    W: (O, C, 1, 1) weight parameter
    z  = add(y, reshape(b, [1, O, 1, 1]))                   (optional)
    o  = permute_dims(z, [0, 2, 3, 1])                      (optional)

and becomes one ``call_tir`` of the NHWC kernel on x with W transposed to (C, O), absorbing the
transposes it can. A depthwise conv whose kernel is not exactly the cyclic one-hot shift, or any
chain that differs, is left alone for TVM's default lowering.

With ``dtype="float16"`` (``--fp16`` builds) the kernel computes in float16 with float32 accumulation and
writes the graph's dtype (ToMixedPrecision, which runs after this rewrite, leaves ``call_tir`` alone): the
rewrite casts the input (the cast ToMixedPrecision puts before the channel MLP on the same input is the
same expression, merged) and ships W^T in float16; the bias stays as it is, added to the accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..cyclefc import WIDENED_INPUTS, cyclefc_primfunc, schedule_cyclefc
from .graph_match import Bindings, axes, is_call, rewritten_main, shape, with_new_params

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_ADD = tvm.ir.Op.get("relax.add")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


@dataclass(frozen=True)
class CycleFCSite:
    root: relax.Var  # the binding whose value the kernel call replaces
    x: relax.Expr  # the kernel's input: NHWC when ``x_is_nhwc``, else the NCHW input of the shift conv
    x_is_nhwc: bool
    out_is_nhwc: bool  # ``root`` is the transpose back to NHWC
    weight: relax.Var  # (O, C, 1, 1)
    bias: relax.Var | None  # (O,)
    kernel_size: tuple[int, int]


def is_cyclic_shift_kernel(weight: np.ndarray) -> bool:
    """(C, 1, kh, kw) with one of kh, kw == 1: channel c picks tap (c + k//2) % k, as CycleFC's offsets say."""
    if weight.ndim != 4 or weight.shape[1] != 1 or 1 not in weight.shape[2:]:
        return False
    channels, k = weight.shape[0], weight.shape[2] * weight.shape[3]
    expected = np.eye(k, dtype=weight.dtype)[(np.arange(channels) + k // 2) % k]
    return np.array_equal(weight.reshape(channels, k), expected)


def _plain_conv(call: relax.Call, groups: int, padding: list[int]) -> bool:
    a = call.attrs
    return (int(a.groups) == groups and [int(p) for p in a.padding] == padding
            and all(int(s) == 1 for s in (*a.strides, *a.dilation))
            and a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW")


def find_cyclefc_sites(func: relax.Function, param_names: set[str], keep: frozenset[str] = frozenset()
                       ) -> list[CycleFCSite]:
    """Every CycleFC of ``main`` none of whose bindings is named in ``keep`` (layers kept in float32: left to the
    default lowering, where ``keep_float32`` finds them)."""
    graph = Bindings(func, param_names)
    value, only_user, is_param = graph.value, graph.only_user, graph.is_param
    sites = []
    for var, shift in value.items():
        if not (is_call(shift, _CONV2D) and isinstance(shift.args[1], tvm.ir.Constant)):
            continue
        kernel = shift.args[1].value.numpy()
        channels = kernel.shape[0]
        kh, kw = kernel.shape[2:] if kernel.ndim == 4 else (0, 0)
        if not (is_cyclic_shift_kernel(kernel) and _plain_conv(shift, channels, [kh // 2, kw // 2] * 2)):
            continue
        proj_var = only_user(var)
        proj = value.get(proj_var)
        if not (is_call(proj, _CONV2D) and proj.args[0].same_as(var) and is_param(proj.args[1], 4)
                and shape(proj.args[1])[1:] == (channels, 1, 1) and _plain_conv(proj, 1, [0, 0, 0, 0])):
            continue
        root, bias = proj_var, None
        add = value.get(only_user(root))
        if is_call(add, _ADD) and add.args[0].same_as(root) and isinstance(add.args[1], relax.Var):
            reshape = value.get(add.args[1])
            if is_call(reshape, _RESHAPE) and is_param(reshape.args[0], 1):
                root, bias = only_user(root), reshape.args[0]
        back = value.get(only_user(root))
        out_is_nhwc = is_call(back, _PERMUTE) and axes(back) == TO_NHWC
        if out_is_nhwc:
            root = only_user(root)
        x, x_is_nhwc = shift.args[0], False
        producer = value.get(x)
        if is_call(producer, _PERMUTE) and axes(producer) == TO_NCHW:
            x, x_is_nhwc = producer.args[0], True
        if not any(v.name in keep for v in graph.upstream([root], [x])):
            sites.append(CycleFCSite(root, x, x_is_nhwc, out_is_nhwc, proj.args[1], bias, (kh, kw)))
    return sites


@relax.expr_functor.mutator
class _SiteRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, sites: list[CycleFCSite], target: tvm.target.Target, dtype: str | None,
                 accumulator: str):
        super().__init__(mod)
        self.accumulator = accumulator
        self.sites = {site.root: site for site in sites}
        self.target = target
        self.dtype = dtype
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.transposed: dict[relax.Var, relax.Var] = {}  # (O, C, 1, 1) weight -> its (C, O) parameter

    def kernel(self, n, h, w, c, o, kernel_size, dtype, out_dtype, has_bias) -> relax.GlobalVar:
        key = (n, h, w, c, o, kernel_size, dtype, out_dtype, has_bias)
        if key not in self.kernels:
            func = cyclefc_primfunc(n, h, w, c, o, kernel_size, dtype=dtype, has_bias=has_bias, out_dtype=out_dtype,
                                    widen=self.target.kind.name in WIDENED_INPUTS, accumulator=self.accumulator)
            func = schedule_cyclefc(func, self.target).without_attr("global_symbol")
            self.kernels[key] = self.builder_.add_func(func, "cyclefc")
        return self.kernels[key]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        site = self.sites.get(binding.var)
        if site is None:
            return super().visit_var_binding_(binding)
        x = self.visit_expr(site.x)
        if not site.x_is_nhwc:
            x = self.builder_.emit(relax.op.permute_dims(x, TO_NHWC))
        n, h, w, c = shape(x)
        o = shape(site.weight)[0]
        graph_dtype = str(x.ty.dtype)
        dtype = self.dtype or graph_dtype
        if site.weight not in self.transposed:
            self.transposed[site.weight] = relax.Var(f"{site.weight.name}.T", relax.TensorType((c, o), dtype))
        if dtype != graph_dtype:  # W^T is a new parameter, shipped in dtype already
            x = self.builder_.emit(relax.op.astype(x, dtype))
        args = [x, self.transposed[site.weight], *([site.bias] if site.bias is not None else [])]
        gv = self.kernel(n, h, w, c, o, site.kernel_size, dtype, graph_dtype, site.bias is not None)
        call = relax.call_tir(gv, args, relax.TensorType((n, h, w, o), graph_dtype))
        if not site.out_is_nhwc:
            call = relax.op.permute_dims(self.builder_.emit(call), TO_NCHW)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))


def rewrite_cyclefc(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target,
                    dtype: str | None = None, keep: frozenset[str] = frozenset(), accumulator: str = "float32"
                    ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Rewrite every CycleFC site of ``main`` (but those with a binding in ``keep``) into kernels computing in
    ``dtype`` (None: the graph's), accumulating a float16 one in ``accumulator``; return the module, its params in
    call order, and a report."""
    func = mod["main"]
    sites = find_cyclefc_sites(func, set(params), keep)
    if not sites:
        return mod, params, {"sites": 0}
    rewriter = _SiteRewriter(mod, sites, target, dtype, accumulator)
    module = rewritten_main(rewriter, func)
    added = {}
    for weight, t in rewriter.transposed.items():
        o, c = shape(weight)[:2]
        added[t.name] = (t, np.ascontiguousarray(params[weight.name].reshape(o, c).T.astype(str(t.ty.dtype))))
    new_mod, new_params = with_new_params(module, params, added)
    dtypes = sorted({dtype for (*_, dtype, _out_dtype, _has_bias) in rewriter.kernels})
    return new_mod, new_params, {"sites": len(sites), "kernels": len(rewriter.kernels), "dtype": "+".join(dtypes),
                                 "schedule": target.kind.name}
