"""The native runner and the C++ API (pipeline/native/): built with the pinned zig for x86_64 and aarch64, run on
real bundles natively and under qemu-user with nothing in their environment but PATH and TVM_LIBRARY_PATH, refusing
what run.py refuses with the same exit codes."""
import ctypes.util
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import linker_available, reissue, run_cli
from pipeline import runtime
from pipeline.bundle import BundleError, make_bundle
from pipeline.emulation import EmulatorUnavailable, find_emulator
from pipeline.toolchain import elf, native_runner

NATIVE_FILES = {"runner", *(p.name for p in native_runner.sources())}


@pytest.fixture(scope="module")
def x86(compiled):
    return compiled("test_mixer", "x86")[0]


@pytest.fixture(scope="module")
def board(x86, tmp_path_factory):
    """The x86 bundle, extracted with tar as on a board (tar keeps the runner executable)."""
    return unpack(make_bundle(x86, tmp_path_factory.mktemp("bundle") / "mixer.tar"))


def unpack(bundle: Path) -> Path:
    subprocess.run(["tar", "xf", bundle.name], cwd=bundle.parent, check=True)
    return bundle.parent / bundle.name.removesuffix(".tar")


def copy_of(directory: Path, dest: Path) -> Path:
    return Path(shutil.copytree(directory, dest))


