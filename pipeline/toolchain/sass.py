"""Which kernels of a cubin run on tensor cores: their SASS read with cuobjdump (pip nvidia-cuda-cuobjdump, with
nvidia-cuda-nvdisasm beside it, both pinned in pyproject's [test] extra).

A kernel uses tensor cores when its machine code has a matrix-multiply-accumulate instruction: HMMA (float16 /
bfloat16 / tf32: wmma and mma.sync, sm_70+), IMMA (int8), BMMA / DMMA, or the sm_90 warpgroup forms (HGMMA,
IGMMA, ...). That is read from the cubin that will run, not inferred from the CUDA source. Where the pinned tools
cannot read the SASS (CUDA 13's nvdisasm reads no sm_72 code, or they are not installed), ``ptx_tensor_core_ops``
reads the PTX that ptxas compiled the cubin from: its ``wmma.mma`` / ``mma.sync`` / ``wgmma`` instructions, which
ptxas compiles to those instructions alone on sm_70 and later (it has no other lowering of them).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from .cuda_toolchains import find_in_nvidia

CUOBJDUMP = "cu13/bin/cuobjdump"
NVDISASM = "cu13/bin/nvdisasm"
TENSOR_CORE_OPCODES = frozenset({"HMMA", "IMMA", "BMMA", "DMMA", "HGMMA", "IGMMA", "BGMMA", "QGMMA"})
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
# "/*0af0*/   @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;": the opcode after the address and an optional predicate
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)((?:\.[A-Za-z0-9_]+)*)")


# PTX: ".visible .entry name(" opens a kernel; "@%p1 wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {..." one of
# the matrix multiply-accumulates
_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(")
_PTX_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:wmma\.mma|mma|wgmma\.mma_async)\.[\w.]+)")


class SassUnavailable(Exception):
    """cuobjdump or nvdisasm is not installed."""


def tool_problem() -> str | None:
    """Why SASS cannot be read here (None: it can)."""
    missing = [rel for rel in (CUOBJDUMP, NVDISASM) if find_in_nvidia(rel) is None]
    if missing:
        return f"{', '.join(Path(m).name for m in missing)} missing: pip install -e '.[test]'"
    return None


def _ops_by_kernel(text: str, header: re.Pattern, instruction: Callable[[str], str | None]) -> dict[str, list[str]]:
    """kernel name (what ``header`` matched) -> the distinct instructions ``instruction`` names in the lines under it."""
    kernels: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        opened = header.match(line)
        if opened:
            current = kernels.setdefault(opened[1], set())
            continue
        op = instruction(line)
        if op and current is not None:
            current.add(op)
    return {name: sorted(ops) for name, ops in kernels.items()}


def _sass_tensor_core_op(line: str) -> str | None:
    instruction = _INSTRUCTION.match(line)
    return instruction[1] + instruction[2] if instruction and instruction[1] in TENSOR_CORE_OPCODES else None


def parse_tensor_core_ops(sass: str) -> dict[str, list[str]]:
    """kernel name -> the distinct tensor-core instructions (opcode with modifiers) in ``cuobjdump -sass`` output."""
    return _ops_by_kernel(sass, _FUNCTION, _sass_tensor_core_op)


def tensor_core_ops(cubin: bytes) -> dict[str, list[str]]:
    """kernel name -> tensor-core instructions of that kernel (empty: none) for every kernel of ``cubin``."""
    problem = tool_problem()
    if problem:
        raise SassUnavailable(problem)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "device.cubin"
        path.write_bytes(cubin)
        # cuobjdump runs nvdisasm from its own directory, where the pip packages put both
        out = subprocess.run([str(find_in_nvidia(CUOBJDUMP)), "-sass", str(path)], capture_output=True, text=True,
                             encoding="utf-8", timeout=300)
    if out.returncode != 0:
        raise SassUnavailable(f"cuobjdump -sass failed: {out.stderr.strip()[:300]}")
    return parse_tensor_core_ops(out.stdout)


def ptx_tensor_core_ops(ptx: str) -> dict[str, list[str]]:
    """kernel name -> the distinct matrix multiply-accumulate instructions of its PTX (empty: none)."""
    return _ops_by_kernel(ptx, _PTX_ENTRY, lambda line: (mma := _PTX_MMA.match(line)) and mma[1])
