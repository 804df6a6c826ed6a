"""The aarch64 code of the contractions, read from the built library's disassembly (llvm-objdump): no spill in a
loop that holds vector FMAs, at least 0.7 fmla per instruction in the contractions' loops (ONNX Runtime's aarch64
SGEMM loop: 0.83), and with --fp16 on a core with float16 arithmetic, those loops in float16 (``fmla v.8h``).

The libraries are real builds for rpi5 (Cortex-A76), and with --fp16 for every Arm board with float16 arithmetic
(rpi5, jetson-orin-cpu); their numerics are checked under qemu in test_aarch64.py.
"""
import pytest
import torch

import targets
from conftest import imported_module, linker_available
from pipeline.toolchain.fma_loops import analyze_disassembly, analyze_library, find_objdump

# FMAs per instruction the register tiles must reach in a contraction's loop (the goal on Arm).
MIN_FMLA_PER_INSTRUCTION = 0.7
DEFAULT_MODEL = "mixer_s16_224"  # the default suite's; the others under -m slow
FP16_ARM_TARGETS = [t.name for t in targets.list_targets() if t.runner == "qemu-aarch64" and t.float16_arithmetic]
# (target, fp16): float32 on rpi5, float16 on every Arm board that computes in it; the default suite builds float16
# for the first of them (the same NEON tiles: +fullfp16 cores alike), the others under -m slow (a minute each)
BUILDS = [pytest.param("rpi5", False, id="rpi5-fp32")] + [
    pytest.param(t, True, id=f"{t}-fp16", marks=[pytest.mark.slow] if i else []) for i, t in enumerate(FP16_ARM_TARGETS)]


def test_loops_spills_and_ratio_are_read_from_the_disassembly():
    """A loop with a spill and a guard inside, a loop without FMAs, a loop nest: what counts is the innermost loop
    holding vector fmla."""
    text = """
0000000000001000 <k_compute_>:
    1000:      	movi	v0.2d, #0000000000000000
    1004:      	ldr	q1, [x1], #16
    1008:      	fmla	v0.4s, v1.4s, v2.s[0]
    100c:      	cmp	w3, #85
    1010:      	b.ge	0x101c <k_compute_+0x1c>
    1014:      	str	q0, [sp, #16]
    1018:      	fmla	v3.8h, v1.8h, v2.h[1]
    101c:      	subs	x2, x2, #1
    1020:      	b.ne	0x1004 <k_compute_+0x4>
    1024:      	add	x0, x0, #1
    1028:      	cbnz	x0, 0x1000 <k_compute_>
    102c:      	ldr	s1, [sp, #4]
    1030:      	subs	x5, x5, #1
    1034:      	b.ne	0x102c <k_compute_+0x2c>
"""
    result = analyze_disassembly(text)
    (loop,) = result.loops
    assert (loop.start, loop.end, loop.instructions) == (0x1004, 0x1020, 8)
    assert (loop.fmla, loop.spills, loop.branches) == (2, 1, 1)
    assert loop.arrangements == {"4s", "8h"} and loop.fmla_per_instruction == 0.25
    assert result.fmla_by_arrangement == {"4s": 1, "8h": 1} and result.undecoded == 0


def arm_library(model: str, target: str, fp16: bool, work):
    """Front end, optimize and build a zoo model for an Arm board (no verification: test_aarch64 runs the numerics
    under qemu)."""
    from pipeline.run import front_end, untimed
    from pipeline.spec import BuildSpec

    front = front_end(BuildSpec(model=model, target=target, fp16=fp16), work, untimed)
    return arm_build(front.mod, front.params, target, fp16, work)


