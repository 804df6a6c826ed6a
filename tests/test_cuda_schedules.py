"""CUDA schedules, checked without a GPU: which rule took each kernel, tensor cores read from the SASS, our
depthwise-conv schedule's arithmetic (the same loop nest run serially on the CPU) and its cubins' resources."""
import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

import models
from models.cyclemlp import CycleFC
import targets
from pipeline.errors import BuildError
from pipeline.spec import BuildSpec
from pipeline.run import compile_model
from pipeline.stages import optimize as optimize_stage
from pipeline.stages.build import CONTRACTION_RULES, build
from pipeline.toolchain.kernel_limits import kernel_limit_violations
from pipeline.stages.optimize import lower_to_fused_tir, optimize
from pipeline.stages.relax_import import import_onnx
from pipeline.toolchain import cuda_toolchains
from pipeline.toolchain.cuda_aot import aot_cuda
from pipeline.toolchain.cuda_toolchains import find_in_nvidia
from pipeline.toolchain.sass import parse_tensor_core_ops, ptx_tensor_core_ops, tool_problem
from tvm.s_tir import dlight as dl
from tvm_schedules.apply import apply_rules
from tvm_schedules.cuda import apply_default_schedules
from tvm_schedules.cuda.depthwise_conv import CUDA, SERIAL, schedule_depthwise
from tvm_schedules.cyclefc import CYCLEFC_RULE, cyclefc_primfunc, schedule_cyclefc

