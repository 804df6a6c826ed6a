"""What the CPU schedules need to know about an llvm target: SIMD width, register count, register tiles.

Shared by the CycleFC kernel (``tvm_schedules.cyclefc``) and the default CPU rules (``tvm_schedules.cpu``).
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm

__all__ = ["cpu_isa", "cpu_isa_data", "cpu_vector_lanes", "cpu_vector_registers", "cpu_tiles", "gemm_tiles",
           "CpuIsa", "CPU_ACC_SCOPE", "MAX_STACK_ALLOCA_BYTES"]


@dataclass(frozen=True)
class CpuIsa:
    """What the contraction tiles depend on, per SIMD level.

    ``k_unroll`` and ``row_registers`` describe how LLVM's aarch64 backend feeds a by-element FMA: with the
    reduction loop unrolled 4x, the 4 consecutive broadcast scalars of one tile row become one ``ldr q`` and
    ``fmla v.4s, v.4s, v.s[i]`` reads them by lane, so each row holds a register of its own (x86 broadcasts one
    scalar at a time: one register for all rows, and no unroll, what its tuning records were made against).
    ``guarded_tile_weight`` discounts a tile whose rows do not divide the row extent: its guard stays inside the
    reduction loop (x86: 0.85, measured; aarch64: 0.5, read from the code: the accumulators live across the
    guard spill, 27 stack accesses per iteration in mixer_s16's rpi5 loops, so a dividing tile is taken unless
    the guarded one holds twice the FMAs per load).
    """

    lanes32: int  # SIMD lanes of 32-bit floats
    registers: int  # vector registers
    k_unroll: int = 1  # reduction steps unrolled in the tile loop
    row_registers: bool = False  # each tile row keeps its k_unroll broadcast values in a register
    guarded_tile_weight: float = 0.85
    # Registers kept free besides the one spare when the accumulators are 16-bit: aarch64's by-element float16
    # fmla reads its element from v0-v15 only, so a tile that fits 32 registers in float32 spills in float16
    # (resmlp_12's 7x3 tile: 31 stack accesses per loop).
    half_spare_registers: int = 0
    # The registers a by-element float16 FMA can read its element from (v0-v15 on aarch64), which hold every tile
    # row's row vectors in a float16 tile; 0: any register.
    half_element_registers: int = 0
    # The most vectors of its input rows (tile rows + kernel height - 1, times nv) a tile may read per step of a sliding
    # reduction (``contraction._sliding_reduction``), or None: LLVM loads them all ahead of the unrolled kernel rows.
    # On rpi5, ConvMixer's depthwise convs: 7x7 at 8x2 (28) and 9x9 at 4x2 (24) spill nothing; 9x9 at 8x2 (32) spilled
    # 42 stack accesses per loop (0.57 fmla per instruction, 0.75 at 4x2), at 4x4 (48) 27.
    slide_input_vectors: int | None = None


CPU_ISA = {"avx512": CpuIsa(16, 32), "avx2": CpuIsa(8, 16), "sse": CpuIsa(4, 16),
           "neon": CpuIsa(4, 32, k_unroll=4, row_registers=True, guarded_tile_weight=0.5, half_spare_registers=1,
                   half_element_registers=16,
                   slide_input_vectors=28)}
# -mcpu -> ISA level; anything not listed falls back to -mattr, then to the triple.
MCPU_ISA = {
    "x86-64-v4": "avx512", "skylake-avx512": "avx512", "cascadelake": "avx512", "cooperlake": "avx512",
    "icelake-server": "avx512", "icelake-client": "avx512", "sapphirerapids": "avx512", "znver4": "avx512",
    "znver5": "avx512", "x86-64-v3": "avx2", "haswell": "avx2", "broadwell": "avx2", "skylake": "avx2",
    "znver1": "avx2", "znver2": "avx2", "znver3": "avx2", "alderlake": "avx2",
}
MATTR_ISA = {"+avx512f": "avx512", "+avx2": "avx2", "+neon": "neon"}

# An accumulator tile is a "global"-scope buffer allocated inside the parallel loop: a per-tile stack array that
# LLVM's SROA turns into registers. "local" and buffers of 1 KiB or more would become a TVMBackendAllocWorkspace
# call per tile, heap memory LLVM cannot promote, so every FMA would store its accumulator back (measured: 0.42 ->
# 0.24 ms at 1x56x56x64, CycleFC kernel (3, 1)); builds run ``passes.small_buffers_on_stack``, which keeps
# "global" buffers up to 4 KiB on the stack, so a tile is bounded by the registers alone.
CPU_ACC_SCOPE = "global"
# TVM's stack-allocation limit, which tiles were sized under before ``small_buffers_on_stack``. The CycleFC kernel's
# tiles (``cpu_tiles``) were measured under it and keep it; so do the default rules' tiles whose vector operand is a
# weight, which stream that weight's panel once per row tile: there more rows per tile beat more accumulators
# (196x512x2048 on the Zen 4 here, 2 threads, interleaved: 7x2 1.17 ms, 6x4 1.25, 4x4 1.25). A tile whose
# broadcast operand is the weight (a 1x1 conv over NCHW pixels) takes every register: 6x4 against 3x4, ConvMixer's
# 1x1 conv at 32x32 ran 11.1 -> 5.7 ms (768 channels) and 80.8 -> 28.8 ms (1536), at 16x16 (1024) 3.7 -> 2.5 ms.
MAX_STACK_ALLOCA_BYTES = 1024
MAX_TILE_ROWS = 16


def cpu_isa(target: tvm.target.Target) -> str:
    """The SIMD level of an llvm target: "avx512", "avx2", "neon" or "sse" (the baseline)."""
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu in MCPU_ISA:
        return MCPU_ISA[mcpu]
    mattr = [str(a) for a in (target.attrs.get("mattr", None) or [])]
    for attr, isa in MATTR_ISA.items():
        if attr in mattr:
            return isa
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")) or bool(target.attrs.get("feature.is_aarch64", False)):
        return "neon"
    return "sse"


def cpu_isa_data(target: tvm.target.Target) -> CpuIsa:
    return CPU_ISA[cpu_isa(target)]


def cpu_vector_lanes(target: tvm.target.Target, dtype: str = "float32") -> int:
    """SIMD lanes of ``dtype`` on this llvm target: 16 float32 for AVX-512, 8 for AVX2, 4 for NEON/SSE."""
    return max(1, cpu_isa_data(target).lanes32 * 32 // tvm.runtime.DataType(dtype).bits)


def cpu_vector_registers(target: tvm.target.Target) -> int:
    """Architectural SIMD registers: 32 for AVX-512 and NEON, 16 for AVX2/SSE."""
    return cpu_isa_data(target).registers


def _divisors_desc(n: int, hi: int, lo: int = 1) -> list[int]:
    return [d for d in range(min(hi, n), max(lo, 1) - 1, -1) if n % d == 0]


def gemm_tiles(m: int, n: int, vec: int, nregs: int, acc_bytes: int = 4, isa: CpuIsa | None = None,
               max_tile_bytes: int | None = None, slide: int = 0, row_vectors: int = 1) -> tuple[int, int]:
    """Register tile (mr, nv) for a GEMM-like loop nest with ``vec``-lane vectors along ``n``: mr rows of
    ``m`` (broadcast operand) by nv vectors (vector operand), for the default CPU rules.

    Unlike :func:`cpu_tiles` (tuned on the CycleFC kernel, K = 64), the score is FMAs per operand load,
    mr*nv / (mr / r + nv) where one load of a row's broadcast operand serves r = ``isa.k_unroll`` reduction
    steps with ``isa.row_registers`` (else r = 1: mr*nv / (mr + nv)), what bounds a long-K GEMM (mixer_s16's
    196x2048x512 on the Zen 4 here: 14x1 ran 6.3 ms, 7x2 5.3, 3x4 4.0), times the fraction of tile rows that are real; a tile whose rows do not
    divide ``m`` is guarded by a branch that LLVM leaves inside the reduction loop, so it counts
    ``isa.guarded_tile_weight`` (x86: 0.85; 196 rows: 7x2 beat a guarded 3x4, 3.7 vs 4.0 ms; 1024 rows: a
    guarded 3x4 beat 2x4, 4.8 vs 5.5 ms). Limits: accumulators + nv vector loads + the broadcast registers (1, or mr
    with ``isa.row_registers``) + 1 spare <= nregs, mr <= 16, nv <= 4 and dividing n / vec, and at most
    ``max_tile_bytes`` of accumulators (``MAX_STACK_ALLOCA_BYTES`` says when); else the registers alone bound the
    tile (``CPU_ACC_SCOPE``). ``slide``: the kernel height of a sliding reduction the tile rows share input rows along
    (0: none), bounding the rows by ``isa.slide_input_vectors``. ``row_vectors``: the vectors each row's values take
    (with ``isa.row_registers``; more than 1 where LLVM unrolls several K steps at once), which in a float16 tile must
    fit ``isa.half_element_registers``.
    """
    isa = isa or CPU_ISA["avx512"]
    row_registers = isa.row_registers
    reuse = isa.k_unroll if row_registers else 1
    nregs -= isa.half_spare_registers if acc_bytes < 4 else 0
    nvec = max(1, n // vec)
    best = None
    for nv in _divisors_desc(nvec, 4):
        per_row = nv + row_vectors if row_registers else nv  # registers one more tile row takes
        mr_max = min((nregs - 1 - nv - (0 if row_registers else 1)) // per_row, MAX_TILE_ROWS, max(m, 1),
                     (max_tile_bytes // (vec * acc_bytes) if max_tile_bytes else nregs) // nv)
        if slide and isa.slide_input_vectors:
            mr_max = min(mr_max, isa.slide_input_vectors // nv - slide + 1)
        if row_registers and acc_bytes < 4 and isa.half_element_registers:
            mr_max = min(mr_max, (isa.half_element_registers - isa.half_spare_registers) // row_vectors)
        for mr in range(mr_max, 0, -1):
            if m % mr and mr * nv * vec * acc_bytes >= MAX_STACK_ALLOCA_BYTES:
                continue  # past the old limit only unguarded: a guarded tile loses the packed weight panel too
            tiles = -(-m // mr)
            used = m / (tiles * mr)
            score = mr * nv / (mr / reuse + nv) * used * (1.0 if m % mr == 0 else isa.guarded_tile_weight)
            key = (round(score, 6), mr * nv, nv)
            if best is None or key > best[0]:
                best = (key, (mr, nv))
    return best[1] if best else (1, 1)


def cpu_tiles(
    w: int, o: int, lanes: int, nregs: int, acc_bytes: int = 4, convert: bool = False, scaled: bool = False
) -> tuple[int, int, int]:
    """Register tile (mr, nv, vec): mr rows (extent ``w``) by nv vectors of vec lanes (extent ``o``).

    * vec: the largest power of two <= ``lanes`` that divides O (O=64 -> 16, O=100 -> 4, O=11 -> 1);
    * registers: mr*nv accumulators + nv weight vectors + 1 broadcast input + 1 spare <= nregs, the tile
      under the 1 KiB stack limit (so at most 15 zmm accumulators on AVX-512), mr <= 16, nv <= 4;
    * nv divides O/vec; mr is the largest divisor of W in [mr_max/2, mr_max], or else mr_max, with the
      last tile of each row guarded (a predicate on the unrolled rows, never on the vector lanes);
    * choice: most accumulators holding real pixels, then unguarded, then most rows (on the Zen 4 here
      14x1 beat 7x2 and 3x4 by 5-10% at 56x56x64 and 14x14x320 in the CycleFC kernel). With ``convert``
      (float16 inputs, so every input scalar and weight vector is converted to float32 before its FMAs)
      the score is FMAs per converted operand, mr*nv / (mr + nv), instead: 7x2 rather than 14x1.
    * ``scaled``: each weight vector is multiplied by a loop-invariant vector first (the token mixer's branch
      weights), which holds nv more registers.
    """
    vec = next(v for v in (lanes >> i for i in range(lanes.bit_length())) if o % v == 0)
    nvec = o // vec
    max_tile = max(1, (MAX_STACK_ALLOCA_BYTES - 1) // (vec * acc_bytes))
    best = None
    for nv in _divisors_desc(nvec, 4):
        mr_max = min((nregs - 2 - nv * (2 if scaled else 1)) // nv, max_tile // nv, MAX_TILE_ROWS, w)
        if mr_max < 1:
            continue
        mrs = _divisors_desc(w, mr_max, (mr_max + 1) // 2)
        mr = mrs[0] if mrs else mr_max
        used = w / (-(-w // mr) * mr)  # fraction of tile rows that are real rows (1.0 when mr divides W)
        score = mr * nv * used / (mr + nv) if convert else mr * nv * used
        key = (score, bool(mrs), mr)  # useful accumulators (per conversion), then unguarded, then most rows
        if best is None or key > best[0]:
            best = (key, (mr, nv, vec))
    return best[1] if best else (1, 1, vec)
