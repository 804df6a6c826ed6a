"""Compute CycleMLP's token mixer as one contraction: the three branches from one read of the input, nothing
but the mixed result written.

The mixer (models/cyclemlp.py, ``CycleMLP.forward``) after import is, on NHWC ``x``:

    h, w, c = sfc_h(x), sfc_w(x), mlp_c(x)               two CycleFC sites (rewrite_cyclefc's) and a matmul
    a       = mean over pixels of (h + w + c)            -> reweight MLP -> softmax over branches -> a_h, a_w, a_c
    out     = h * a_h + w * a_w + c * a_c

which writes h, w and c, reads them back for the sum, again for the mix, and writes the mix. Every branch is
linear in x, so the mean needs no branch output: mean(h + w + c) = sum_j mean(shift_j(x)) @ W_j + b_j, where a
shifted image's pixel mean is x's column (row) sums with the columns (rows) its shift reads (a matrix-vector
product, computed here from x before the big contraction). Then ``out`` is one call of our token-mixer kernel
(``tvm_schedules.cyclefc.token_mixer_te``): a GEMM over the J * C stacked branch inputs, each read shifted
straight from x, the softmax weights riding on the weight loads, the scaled biases added in the epilogue.

Runs before ``rewrite_cyclefc`` (it finds the CycleFC sites in their export form); a mixer whose branches or
means are used elsewhere (a probe output of ``diagnose``, say), or that differs in any other way, is left to
the CycleFC rewrite and the default lowering, and so is one on a small image (``MIN_PIXELS_PER_CHANNEL``) or
for a target kind it does not pay on (``TARGET_KINDS``). ``dtype`` float16 (``--fp16``): the kernel reads x and the weights
in float16 and accumulates in float32; the branch weights, biases and output stay in the graph's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..cyclefc import TOKEN_MIXER_RULE, TOKEN_SQUEEZE_RULE, schedule_cyclefc, token_mixer_primfunc
from .graph_match import Bindings, axes, is_call, rewritten_main, shape, with_new_params
from .rewrite_cyclefc import find_cyclefc_sites

_ADD = tvm.ir.Op.get("relax.add")
_MUL = tvm.ir.Op.get("relax.multiply")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_MEAN = tvm.ir.Op.get("relax.mean")
UNSHIFTED = (1, 1)
# Fused only where the image has at least this many pixels per channel. What fusing saves is the branches'
# outputs written and read back (pixels x channels each); what it costs is the kernel's weaker GEMM: one
# accumulator over J*C, every weight vector multiplied by its branch weight, against the default matmul
# schedule's packed panels for mlp_c. cyclemlp_b1 on a 2-core AMD EPYC (Zen 5), each kernel timed alone, quiet,
# fused / unfused per mixer: 56x56x64 0.95, 28x28x128 0.93, 14x14x320 1.27, 7x7x512 1.44.
MIN_PIXELS_PER_CHANNEL = 1
# The TVM target kinds the optimize stage runs it for. Not CUDA: there each fused mixer is launches more, not fewer (its squeeze reads
# x's pixel sums through some eight small reductions, where the unfused mixer launches its three GEMMs and three
# elementwise kernels): cyclemlp_b1's inference went from 181 to 197 launches, in a build bound by launches.
TARGET_KINDS = frozenset({"llvm"})


@dataclass(frozen=True)
class Branch:
    kernel_size: tuple[int, int]  # a CycleFC's shift, or UNSHIFTED for a plain projection
    weight: np.ndarray  # (C, O)
    bias: np.ndarray | None  # (O,)


@dataclass(frozen=True)
class MixerSite:
    x: relax.Expr  # NHWC input of every branch
    branches: tuple[Branch, ...]
    scales: tuple[relax.Expr, ...]  # each branch's (N, 1, 1, O) weight, in branch order
    mean: relax.Var  # the binding of mean(h + w + c): (N, O)
    mix: relax.Var  # the binding of sum_j branch_j * scale_j


def _add_leaves(graph: Bindings, var, inner_ok) -> list:
    """The terms of a tree of adds rooted at ``var`` whose inner nodes pass ``inner_ok``."""
    value = graph.value.get(var)
    if not is_call(value, _ADD):
        return [var]
    leaves = []
    for arg in value.args:
        if isinstance(arg, relax.Var) and is_call(graph.value.get(arg), _ADD) and inner_ok(arg):
            leaves += _add_leaves(graph, arg, inner_ok)
        else:
            leaves.append(arg)
    return leaves


def _branches(func: relax.Function, graph: Bindings, params: dict[str, np.ndarray]) -> dict[relax.Var, tuple]:
    """Every NHWC -> NHWC linear map of an activation: var -> (input, Branch)."""
    found = {}
    for site in find_cyclefc_sites(func, set(params)):
        if site.x_is_nhwc and site.out_is_nhwc:
            o, c = shape(site.weight)[:2]
            weight = params[site.weight.name].reshape(o, c).T
            bias = None if site.bias is None else params[site.bias.name]
            found[site.root] = (site.x, Branch(site.kernel_size, weight, bias))
    for var, value in graph.value.items():
        if not (is_call(value, _MATMUL) and graph.is_param(value.args[1], 2)):
            continue
        x, root, bias = value.args[0], var, None
        if len(shape(x)) == 2:  # a Linear with a bias exports as reshape (N*H*W, C) -> Gemm -> reshape back
            flat = graph.value.get(x)
            if not is_call(flat, _RESHAPE) or len(shape(flat.args[0])) != 4:
                continue
            x = flat.args[0]
        add = graph.value.get(graph.only_user(var))
        if is_call(add, _ADD) and add.args[0].same_as(var) and graph.is_param(add.args[1], 1):
            root, bias = graph.only_user(var), params[add.args[1].name]
        if len(shape(root)) == 2:
            back = graph.only_user(root)
            if back is None or not is_call(graph.value[back], _RESHAPE) or len(shape(back)) != 4:
                continue
            root = back
        found[root] = (x, Branch(UNSHIFTED, params[value.args[1].name], bias))
    return found


def _pixel_mean_of(graph: Bindings, total: relax.Var) -> relax.Var | None:
    """The binding of ``mean(reshape(permute(total, NCHW), (N, C, H*W)), axis=2)``, CycleMLP's squeeze."""
    chain, var = [], total
    for op in (_PERMUTE, _RESHAPE, _MEAN):
        var = graph.only_user(var)
        if var is None or not is_call(graph.value[var], op):
            return None
        chain.append(var)
    permute, reshape, mean = chain
    n, h, w, c = shape(total)
    mean_call = graph.value[mean]
    if axes(graph.value[permute]) != [0, 3, 1, 2] or shape(reshape) != (n, c, h * w):
        return None
    if [int(a) for a in mean_call.attrs.axis] != [2] or bool(mean_call.attrs.keepdims):
        return None
    return mean


