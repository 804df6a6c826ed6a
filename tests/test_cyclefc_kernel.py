"""The CycleFC TensorIR kernel (tvm_schedules/cyclefc.py) against the PyTorch reference models.cyclemlp.CycleFC."""
import re

import numpy as np
import pytest
import torch
import tvm

from models.cyclemlp import CycleFC
from tvm_schedules.cyclefc import (
    cpu_tiles,
    cpu_vector_lanes,
    cyclefc_primfunc,
    schedule_cyclefc,
)
from tvm_schedules import cyclefc as cyclefc_mod

CPU = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4", "num-cores": 2})
ORIN = tvm.target.Target("nvidia/jetson-orin-nano")
NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4})

# (N, H, W, C, O, kernel): non-square images, C/O not multiples of k or of the vector width, both orientations,
# (1, 5) kernels, batch 2, W with no good tile divisor (guarded last tile), and the CycleMLP-B1 shapes.
SHAPES = [
    (1, 5, 7, 7, 5, (1, 3)),
    (1, 1, 9, 5, 11, (3, 1)),
    (1, 13, 6, 5, 11, (3, 1)),
    (1, 13, 6, 10, 17, (1, 5)),
    (2, 5, 7, 7, 5, (1, 5)),
    (2, 9, 4, 12, 24, (5, 1)),
    (1, 3, 17, 6, 11, (1, 3)),  # W=17: 16-row tile + guarded remainder, scalar O
    (1, 4, 19, 48, 64, (3, 1)),  # W=19: guarded tiles with 16-lane vectors
    (2, 6, 9, 20, 100, (1, 3)),  # O=100: 4-lane vectors
    (1, 56, 56, 64, 64, (1, 3)),  # CycleMLP-B1 stage 1
    (1, 14, 14, 320, 320, (3, 1)),  # CycleMLP-B1 stage 3
]


def _torch_reference(x_nhwc: np.ndarray, c, o, kernel, seed, has_bias=True):
    """models.cyclemlp.CycleFC with seeded weights: returns (weight (O, C), bias (O,) or None, NHWC output)."""
    torch.manual_seed(seed)
    m = CycleFC(c, o, kernel, bias=has_bias).eval()
    with torch.no_grad():
        y = m(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous().numpy()
    w = m.weight.detach()[:, :, 0, 0].numpy()
    b = m.bias.detach().numpy() if has_bias else None
    return w, b, y


def _run_cpu(x, weight, bias, kernel, dtype, schedule_for=CPU):
    """The kernel scheduled for ``schedule_for`` (portable TIR; its shift widened as a CPU build does), built and
    run here."""
    n, h, w, c = x.shape
    o = weight.shape[0]
    func = cyclefc_primfunc(n, h, w, c, o, kernel, dtype, bias is not None, widen=True)
    f = schedule_cyclefc(func, schedule_for)
    ex = tvm.compile(tvm.IRModule({"cyclefc": f}), target=CPU)
    dev = tvm.cpu()
    args = [x.astype(dtype), np.ascontiguousarray(weight.T).astype(dtype)]
    if bias is not None:
        args.append(bias.astype(dtype))
    out = tvm.runtime.tensor(np.zeros((n, h, w, o), dtype), dev)
    ex.mod["cyclefc"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-k{s[5][0]}x{s[5][1]}")
def test_cpu_kernel_matches_torch_fp32(shape):
    n, h, w, c, o, kernel = shape
    rng = np.random.default_rng(sum(shape[:5]))
    x = rng.standard_normal((n, h, w, c)).astype("float32")
    weight, bias, ref = _torch_reference(x, c, o, kernel, seed=c * 1000 + o)
    got = _run_cpu(x, weight, bias, kernel, "float32")
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    assert err <= 1e-5, f"max abs error {err:.3e}"
    assert float(np.abs(ref).max()) > 0.1  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"_k{s[5][0]}{s[5][1]}")
def test_neon_schedule_matches_torch(shape, dtype):
    """The NEON schedule (shifted rows materialized per task, read as row vectors, where C divides by 4; else the
    x86 form), run here."""
    n, h, w, c, o, k = shape
    x = np.random.default_rng(1).standard_normal((n, h, w, c)).astype("float32")
    weight, bias, ref = _torch_reference(x, c, o, k, seed=1)
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(_run_cpu(x, weight, bias, k, dtype, schedule_for=NEON).astype("float32"), ref,
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n,h,w,c,o", [(1, 5, 7, 8, 5), (2, 6, 9, 12, 20), (1, 14, 14, 64, 64)])
def test_neon_token_mixer_matches_the_x86_schedule(n, h, w, c, o, dtype):
    """CycleMLP's fused token mixer (three branches, branch weights per image) scheduled for NEON against the x86
    schedule, both run here: odd images, guarded tiles, batch 2."""
    from tvm_schedules.cyclefc import TOKEN_MIXER_RULE, token_mixer_primfunc

    branches = [(1, 3), (3, 1), (1, 1)]
    rng = np.random.default_rng(2)
    args = [rng.standard_normal((n, h, w, c)).astype(dtype), rng.standard_normal((3 * c, o)).astype(dtype),
            rng.uniform(0, 1, (n, 3, o)).astype("float32"), rng.standard_normal((n, o)).astype("float32")]
    outs = []
    for target in (CPU, NEON):
        func = token_mixer_primfunc(n, h, w, c, o, branches, dtype=dtype, out_dtype="float32")
        ex = tvm.compile(tvm.IRModule({"main": schedule_cyclefc(func, target, TOKEN_MIXER_RULE)}), target=CPU)
        out = tvm.runtime.tensor(np.zeros((n, h, w, o), "float32"))
        ex.mod["main"](*[tvm.runtime.tensor(a) for a in args], out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-4)


def test_cpu_kernel_without_bias():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 6, 11, 9)).astype("float32")
    weight, bias, ref = _torch_reference(x, 9, 13, (1, 3), seed=3, has_bias=False)
    assert bias is None
    got = _run_cpu(x, weight, None, (1, 3), "float32")
    assert float(np.abs(got - ref).max()) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 5, 7, 7, 5, (1, 3)), (1, 13, 6, 48, 64, (3, 1)), (1, 14, 14, 320, 320, (1, 3))])
