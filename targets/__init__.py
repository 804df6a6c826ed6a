"""Target specs as data. TVM is not imported here: `pipeline` turns a spec into a tvm Target.

Per-target differences live in these fields, never in `if target == ...` branches.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CudaSpec:
    arch: str  # e.g. "sm_87"
    toolchain: str  # a key of pipeline.cuda_aot.TOOLCHAINS: the board's CUDA major decides it
    supported: str  # which driver / JetPack the device code is built for (shown to users)
    # Per-block limits every compiled kernel is checked against.
    max_threads_per_block: int = 1024
    max_shared_bytes: int = 48 * 1024
    max_registers_per_thread: int = 255


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
    aliases: tuple[str, ...] = field(default=())

    def with_cuda_arch(self, arch: str) -> "TargetSpec":
        """The same target for another GPU architecture (`--cuda-arch`)."""
        if self.cuda is None or not isinstance(self.tvm_target, dict):
            raise ValueError(f"{self.name} has a fixed GPU architecture; --cuda-arch applies to the `cuda` target")
        return dataclasses.replace(self, tvm_target={**self.tvm_target, "arch": arch},
                                   cuda=dataclasses.replace(self.cuda, arch=arch))


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


def register_target(spec: TargetSpec) -> TargetSpec:
    for key in (spec.name, *spec.aliases):
        if key in _targets:
            raise ValueError(f"target {key!r} registered twice")
        _targets[key] = spec
    return spec


X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": x86_64_level(), "num-cores": os.cpu_count() or 1}
AARCH64 = "aarch64-linux-gnu"


def arm_cpu(mcpu: str | None, cores: int, *features: str) -> dict:
    target = {"kind": "llvm", "mtriple": AARCH64, "mattr": ["+neon", *features], "num-cores": cores}
    return target if mcpu is None else {**target, "mcpu": mcpu}


JETPACK6 = CudaSpec(arch="sm_87", toolchain="nvrtc-12",
                    supported="JetPack 6 (CUDA 12 driver); cubins from NVRTC 12.6")
JETPACK5 = CudaSpec(arch="sm_72", toolchain="nvrtc-11",
                    supported="JetPack 5 (CUDA 11.4 driver); cubins from NVRTC 11.8, CUDA 11 minor-version compatible")

register_target(TargetSpec(
    name="x86", aliases=("host",),
    description="this x86-64 host (LLVM, -mcpu from its CPU flags: AVX-512 where present)",
    tvm_target=X86_HOST, runner="host"))
register_target(TargetSpec(
    name="aarch64", description="generic 64-bit Arm Linux with NEON",
    tvm_target=arm_cpu(None, 4), cross_triple=AARCH64, runner="qemu-aarch64"))
register_target(TargetSpec(
    name="rpi4", description="Raspberry Pi 4 (Cortex-A72, 64-bit OS)",
    tvm_target=arm_cpu("cortex-a72", 4), cross_triple=AARCH64, runner="qemu-aarch64"))
register_target(TargetSpec(
    name="rpi5", description="Raspberry Pi 5 (Cortex-A76, 64-bit OS)",
    tvm_target=arm_cpu("cortex-a76", 4, "+dotprod", "+fullfp16"), cross_triple=AARCH64, runner="qemu-aarch64"))
register_target(TargetSpec(
    name="jetson-orin-cpu", description="the CPU of a Jetson Orin (Cortex-A78AE), no GPU",
    tvm_target=arm_cpu("cortex-a78ae", 6, "+dotprod", "+fullfp16"), cross_triple=AARCH64, runner="qemu-aarch64"))
register_target(TargetSpec(
    name="cuda", description="an NVIDIA GPU in this x86-64 host; --cuda-arch picks the arch (default sm_87)",
    tvm_target={"kind": "cuda", "arch": "sm_87", "max_threads_per_block": 1024, "max_num_threads": 1024,
                "max_shared_memory_per_block": 49152, "thread_warp_size": 32},
    tvm_host=X86_HOST, device="cuda", runner="host",
    cuda=CudaSpec(arch="sm_87", toolchain="nvrtc-12", supported="CUDA 12.x drivers (NVRTC 12.6 cubins)")))
# TVM's Orin tags call the CPU "carmel" (Xavier's) or "cortex-a78": we name the Orin core.
register_target(TargetSpec(
    name="jetson-orin-nano", description="Jetson Orin Nano: Ampere sm_87 + 6x Cortex-A78AE",
    tvm_target="nvidia/jetson-orin-nano", tvm_host=arm_cpu("cortex-a78ae", 6, "+dotprod", "+fullfp16"),
    device="cuda", cross_triple=AARCH64, cuda=JETPACK6))
register_target(TargetSpec(
    name="jetson-orin-nx", description="Jetson Orin NX: Ampere sm_87 + 8x Cortex-A78AE",
    tvm_target="nvidia/jetson-orin-nano", tvm_host=arm_cpu("cortex-a78ae", 8, "+dotprod", "+fullfp16"),
    device="cuda", cross_triple=AARCH64, cuda=JETPACK6))
register_target(TargetSpec(
    name="jetson-agx-orin", description="Jetson AGX Orin: Ampere sm_87 + 12x Cortex-A78AE",
    tvm_target="nvidia/jetson-agx-orin-64gb", tvm_host=arm_cpu("cortex-a78ae", 12, "+dotprod", "+fullfp16"),
    device="cuda", cross_triple=AARCH64, cuda=JETPACK6))
register_target(TargetSpec(
    name="jetson-xavier-nx", description="Jetson Xavier NX: Volta sm_72 + 6x Carmel",
    tvm_target="nvidia/jetson-agx-xavier", tvm_host=arm_cpu("carmel", 6, "+fullfp16"),
    device="cuda", cross_triple=AARCH64, cuda=JETPACK5))
register_target(TargetSpec(
    name="jetson-agx-xavier", description="Jetson AGX Xavier: Volta sm_72 + 8x Carmel",
    tvm_target="nvidia/jetson-agx-xavier", tvm_host=arm_cpu("carmel", 8, "+fullfp16"),
    device="cuda", cross_triple=AARCH64, cuda=JETPACK5))


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
    return list({spec.name: spec for spec in _targets.values()}.values())
