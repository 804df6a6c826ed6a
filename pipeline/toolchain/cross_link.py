"""Link TVM-exported objects into a shared library for another architecture (aarch64 first).

``ex.export_library(path, fcompile=cross_linker("aarch64-linux-gnu"))`` writes an aarch64 ``.so`` on this x86 host.

Linkers, in order of preference:

1. ``zig cc`` from the PyPI package ``ziglang`` (``pip install ziglang`` is the whole set-up; it
   carries its own clang/lld and glibc stubs). Its global cache is kept in one stable place,
   ``pipeline.paths.zig_cache_dir()``, because the first link for a target builds zig's libc
   stubs and compiler-rt (about a minute); every later link on the machine is fast.
   ``scripts/setup_aarch64_runtime.sh`` installs ziglang and warms that cache
   (``python -m pipeline.toolchain.cross_link --warm-up``).
2. Debian's cross g++ (``apt-get install g++-aarch64-linux-gnu``), when zig is missing.

Neither present: :class:`CrossLinkError` saying what to install.

Only the standard library is imported here (no TVM), so the warm-up and the checks are cheap.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import paths
from ..errors import PipelineError
from . import elf

log = logging.getLogger(__name__)

# glibc the zig-linked library asks for: the manylinux_2_28 baseline of the aarch64 TVM wheel,
# so the library loads wherever that wheel does (Debian 11+, Ubuntu 20.04+ / JetPack 5+).
DEFAULT_GLIBC = "2.28"
LINK_TIMEOUT_S = 900  # a cold zig cache on a busy 2-core host takes one to a few minutes

_CXX_SUFFIXES = (".cc", ".cpp", ".cxx", ".cu")


class CrossLinkError(PipelineError):
    """No cross linker for the requested target, or the link itself failed."""


def zig_command() -> list[str] | None:
    """The ``zig`` of the installed ``ziglang`` package (its binary directly: no Python start-up), or None."""
    try:
        spec = importlib.util.find_spec("ziglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "zig"
    return [str(binary)] if binary.is_file() and os.access(binary, os.X_OK) else [sys.executable, "-m", "ziglang"]


def zig_env() -> dict[str, str]:
    """The environment to run zig in: this process's, with zig's caches in their one stable place."""
    cache = str(paths.zig_cache_dir())
    return {**os.environ, "ZIG_GLOBAL_CACHE_DIR": cache, "ZIG_LOCAL_CACHE_DIR": cache}


def _debian_cross_cc(triple: str) -> str | None:
    return shutil.which(f"{triple}-g++") or shutil.which(f"{triple}-gcc")


def zig_target(triple: str, glibc: str | None = DEFAULT_GLIBC) -> str:
    """zig's -target for an LLVM triple: aarch64-linux-gnu -> aarch64-linux-gnu.2.28 (glibc pinned)."""
    arch, _, rest = triple.partition("-")
    os_abi = rest.removeprefix("unknown-")  # aarch64-unknown-linux-gnu -> linux-gnu
    target = f"{arch}-{os_abi}"
    return f"{target}.{glibc}" if glibc and os_abi.startswith("linux-gnu") else target


def _debian_package(triple: str) -> str:
    return f"g++-{triple.replace('_', '-')}"