def arm_build(mod, params, target: str, fp16: bool, work):
    """Optimize and build ``mod`` for an Arm board: the library and the shapes of the functions the Contraction
    rule or CycleMLP's kernels (CycleFC, the fused token mixer) scheduled, by name."""
    import targets as target_specs
    from pipeline.stages.build import build
    from pipeline.stages.optimize import optimize
    from tvm import tirx
    from tvm_schedules.cyclefc import CYCLEFC_RULE, TOKEN_MIXER_RULE
    from tvm_schedules.scheduled import scheduled_by

    spec = target_specs.get_target(target)
    mod, _params, _ = optimize(mod, params, spec, fp16)
    build(mod, spec, work / "lib.so")
    marks = {gv.name_hint: scheduled_by(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    judged = ("Contraction", CYCLEFC_RULE, TOKEN_MIXER_RULE)
    return work / "lib.so", {name: shape for name, (rule, shape) in marks.items() if rule in judged}


def needs_arm_tools():
    if find_objdump() is None:
        pytest.skip("llvm-objdump not installed (apt-get install llvm)")
    if not linker_available():
        pytest.skip("no aarch64 linker: run scripts/setup_aarch64_runtime.sh")


def assert_fma_loops_fit(lib, contractions: dict, fp16: bool) -> None:
    """No FMA loop of the library spills, and every matrix-matrix contraction's loops reach
    MIN_FMLA_PER_INSTRUCTION in the precision built."""
    result = analyze_library(lib)
    assert result.undecoded == 0
    spilling = [loop.as_dict() for loop in result.loops if loop.spills]
    assert not spilling, f"{len(spilling)} FMA loops spill: {spilling[:4]}"
    # Matrix-vector products (one row or one column) load one weight vector per FMA: at most 2 fmla per ldp,
    # so they are held only to the no-spill rule.
    matrix = {name for name, shape in contractions.items() if min(shape["m"], shape["n"]) > 1}
    assert matrix, "no matrix-matrix contraction to judge"
    wanted = "8h" if fp16 else "4s"
    for name in sorted(matrix):
        loops = result.loops_of(name)
        assert loops, f"{name}: no FMA loop found in the library"
        for loop in loops:
            described = f"{name} {loop.as_dict()}"
            assert loop.fmla_per_instruction >= MIN_FMLA_PER_INSTRUCTION, described
            assert loop.arrangements == {wanted}, described
    if fp16:
        assert result.fmla_by_arrangement["8h"] > 0


@pytest.mark.parametrize("target,fp16", BUILDS)
@pytest.mark.parametrize("model", [DEFAULT_MODEL, pytest.param("resmlp_12_224", marks=pytest.mark.slow),
                                   pytest.param("cyclemlp_b1", marks=pytest.mark.slow)])
def test_arm_fma_loops_do_not_spill_and_keep_the_fma_pipes_busy(model, target, fp16, tmp_path):
    needs_arm_tools()
    assert_fma_loops_fit(*arm_library(model, target, fp16, tmp_path), fp16)


@pytest.mark.parametrize("kernel,stride,padding,channels,fp16", [
    (7, 4, 2, 64, False), (7, 7, 0, 768, False), (7, 7, 0, 768, True), (8, 8, 0, 768, False),
    (14, 14, 0, 1024, False), (14, 14, 0, 1024, True)],
    ids=["cyclemlp-stem", "convmixer-stem", "convmixer-stem-fp16", "resmlp-big-stem", "convmixer-p14-stem",
         "convmixer-p14-stem-fp16"])
def test_a_conv_over_three_channels_does_not_spill(kernel, stride, padding, channels, fp16, tmp_path):
    """A patch embedding over RGB: no reduction axis (3 channels, 7 rows, 7 columns) divides by 4 to read the tile
    rows as vectors. CycleMLP's 7x7/s4 windows overlap along kx: there LLVM kept an 8-row tile's 35 input values live
    across the unrolled kx loop (18 stack accesses per loop), so ky goes innermost and each row's value is broadcast
    and used at once. ConvMixer's 7x7/s7 windows do not overlap: each row's 7 values along kx are loaded as vectors
    and kept, so they still count as row registers (taken as broadcasts, its 8x3 tile spilled 35), but in float16 it
    loads them one by one (a by-element fmla .8h reads v0-v15 only), so there they are broadcasts (8x3, not 8x2: 0.62
    -> 0.70 fmla per instruction). ResMLP-big's 8x8
    patches: kx = 2 steps of 4, a loop LLVM unrolled whole, loading both steps' row vectors (9 stack accesses per
    loop); it is fused with ky now. ConvMixer-1024's 14x14 patches: kx = 3 steps of 4, which LLVM unrolls whole, and a
    partial one: the tile counts all four steps' row vectors (read as 2-wide vectors, 0.68 fmla per instruction;
    sized for one step, 66 stack accesses per loop in float16)."""
    needs_arm_tools()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, channels, kernel, stride=stride, padding=padding)
    mod, params, _inputs, _reference = imported_module(conv, (1, 3, 224, 224), tmp_path)
    assert_fma_loops_fit(*arm_build(mod, params, "rpi5", fp16, tmp_path), fp16=fp16)


@pytest.mark.parametrize("channels,fp16", [(64, False), (128, True)], ids=["64-fp32", "128-fp16"])
def test_a_layer_norm_whose_weights_fill_the_registers_does_not_spill(channels, fp16, tmp_path):
    """CycleMLP's first-stage LayerNorm: its weight and bias fill the 32 NEON registers (64 channels in float32; 128
    in a float16 build, whose 8-lane cast vectors are computed as two float32 registers). LLVM unrolls the short
    channel loop whole and hoists both out of the row loop (19 and 127 stack accesses per loop), so blocks of rows
    are normalized channel panel by channel panel. The Linear after it gives the library a contraction to judge."""
    import torch

    needs_arm_tools()
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(channels), torch.nn.Linear(channels, channels))
    mod, params, _inputs, _reference = imported_module(block, (1, 28 * 28, channels), tmp_path)
    assert_fma_loops_fit(*arm_build(mod, params, "rpi5", fp16, tmp_path), fp16)


