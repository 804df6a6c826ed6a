"""The loops of an aarch64 library that do vector multiply-adds, read from its disassembly (llvm-objdump -d).

A loop is the address range of a backward branch within one function (the branch and its target); an FMA loop is
an innermost one (no other loop inside it) holding vector ``fmla``. In such a loop, a load or store addressed by
``sp`` is a spill (TVM's kernels keep no arrays on the stack other than the accumulator tile, which LLVM turns into
registers when they fit), and ``fmla`` per instruction says how close the loop is to the FMA pipes' limit (ONNX
Runtime's aarch64 SGEMM loop: 64 fmla in 77 instructions, 0.83). The library-wide counts of fmla by arrangement
(``4s``: float32, ``8h``: float16) and of widening conversions (``fcvtl``) say whether a float16 build computes in
float16.

Only the standard library: a benchmark or the manifest can call :func:`analyze_library`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OBJDUMP_NAMES = ("llvm-objdump", "llvm-objdump-19", "llvm-objdump-18", "llvm-objdump-17", "llvm-objdump-16",
                 "llvm-objdump-15", "llvm-objdump-14")
_FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
# "   21a20:      	ld1r	{ v0.4s }, [x28], #4"
_INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_BRANCHES = frozenset({"b", "cbz", "cbnz", "tbz", "tbnz"})
_TARGET = re.compile(r"(?:^|,\s*)(?:0x)?([0-9a-f]+)\s+<")
_STACK_ACCESS = re.compile(r"\[sp\b")
_VECTOR_FMLA = re.compile(r"\bv\d+\.(\d+[hsd])\b")
_MEMORY_OPS = ("ld", "st")
# Decoded whatever the target: without +fullfp16, llvm-objdump prints every float16 arithmetic instruction as
# "<unknown>" (which is how an rpi5 --fp16 library once read as "no fmla v.8h"); an instruction the target lacks
# is never in its code, so decoding more extensions than it has changes nothing else.
DECODE_FEATURES = "+fullfp16,+fp16fml,+dotprod,+i8mm,+bf16,+sve,+sve2"
UNKNOWN = "<unknown>"


class ObjdumpUnavailable(Exception):
    """No llvm-objdump on this machine."""


def find_objdump() -> str | None:
    return next((path for name in OBJDUMP_NAMES if (path := shutil.which(name))), None)


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str
    operands: str

    @property
    def is_branch(self) -> bool:
        return self.mnemonic in _BRANCHES or self.mnemonic.startswith("b.")

    @property
    def branch_target(self) -> int | None:
        if not self.is_branch:
            return None
        match = _TARGET.search(self.operands)
        return int(match[1], 16) if match else None

    @property
    def vector_fma(self) -> str | None:
        """The arrangement of a vector fmla ("4s", "8h", "2d"), else None."""
        if self.mnemonic != "fmla":
            return None
        match = _VECTOR_FMLA.match(self.operands)
        return match[1] if match else None

    @property
    def is_stack_access(self) -> bool:
        return self.mnemonic.startswith(_MEMORY_OPS) and bool(_STACK_ACCESS.search(self.operands))


@dataclass(frozen=True)
class FmaLoop:
    function: str
    start: int  # address of the loop's first instruction (the backward branch's target)
    end: int  # address of the backward branch
    instructions: int
    fmla: int  # vector fmla
    arrangements: frozenset  # of those fmla: "4s" (float32), "8h" (float16), ...
    spills: int  # sp-addressed loads and stores
    branches: int  # branches inside the loop besides its back edge (a guarded tail kept in the loop)

    @property
    def fmla_per_instruction(self) -> float:
        return self.fmla / self.instructions

    def as_dict(self) -> dict:
        return {"function": self.function, "address": hex(self.start), "instructions": self.instructions,
                "fmla": self.fmla, "arrangements": sorted(self.arrangements), "spills": self.spills, "branches": self.branches,
                "fmla_per_instruction": round(self.fmla_per_instruction, 3)}


@dataclass
class LibraryFmas:
    loops: list[FmaLoop] = field(default_factory=list)
    fmla_by_arrangement: Counter = field(default_factory=Counter)  # the whole library, loops or not
    widening_conversions: int = 0  # fcvtl / fcvtl2: float16 -> float32
    undecoded: int = 0  # instructions llvm-objdump could not decode (0, or the counts above are incomplete)

    def loops_of(self, kernel: str) -> list[FmaLoop]:
        """The FMA loops of one TIR function (see :func:`kernel_name`)."""
        return [loop for loop in self.loops if kernel_name(loop.function) == kernel]

    def summary(self) -> dict:
        fmla = sum(loop.fmla for loop in self.loops)
        instructions = sum(loop.instructions for loop in self.loops)
        return {"fma_loops": len(self.loops), "spills_in_fma_loops": sum(loop.spills for loop in self.loops),
                "fmla_per_instruction": round(fmla / instructions, 3) if instructions else None,
                "fmla_by_arrangement": dict(sorted(self.fmla_by_arrangement.items())),
                "fcvtl": self.widening_conversions, "undecoded": self.undecoded}


def kernel_name(symbol: str) -> str:
    """The TIR function a symbol of a TVM library comes from: ``__tvm_ffi_f`` (its entry) and ``f_compute_``
    (the body of its parallel loop) are both ``f``."""
    return symbol.removeprefix("__tvm_ffi_").removesuffix("_compute_")


def parse_functions(disassembly: str) -> dict[str, list[Instruction]]:
    """function name -> its instructions, from ``llvm-objdump -d --no-show-raw-insn`` output."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in disassembly.splitlines():
        head = _FUNCTION.match(line)
        if head:
            current = functions.setdefault(head[2], [])
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            current.append(Instruction(int(instruction[1], 16), instruction[2], instruction[3].strip()))
    return functions