def find_mixer_sites(func: relax.Function, params: dict[str, np.ndarray], keep: frozenset[str] = frozenset()
                     ) -> list[MixerSite]:
    """Every ``sum_j branch_j * scale_j`` whose branches share one input and are otherwise used only by their
    plain sum, whose only use is its pixel mean; but those with a binding named in ``keep`` (kept in float32)."""
    graph = Bindings(func, set(params))
    branches = _branches(func, graph, params)
    sites = []
    for mix, value in graph.value.items():
        if not is_call(value, _ADD) or is_call(graph.value.get(graph.only_user(mix)), _ADD):
            continue  # not the root of an add tree
        scaled = []
        for term in _add_leaves(graph, mix, lambda v: graph.only_user(v) is not None):
            product = graph.value.get(term) if isinstance(term, relax.Var) else None
            if not is_call(product, _MUL) or graph.only_user(term) is None:
                break
            branch, scale = product.args
            if branch not in branches:
                branch, scale = scale, branch
            if branch not in branches:
                break
            scaled.append((branch, scale))
        else:
            site = _site(graph, branches, mix, scaled)
            if site is not None and not any(v.name in keep for v in graph.upstream(
                    [site.mix, site.mean], [site.x, *site.scales])):
                sites.append(site)
    return sites


def _site(graph: Bindings, branches: dict, mix: relax.Var, scaled: list) -> MixerSite | None:
    vars_ = [b for b, _ in scaled]
    if len(vars_) < 2 or len(set(vars_)) != len(vars_):
        return None
    x = branches[vars_[0]][0]
    n, h, w, c = shape(x)
    o = shape(mix)[3]
    if any(not branches[b][0].same_as(x) for b in vars_) or shape(mix) != (n, h, w, o):
        return None
    if h * w < MIN_PIXELS_PER_CHANNEL * c:
        return None  # the branches' outputs are small beside their weights: fusing saves less than it costs
    if any(shape(s) != (n, 1, 1, o) for _, s in scaled):
        return None
    # each branch's one other use is an add of the plain sum; its root's one use is the pixel mean
    sums = []
    for b in vars_:
        users = graph.users.get(b, [])
        adds = [u for u in users if u is not None and is_call(graph.value.get(u), _ADD)]
        if len(users) != 2 or len(adds) != 1:
            return None
        sums.append(adds[0])
    total = sums[0]
    while graph.only_user(total) is not None and is_call(graph.value.get(graph.only_user(total)), _ADD):
        total = graph.only_user(total)
    leaves = _add_leaves(graph, total, lambda v: graph.only_user(v) is not None)
    if len(leaves) != len(vars_) or set(leaves) != set(vars_):
        return None
    mean = _pixel_mean_of(graph, total)
    if mean is None:
        return None
    return MixerSite(x, tuple(branches[b][1] for b in vars_), tuple(s for _, s in scaled), mean, mix)