def run_tool(cmd: list[str], env: dict[str, str] | None, what: str) -> None:
    """Run a compiler or linker; CrossLinkError with the end of its output when it fails or times out."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LINK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise CrossLinkError(f"{what} timed out after {LINK_TIMEOUT_S} s: {' '.join(cmd)}") from e
    except OSError as e:
        raise CrossLinkError(f"{what} could not start ({e}): {' '.join(cmd)}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise CrossLinkError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def cross_linker(triple: str = "aarch64-linux-gnu", prefer: str | None = None,
                 glibc: str | None = DEFAULT_GLIBC) -> Callable[..., None]:
    """An ``fcompile`` for ``export_library`` that links shared objects for ``triple``.

    ``prefer``: ``"zig"`` or ``"gcc"`` to demand one linker (error if it is missing); default: zig,
    else Debian's ``{triple}-g++``. ``glibc``: the glibc version zig links against (ignored by g++).
    The returned callable has ``output_format = "so"``, ``get_target_triple()`` and ``linker``
    (a description such as ``"zig (aarch64-linux-gnu.2.28)"``).
    """
    if prefer not in (None, "zig", "gcc"):
        raise ValueError(f"prefer must be None, 'zig' or 'gcc', not {prefer!r}")
    zig = zig_command() if prefer in (None, "zig") else None
    gcc = _debian_cross_cc(triple) if prefer in (None, "gcc") and zig is None else None
    if zig is None and gcc is None:
        wanted = {"zig": "`pip install ziglang`", "gcc": f"`apt-get install {_debian_package(triple)}`"}
        options = " or ".join(v for k, v in wanted.items() if prefer in (None, k))
        raise CrossLinkError(f"no linker for {triple}: {options} (or run {paths.SETUP_SCRIPT}, which installs ziglang)")

    if zig is not None:
        target = zig_target(triple, glibc)
        cache = paths.zig_cache_dir()

        def fcompile(output: str, objects: Sequence[str], options: Sequence[str] | None = None, **_ignored) -> None:
            cache.mkdir(parents=True, exist_ok=True)
            cold = not any(cache.iterdir())
            if cold:
                log.info("zig's cache %s is empty: the first %s link builds its libc stubs (about a minute)",
                         cache, target)
            mode = "c++" if any(str(o).endswith(_CXX_SUFFIXES) for o in objects) else "cc"
            cmd = [*zig, mode, "-target", target, "-shared", "-fPIC", "-o", str(output),
                   *map(str, objects), *(options or ()), "-lm"]
            start = time.perf_counter()
            run_tool(cmd, zig_env(), f"zig link for {target}")
            log.info("zig linked %s in %.2f s%s", output, time.perf_counter() - start, " (cold cache)" if cold else "")

        fcompile.linker = f"zig ({target})"
    else:
        def fcompile(output: str, objects: Sequence[str], options: Sequence[str] | None = None, **_ignored) -> None:
            run_tool([gcc, "-shared", "-fPIC", "-o", str(output), *map(str, objects), *(options or ())],
                     None, f"{gcc} link")

        fcompile.linker = gcc

    fcompile.output_format = "so"
    fcompile.get_target_triple = lambda: triple
    fcompile.__name__ = f"cross_link_{triple.replace('-', '_')}"
    return fcompile


def warm_up(triple: str = "aarch64-linux-gnu") -> tuple[str, float]:
    """Link a one-function library so zig builds and caches its libc stubs now; returns (linker, seconds)."""
    fcompile = cross_linker(triple)
    with tempfile.TemporaryDirectory(prefix="pipeline-link-") as tmp:
        src = Path(tmp) / "warm.c"
        src.write_text("#include <math.h>\nfloat pipeline_warm_up(float x) { return expf(x); }\n")
        out = Path(tmp) / "libwarm.so"
        start = time.perf_counter()
        fcompile(str(out), [str(src)])
        seconds = time.perf_counter() - start
        if triple.startswith("aarch64") and elf.machine(out) != elf.EM_AARCH64:
            raise CrossLinkError(f"{fcompile.linker} produced e_machine {elf.machine(out)}, not aarch64")
    return fcompile.linker, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.toolchain.cross_link", description=__doc__.splitlines()[0])
    parser.add_argument("--warm-up", action="store_true", help="link a tiny library to fill zig's cache")
    parser.add_argument("--triple", default="aarch64-linux-gnu")
    args = parser.parse_args(argv)
    try:
        if args.warm_up:
            linker, seconds = warm_up(args.triple)
            extra = f", cache {paths.zig_cache_dir()}" if linker.startswith("zig") else ""
            print(f"linked a {args.triple} library with {linker} in {seconds:.1f} s{extra}")
        else:
            print(cross_linker(args.triple).linker)
    except CrossLinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