def fma_loops(function: str, body: list[Instruction]) -> list[FmaLoop]:
    """The innermost loops of one function that hold vector fmla."""
    first = body[0].address if body else 0
    ranges = sorted({(target, ins.address) for ins in body
                     if (target := ins.branch_target) is not None and first <= target <= ins.address})
    innermost = [(lo, hi) for lo, hi in ranges
                 if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in ranges)]
    out = []
    for lo, hi in innermost:
        inside = [ins for ins in body if lo <= ins.address <= hi]
        arrangements = [a for ins in inside if (a := ins.vector_fma)]
        if arrangements:
            out.append(FmaLoop(function, lo, hi, len(inside), len(arrangements), frozenset(arrangements),
                               sum(ins.is_stack_access for ins in inside), sum(ins.is_branch for ins in inside) - 1))
    return out


def analyze_disassembly(disassembly: str) -> LibraryFmas:
    result = LibraryFmas()
    for name, body in parse_functions(disassembly).items():
        result.loops.extend(fma_loops(name, body))
        for ins in body:
            if (arrangement := ins.vector_fma) is not None:
                result.fmla_by_arrangement[arrangement] += 1
            elif ins.mnemonic in ("fcvtl", "fcvtl2"):
                result.widening_conversions += 1
            elif ins.mnemonic == UNKNOWN:
                result.undecoded += 1
    return result


def analyze_library(path: Path) -> LibraryFmas:
    """The FMA loops of an aarch64 shared library (raises ObjdumpUnavailable without llvm-objdump)."""
    objdump = find_objdump()
    if objdump is None:
        raise ObjdumpUnavailable("llvm-objdump not found: install llvm (apt-get install llvm)")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--mattr={DECODE_FEATURES}", str(path)], capture_output=True, text=True,
                         encoding="utf-8", timeout=300, check=False)
    if out.returncode != 0:
        raise ObjdumpUnavailable(f"llvm-objdump -d failed: {out.stderr.strip()[:300]}")
    return analyze_disassembly(out.stdout)
