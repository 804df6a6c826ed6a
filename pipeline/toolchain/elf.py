"""The one ELF reader (pure Python, ELF64 little-endian): host libraries (x86-64, aarch64) and CUDA cubins.

The header's machine is read by pipeline.runtime (a bundle's run.py checks a library's architecture on the
board, where only that file ships); the rest, sections and symbols, is here.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from ..runtime import ELF_ARCHS, elf_arch, elf_machine as machine  # noqa: F401 - this module's face for them

EM_X86_64, EM_AARCH64, EM_CUDA = 62, 183, 190  # e_machine


class Section(NamedTuple):
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    info: int


class Symbol(NamedTuple):
    name: str
    shndx: int  # 0: undefined (imported)
    value: int
    size: int


def arch_name(e_machine: int) -> str:
    return ELF_ARCHS.get(e_machine, f"ELF machine {e_machine}")


def sections(data: bytes) -> list[Section]:
    """Section headers in index order."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = raw[shstrndx][4]
    return [Section(cstr(data, stroff + r[0]), r[1], r[3], r[4], r[5], r[6], r[7]) for r in raw]


def sections_by_name(data: bytes) -> dict[str, Section]:
    """Cubins have unique section names."""
    return {s.name: s for s in sections(data)}


def cstr(data: bytes, offset: int) -> str:
    return data[offset: data.index(b"\0", offset)].decode()


def symbols(data: bytes, table: str = ".symtab") -> list[Symbol]:
    """Every symbol of the symbol table section ``table`` (none if the file has no such section)."""
    secs = sections(data)
    tab = next((s for s in secs if s.name == table), None)
    if tab is None:
        return []
    strtab = secs[tab.link].offset
    out = []
    for i in range(tab.size // 24):
        st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, tab.offset + 24 * i)
        out.append(Symbol(cstr(data, strtab + st_name), shndx, value, size))
    return out


def undefined_symbols(data: bytes) -> set[str]:
    """What a shared library imports: its undefined dynamic symbols."""
    return {s.name for s in symbols(data, ".dynsym") if s.shndx == 0 and s.name}


def symbol_data(data: bytes, name: str) -> bytes:
    """The bytes from where the defined symbol ``name`` starts to the end of the file (KeyError if none)."""
    secs = sections(data)
    for table in (".dynsym", ".symtab"):
        for sym in symbols(data, table):
            if sym.name == name and sym.shndx != 0:
                section = secs[sym.shndx]  # st_value is a virtual address: map it through its section
                return data[section.offset + sym.value - section.addr:]
    raise KeyError(name)