def native(executable: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A native program as a board without Python runs it: nothing in its environment but the TVM runtime's
    directories (and what ``env`` adds)."""
    base = {"PATH": "/usr/bin:/bin", "TVM_LIBRARY_PATH": native_runner.host_library_path()}
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})})


def needed(executable: Path) -> set[str]:
    """The shared libraries an ELF file names as NEEDED (DT_NEEDED entries of .dynamic, names in .dynstr)."""
    data = executable.read_bytes()
    sections = elf.sections_by_name(data)
    dynamic, names = sections[".dynamic"], sections[".dynstr"]
    entries = [data[dynamic.offset + i: dynamic.offset + i + 16] for i in range(0, dynamic.size, 16)]
    return {elf.cstr(data, names.offset + int.from_bytes(e[8:], "little"))
            for e in entries if int.from_bytes(e[:8], "little") == 1}


def run_py(capsys, directory: Path, *args: str) -> tuple[int, str, str]:
    """run.py's main on ``directory`` in this process (test_deploy runs it in an interpreter of its own): its exit
    status, stdout and stderr."""
    capsys.readouterr()
    code = runtime.main([str(directory), *args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- package

def test_package_adds_the_runner_and_its_sources_listed_in_the_bundles_manifest(x86, board, tmp_path):
    artifact_manifest = (x86 / "manifest.json").read_bytes()
    assert {p.name for p in board.iterdir()} == {"manifest.json", "manifest.sha256", "run.py", *runtime.RUN_FILES,
                                                 *NATIVE_FILES}
    manifest = json.loads((board / "manifest.json").read_text())
    assert manifest["bundle"]["files"] == {name: runtime.sha256_file(board / name) for name in NATIVE_FILES}
    assert manifest["bundle"]["runner"]["arch"] == "x86_64" and "zig" in manifest["bundle"]["runner"]["built_with"]
    # the same build: the build_id leaves "bundle" out; Python's checks accept the renewed seal
    assert manifest["build_id"] == json.loads(artifact_manifest)["build_id"]
    assert runtime.read_manifest(board) == manifest
    runtime.verify_files(board, manifest)
    assert (x86 / "manifest.json").read_bytes() == artifact_manifest  # the artifact itself is left as it was
    assert runtime.elf_arch(board / "runner") == "x86_64" and os.access(board / "runner", os.X_OK)
    # glibc only: no libstdc++ (zig's libc++ is linked in), no TVM (opened at run time), no Python
    assert needed(board / "runner") <= {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0",
                                        "ld-linux-x86-64.so.2"}

    with tarfile.open(make_bundle(x86, tmp_path / "plain.tar", native=False)) as tar:
        assert not {Path(n).name for n in tar.getnames()} & NATIVE_FILES
        assert tar.extractfile("plain/manifest.json").read() == artifact_manifest


# ---------------------------------------------------------------- the x86 runner, natively

def test_x86_runner_checks_runs_compares_and_times_like_run_py(board, capsys):
    result = native(board / "runner", "--repeat", "5", "--warmup", "1")  # no directory: its own
    assert result.returncode == 0, result.stderr
    code, out, err = run_py(capsys, board, "--repeat", "5", "--warmup", "1")
    assert code == 0, err
    lines, python_lines = result.stdout.splitlines(), out.splitlines()
    # the same check line for line (header, every output's numbers), then its own latency
    assert lines[:2] == python_lines[:2] and len(lines) == 3
    assert lines[0].startswith("test_mixer for x86 (build ") and "files match the manifest, not signed" in lines[0]
    assert lines[1].startswith("logits: max_abs") and lines[1].endswith(" ok")
    assert lines[2].startswith("latency: median ") and "over 5 runs after 1 warm-up, on cpu" in lines[2]
    assert f"{os.cpu_count()} CPU thread(s)" in lines[2]  # the cores it was compiled for, as run.py
    assert "1 CPU thread(s)" in native(board / "runner", str(board), "--repeat", "1",
                                       env={"TVM_NUM_THREADS": "1"}).stdout


def test_runner_help_and_usage_errors(board):
    result = native(board / "runner", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: runner [BUNDLE_DIR]")
    assert "Exit status: 0 ok, 1 this machine cannot run it, 2 bad or tampered bundle" in result.stdout
    assert "TVM_LIBRARY_PATH" in result.stdout and "--public-key" in result.stdout
    for args in (["--repeat", "0"], ["--warmup"], ["--bogus"], [str(board), str(board)]):
        result = native(board / "runner", *args)
        assert result.returncode == 2 and "usage: runner" in result.stderr and "runner: error:" in result.stderr


# ---------------------------------------------------------------- refusals: the same exit codes as run.py

def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


TAMPERING = {
    "library": (lambda d: flip_a_bit(d / "lib.so"), "lib.so does not match its sha256 in the manifest"),
    "manifest": (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace(
        '"atol": 1e-05', '"atol": 1.0')), "manifest.json was modified after the build (it does not match "
                                          "manifest.sha256)"),
    "source": (lambda d: (d / "runner.cc").write_text((d / "runner.cc").read_text() + "//\n"),
               "runner.cc does not match its sha256 in the manifest"),
    "missing": (lambda d: (d / "params.npz").unlink(), "params.npz is missing"),
    "unlisted": (lambda d: (d / "notes.txt").write_text("extra"), "notes.txt is not listed in the manifest"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_bundle_exits_2_with_one_line(board, tmp_path, capsys, case):
    tamper, message = TAMPERING[case]
    copy = copy_of(board, tmp_path / "b")
    tamper(copy)
    result = native(board / "runner", str(copy))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert run_py(capsys, copy)[0] == 2  # run.py refuses it the same way


def test_outputs_that_differ_exit_3(board, tmp_path, capsys):
    copy = copy_of(board, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tolerance"] = {"atol": 1e-12, "rtol": 0.0}  # below float32 rounding: the check must fail
    reissue(copy, manifest)
    result = native(board / "runner", str(copy))
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: outputs differ from the reference: logits: max_abs")
    assert "FAILED" in result.stderr
    assert run_py(capsys, copy)[0] == 3


def test_wrong_architecture_and_a_missing_runtime_library_exit_1(board, compiled, tmp_path):
    if not linker_available():
        pytest.skip("no aarch64 linker: run scripts/setup_aarch64_runtime.sh (installs ziglang)")
    aarch64 = compiled("test_mixer", "aarch64")[0]
    result = native(board / "runner", str(aarch64))
    assert result.returncode == 1
    assert f"{aarch64}/lib.so is an aarch64 library and this machine is x86_64" in result.stderr

    assert ctypes.util.find_library("tvm_ffi") is None  # so the loader's own search cannot find it either
    result = native(board / "runner", env={"TVM_LIBRARY_PATH": str(tmp_path)})
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "error: cannot load the TVM runtime (" in result.stderr and "libtvm_ffi.so: cannot open" in result.stderr
    assert "TVM_LIBRARY_PATH" in result.stderr
    ffi_only = native_runner.host_library_path().split(os.pathsep)[1]  # tvm_ffi/lib: no libtvm_runtime.so there
    result = native(board / "runner", env={"TVM_LIBRARY_PATH": ffi_only})
    assert result.returncode == 1 and "libtvm_runtime.so: cannot open" in result.stderr


def test_signatures_are_checked_with_the_machines_libcrypto(x86, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {}
    for name in ("owner", "other"):
        private = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        keys[name] = tmp_path / f"{name}.pub.pem"
        keys[name].write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    signed = unpack(make_bundle(x86, tmp_path / "signed.tar", sign_key=tmp_path / "owner.pem"))
    result = native(signed / "runner", "--public-key", str(keys["owner"]), "--repeat", "1")
    assert result.returncode == 0, result.stderr
    assert "signature checked" in result.stdout.splitlines()[0]
    assert run_py(capsys, signed, "--public-key", str(keys["owner"]), "--repeat", "1")[0] == 0  # the final manifest
    assert "signed, signature not checked (no --public-key)" in native(signed / "runner", "--repeat", "1").stdout
    result = native(signed / "runner", "--public-key", str(keys["other"]))
    assert result.returncode == 2 and "manifest.sig is not a signature of its manifest by" in result.stderr
    unsigned = unpack(make_bundle(x86, tmp_path / "unsigned.tar"))
    result = native(unsigned / "runner", "--public-key", str(keys["owner"]))
    assert result.returncode == 2 and "is not signed (no manifest.sig) but a public key was given" in result.stderr


# ---------------------------------------------------------------- the aarch64 runner, under qemu-user

def test_aarch64_runner_under_qemu_against_the_aarch64_tvm_runtime(compiled, tmp_path):
    if not linker_available():
        pytest.skip("no aarch64 linker: run scripts/setup_aarch64_runtime.sh (installs ziglang)")
    try:
        emu = find_emulator()
    except EmulatorUnavailable as e:
        pytest.skip(f"aarch64 emulator not set up: {e}")
    arm = unpack(make_bundle(compiled("test_mixer", "aarch64")[0], tmp_path / "arm.tar"))
    assert runtime.elf_arch(arm / "runner") == "aarch64"
    assert needed(arm / "runner") <= {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0",
                                      "ld-linux-aarch64.so.1"}
    # What docs/deploy.md says to copy onto an image: the two runtime libraries of the wheels, in one directory.
    libs = tmp_path / "opt-tvm-lib"
    libs.mkdir()
    for lib in (emu.site / "tvm" / "lib" / "libtvm_runtime.so", emu.site / "tvm_ffi" / "lib" / "libtvm_ffi.so"):
        shutil.copy(lib, libs)
    result = subprocess.run(emu.program(arm / "runner", "--repeat", "3", "--warmup", "1"), capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "TVM_LIBRARY_PATH": str(libs)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("test_mixer for aarch64 (build ") and lines[1].endswith(" ok")
    assert "over 3 runs after 1 warm-up, on cpu" in lines[2]


# ---------------------------------------------------------------- the C++ API

def test_cpp_api_example_outputs_equal_run_pys(board, tmp_path):
    example = native_runner.build("example", "x86_64")
    manifest = json.loads((board / "manifest.json").read_text())
    [spec] = manifest["inputs"]
    x = np.random.default_rng(7).standard_normal(spec["shape"]).astype(spec["dtype"])  # not the reference input
    x.tofile(tmp_path / "input.bin")
    result = native(example, str(board), str(tmp_path / "input.bin"), str(tmp_path / "logits.bin"))
    assert result.returncode == 0, result.stderr
    assert "test_mixer x86: logits of 40 bytes" in result.stdout and "#1: index" in result.stdout
    params, _, _ = runtime.load_arrays(board, manifest)
    expected = runtime.run_library(board / "lib.so", "cpu", params, {spec["name"]: x}, ("logits",), manifest)["logits"]
    assert np.array_equal(np.fromfile(tmp_path / "logits.bin", np.float32).reshape(expected.shape), expected)

    (tmp_path / "short.bin").write_bytes(b"1234")
    result = native(example, str(board), str(tmp_path / "short.bin"))
    assert result.returncode == 2 and "input input takes 12288 bytes, not 4" in result.stderr


def test_cmakelists_rebuilds_the_runner_from_the_bundles_sources(board, tmp_path):
    if not (shutil.which("cmake") and shutil.which("c++")):
        pytest.skip("cmake or a C++ compiler is missing")
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(board), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug",  # fast
                                f"-DTVM_FFI_INCLUDE_DIR={native_runner.tvm_ffi_include()}"],
                               capture_output=True, text=True, timeout=120)
    assert configure.returncode == 0, configure.stderr
    made = subprocess.run(["cmake", "--build", str(build), "--target", "runner", "--parallel", "2"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    result = native(build / "runner", str(board), "--repeat", "1")
    assert result.returncode == 0 and result.stdout.splitlines()[1].endswith(" ok"), result.stderr


# ---------------------------------------------------------------- builtins only TVM's Python has

def test_the_python_only_builtins_are_those_tvms_python_registers_and_its_runtime_lacks():
    import tvm

    package = Path(tvm.__file__).parent
    registered = {line.split('"')[1] for path in package.rglob("*.py") for line in path.read_text(encoding="utf-8").splitlines()
                  if 'register_global_func("relax.run.' in line}
    assert registered == set(native_runner.PYTHON_ONLY_BUILTINS)
    assert native_runner.python_only_builtins(package / "lib" / "libtvm_runtime.so") == []


def test_a_library_that_calls_one_is_refused_by_package_unless_no_native(x86, tmp_path):
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Unique:
        @R.function
        def main(x: R.Tensor((8,), "float32")):
            return R.unique(x, sorted=True, return_index=False, return_inverse=False, return_counts=False, axis=None)

    art = copy_of(x86, tmp_path / "art")
    tvm.compile(Unique, "llvm").export_library(str(art / "lib.so"))
    assert native_runner.python_only_builtins(art / "lib.so") == ["relax.run.unique"]
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["lib.so"] = runtime.sha256_file(art / "lib.so")
    reissue(art, manifest)
    with pytest.raises(BundleError, match="calls relax.run.unique, which only TVM's Python package provides"):
        make_bundle(art, tmp_path / "b.tar")
    result = run_cli("package", str(art), "--out", str(tmp_path / "b.tar"))
    assert result.returncode == 2 and "package with --no-native" in result.stderr
    with tarfile.open(make_bundle(art, tmp_path / "b.tar", native=False)) as tar:
        assert "b/run.py" in tar.getnames() and "b/runner" not in tar.getnames()


def test_a_cuda_bundle_on_a_machine_without_cuda_exits_1(compiled):
    import tvm

    if tvm.runtime.enabled("cuda") and tvm.cuda().exist:
        pytest.skip("this host has a CUDA GPU: the runner could run it")
    from pipeline.toolchain.cuda_toolchains import find_in_nvidia

    if find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.12") is None:
        pytest.skip("NVRTC 12 missing: cannot build a CUDA artifact here")
    result = native(native_runner.build("runner", "x86_64"), str(compiled("test_mixer", "cuda")[0]))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "has no cuda support (" in result.stderr and "libtvm_runtime_cuda.so" in result.stderr
    assert "scripts/build_tvm_runtime_on_jetson.sh" in result.stderr


def test_old_runner_builds_are_pruned(tmp_path):
    """Every source change builds a new runner; the cache keeps the newest KEEP_BUILDS of each program and arch."""
    for i in range(6):
        (tmp_path / f"runner-x86_64-{i:016x}").write_bytes(b"")
        os.utime(tmp_path / f"runner-x86_64-{i:016x}", (1000 + i, 1000 + i))
    (tmp_path / "runner-aarch64-0").write_bytes(b"")  # another arch: not this build's to prune
    native_runner._prune(tmp_path, "runner-x86_64-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runner-aarch64-0"] + [
        f"runner-x86_64-{i:016x}" for i in range(6 - native_runner.KEEP_BUILDS, 6)]
