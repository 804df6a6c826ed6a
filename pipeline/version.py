"""Which pipeline this is: its version and, in a git checkout, the commit (marked -dirty with local changes).
Only the standard library is imported here (`--version` stays fast)."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent


def version() -> str:
    try:
        return metadata.version("pipeline")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@functools.cache
def source_commit() -> str | None:
    """The git commit of this source tree, with "-dirty" when tracked files differ from it; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def describe() -> dict:
    return {"version": version(), "commit": source_commit()}
