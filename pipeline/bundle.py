"""Bundles: one file that carries an artifact to a board.

A bundle is a tar (gzip-compressed when its name ends in .tar.gz or .tgz) holding one directory:
manifest.json, lib.so, params.npz, inputs.npz, outputs.npz and run.py, which is pipeline/runtime.py
itself (stdlib + numpy + the TVM runtime); and, unless left out, ``runner``, the same check as a native executable
for the library's CPU (no Python), with its C++ sources and CMakeLists.txt (pipeline.toolchain.native_runner).
On the board::

    tar xf cyclemlp_b1-jetson-orin-nano.tar && python3 cyclemlp_b1-jetson-orin-nano/run.py
    tar xf cyclemlp_b1-jetson-orin-nano.tar && cyclemlp_b1-jetson-orin-nano/runner

The files package adds are listed in the bundle's manifest under "bundle" (outside the build_id: they are not what
was built), so the bundle checks them like the rest; the artifact's own manifest is left as it is.

Extraction and the hash check are pipeline.runtime's, the code the board runs, so the host and the
board apply the same rules, and raise the same BundleError.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import runtime
from .runtime import BadInput, BundleError, extract_bundle
from .toolchain import native_runner

SUFFIXES = (".tar", ".tar.gz", ".tgz")


def stem(path: Path) -> str:
    """The name of a bundle file without its suffix (an artifact directory's name as is)."""
    return next((path.name[:-len(s)] for s in SUFFIXES if path.name.endswith(s)), path.name)


def verify_artifact(directory: Path, public_key: Path | None = None) -> dict:
    """The manifest of the artifact in ``directory``, once it is intact (and, with ``public_key``, signed by its
    owner) and every file matches its sha256 there."""
    manifest = runtime.read_manifest(directory, public_key)
    runtime.verify_files(directory, manifest)
    return manifest


def sign(manifest: bytes, private_key: Path) -> bytes:
    """An Ed25519 signature of ``manifest`` with the PEM private key at ``private_key`` (openssl genpkey
    -algorithm ed25519 makes one): what a board's run.py or deploy checks with the public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(f"cannot read the signing key {private_key} ({e}); give an unencrypted Ed25519 private key "
                       "in PEM (openssl genpkey -algorithm ed25519 -out key.pem)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{private_key} is not an Ed25519 private key (openssl genpkey -algorithm ed25519)")
    return key.sign(manifest)


@contextlib.contextmanager
def open_artifact(path: Path, public_key: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """(directory, manifest) of an artifact directory or a bundle file, the manifest and every file checked first.

    A bundle is extracted into a temporary directory that is removed on exit.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as tmp:
        directory = path if path.is_dir() else extract_bundle(path, Path(tmp))
        yield directory, verify_artifact(directory, public_key)


def native_files(directory: Path) -> tuple[dict[str, Path], dict]:
    """The native runner's files for the library in ``directory`` (name in the bundle -> file) and the manifest's
    "bundle" entry that lists them; BundleError when the library cannot run natively."""
    library = directory / runtime.LIBRARY
    arch = runtime.elf_arch(library)
    if arch not in native_runner.TRIPLES:
        raise BundleError(f"{library} is {arch or 'not an ELF library'}: the native runner is built for "
                          f"{', '.join(native_runner.TRIPLES)}; package with --no-native")
    python_only = native_runner.python_only_builtins(library)
    if python_only:
        raise BundleError(f"{library} calls {', '.join(python_only)}, which only TVM's Python package provides: the "
                          "native runner cannot run it; package with --no-native (run.py runs it)")
    files = native_runner.bundle_files(arch)
    entry = {"files": {name: runtime.sha256_file(path) for name, path in files.items()},
             "runner": {"arch": arch, "built_with": native_runner.toolchain(arch)}}
    return files, entry


def make_bundle(artifact_dir: Path, out: Path | None = None, sign_key: Path | None = None,
                native: bool = True) -> Path:
    """Write the bundle of ``artifact_dir`` to ``out`` (default: ARTIFACT_DIR.tar beside it); return its path.

    Inside, one directory named after the file (NAME.tar holds NAME/); with ``native``, the native runner and its
    sources, listed in the bundle's manifest; with ``sign_key`` also manifest.sig, the signature of that manifest
    (which covers every file through their sha256s). A tampered artifact is refused; the file appears only once
    complete.
    """
    directory = Path(artifact_dir).resolve()
    manifest = verify_artifact(directory)
    out = Path(out) if out is not None else directory.with_name(f"{directory.name}.tar")
    if not out.name.endswith(SUFFIXES):
        raise BundleError(f"{out}: a bundle's name must end in {', '.join(SUFFIXES)} (.tar.gz / .tgz: gzip)")
    top = stem(out)  # `tar xf NAME.tar` gives NAME/
    if not runtime.PLAIN_NAME.match(top):
        raise BundleError(f"{out}: use a bundle name of letters, digits and . _ + - (it names the directory inside)")
    extra, entry = native_files(directory) if native else ({}, None)
    bundled = {k: v for k, v in manifest.items() if k != "bundle"} | ({"bundle": entry} if entry else {})
    with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as staging:
        # The bundle's manifest: the artifact's with what package adds, sealed anew (then signed) in a staging
        # copy; the artifact's own stays as it is.
        sealed = directory if bundled == manifest else Path(staging)
        if sealed != directory:
            runtime.write_manifest(sealed, bundled)
        members: list[tuple[Path | bytes, str]] = [
            *((sealed / name, name) for name in (runtime.MANIFEST, runtime.MANIFEST_SEAL)),
            *((directory / name, name) for name in runtime.RUN_FILES),
            (Path(runtime.__file__), runtime.RUNNER), *((path, name) for name, path in extra.items())]
        if sign_key is not None:
            members.append((sign((sealed / runtime.MANIFEST).read_bytes(), sign_key), runtime.SIGNATURE))
        return write_tar(out, top, members)


def write_tar(out: Path, top: str, members: list[tuple[Path | bytes, str]]) -> Path:
    """Write ``members`` (a file or bytes, and its name) into the tar ``out`` (gzip for .gz / .tgz) as the one
    directory ``top``: the layout ``runtime.extract_bundle`` accepts (a bundle's, a batch of tuning candidates').
    The file appears only once complete."""
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
            for member, name in members:
                if isinstance(member, bytes):
                    info = tarfile.TarInfo(f"{top}/{name}")
                    info.size, info.mode, info.mtime = len(member), 0o644, int(time.time())
                    tar.addfile(info, io.BytesIO(member))
                else:
                    tar.add(member, arcname=f"{top}/{name}", recursive=False)
        os.chmod(partial, 0o644)  # mkstemp makes it 0600
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return out
