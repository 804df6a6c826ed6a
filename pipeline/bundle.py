"""Bundles: one file that carries an artifact to a board.

A bundle is a tar (gzip-compressed when its name ends in .tar.gz or .tgz) holding one directory:
manifest.json, lib.so, params.npz, inputs.npz, outputs.npz and run.py, which is pipeline/runtime.py
itself (stdlib + numpy + the TVM runtime). On the board::

    tar xf cyclemlp_b1-jetson-orin-nano.tar && python3 cyclemlp_b1-jetson-orin-nano/run.py

Extraction and the hash check are pipeline.runtime's, the code the board runs, so the host and the
board apply the same rules, and raise the same BundleError.
"""
from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import runtime
from .runtime import BundleError, extract_bundle

SUFFIXES = (".tar", ".tar.gz", ".tgz")


def stem(path: Path) -> str:
    """The name of a bundle file without its suffix (an artifact directory's name as is)."""
    return next((path.name[:-len(s)] for s in SUFFIXES if path.name.endswith(s)), path.name)


def verify_artifact(directory: Path) -> dict:
    """The manifest of the artifact in ``directory``, once every file matches its sha256 there."""
    manifest = runtime.read_manifest(directory)
    runtime.verify_files(directory, manifest)
    return manifest


@contextlib.contextmanager
def open_artifact(path: Path) -> Iterator[tuple[Path, dict]]:
    """(directory, manifest) of an artifact directory or a bundle file, every file checked first.

    A bundle is extracted into a temporary directory that is removed on exit.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as tmp:
        directory = path if path.is_dir() else extract_bundle(path, Path(tmp))
        yield directory, verify_artifact(directory)


def make_bundle(artifact_dir: Path, out: Path | None = None) -> Path:
    """Write the bundle of ``artifact_dir`` to ``out`` (default: ARTIFACT_DIR.tar beside it); return its path.

    Inside, one directory named after the file (NAME.tar holds NAME/). A tampered artifact is
    refused; the file appears only once complete.
    """
    directory = Path(artifact_dir).resolve()
    verify_artifact(directory)
    out = Path(out) if out is not None else directory.with_name(f"{directory.name}.tar")
    if not out.name.endswith(SUFFIXES):
        raise BundleError(f"{out}: a bundle's name must end in {', '.join(SUFFIXES)} (.tar.gz / .tgz: gzip)")
    top = stem(out)  # `tar xf NAME.tar` gives NAME/
    if not runtime.PLAIN_NAME.match(top):
        raise BundleError(f"{out}: use a bundle name of letters, digits and . _ + - (it names the directory inside)")
    members = [(directory / name, name) for name in (runtime.MANIFEST, *runtime.RUN_FILES)]
    members.append((Path(runtime.__file__), runtime.RUNNER))
    return write_tar(out, top, members)


def write_tar(out: Path, top: str, members: list[tuple[Path, str]]) -> Path:
    """Write ``members`` (file, name) into the tar ``out`` (gzip for .gz / .tgz) as the one directory ``top``: the
    layout ``runtime.extract_bundle`` accepts (a bundle's, a batch of tuning candidates'). The file appears only once
    complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as e:
        raise BundleError(f"cannot write to {out.parent}: {e.strerror}; choose another --out") from None
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz" if out.name.endswith((".gz", ".tgz")) else "w") as tar:
            top_dir = tarfile.TarInfo(top)
            top_dir.type, top_dir.mode, top_dir.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(top_dir)
            for path, name in members:
                tar.add(path, arcname=f"{top}/{name}", recursive=False)
        os.chmod(partial, 0o644)  # mkstemp makes it 0600
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return out
