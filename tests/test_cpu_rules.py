"""The default CPU schedule rules (tvm_schedules.cpu): each rule on the fused functions it is meant for, at
awkward shapes, against the same module built without them (and numpy / torch references); that the rule
really scheduled (marked, parallel, vectorized) and keeps its accumulators off the heap; and the optimize
stage's integration (by target kind, report, already-scheduled functions left alone)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te, tirx, topi

import targets
from pipeline.stages import optimize as optimize_stage
from pipeline.tvm_targets import to_tvm_target
from pipeline.stages.optimize import lower_to_fused_tir
from tvm_schedules.cpu import Contraction, Injective, RowReduction, apply_default_schedules, default_rules
from tvm_schedules.passes.small_buffers_on_stack import TIR_PIPELINE
from tvm_schedules.scheduled import is_scheduled
from tvm_schedules.cpu.fast_math import vectorizable_math
from tvm_schedules.cpu.isa import MAX_STACK_ALLOCA_BYTES, gemm_tiles
from tvm_schedules.cyclefc import cyclefc_primfunc, schedule_cyclefc

HOST = to_tvm_target(targets.get_target("x86"))
ARM = to_tvm_target(targets.get_target("jetson-orin-cpu"))
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def fused_module(emit, *shapes, dtype="float32") -> tvm.IRModule:
    """A Relax function of ``dtype`` inputs ``shapes`` whose body is ``emit(*vars)``, legalized and fused as the
    optimize stage does (so the PrimFuncs have the pipeline's form: pad_temp, fused epilogues...)."""
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(s, dtype)) for i, s in enumerate(shapes)]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(emit(*xs))
        bb.emit_func_output(out)
    return lower_to_fused_tir(bb.get())


def run(mod: tvm.IRModule, args: list[np.ndarray], target=HOST) -> np.ndarray:
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target), tir_pipeline=TIR_PIPELINE)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def check(emit, shapes, expect_rule: str, reference=None, rtol=1e-5, atol=1e-5, dtype="float32", target=HOST):
    """Schedule the fused module with the default rules for ``target``; the expected rule must have scheduled a
    function and every function must end up scheduled; outputs equal the unscheduled build's (and ``reference``),
    both built and run here (a schedule for another CPU is portable TIR: its numerics are checked on this one)."""
    mod = fused_module(emit, *shapes, dtype=dtype)
    args = [RNG.uniform(-1, 1, s).astype(dtype) for s in shapes]
    expected = run(mod, args)
    scheduled, report = apply_default_schedules(mod, target)
    assert report["rules"][expect_rule] >= 1, report
    assert report["unscheduled"] == [], report
    assert all(is_scheduled(f) for f in prim_funcs(scheduled).values())
    got = run(scheduled, args)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    if reference is not None:
        np.testing.assert_allclose(got, reference(*args), rtol=rtol, atol=atol)
    return scheduled


def gelu(x):
    return x * 0.5 * (1 + torch.special.erf(x / math.sqrt(2)))


def scripts(mod: tvm.IRModule) -> str:
    return "\n".join(f.script() for f in prim_funcs(mod).values())


# ---------------------------------------------------------------------------------------------------------------
# Contraction: matmul / dense / batch matmul


