"""Target specs as data. TVM is not imported here: `pipeline` turns a spec into a tvm Target.

Per-target differences live in these fields, never in `if target == ...` branches.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path


# The most shared memory (static + dynamic) one thread block may use, by arch: the CUDA C++ Programming Guide's
# "Technical Specifications per Compute Capability", "Maximum amount of shared memory per thread block"; above
# 48 KiB only as dynamic shared memory the kernel opts into (cuFuncSetAttribute, which TVM's CUDA runtime calls:
# pipeline/toolchain/dynamic_shared.py). Before Volta there is no opt-in: 48 KiB.
KIB = 1024
SHARED_BYTES_OPTIN = {**{f"sm_{cc}": 48 * KIB for cc in (35, 37, 50, 52, 53, 60, 61, 62)},
                      "sm_70": 96 * KIB, "sm_72": 96 * KIB, "sm_75": 64 * KIB, "sm_80": 163 * KIB, "sm_86": 99 * KIB,
                      "sm_87": 163 * KIB, "sm_89": 99 * KIB, "sm_90": 227 * KIB}


@dataclass(frozen=True)
class CudaSpec:
    arch: str  # e.g. "sm_87"
    # A key of pipeline.toolchain.cuda_toolchains.TOOLCHAINS (which says the driver its cubins need): the
    # board's CUDA major decides it.
    toolchain: str
    jetpack: str | None = None  # the Jetson software release that brings that driver, where the target is a Jetson
    # Per-block limits every compiled kernel is checked against.
    max_threads_per_block: int = 1024
    max_shared_bytes: int = 48 * KIB  # static (.nv.shared); what TVM's schedules are told they may allocate
    max_registers_per_thread: int = 255
    # Capture the inference in CUDA graphs (RewriteCUDAGraph, PassContext relax.backend.use_cuda_graph): with
    # static shapes the VM replays one graph per captured region instead of launching every kernel itself.
    cuda_graph: bool = True

    @property
    def max_shared_bytes_optin(self) -> int:
        """Static + dynamic shared bytes a block of this arch may use (its kernels opting in above 48 KiB)."""
        return SHARED_BYTES_OPTIN[self.arch]

    def tvm_target(self) -> dict:
        """A TVM CUDA target for this GPU, its limits the ones every kernel is checked against."""
        return {"kind": "cuda", "arch": self.arch, "max_threads_per_block": self.max_threads_per_block,
                "max_num_threads": self.max_threads_per_block, "max_shared_memory_per_block": self.max_shared_bytes,
                "thread_warp_size": 32}


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    tvm_target: dict | str  # what tvm.target.Target(...) takes: a dict, or a TVM tag name
    tvm_host: dict | None = None  # overrides the host of a tag (e.g. the Orin Nano tag says Xavier's CPU)
    device: str = "cpu"  # TVM device kind the compiled library runs on
    cross_triple: str | None = None  # link the library for this triple (the build host is x86-64)
    runner: str | None = None  # how verify executes it here: "host", "qemu-aarch64", or None (board only)
    cuda: CudaSpec | None = None
    # Whether --fp16 computes in float16 here: False where the CPU has no float16 arithmetic (an Arm core without
    # +fullfp16, e.g. the Pi 4's Cortex-A72), so every float16 operation would be widened to float32 and back.
    float16_arithmetic: bool = True
    # What --fp16 convs and matmuls accumulate in. float32 by default: the tensor cores' float32 accumulators cost
    # nothing extra, and on an x86 CPU float16 is widened anyway. An Arm core with +fullfp16 accumulates in
    # float16: its `fmla v.8h` FMAs do, and float32 accumulators would widen every FMA (fcvtl + fmla v.4s);
    # mixer_s16_224 on rpi5 so verifies under qemu at 0.18 of its fp16 tolerance.
    float16_accumulator: str = "float32"
    aliases: tuple[str, ...] = field(default=())

    def with_cuda_arch(self, arch: str) -> "TargetSpec":
        """The same target for another GPU architecture (`--cuda-arch`)."""
        if self.cuda is None:
            raise ValueError(f"{self.name} has no GPU; --cuda-arch applies to the `cuda` target")
        if not isinstance(self.tvm_target, dict):
            raise ValueError(f"{self.name} has a fixed GPU architecture ({self.cuda.arch}); "
                             "--cuda-arch applies to the `cuda` target")
        cuda = dataclasses.replace(self.cuda, arch=arch)
        return dataclasses.replace(self, tvm_target=cuda.tvm_target(), cuda=cuda)


def x86_64_level(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The highest x86-64 psABI level this CPU supports (v4 = AVX-512), as an LLVM -mcpu name."""
    try:
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "x86-64"
    levels = (
        ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
        ("x86-64-v3", {"avx2", "fma", "bmi2", "movbe"}),
        ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
    )
    return next((name for name, needed in levels if needed <= flags), "x86-64")


_targets: dict[str, TargetSpec] = {}


