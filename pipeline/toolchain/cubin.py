"""What CUDA device code a library carries, and what each kernel of a cubin needs (registers, shared and local
memory, threads), read from the bytes alone: no CUDA tool needed, and aarch64 libraries read alike."""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterator

from . import elf

_EIATTR_FRAME_SIZE, _EIATTR_MAX_THREADS, _EIATTR_REGCOUNT = 0x11, 0x05, 0x2F
_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL, _EIFMT_SVAL = 1, 2, 3, 4


def _nv_info(data: bytes, off: int, size: int) -> Iterator[tuple[int, bytes]]:
    """Yield (attribute, payload) records of a .nv.info section."""
    end, p = off + size, off
    while p + 2 <= end:
        fmt, attr = data[p], data[p + 1]
        if fmt == _EIFMT_SVAL:
            n, = struct.unpack_from("<H", data, p + 2)
            yield attr, data[p + 4: p + 4 + n]
            p += 4 + n
        elif fmt == _EIFMT_HVAL:
            yield attr, data[p + 2: p + 4]
            p += 4
        elif fmt == _EIFMT_BVAL:
            yield attr, data[p + 2: p + 3]
            p += 4  # records are 4-byte aligned
        else:  # NVAL
            yield attr, b""
            p += 4


def cubin_info(cubin: bytes) -> dict:
    """Arch and ELF ABI of a cubin: {'arch': 'sm_87', 'abi_version': 7, 'toolkit': 126 | None}.

    CUDA <= 12 cubins have OS/ABI 0x33, ABI version 7, the SM in e_flags bits 0-7 and the
    toolkit (e.g. 126 = 12.6) in e_version; CUDA 13 cubins have OS/ABI 0x41, ABI version 8
    and the SM in e_flags bits 8-15.
    """
    if cubin[:4] != b"\x7fELF":
        raise ValueError("not an ELF cubin")
    osabi, abiver = cubin[7], cubin[8]
    e_machine, = struct.unpack_from("<H", cubin, 0x12)
    e_version, = struct.unpack_from("<I", cubin, 0x14)
    e_flags, = struct.unpack_from("<I", cubin, 0x30)
    if e_machine != elf.EM_CUDA:
        raise ValueError(f"ELF machine {e_machine} is not EM_CUDA")
    sm = (e_flags >> 8) & 0xFF if osabi == 0x41 else e_flags & 0xFF
    return {"arch": f"sm_{sm}", "abi_version": abiver, "toolkit": e_version if osabi == 0x33 else None}


# TVM's `__global__ void __launch_bounds__(N) name(`, or `(N, M)` once a SpillRetry rewrote it: groups N, M (or
# None), what follows the bounds up to the name's parenthesis, the name.
LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\((\d+)(?:,\s*(\d+))?\)(\s+(\w+)\s*\()")


def launch_bounds(cuda_source: str) -> dict[str, int]:
    """kernel name -> N from its ``__launch_bounds__`` (``LAUNCH_BOUNDS``)."""
    return {m[4]: int(m[1]) for m in LAUNCH_BOUNDS.finditer(cuda_source)}


def _section_size(secs: dict[str, elf.Section], name: str) -> int:
    return secs[name].size if name in secs else 0


def kernel_resources(cubin: bytes, bounds: dict[str, int] | None = None) -> list[dict]:
    """Per kernel: name, registers (per thread), shared_bytes (static), local_bytes (per
    thread: stack frame + .nv.local), max_threads (EIATTR_MAX_THREADS, i.e. the
    __launch_bounds__ ptxas saw; else `bounds` from the source; else None).

    Read from the cubin's ELF alone, so no CUDA tool is needed; the numbers match
    `cuobjdump --dump-resource-usage` (REG, SHARED, STACK + LOCAL).
    """
    secs = elf.sections_by_name(cubin)
    names = [s.name for s in elf.symbols(cubin)]
    regs: dict[str, int] = {}
    frame: dict[str, int] = {}
    if ".nv.info" in secs:
        info = secs[".nv.info"]
        for attr, val in _nv_info(cubin, info.offset, info.size):
            if attr in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE) and len(val) >= 8:
                sym, v = struct.unpack_from("<II", val)
                (regs if attr == _EIATTR_REGCOUNT else frame)[names[sym]] = v
    out = []
    for sec, text in secs.items():
        if not sec.startswith(".text."):
            continue
        k = sec[len(".text."):]
        max_threads = None
        if f".nv.info.{k}" in secs:
            info = secs[f".nv.info.{k}"]
            for attr, val in _nv_info(cubin, info.offset, info.size):
                if attr == _EIATTR_MAX_THREADS and len(val) >= 12:
                    x, y, z = struct.unpack_from("<III", val)
                    max_threads = x * y * z
        if max_threads is None and bounds:
            max_threads = bounds.get(k)
        out.append({
            "name": k,
            # ptxas also stores the count in the top byte of the .text section's sh_info.
            "registers": regs.get(k, text.info >> 24),
            "shared_bytes": _section_size(secs, f".nv.shared.{k}"),
            "local_bytes": frame.get(k, 0) + _section_size(secs, f".nv.local.{k}"),
            "max_threads": max_threads,
        })
    return out


