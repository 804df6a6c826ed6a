"""The native runner (pipeline/native/, C++): built here for a bundle's CPU, so that boards need no Python.

``package`` puts into every bundle ``runner``, an executable for the artifact's CPU (x86_64 or aarch64) that does
what run.py does, with its C++ source and a CMakeLists.txt to rebuild it on the board. It is compiled with
``zig c++`` (the pinned ziglang: clang with libc++, linked statically, and glibc 2.28 stubs for either CPU, so the
binary runs wherever the manylinux_2_28 TVM wheels do) against tvm-ffi's C headers from the pinned apache-tvm-ffi
wheel. It opens libtvm_runtime.so and libtvm_ffi.so when it runs (pipeline/native/tvm_runtime.h says why), so
nothing of TVM's is linked and neither architecture needs its TVM runtime on this machine to be built.

Each program is built once per (architecture, inputs) into ``pipeline.paths.native_dir()``; zig keeps what it
builds once per target (libc++: a minute or two, cold) in its own cache. Only the standard library is imported here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .. import paths
from .cross_link import CrossLinkError, run_tool, zig_command, zig_env, zig_target

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "native"
# The programs, each the files compiled into it; the headers it includes are the rest of SOURCE_DIR.
PROGRAMS = {"runner": ("runner.cc", "pipeline_runner.cc"), "example": ("example.cc", "pipeline_runner.cc")}
TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}  # runtime.elf_arch names -> LLVM triples
CXXFLAGS = ("-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-s")
# tvm-ffi's headers the sources include (tvm/ffi/c_api.h includes dlpack's): part of what a build depends on.
TVM_FFI_HEADERS = ("tvm/ffi/c_api.h", "dlpack/dlpack.h")

# Relax VM builtins that only TVM's Python package registers (tvm/relax/op/base.py and set.py): a library that calls
# one runs under run.py but not natively. The VM looks them up by name, which the library holds as plain text.
PYTHON_ONLY_BUILTINS = ("relax.run.shape_to_tensor", "relax.run.print", "relax.run.assert_op", "relax.run.unique",
                        "relax.run.nonzero")


def sources() -> list[Path]:
    """The C++ sources and CMakeLists.txt of pipeline/native/: what a bundle carries to rebuild the runner (and the
    example) on the board. Nothing else there ships (an editor's backup would be a file the bundle does not list)."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".h", ".cc") or p.name == "CMakeLists.txt")


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (tvm_ffi would load its library)."""
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def tvm_ffi_include() -> Path:
    """The include directory of the installed apache-tvm-ffi wheel (C headers, the same for every CPU)."""
    package = _package_dir("tvm_ffi")
    include = package / "include" if package else None
    if include is None or not all((include / h).is_file() for h in TVM_FFI_HEADERS):
        raise CrossLinkError("the tvm-ffi headers (tvm/ffi/c_api.h) are missing: pip install the pinned "
                             "apache-tvm-ffi (pyproject.toml)")
    return include


def host_library_path() -> str:
    """TVM_LIBRARY_PATH for running a runner on this machine: the installed wheels' tvm/lib and tvm_ffi/lib."""
    return os.pathsep.join(str(_package_dir(p) / "lib") for p in ("tvm", "tvm_ffi") if _package_dir(p))


def _build_key(program: str, arch: str, include: Path) -> str:
    digest = hashlib.sha256()
    versions = f"ziglang {metadata.version('ziglang')} {zig_target(TRIPLES[arch])} {' '.join(CXXFLAGS)}"
    digest.update(f"{program}\0{versions}\0".encode())
    for path in [*sources(), *(include / h for h in TVM_FFI_HEADERS)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build(program: str, arch: str) -> Path:
    """The executable ``program`` ("runner" or "example") for ``arch`` ("x86_64" or "aarch64"), built if missing."""
    if arch not in TRIPLES:
        raise CrossLinkError(f"no native {program} for {arch}: it is built for {', '.join(TRIPLES)}")
    zig = zig_command()
    if zig is None:
        raise CrossLinkError(f"building the native {program} needs zig: `pip install ziglang` (pyproject.toml pins it)")
    include = tvm_ffi_include()
    out = paths.native_dir() / f"{program}-{arch}-{_build_key(program, arch, include)}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the native %s for %s (zig's first C++ build for a CPU also builds its libc++: minutes)",
             program, arch)
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    try:
        start = time.perf_counter()
        cmd = [*zig, "c++", "-target", zig_target(TRIPLES[arch]), *CXXFLAGS, "-I", str(include), "-o", partial,
               *(str(SOURCE_DIR / f) for f in PROGRAMS[program]), "-ldl"]
        run_tool(cmd, zig_env(), f"zig c++ of the native {program} for {arch}")
        os.chmod(partial, 0o755)
        os.replace(partial, out)  # whole or not at all: concurrent builds each write their own partial file
        log.info("built %s in %.1f s", out, time.perf_counter() - start)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    _prune(out.parent, f"{program}-{arch}-")
    return out


KEEP_BUILDS = 3  # per program and arch: other checkouts (another version's sources) may still use theirs


def _prune(directory: Path, prefix: str) -> None:
    """Remove all but the KEEP_BUILDS newest builds named ``prefix*``: each source change built a new one."""
    builds = sorted((p for p in directory.glob(f"{prefix}*") if p.is_file()), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for old in builds[KEEP_BUILDS:]:
        try:
            old.unlink()
        except OSError:
            pass  # another process pruned it first


def toolchain(arch: str) -> str:
    """What a bundle's manifest says built its runner."""
    return f"zig {metadata.version('ziglang')} c++ -target {zig_target(TRIPLES[arch])}, tvm-ffi headers of " \
           f"apache-tvm-ffi {metadata.version('apache-tvm-ffi')}"


def bundle_files(arch: str) -> dict[str, Path]:
    """What ``package`` adds to a bundle for ``arch``, by name in the bundle: the runner and its sources."""
    return {"runner": build("runner", arch), **{p.name: p for p in sources()}}


def python_only_builtins(library: Path) -> list[str]:
    """The Python-only builtins (PYTHON_ONLY_BUILTINS) the compiled ``library`` calls: none, for it to run natively."""
    data = Path(library).read_bytes()
    return [name for name in PYTHON_ONLY_BUILTINS if name.encode() in data]