def register_target(target: TargetSpec) -> TargetSpec:
    for key in (target.name, *target.aliases):
        if key in _targets:
            raise ValueError(f"target {key!r} registered twice")
        _targets[key] = target
    return target


X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": x86_64_level(), "num-cores": os.cpu_count() or 1}
AARCH64 = "aarch64-linux-gnu"


def arm_cpu(mcpu: str | None, cores: int, *features: str) -> dict:
    target = {"kind": "llvm", "mtriple": AARCH64, "mattr": ["+neon", *features], "num-cores": cores}
    return target if mcpu is None else {**target, "mcpu": mcpu}


ORIN_GPU = CudaSpec(arch="sm_87", toolchain="nvrtc-12", jetpack="JetPack 6")
XAVIER_GPU = CudaSpec(arch="sm_72", toolchain="nvrtc-11", jetpack="JetPack 5")
GENERIC_GPU = CudaSpec(arch="sm_87", toolchain="nvrtc-12")
ORIN_CPU = ("cortex-a78ae", "+dotprod", "+fullfp16")
XAVIER_CPU = ("carmel", "+fullfp16")


def arm_board(name: str, description: str, mcpu: str | None, cores: int, *features: str) -> TargetSpec:
    """A 64-bit Arm Linux board's CPU: cross-linked here, verified under qemu-user."""
    return TargetSpec(name=name, description=description, tvm_target=arm_cpu(mcpu, cores, *features),
                      cross_triple=AARCH64, runner="qemu-aarch64", float16_arithmetic="+fullfp16" in features,
                      float16_accumulator="float16" if "+fullfp16" in features else "float32")


def jetson(name: str, description: str, tag: str, gpu: CudaSpec, cores: int, cpu: tuple[str, ...]) -> TargetSpec:
    """A Jetson: TVM's tag for the GPU, and its host CPU named here (TVM's Orin tags say "carmel", Xavier's
    core, or "cortex-a78"; the Orin core is the Cortex-A78AE)."""
    return TargetSpec(name=name, description=description, tvm_target=tag, tvm_host=arm_cpu(cpu[0], cores, *cpu[1:]),
                      device="cuda", cross_triple=AARCH64, cuda=gpu)


for _target in (
    TargetSpec(name="x86", aliases=("host",),
               description="this x86-64 host (LLVM, -mcpu from its CPU flags: AVX-512 where present)",
               tvm_target=X86_HOST, runner="host"),
    arm_board("aarch64", "generic 64-bit Arm Linux with NEON", None, 4),
    arm_board("rpi4", "Raspberry Pi 4 (Cortex-A72, 64-bit OS)", "cortex-a72", 4),
    arm_board("rpi5", "Raspberry Pi 5 (Cortex-A76, 64-bit OS)", "cortex-a76", 4, "+dotprod", "+fullfp16"),
    arm_board("jetson-orin-cpu", "the CPU of a Jetson Orin (Cortex-A78AE), no GPU", ORIN_CPU[0], 6, *ORIN_CPU[1:]),
    TargetSpec(name="cuda", description="an NVIDIA GPU in this x86-64 host; --cuda-arch picks the arch (default sm_87)",
               tvm_target=GENERIC_GPU.tvm_target(), tvm_host=X86_HOST, device="cuda", runner="host",
               cuda=GENERIC_GPU),
    jetson("jetson-orin-nano", "Jetson Orin Nano: Ampere sm_87 + 6x Cortex-A78AE", "nvidia/jetson-orin-nano",
           ORIN_GPU, 6, ORIN_CPU),
    jetson("jetson-orin-nx", "Jetson Orin NX: Ampere sm_87 + 8x Cortex-A78AE", "nvidia/jetson-orin-nano",
           ORIN_GPU, 8, ORIN_CPU),
    jetson("jetson-agx-orin", "Jetson AGX Orin: Ampere sm_87 + 12x Cortex-A78AE", "nvidia/jetson-agx-orin-64gb",
           ORIN_GPU, 12, ORIN_CPU),
    jetson("jetson-xavier-nx", "Jetson Xavier NX: Volta sm_72 + 6x Carmel", "nvidia/jetson-agx-xavier",
           XAVIER_GPU, 6, XAVIER_CPU),
    jetson("jetson-agx-xavier", "Jetson AGX Xavier: Volta sm_72 + 8x Carmel", "nvidia/jetson-agx-xavier",
           XAVIER_GPU, 8, XAVIER_CPU),
):
    register_target(_target)


class UnknownTargetError(KeyError):
    def __init__(self, name: str):
        self.name = name
        self.suggestions = difflib.get_close_matches(name, list(_targets), n=3, cutoff=0.5)
        super().__init__(name)

    def __str__(self) -> str:
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"unknown target {self.name!r}{hint} (see `python -m pipeline list-targets`)"


def get_target(name: str) -> TargetSpec:
    if name not in _targets:
        raise UnknownTargetError(name)
    return _targets[name]


def list_targets() -> list[TargetSpec]:
    """Every spec once (aliases folded), in registration order."""
    return list({target.name: target for target in _targets.values()}.values())