def test_cpu_kernel_fp16(shape):
    """float16 in and out, float32 accumulation: only the final rounding to float16 differs from float32."""
    n, h, w, c, o, kernel = shape
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, h, w, c)).astype("float16")
    weight, bias, _ = _torch_reference(x.astype("float32"), c, o, kernel, seed=5)
    weight, bias = weight.astype("float16"), bias.astype("float16")
    # reference: the same float16 values through the PyTorch module in float32
    torch.manual_seed(0)
    m = CycleFC(c, o, kernel).eval()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(weight.astype("float32"))[:, :, None, None])
        m.bias.copy_(torch.from_numpy(bias.astype("float32")))
        ref = m(torch.from_numpy(x.astype("float32")).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = _run_cpu(x, weight, bias, kernel, "float16")
    assert got.dtype == np.float16
    # half an ulp of float16 is 2**-11 relative; allow one ulp, plus a little absolute slack near zero
    np.testing.assert_allclose(got.astype("float32"), ref, rtol=2.0**-10, atol=2e-4)


def test_wrong_orientation_is_detected():
    """The fp32 comparison is sensitive: a (3, 1) kernel does not pass for a (1, 3) reference."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 7, 8)).astype("float32")
    weight, bias, ref = _torch_reference(x, 8, 8, (1, 3), seed=1)
    got = _run_cpu(x, weight, bias, (3, 1), "float32")
    assert float(np.abs(got - ref).max()) > 1e-2


def test_cpu_schedule_structure():
    f = schedule_cyclefc(cyclefc_primfunc(1, 56, 56, 64, 64, (1, 3), name="cyclefc_s1"), CPU)
    assert f.attrs["global_symbol"] == "cyclefc_s1"
    assert bool(f.attrs["tirx.is_scheduled"])
    script = f.script()
    # the shift is folded into the load: no shift block, the guarded read of x sits in the GEMM update
    assert 'T.sblock("shift")' not in script and "shift = " not in script
    assert re.search(r"T\.if_then_else\(.*x\[.*\* weight_t\[", script)
    assert re.search(r"in T\.parallel\(T\.int64\(896\)\)", script)  # 56 rows x 4 W tiles x 4 O tiles
    assert re.search(r"T\.vectorized\(T\.int64\(16\)\)", script) and re.search(r"T\.unroll\(T\.int64\(14\)\)", script)
    assert 'T.sblock("mm_init")' in script and 'T.sblock("mm_update")' in script and 'T.sblock("out")' in script
    # after lowering, the (14 x 16) accumulator tile is a stack array LLVM keeps in registers: no heap
    # workspace per tile, and 16-wide FMAs
    ll = tvm.compile(tvm.IRModule({"cyclefc_s1": f}), target=CPU).mod.inspect_source("ll")
    assert "TVMBackendAllocWorkspace" not in ll
    assert re.search(r"@llvm\.fmuladd\.v16f32|@llvm\.fma\.v16f32", ll)


def test_dlight_leaves_scheduled_kernel_alone():
    from tvm.s_tir import dlight as dl

    f = schedule_cyclefc(cyclefc_primfunc(1, 6, 7, 8, 16, (3, 1)), CPU)
    before = f.script()
    with ORIN:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(tvm.IRModule({"cyclefc": f}))
    assert mod["cyclefc"].script() == before
    # while the same function without the attribute is rescheduled (threads bound) by dlight
    with ORIN:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(
            tvm.IRModule({"cyclefc": cyclefc_primfunc(1, 6, 7, 8, 16, (3, 1))})
        )
    assert "threadIdx" in mod["cyclefc"].script()


def test_vector_width_table():
    assert cpu_vector_lanes(CPU) == 16
    assert cpu_vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})) == 8
    assert cpu_vector_lanes(tvm.target.Target({"kind": "llvm", "mattr": ["+avx512f"]})) == 16
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert cpu_vector_lanes(arm) == 4
    assert cpu_vector_lanes(ORIN.host) == 4
    assert cpu_vector_lanes(CPU, "float16") == 32
    # tiles: 16 lanes x 14 rows on AVX-512 for both B1 shapes; vec divides O; tile stays under 1 KiB
    assert cpu_tiles(56, 64, 16, 32) == (14, 1, 16)
    assert cpu_tiles(14, 320, 16, 32) == (14, 1, 16)
    assert cpu_tiles(56, 64, 16, 32, convert=True) == (7, 2, 16)  # float16 inputs: fewer conversions per FMA
    # the W=17 and W=19 cases of SHAPES do exercise the guarded last tile
    assert 17 % cpu_tiles(17, 11, 16, 32)[0] != 0 and 19 % cpu_tiles(19, 64, 16, 32)[0] != 0
    for w, o in [(5, 11), (17, 11), (19, 64), (9, 100), (7, 512)]:
        for lanes, nregs in [(16, 32), (8, 16), (4, 32)]:
            mr, nv, vec = cpu_tiles(w, o, lanes, nregs)
            assert o % vec == 0 and (o // vec) % nv == 0 and 1 <= mr <= w
            assert mr * nv * vec * 4 < 1024 and mr * nv + nv + 2 <= nregs


def test_schedule_dispatch_by_kind():
    assert set(cyclefc_mod.SCHEDULES) == {"llvm", "cuda"}
    with pytest.raises(ValueError, match="no CycleFC schedule"):
        schedule_cyclefc(cyclefc_primfunc(1, 4, 4, 3, 3, (1, 3)), tvm.target.Target({"kind": "c"}))


def _cuda_source(f):
    ex = tvm.compile(tvm.IRModule({"cyclefc": f}), target=ORIN)
    return "".join(m.inspect_source() for m in [ex.mod, *ex.mod.imports] if m.kind == "cuda")


@pytest.mark.parametrize("schedule", ["dlight", "manual"])
@pytest.mark.parametrize("shape", [(1, 56, 56, 64, 64, (1, 3)), (1, 14, 14, 320, 320, (3, 1)), (2, 13, 6, 5, 11, (3, 1))])
def test_cuda_build_one_kernel(shape, schedule):
    f = cyclefc_primfunc(*shape)
    if schedule == "dlight":
        s = schedule_cyclefc(f, ORIN)
    else:
        s = cyclefc_mod._schedule_cuda_manual(f, ORIN).with_attr("tirx.is_scheduled", True)
    assert bool(s.attrs["tirx.is_scheduled"])
    script = s.script()
    assert 'T.sblock("shift")' not in script
    threads = dict((axis, int(n)) for n, axis in re.findall(r'T\.thread_binding\((?:T\.int64\()?(\d+)\)?, thread="(threadIdx\.[xyz])"\)', script))
    assert threads and int(np.prod(list(threads.values()))) <= 1024
    src = _cuda_source(s)
    assert src, "no CUDA source was generated"
    # one kernel: its definition (the source also holds one forward declaration of it)
    definitions = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\([^;{]*\)\s*\{', src)
    assert len(definitions) == 1, definitions
    assert len(set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)", src))) == 1
    assert int(definitions[0][0]) <= 1024
    if schedule == "dlight":
        assert "__shared__" in src  # dlight's shared-memory tiling, the shift inlined into its load
