"""Where the pipeline keeps what outlives a command: one rule for every cache directory.

Everything lives under ``$PIPELINE_CACHE_DIR`` (default ``~/.cache/pipeline``). Two directories that
scripts/setup_aarch64_runtime.sh prepares once per machine can be moved on their own, so a test run that
isolates the rest still finds them: ``PIPELINE_AARCH64_ROOT`` and ``PIPELINE_ZIG_CACHE_DIR``.
Only the standard library is imported here.
"""
from __future__ import annotations

import os
from pathlib import Path

SETUP_SCRIPT = "scripts/setup_aarch64_runtime.sh"  # prepares aarch64_root() and warms zig_cache_dir()
CACHE_ENV = "PIPELINE_CACHE_DIR"
AARCH64_ENV = "PIPELINE_AARCH64_ROOT"
ZIG_ENV = "PIPELINE_ZIG_CACHE_DIR"
SHIPPED_ENV = "PIPELINE_SHIPPED_RECORDS"  # another directory of shipped records (the tests point it at their own)


def cache_root() -> Path:
    """``$PIPELINE_CACHE_DIR``, else ``~/.cache/pipeline``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pipeline").expanduser()


def _own_or_cache(env: str, name: str) -> Path:
    return Path(os.environ[env]).expanduser() if os.environ.get(env) else cache_root() / name


def tuning_dir() -> Path:
    """Tuning databases, one directory per target (pipeline.tuning.database)."""
    return cache_root() / "tuning"


def shipped_records_dir() -> Path:
    """The tuning records this repository ships, one directory per target class (pipeline.tuning.apply);
    not a cache: kept in the repository, read-only."""
    default = Path(__file__).resolve().parent.parent / "tvm_schedules" / "records"
    return Path(os.environ[SHIPPED_ENV]).expanduser() if os.environ.get(SHIPPED_ENV) else default


def cuda_stub_dir() -> Path:
    """The libcuda.so.1 stub that lets TVM's CUDA codegen run without a driver (pipeline.toolchain.cuda_runtime)."""
    return cache_root() / "cuda-stub"


def zig_cache_dir() -> Path:
    """zig's global cache (libc stubs, compiler-rt): built once, on the first cross link (pipeline.toolchain.cross_link)."""
    return _own_or_cache(ZIG_ENV, "zig")


def native_dir() -> Path:
    """The native runner and the C++ API's example, one executable per CPU and source (pipeline.toolchain.native_runner)."""
    return cache_root() / "native"


def aarch64_root() -> Path:
    """The aarch64 userland and TVM runtime that run libraries under qemu-user (pipeline.emulation)."""
    return _own_or_cache(AARCH64_ENV, "aarch64")


def portable(path: Path | str) -> str:
    """``path`` as a manifest that ships to boards may say it: relative to the cache root, no machine's home."""
    path = Path(path)
    try:
        return f"${CACHE_ENV}/{path.resolve().relative_to(cache_root().resolve())}"
    except ValueError:
        return path.name