# ---------------------------------------------------------------------------------------
# What device code does a library / executable carry?

_LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


def _read_u64(b: bytes, p: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", b, p)[0], p + 8


def _parse_library_bin(blob: bytes) -> list[tuple[str, bytes]]:
    """(kind, serialized bytes) of each module in tvm-ffi's packed-imports blob.

    Layout (tvm_ffi/src/ffi/extra/library_module.cc): <nbytes:u64> <import_tree indptr:
    vec<u64>> <child indices: vec<u64>> then per module <kind:str> [<bytes>] ("_lib" has
    none); str/bytes/vec are a u64 count followed by the items.
    """
    nbytes, p = _read_u64(blob, 0)
    end = p + nbytes
    n_indptr, p = _read_u64(blob, p)
    p += 8 * n_indptr
    n_child, p = _read_u64(blob, p)
    p += 8 * n_child
    mods = []
    for _ in range(n_indptr - 1):
        n, p = _read_u64(blob, p)
        kind = blob[p: p + n].decode()
        p += n
        payload = b""
        if kind != "_lib":
            n, p = _read_u64(blob, p)
            payload = blob[p: p + n]
            p += n
        mods.append((kind, payload))
    assert p <= end
    return mods


def _split_cuda_module(payload: bytes) -> tuple[str, bytes]:
    """(fmt, code) of a serialized CUDA module: <fmt:str> <fmap> <code:bytes>.

    fmap is not parsed: code is the trailing length-prefixed field, so find the split point
    whose u64 prefix equals the remaining length, scanning from the front: from the back, the last 16
    bytes of a cubin that end in [u64 8][8 bytes] matched first (a flaky "not an ELF cubin").
    """
    n, p = _read_u64(payload, 0)
    fmt = payload[p: p + n].decode()
    for q in range(p + n, len(payload) - 7):
        if struct.unpack_from("<Q", payload, q)[0] == len(payload) - q - 8:
            return fmt, payload[q + 8:]
    raise ValueError("malformed CUDA module payload")


def _library_blob(lib) -> bytes:
    if isinstance(lib, (str, os.PathLike)):
        try:
            return elf.symbol_data(Path(lib).read_bytes(), _LIBRARY_BIN_SYMBOL)
        except KeyError:
            raise ValueError(f"{lib}: no {_LIBRARY_BIN_SYMBOL} symbol (not a TVM-exported library?)") from None
    # In-memory module or Executable: pack its imports exactly as export_library would.
    import tvm_ffi

    mod = getattr(lib, "mod", lib)
    return bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())


def cuda_device_code(lib) -> list[tuple[str, bytes]]:
    """(fmt, code) of every CUDA module in an exported library (path to the .so, or to the
    devc.o inside a .tar export) or an in-memory Executable/Module. fmt is "cuda" (C++
    source, compiled on the board at load time), "cubin", "ptx" or "fatbin".
    Needs no CUDA runtime, and reads aarch64 files as well.
    """
    return [_split_cuda_module(p) for kind, p in _parse_library_bin(_library_blob(lib)) if kind == "cuda"]


def cuda_device_code_format(lib) -> str:
    """"cubin" / "ptx" / "fatbin" / "cuda" (source) for the library's CUDA code; "none" if
    it has no CUDA module; formats joined with "+" if modules differ."""
    fmts = sorted({f for f, _ in cuda_device_code(lib)})
    return "+".join(fmts) if fmts else "none"