@pytest.mark.parametrize("m, k, n", [(1, 7, 13), (37, 19, 50), (196, 33, 49), (5, 64, 1000), (50, 17, 3)])
def test_dense_with_bias_gelu_epilogue(m, k, n):
    """x @ W^T + b, GELU: the Linear-layer form (weight transposed, so packed), awkward shapes."""
    def emit(x, w, b):
        y = relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w)), b)
        return relax.op.nn.gelu(y)

    ref = lambda x, w, b: gelu(torch.from_numpy(x @ w.T + b)).numpy()  # noqa: E731
    check(emit, [(m, k), (n, k), (n,)], "Contraction", ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("m, k, n", [(23, 31, 48), (196, 64, 196)])
def test_matmul_weight_k_by_n(m, k, n):
    """The ONNX MatMul form of these models: weight already (K, N), N contiguous: no packing needed."""
    check(lambda x, w: relax.op.matmul(x, w), [(m, k), (k, n)], "Contraction", lambda x, w: x @ w, rtol=1e-4)


@pytest.mark.parametrize("b, m, k, n", [(1, 32, 16, 16), (3, 17, 9, 20)])
def test_batch_matmul_token_mixing(b, m, k, n):
    """Token mixing: batched, the activations transposed in, the output written straight to the function
    output (a cache_write accumulator tile)."""
    def emit(x, w):
        return relax.op.matmul(relax.op.permute_dims(x, [0, 2, 1]), w)

    check(emit, [(b, k, m), (b, k, n)], "Contraction", lambda x, w: x.transpose(0, 2, 1) @ w, rtol=1e-4)


def test_float16_dense_gelu():
    """--fp16 builds: float16 matmuls (float16 accumulators, 32 lanes on AVX-512) with a float16 GELU."""
    def emit(x, w, b):
        return relax.op.nn.gelu(relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w)), b))

    ref = lambda x, w, b: gelu(torch.from_numpy(x.astype("float32") @ w.astype("float32").T  # noqa: E731
                                                + b.astype("float32"))).numpy()
    check(emit, [(37, 40), (96, 40), (96,)], "Contraction", ref, rtol=2e-2, atol=2e-2, dtype="float16")


# ---------------------------------------------------------------------------------------------------------------
# Contraction: conv2d as it appears here (NCHW)


def conv_ref(x, w, stride=1, padding=0, groups=1, bias=None):
    return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=padding,
                                      groups=groups, bias=None if bias is None else torch.from_numpy(bias)).numpy()


@pytest.mark.parametrize("c, o, h", [(12, 20, 7), (32, 48, 16)])
def test_conv_1x1_bias_gelu(c, o, h):
    def emit(x, w, b):
        y = relax.op.nn.conv2d(x, w)
        return relax.op.nn.gelu(relax.op.add(y, relax.op.reshape(b, (1, o, 1, 1))))

    ref = lambda x, w, b: gelu(torch.from_numpy(conv_ref(x, w, bias=b))).numpy()  # noqa: E731
    check(emit, [(1, c, h, h), (o, c, 1, 1), (o,)], "Contraction", ref, rtol=1e-4, atol=2e-5)


def test_conv_1x1_streams_the_image_in_panels():
    """Input channels one 16x32 image plane apart (2 KiB), 48 output channels (8 row tiles of 6): the image is
    copied into panels one tile wide, [pixel // width, 1, channel, pixel % width], and the result is unchanged."""
    c, o = 24, 48
    scheduled = check(lambda x, w: relax.op.nn.conv2d(x, w), [(1, c, 16, 32), (o, c, 1, 1)], "Contraction",
                      lambda x, w: conv_ref(x, w), rtol=1e-4)
    panels = re.findall(rf"_global = T.sblock_alloc_buffer\(\(T.int64\((\d+)\), T.int64\(1\), T.int64\({c}\), "
                        r"T.int64\((\d+)\)\)", scripts(scheduled))
    assert [int(n) * int(width) for n, width in panels] == [16 * 32], scripts(scheduled)