def test_a_9x9_depthwise_conv_tile_reads_few_enough_input_rows(tmp_path):
    """ConvMixer-1024/1536's 9x9 depthwise conv: the tile's rows share input rows along the unrolled ky, which LLVM
    loads all ahead, so the tile is bounded by the vectors of those rows (``isa.CpuIsa.slide_input_vectors``): an 8x2
    tile read 16 rows of 2 vectors and spilled 42 per loop at 0.57 fmla per instruction."""
    import torch

    needs_arm_tools()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 9, padding=4, groups=64)
    mod, params, _inputs, _reference = imported_module(conv, (1, 64, 16, 16), tmp_path)
    lib, contractions = arm_build(mod, params, "rpi5", False, tmp_path)
    result = analyze_library(lib)
    (name,) = contractions
    assert result.loops_of(name) and not [loop.as_dict() for loop in result.loops if loop.spills]
    assert all(loop.fmla_per_instruction >= MIN_FMLA_PER_INSTRUCTION for loop in result.loops_of(name)), \
        [loop.as_dict() for loop in result.loops_of(name)]


@pytest.mark.parametrize("size", [16, 32])
def test_a_1x1_conv_reads_its_weight_rows_as_vectors_and_keeps_its_tile_in_registers(size, tmp_path):
    """A 1x1 conv's weight [o, c, 1, 1]: each tile row's 4 input-channel values are one vector load read by lane, as
    for a matmul's weight; the unit dims had left them to 4 scalar loads (ConvMixer's 1x1 convs on rpi5: 0.60 fmla per
    instruction, now 0.80). Its accumulator is indexed by the fused pixel the tile runs along: indexed by (y, x), its
    tile's region came out 17 rows tall at 16x16, a buffer LLVM left in memory (a load and a store per fmla: 0.32)."""
    import torch

    needs_arm_tools()
    torch.manual_seed(0)
    mod, params, _inputs, _reference = imported_module(torch.nn.Conv2d(256, 256, 1), (1, 256, size, size), tmp_path)
    assert_fma_loops_fit(*arm_build(mod, params, "rpi5", False, tmp_path), fp16=False)