def read_mask(extent: int, channels: int, k: int) -> np.ndarray:
    """(extent, channels): 1 where a CycleFC shift of kernel length ``k`` reads position i of channel c (it reads
    ``p + s(c)`` for every output position p, zeros outside)."""
    shift = (np.arange(channels) + k // 2) % k - k // 2
    i = np.arange(extent)[:, None]
    return ((i - shift >= 0) & (i - shift < extent)).astype("float32")


@relax.expr_functor.mutator
class _MixerRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, sites: list[MixerSite], target: tvm.target.Target, dtype: str | None,
                 accumulator: str):
        super().__init__(mod)
        self.accumulator = accumulator
        self.by_mean = {site.mean: site for site in sites}
        self.by_mix = {site.mix: site for site in sites}
        self.target, self.dtype = target, dtype
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.new_params: dict[str, tuple[relax.Var, np.ndarray]] = {}
        self.site_params: dict[relax.Var, tuple] = {}

    def params_of(self, site: MixerSite, graph_dtype: str):
        """(stacked weight (J*C, O) in the compute dtype, biases (J, O) or None, their sum (O,) or None)."""
        if site.mix not in self.site_params:
            dtype = self.dtype or graph_dtype
            stem = site.mix.name
            weight = np.concatenate([b.weight for b in site.branches]).astype(dtype)
            made = [self.param(f"{stem}.weight", weight)]
            if any(b.bias is not None for b in site.branches):
                biases = np.stack([b.bias if b.bias is not None else np.zeros(weight.shape[1], graph_dtype)
                                   for b in site.branches]).astype(graph_dtype)
                made += [self.param(f"{stem}.biases", biases), self.param(f"{stem}.bias_sum", biases.sum(0))]
            else:
                made += [None, None]
            self.site_params[site.mix] = tuple(made)
        return self.site_params[site.mix]

    def param(self, name: str, array: np.ndarray) -> relax.Var:
        var = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        self.new_params[name] = (var, np.ascontiguousarray(array))
        return var

    def emit(self, expr):
        return self.builder_.emit(expr)

    def branch_means(self, site: MixerSite, x: relax.Expr) -> relax.Expr:
        """(N, J*C): each branch input's pixel sum (x shifted as the branch reads it)."""
        n, h, w, c = shape(x)
        sums = {1: self.emit(relax.op.sum(x, axis=[1])), 2: self.emit(relax.op.sum(x, axis=[2]))}  # (N, W|H, C)
        means = []
        for branch in site.branches:
            kh, kw = branch.kernel_size
            axis = 1 if kh == 1 else 2  # a (1, k) shift moves along W: it needs x's sums over H, per column
            line = sums[axis]
            k, extent = max(kh, kw), (w if axis == 1 else h)
            if k > 1:
                line = self.emit(relax.op.multiply(line, relax.const(read_mask(extent, c, k).astype(str(x.ty.dtype)))))
            means.append(self.emit(relax.op.sum(line, axis=[1])))
        return self.emit(relax.op.concat(means, axis=1))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        site = self.by_mean.get(binding.var) or self.by_mix.get(binding.var)
        if site is None:
            return super().visit_var_binding_(binding)
        x = self.visit_expr(site.x)
        n, h, w, c = shape(x)
        graph_dtype = str(x.ty.dtype)
        dtype = self.dtype or graph_dtype
        weight, biases, bias_sum = self.params_of(site, graph_dtype)
        o = shape(binding.var)[-1]
        kernels = tuple(b.kernel_size for b in site.branches)
        if binding.var in self.by_mean:  # mean_pixels(h + w + c) = sum_j mean_pixels(shift_j(x)) @ W_j + sum_j b_j
            # by the same kernel on the same weight (one copy of it; a matmul's default schedule would pack its own)
            mean = self.emit(relax.op.multiply(self.branch_means(site, x), relax.const(1.0 / (h * w), graph_dtype)))
            if dtype != graph_dtype:
                mean = self.emit(relax.op.astype(mean, dtype))
            args = [self.emit(relax.op.reshape(mean, (n, 1, 1, len(kernels), c))), weight]
            if bias_sum is not None:
                args.append(self.emit(relax.op.broadcast_to(bias_sum, (n, o))))  # weights alone: folded
            unshifted = (UNSHIFTED,) * len(kernels)
            gv = self.kernel(n, 1, 1, c, o, unshifted, dtype, graph_dtype, bias_sum is not None, True)
            squeeze = self.emit(relax.call_tir(gv, args, relax.TensorType((n, 1, 1, o), graph_dtype)))
            value = relax.op.reshape(squeeze, (n, o))
        else:
            scale = self.emit(relax.op.concat([self.emit(relax.op.reshape(self.visit_expr(s), (n, 1, o)))
                                               for s in site.scales], axis=1))  # (N, J, O)
            args = [self.emit(relax.op.astype(x, dtype)) if dtype != graph_dtype else x, weight, scale]
            if biases is not None:
                args.append(self.emit(relax.op.sum(relax.op.multiply(scale, biases), axis=[1])))
            value = relax.call_tir(self.kernel(n, h, w, c, o, kernels, dtype, graph_dtype, biases is not None, False),
                                   args, relax.TensorType((n, h, w, o), graph_dtype))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    def kernel(self, *key) -> relax.GlobalVar:
        if key not in self.kernels:
            n, h, w, c, o, kernels, dtype, out_dtype, has_bias, squeeze = key
            func = token_mixer_primfunc(n, h, w, c, o, kernels, dtype=dtype, has_bias=has_bias, out_dtype=out_dtype,
                                        squeeze=squeeze, accumulator=self.accumulator)
            rule = TOKEN_SQUEEZE_RULE if squeeze else TOKEN_MIXER_RULE
            func = schedule_cyclefc(func, self.target, rule).without_attr("global_symbol")
            self.kernels[key] = self.builder_.add_func(func, "cycle_token_squeeze" if squeeze else "cycle_token_mixer")
        return self.kernels[key]


def fuse_cycle_token_mixer(mod: tvm.IRModule, params: dict[str, np.ndarray], target: tvm.target.Target,
                           dtype: str | None = None, keep: frozenset[str] = frozenset(), accumulator: str = "float32"
                           ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Rewrite every CycleMLP token mixer of ``main`` (but those with a binding in ``keep``) into one kernel call
    computing in ``dtype`` (None: the graph's), accumulating a float16 one in ``accumulator``; return the module,
    its params in call order, and a report."""
    func = mod["main"]
    sites = find_mixer_sites(func, params, keep)
    if not sites:
        return mod, params, {"sites": 0}
    rewriter = _MixerRewriter(mod, sites, target, dtype, accumulator)
    new_mod, new_params = with_new_params(rewritten_main(rewriter, func), params, rewriter.new_params)
    dtypes = sorted({key[6] for key in rewriter.kernels})
    return new_mod, new_params, {"sites": len(sites), "kernels": len(rewriter.kernels), "dtype": "+".join(dtypes),
                                 "branches": sorted({len(s.branches) for s in sites}), "schedule": target.kind.name}