@pytest.mark.parametrize("c, h, k", [(24, 16, 9), (7, 11, 3), (5, 6, 5)])
def test_depthwise_conv_same_padding(c, h, k):
    """ConvMixer's depthwise k x k (padding k//2: the pad block stays materialized)."""
    emit = lambda x, w: relax.op.nn.conv2d(x, w, padding=k // 2, groups=c)  # noqa: E731
    check(emit, [(1, c, h, h), (c, 1, k, k)], "Contraction",
          lambda x, w: conv_ref(x, w, padding=k // 2, groups=c), rtol=1e-4)


@pytest.mark.parametrize("c, o, hw, p, target", [
    (3, 20, 28, 14, HOST), (3, 32, 32, 4, HOST), (5, 7, 12, 3, HOST),
    # NEON: kx = 14 unrolled by 4 with a partial last step; kx = 8, its two unrolled steps fused with ky
    pytest.param(3, 20, 28, 14, ARM, id="neon-14"), pytest.param(3, 24, 32, 8, ARM, id="neon-8")])
def test_patch_embedding_conv(c, o, hw, p, target):
    """Patch embedding: stride = kernel (the weight is packed so output channels are the vector axis)."""
    def emit(x, w, b):
        return relax.op.add(relax.op.nn.conv2d(x, w, strides=p), relax.op.reshape(b, (1, o, 1, 1)))

    check(emit, [(1, c, hw, hw), (o, c, p, p), (o,)], "Contraction",
          lambda x, w, b: conv_ref(x, w, stride=p, bias=b), rtol=1e-4, target=target)


def test_strided_overlapping_conv():
    """CycleMLP's downsampling conv: 3x3, stride 2, padding 1, at odd sizes."""
    emit = lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1)  # noqa: E731
    check(emit, [(1, 6, 15, 15), (10, 6, 3, 3)], "Contraction",
          lambda x, w: conv_ref(x, w, stride=2, padding=1), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# RowReduction and Injective


@pytest.mark.parametrize("rows, width", [(196, 384), (7, 13), (196, 256)])
def test_layer_norm(rows, width):
    def emit(x, g, b):
        return relax.op.nn.layer_norm(x, g, b, axes=[-1])

    ref = lambda x, g, b: torch.nn.functional.layer_norm(  # noqa: E731
        torch.from_numpy(x), (width,), torch.from_numpy(g), torch.from_numpy(b)).numpy()
    scheduled = check(emit, [(1, rows, width), (width,), (width,)], "RowReduction", ref, rtol=1e-4, atol=1e-5)
    if width % 16 == 0:  # both row sums (mean, variance) are vectors of partials, and so is the normalization
        assert vector_widths(scheduled).count(16) >= 3, scripts(scheduled)
    if width == 256:  # weight and bias fill the 32 zmm registers: 7 rows (196 = 28 x 7) per channel panel
        assert "T.unroll(T.int64(7))" in scripts(scheduled), scripts(scheduled)


def vector_widths(mod: tvm.IRModule) -> list[int]:
    return [int(w) for w in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", scripts(mod))]


@pytest.mark.parametrize("shape, axis", [((3, 1, 64), 0), ((5, 37), -1)])
def test_softmax(shape, axis):
    check(lambda x: relax.op.nn.softmax(x, axis=axis), [shape], "RowReduction",
          lambda x: torch.softmax(torch.from_numpy(x), axis).numpy())


@pytest.mark.parametrize("channels", [50, 512])
def test_mean_over_tokens(channels):
    scheduled = check(lambda x: relax.op.mean(x, axis=[1]), [(1, 196, channels)], "RowReduction",
                      lambda x: x.mean(1), rtol=1e-5)
    if channels % 16 == 0:  # strided tokens: 16 channels summed side by side, not one scalar chain per channel
        assert 16 in vector_widths(scheduled), scripts(scheduled)


@pytest.mark.parametrize("shape", [(1, 196, 512), (3, 7, 5)])
def test_injective_transpose_add(shape):
    def emit(x, y):
        return relax.op.add(relax.op.permute_dims(x, [0, 2, 1]), y)

    out_shape = (shape[0], shape[2], shape[1])
    check(emit, [shape, out_shape], "Injective", lambda x, y: x.transpose(0, 2, 1) + y)


def test_injective_weight_transpose_is_tiled():
    """A large transpose (a weight transposed at run time) is tiled and parallel, not gathered row by row: 16
    contiguous output columns (a vector) by 8 input columns (1000 = 8 x 125)."""
    scheduled = check(lambda x: relax.op.permute_dims(x), [(512, 1000)], "Injective", lambda x: x.T)
    text = scripts(scheduled)
    assert "T.parallel" in text and "T.vectorized(T.int64(16))" in text and "in range(T.int64(8))" in text


# ---------------------------------------------------------------------------------------------------------------
# What the rules produce


def test_matmul_schedule_is_parallel_vectorized_register_tiled():
    mod = fused_module(lambda x, w, b: relax.op.add(relax.op.matmul(x, w), b), (196, 512), (512, 256), (256,))
    [func] = prim_funcs(mod).values()
    sch = Contraction().apply(func, HOST, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized(T.int64(16))" in text and "T.unroll" in text
    mr, nv = gemm_tiles(196, 256, 16, 32, max_tile_bytes=MAX_STACK_ALLOCA_BYTES - 1)  # a streamed weight
    assert 196 % mr == 0 and mr * nv * 16 * 4 < 1024  # unguarded rows; the tile of TVM's stack-alloca limit
    mr, nv = gemm_tiles(768, 1024, 16, 32)  # a 1x1 conv's broadcast weight: as many accumulators as fit
    assert 768 % mr == 0 and 15 < mr * nv and mr * nv + nv + 2 <= 32


def _parallel_bodies(text: str) -> list[str]:
    """The text of every T.parallel loop body in a TIR script (by indentation)."""
    lines, bodies = text.splitlines(), []
    for i, line in enumerate(lines):
        if "T.parallel(" in line:
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            bodies.append("\n".join(body))
    return bodies


def _lowered_host_tir(func: tirx.PrimFunc, target) -> str:
    """The function after TVM's TIR pipeline and LowerTVMBuiltin: where an allocation becomes a stack array or
    a TVMBackendAllocWorkspace call (before LLVM outlines the parallel loops)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)  # as tvm.tirx.build does
    pipeline, finalize_host, _ = tvm.tirx.get_tir_pipeline(TIR_PIPELINE)  # as the build stage builds
    return finalize_host()(pipeline(mod)).script()


@pytest.mark.parametrize("emit, shapes", [
    (lambda x, w: relax.op.matmul(x, w), [(196, 512), (512, 256)]),  # accumulator = cache_write tile
    (lambda x, w, b: relax.op.nn.gelu(relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w)), b)),
     [(64, 96), (48, 96), (48,)]),  # fused epilogue, packed weight
    (lambda x, w: relax.op.nn.conv2d(x, w, strides=14), [(1, 3, 56, 56), (64, 3, 14, 14)]),
])
def test_accumulator_tile_is_not_a_heap_workspace(emit, shapes):
    """The accumulator tile is a "global" buffer allocated inside the parallel loop, which LowerTVMBuiltin keeps
    on the stack (under 1 KiB by itself, larger where ``small_buffers_on_stack`` annotated it): no
    TVMBackendAllocWorkspace inside any parallel loop (a packed operand's buffer, allocated once per call outside
    them, may be one)."""
    mod = fused_module(emit, *shapes)
    scheduled, report = apply_default_schedules(mod, HOST)
    [name] = [n for n in prim_funcs(mod) if "matmul" in n or "conv2d" in n]
    text = _lowered_host_tir(prim_funcs(scheduled)[name], HOST)
    bodies = _parallel_bodies(text)
    assert bodies, text
    assert not any("TVMBackendAllocWorkspace" in b for b in bodies)


def test_fast_erf_matches_topi_and_erf():
    """GELU's erf becomes TVM's own fast_erf polynomial (vectorizable), within 1e-6 of erf."""
    a = te.placeholder((20001,), name="a")
    erf_func = vectorizable_math(te.create_prim_func([a, te.compute(a.shape, lambda i: tirx.erf(a[i]))]))
    topi_func = te.create_prim_func([a, topi.fast_erf(a)])
    x = np.linspace(-6, 6, 20001).astype("float32")
    outs = []
    for f in (erf_func, topi_func):
        lib = tvm.compile(tvm.IRModule({"main": f}), target=HOST)
        y = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - np.array([math.erf(v) for v in x.tolist()])).max() < 1e-6
    assert "erf" not in erf_func.script().replace("erf_x", "")


# ---------------------------------------------------------------------------------------------------------------
# Integration


def test_rules_skip_scheduled_functions_and_non_cpu_targets():
    cyclefc = schedule_cyclefc(cyclefc_primfunc(1, 8, 8, 16, 16, (1, 3)), HOST)
    for rule in default_rules():
        assert rule.apply(cyclefc, HOST, False) is None
    mod = fused_module(lambda x, w: relax.op.matmul(x, w), (16, 32), (32, 16))
    [func] = prim_funcs(mod).values()
    assert Contraction().apply(func, tvm.target.Target({"kind": "cuda", "arch": "sm_87"}), False) is None
    assert Injective().apply(func, HOST, False) is None  # not its kind of function
    ln = fused_module(lambda x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1]), (4, 8), (8,), (8,))
    [ln_func] = prim_funcs(ln).values()
    assert Contraction().apply(ln_func, HOST, False) is None and RowReduction().apply(ln_func, HOST, False) is not None


def test_arm_target_gets_neon_width_schedules():
    mod = fused_module(lambda x, w, b: relax.op.add(relax.op.matmul(x, w), b), (49, 64), (64, 40), (40,))
    scheduled, report = apply_default_schedules(mod, ARM)
    assert report["rules"]["Contraction"] == 1 and report["unscheduled"] == []
    text = scripts(scheduled)
    assert "T.vectorized(T.int64(4))" in text and "T.vectorized(T.int64(16))" not in text
    tvm.compile(scheduled, ARM, relax_pipeline=relax.get_default_pipeline(ARM))  # builds for aarch64


@pytest.mark.parametrize("k", [49, 50])
def test_neon_tile_unrolls_a_reduction_that_does_not_divide_by_four(k):
    """Rows contiguous along a reduction of 49 (Mixer-S/32's token MLP): the NEON tile unrolls K by 4 over its full
    steps, and the partial last step is a loop of its own, not a guard in the hot loop nor an unroll by 1."""
    scheduled = check(lambda w, x, b: relax.op.add(relax.op.matmul(w, x), b), [(24, k), (k, 64), (64,)],
                      "Contraction", reference=lambda w, x, b: w @ x + b, target=ARM)
    assert "_partition" in scripts(scheduled)


def test_optimize_stage_applies_defaults_by_target_kind(monkeypatch):
    """optimize() schedules every function by target kind (report per rule; CUDA: tvm_schedules.cuda's rules)."""
    mod = fused_module(lambda x, w: relax.op.nn.gelu(relax.op.matmul(x, w)), (8, 16), (16, 24))
    for name, rule in (("x86", "Contraction"), ("aarch64", "Contraction"), ("cuda", "dlight.gpu.Matmul")):
        out, report = optimize_stage.apply_default_schedules(mod, targets.get_target(name))
        assert report["applied"] is True, (name, report)
        assert sum(report["rules"].values()) == len(prim_funcs(mod)) and report["unscheduled"] == []
        assert report["rules"][rule] == 1, (name, report)
        assert all(is_scheduled(f) for f in prim_funcs(out).values())
    monkeypatch.setattr(optimize_stage, "DEFAULT_SCHEDULES", {})
    _, report = optimize_stage.apply_default_schedules(mod, targets.get_target("x86"))
    assert report["applied"] is False


def test_torch_block_through_the_pipeline_stages(tmp_path):
    """A small Mixer/ConvMixer-like torch module through export, onnxsim, import and optimize: every fused
    function is scheduled by some rule and the library's output matches the build without defaults."""
    from pipeline.stages.export import export_onnx
    from pipeline.stages.relax_import import import_onnx
    from pipeline.stages.simplify import simplify_onnx

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 24, 4, stride=4)
            self.dw = torch.nn.Conv2d(24, 24, 5, padding=2, groups=24)
            self.bn = torch.nn.BatchNorm2d(24)
            self.norm = torch.nn.LayerNorm(24)
            self.token = torch.nn.Linear(25, 25)
            self.fc = torch.nn.Linear(24, 40)
            self.head = torch.nn.Linear(40, 11)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.bn(torch.nn.functional.gelu(self.dw(x)))
            x = self.norm(x.flatten(2).transpose(1, 2))  # (1, 25, 24)
            x = x + self.token(x.transpose(1, 2)).transpose(1, 2)
            x = torch.nn.functional.gelu(self.fc(x))
            return self.head(x.mean(1)).softmax(-1)

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(1, 3, 20, 20)
    export_onnx(model, {"input": x.numpy()}, ("logits",), 17, tmp_path / "m.onnx")
    simplify_onnx(tmp_path / "m.onnx", tmp_path / "m.sim.onnx")
    mod, params = import_onnx(tmp_path / "m.sim.onnx", {"input": (1, 3, 20, 20)})
    lowered, params, _ = optimize_stage.lower(mod, params, targets.get_target("x86"))
    args = [x.numpy(), *params.values()]
    unscheduled = run(lowered, args)
    scheduled, report = apply_default_schedules(lowered, HOST)
    assert report["unscheduled"] == [] and report["rules"]["Contraction"] >= 5, report
    np.testing.assert_allclose(run(scheduled, args), unscheduled, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(run(scheduled, args), model(x).numpy(), rtol=1e-4, atol=1e-6)