class _TokenMlpFc1(torch.nn.Module):
    """Mixer's token-mixing fc1 over a (tokens, channels) image: Linear along the tokens, then GELU."""

    def __init__(self, tokens: int, hidden: int):
        super().__init__()
        self.fc = torch.nn.Linear(tokens, hidden)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x.transpose(1, 2))).transpose(1, 2)


def test_a_token_mlp_over_49_tokens_unrolls_its_reduction(tmp_path):
    """Mixer-S/32's and B/32's token fc1 reduce over 49 tokens, which do not divide by the K unroll of 4: its full
    steps are unrolled (each tile row's 4 weight values one vector read by lane) and the last token is a step of its
    own. Unrolled by 1, each row's value was loaded alone: 8 ldr s per 16 fmla, 0.55 fmla per instruction."""
    needs_arm_tools()
    torch.manual_seed(0)
    mod, params, _inputs, _reference = imported_module(_TokenMlpFc1(49, 256).eval(), (1, 49, 512), tmp_path)
    assert_fma_loops_fit(*arm_build(mod, params, "rpi5", False, tmp_path), fp16=False)


@pytest.mark.parametrize("kernel,c,hw,dtype", [("token_mixer", 96, 56, "float16"), ("token_mixer", 64, 56, "float32"),
                                               ("cyclefc", 320, 14, "float32"), ("cyclefc", 320, 14, "float16")],
                         ids=["mixer-96-fp16", "mixer-64-fp32", "cyclefc-320-fp32", "cyclefc-320-fp16"])
def test_cyclemlp_kernels_read_shifted_rows_as_vectors(kernel, c, hw, dtype, tmp_path):
    """CycleMLP's own kernels on NEON (the fused token mixer of cyclemlp_b5 in float16, of cyclemlp_b1, and a stage-3
    CycleFC). With the shift inlined (the x86 schedule) each row's value was a bounds-checked scalar load, the image
    border's branches inside the loop, and the token mixer's branch weights multiplied into every weight vector at
    every step: 0.2-0.5 fmla per instruction, and in float16 5-10 stack accesses per loop. Now each task copies its
    rows shifted (in the accumulator's type) and the tile reads them as vectors: no branch, no spill; in float16 they
    accumulate in float16 as the board's other contractions do (``fmla .8h``)."""
    import tvm

    from pipeline.toolchain.cross_link import cross_linker
    from pipeline.tvm_targets import to_tvm_target
    from tvm_schedules.cyclefc import (CYCLEFC_RULE, TOKEN_MIXER_RULE, cyclefc_primfunc, schedule_cyclefc,
                                       token_mixer_primfunc)

    needs_arm_tools()
    spec = targets.get_target("rpi5")
    target = to_tvm_target(spec)
    accumulator = spec.float16_accumulator  # float16: rpi5's cores compute in it
    if kernel == "token_mixer":
        func = token_mixer_primfunc(1, hw, hw, c, c, [(1, 3), (3, 1), (1, 1)], dtype=dtype, accumulator=accumulator)
        rule = TOKEN_MIXER_RULE
    else:
        func, rule = cyclefc_primfunc(1, hw, hw, c, c, (3, 1), dtype, widen=True, accumulator=accumulator), CYCLEFC_RULE
    library = tvm.compile(tvm.IRModule({"main": schedule_cyclefc(func, target, rule)}), target=target)
    library.export_library(str(tmp_path / "lib.so"), fcompile=cross_linker(spec.cross_triple))
    loops = [loop for loop in analyze_library(tmp_path / "lib.so").loops if loop.fmla >= 16]  # the tile's loops
    assert loops, "no FMA loop found"
    for loop in loops:
        assert not loop.spills and not loop.branches and loop.fmla_per_instruction >= MIN_FMLA_PER_INSTRUCTION, \
            loop.as_dict()
        assert loop.arrangements == {"8h" if dtype == "float16" else "4s"}, loop.as_dict()
