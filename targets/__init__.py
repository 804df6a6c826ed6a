"""Target specs as data. TVM is not imported here: `pipeline` turns a spec into a tvm Target.

Per-target differences live in these fields, never in `if target == ...` branches.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    tvm_target: dict  # what tvm.target.Target(...) takes
    device: str = "cpu"  # TVM device kind the compiled library runs on
    runs_on_build_host: bool = False  # the artifact can be executed (and verified) on this machine
    aliases: tuple[str, ...] = field(default=())


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


register_target(TargetSpec(
    name="x86",
    aliases=("host",),
    description="this x86-64 host (LLVM, -mcpu from its CPU flags: AVX-512 where present)",
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": x86_64_level(), "num-cores": os.cpu_count() or 1},
    runs_on_build_host=True,
))


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