pytestmark = [
    pytest.mark.skipif(find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.12") is None, reason="NVRTC 12 missing: pip install "
                       + " ".join(cuda_toolchains.TOOLCHAINS["nvrtc-12"].pip_packages)),
    pytest.mark.skipif(tool_problem() is not None, reason=f"SASS cannot be read: {tool_problem()}"),
]
# TVM's own CUDA default schedules (relax/backend/cuda/pipeline.py): no convolution rule
DLIGHT_DEFAULTS = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def depthwise(channels, size, kernel, stride=1, dtype="float32"):
    """A ConvMixer-style fused depthwise conv: "same" padding, + bias, GELU-like epilogue (relu here)."""
    x = te.placeholder((1, channels, size, size), dtype, name="x")
    w = te.placeholder((channels, 1, kernel, kernel), dtype, name="w")
    b = te.placeholder((1, channels, 1, 1), dtype, name="b")
    y = topi.nn.group_conv2d_nchw(x, w, stride, kernel // 2, 1, channels, out_dtype=dtype)
    return te.create_prim_func([x, w, b, topi.nn.relu(topi.add(y, b))])


DEPTHWISE = [(64, 32, 7, 1), (48, 16, 9, 1), (40, 28, 3, 2), (24, 14, 5, 1)]


@pytest.mark.parametrize("channels,size,kernel,stride", DEPTHWISE)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_depthwise_schedule_computes_the_conv(channels, size, kernel, stride, dtype):
    # The CUDA loop nest (tiles, shared window with the padding computed into it, register accumulators,
    # epilogue per thread) run serially on the CPU against the unscheduled function. What this cannot
    # check: the threads' concurrency (barriers are TVM's to insert).
    func = depthwise(channels, size, kernel, stride, dtype)
    rng = np.random.default_rng(kernel)
    shapes = [(1, channels, size, size), (channels, 1, kernel, kernel), (1, channels, 1, 1)]
    args = [rng.standard_normal(s).astype(dtype) for s in shapes]
    out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    results = []
    for mod in (schedule_depthwise(func, SERIAL).mod, tvm.IRModule({"main": func})):
        out = tvm.runtime.tensor(np.zeros((1, channels, out_size, out_size), dtype))
        tvm.compile(mod, target="llvm")(*[tvm.runtime.tensor(a) for a in args], out)
        results.append(out.numpy().astype("float64"))
    assert np.abs(results[0]).max() > 0.1
    assert np.allclose(results[0], results[1], atol=1e-5 if dtype == "float32" else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("arch,toolchain,dtype", [("sm_87", "nvrtc-12", "float32"), ("sm_90", "nvrtc-12", "float32"),
                                                  ("sm_87", "nvrtc-12", "float16"), ("sm_90", "nvrtc-12", "float16"),
                                                  ("sm_72", "nvrtc-11", "float32")])
def test_depthwise_cubins_fit_every_cuda_target(arch, toolchain, dtype):
    if find_in_nvidia(f"cuda_nvrtc/lib/{cuda_toolchains.TOOLCHAINS[toolchain].nvrtc_lib}") is None:
        pytest.skip(cuda_toolchains.TOOLCHAINS[toolchain].install_hint())
    spec = dataclasses.replace(targets.get_target("cuda").cuda, arch=arch, toolchain=toolchain)
    target = tvm.target.Target(spec.tvm_target(), host={"kind": "llvm"})
    with aot_cuda(arch, toolchain) as session:
        for channels, size, kernel, stride in DEPTHWISE + [(768, 32, 7, 1), (1536, 32, 9, 1), (1024, 16, 9, 1)]:
            tvm.compile(schedule_depthwise(depthwise(channels, size, kernel, stride, dtype), CUDA).mod, target=target)
    kernels = [k for out in session.outputs for k in out.kernel_resources()]
    assert len(kernels) == 7
    assert kernel_limit_violations(kernels, spec) == []
    assert all(k["shared_bytes"] > 0 and k["local_bytes"] == 0 and k["max_threads"] <= 256 for k in kernels)


@pytest.mark.parametrize("model", ["test_convmixer", "test_cyclemlp"])
def test_cuda_kernels_say_what_scheduled_them(model, tmp_path):
    _, manifest = compile_model(BuildSpec(model=model, target="cuda", cuda_arch="sm_90"), tmp_path / model)
    cuda = manifest["target"]["build"]["cuda"]
    kernels = cuda["kernels"]
    assert cuda["schedule_gaps"] == []
    assert kernel_limit_violations(kernels, dataclasses.replace(targets.get_target("cuda").cuda, arch="sm_90")) == []
    assert all(k["rule"] != "dlight (build pipeline)" and isinstance(k["tensor_cores"], bool) for k in kernels)
    convs = [k for k in kernels if k["contraction"] and k["contraction"]["op"] == "conv2d"]
    assert convs and all(k["rule"] in CONTRACTION_RULES for k in convs)
    if model == "test_convmixer":
        assert [k["rule"] for k in convs].count("DepthwiseConv2d") == 1  # its two blocks share one function
    else:
        # every CycleFC our kernel (the token mixer is not fused on CUDA: fuse_cycle_token_mixer.TARGET_KINDS)
        cyclefcs = sum(isinstance(m, CycleFC) for m in models.create_model(model).modules())
        assert sum(k["launches"] for k in kernels if k["rule"] == CYCLEFC_RULE) == cyclefcs > 0
    assert cuda["per_inference"]["cuda_graph"] is True
    launched = [k for k in kernels if k["launches"]]  # not the reshapes the build turns into views
    assert cuda["per_inference"]["kernel_launches"] == sum(k["launches"] for k in kernels) > len(launched)


def test_a_conv_left_to_dlight_is_a_gap(compiled, tmp_path, monkeypatch):
    # TVM's default CUDA schedules leave ConvMixer's depthwise conv to a generic rule: the build says so.
    out, _ = compiled("test_convmixer")
    monkeypatch.setitem(optimize_stage.DEFAULT_SCHEDULES, "cuda", lambda mod, t: apply_rules(mod, t, DLIGHT_DEFAULTS))
    target = targets.get_target("cuda")
    mod, params = import_onnx(out / "model.sim.onnx", {"input": (1, 3, 32, 32)})
    mod, _, _ = optimize(mod, params, target)
    gaps = build(mod, target, tmp_path / "lib.so")["cuda"]["schedule_gaps"]
    assert len(gaps) == 1 and "conv2d scheduled by dlight.gpu.GeneralReduction" in gaps[0]


def matmul_module(m, n, k, dtype):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), dtype))
    w = relax.Var("w", relax.TensorType((k, n), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            gv = bb.emit_output(relax.op.nn.gelu(relax.op.matmul(x, w)))
        bb.emit_func_output(gv)
    return bb.get()


def scheduled_matmul(m, n, k, arch, dtype="float16", rules=None):
    """The matmul module with our default CUDA schedules (or ``rules``), and the cuda target for ``arch``."""
    target = targets.get_target("cuda").with_cuda_arch(arch)
    mod, _ = apply_default_schedules(lower_to_fused_tir(matmul_module(m, n, k, dtype)),
                                     tvm.target.Target(target.tvm_target), rules)
    return mod, target


# (M, N, K): a Mixer-size matmul, and CycleMLP stage 1's 64-wide ones (channel MLP fc2 and its CycleFC-sized
# projection), which dlight's Matmul leaves on CUDA cores (it tensorizes only above 64)
FLOAT16_MATMULS = [(196, 768, 384), (3136, 64, 256), (3136, 64, 64)]
STAGE4_MATMUL = (49, 512, 512)  # CycleMLP stage 4's channel MLP: 7x7 = 49 pixels, 512 channels


@pytest.mark.parametrize("m,n,k,rules,tensor_cores",
                         [(*mnk, None, True) for mnk in FLOAT16_MATMULS]  # our defaults
                         + [(*FLOAT16_MATMULS[0], DLIGHT_DEFAULTS, True), (*FLOAT16_MATMULS[2], DLIGHT_DEFAULTS, False),
                            (*STAGE4_MATMUL, DLIGHT_DEFAULTS, False),
                            (*FLOAT16_MATMULS[0], [dl.gpu.Fallback()], False)])
def test_a_large_float16_matmul_without_tensor_cores_is_a_gap(m, n, k, rules, tensor_cores, tmp_path):
    mod, target = scheduled_matmul(m, n, k, "sm_90", rules=rules)
    report = build(mod, target, tmp_path / "lib.so")["cuda"]
    kernels = [k for k in report["kernels"] if k["contraction"]]  # dlight's Fallback makes one kernel per block
    kernel = kernels[0]
    assert kernel["contraction"] == {"op": "matmul", "dtype": "float16", "batch": 1, "m": m, "n": n, "k": k}
    assert all(k["tensor_cores"] is tensor_cores for k in kernels)
    # the tensorizing schedule's tiles are dynamic shared memory, more than the 48 KiB a block has without opting in
    assert all((k["dynamic_shared_bytes"] > 48 * 1024) is tensor_cores for k in kernels)
    if tensor_cores:
        assert any(op.startswith("HMMA") for op in kernel["tensor_core_ops"]) and report["schedule_gaps"] == []
        assert kernel["rule"] == ("TensorCoreMatmul" if rules is None else "dlight.gpu.Matmul")
    else:
        assert any("without tensor cores" in gap for gap in report["schedule_gaps"])


@pytest.mark.parametrize("arch", ["sm_72", "sm_87", "sm_90"])
def test_a_49_row_float16_matmul_runs_on_tensor_cores_within_every_limit(arch, tmp_path):
    # M below 64, padded to the 128-row tile: its dynamic shared memory within sm_72's 96 KiB opt-in limit too
    mod, target = scheduled_matmul(*STAGE4_MATMUL, arch)
    report = build(mod, target, tmp_path / "lib.so")["cuda"]
    [kernel] = report["kernels"]
    assert kernel["rule"] == "TensorCoreMatmul" and kernel_limit_violations(report["kernels"], target.cuda) == []
    assert report["schedule_gaps"] == []
    # CUDA 13's nvdisasm (the pinned SASS reader) no longer reads sm_72 code: there the build says so and reads the
    # PTX that ptxas compiled instead
    if arch == "sm_72":
        assert "SM72" in report["per_inference"]["sass"] and "PTX" in report["per_inference"]["sass"]
        assert kernel["tensor_cores"] is True
        assert any(op.startswith("wmma.mma.sync") for op in kernel["tensor_core_ops"]), kernel["tensor_core_ops"]
    else:
        assert any(op.startswith("HMMA") for op in kernel["tensor_core_ops"])


def test_a_16_row_float16_matmul_stays_on_cuda_cores_and_is_no_gap(tmp_path):
    mod, target = scheduled_matmul(16, 512, 512, "sm_90")
    report = build(mod, target, tmp_path / "lib.so")["cuda"]
    [kernel] = report["kernels"]
    assert kernel["rule"] == "dlight.gpu.Matmul" and kernel["tensor_cores"] is False
    assert report["schedule_gaps"] == []


def test_a_kernel_over_the_opt_in_shared_memory_limit_fails_the_build(tmp_path):
    # sm_75 (Turing) has wmma but lets a block opt into 64 KiB of shared memory only: the tensor-core tiles would
    # fail at launch ("Failed to set the allowed dynamic shared memory size"), so the build refuses them.
    mod, target = scheduled_matmul(*FLOAT16_MATMULS[0], "sm_75")
    with pytest.raises(BuildError, match=r"fused_matmul_gelu_kernel: shared_bytes \d+ \+ dynamic_shared_bytes \d+ "
                                         r"> 65536 \(sm_75's opt-in limit per block\)"):
        build(mod, target, tmp_path / "lib.so")


def test_float16_cyclefc_runs_on_tensor_cores(tmp_path):
    # CycleMLP stage 1's CycleFC in an --fp16 build: float16 in, float32 accumulators and output
    target = targets.get_target("cuda").with_cuda_arch("sm_90")
    tvm_target = tvm.target.Target(target.tvm_target)
    kernel = schedule_cyclefc(cyclefc_primfunc(1, 56, 56, 64, 64, (1, 3), dtype="float16", out_dtype="float32"),
                              tvm_target).without_attr("global_symbol")
    bb = relax.BlockBuilder()
    args = [relax.Var(name, relax.TensorType(shape, dtype))
            for name, shape, dtype in (("x", (1, 56, 56, 64), "float16"), ("w", (64, 64), "float16"), ("b", (64,), "float32"))]
    with bb.function("main", args):
        bb.emit_func_output(bb.emit(relax.call_tir(bb.add_func(kernel, "cyclefc"), args,
                                                   relax.TensorType((1, 56, 56, 64), "float32"))))
    report = build(bb.get(), target, tmp_path / "lib.so")["cuda"]
    [kernel] = report["kernels"]
    assert kernel["rule"] == "CycleFC" and "HMMA.16816.F32" in kernel["tensor_core_ops"]
    assert report["schedule_gaps"] == []


def test_float32_matmul_reads_as_no_tensor_cores(tmp_path):
    mod, target = scheduled_matmul(196, 768, 384, targets.get_target("cuda").cuda.arch, dtype="float32")
    report = build(mod, target, tmp_path / "lib.so")["cuda"]
    assert all(k["tensor_cores"] is False for k in report["kernels"]) and report["schedule_gaps"] == []


def test_sass_parser():
    sass = """
		Function : mm_kernel
        /*0a10*/                   HMMA.16816.F32 R4, R8, R12, R4 ;                /* 0x000000 */
        /*0a20*/              @!P0 HGMMA.64x64x16.F32 gdesc[UR4], R24 ;            /* 0x000000 */
		Function : add_kernel
        /*0010*/                   FADD R4, R8, R12 ;                              /* 0x000000 */
"""
    assert parse_tensor_core_ops(sass) == {"mm_kernel": ["HGMMA.64x64x16.F32", "HMMA.16816.F32"], "add_kernel": []}


def test_ptx_parser():
    ptx = """
.visible .entry mm_kernel(
	.param .u64 mm_kernel_param_0
)
{
	@%p1 wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {%f2, %f3}, {%r2, %r3}, {%r10, %r11}, {%f1, %f1};
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f4, %f5, %f6, %f7}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f4};
	wmma.load.a.sync.aligned.row.m16n16k16.global.f16 {%r2, %r3}, [%rd6], %r1;
}
.visible .entry add_kernel(
	.param .u64 add_kernel_param_0
)
{
	add.f32 %f1, %f2, %f3;
}
"""
    assert ptx_tensor_core_ops(ptx) == {
        "mm_kernel": ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                      "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32"], "add_kernel": []}


def test_the_ptx_names_the_kernels_whose_sass_runs_on_tensor_cores():
    """Where both can be read (sm_87, Orin), the PTX reader (what sm_72 builds rely on) agrees with the SASS kernel by
    kernel: a float16 matmul on tensor cores, a 16-row one and a float32 one on CUDA cores."""
    from pipeline.toolchain.sass import tensor_core_ops
    from pipeline.tvm_targets import to_tvm_target

    arch, seen = "sm_87", set()
    with aot_cuda(arch) as session:
        for m, n, k, dtype in [(*FLOAT16_MATMULS[2], "float16"), (16, 512, 512, "float16"), (64, 64, 64, "float32")]:
            mod, target = scheduled_matmul(m, n, k, arch, dtype)
            tvm_target = to_tvm_target(target)
            tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target))
    for out in session.outputs:
        sass = {name: bool(ops) for name, ops in tensor_core_ops(out.cubin).items()}
        assert sass and {name: bool(ops) for name, ops in ptx_tensor_core_ops(out.ptx).items()} == sass
        seen |= set(sass.values())
    assert seen == {True, False}
