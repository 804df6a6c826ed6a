"""What an artifact claims: per check what ran where, a library called verified only when it ran; a build_id
that names what was built, not what was checked; a manifest that cannot be edited unnoticed; signed bundles."""
import json
import shutil
import tarfile

import pytest

from conftest import emulator_available, run_cli
from pipeline import runtime
from pipeline.bundle import BundleError, make_bundle
from pipeline.run import compile_model
from pipeline.spec import BuildSpec


def test_a_library_that_cannot_run_here_is_not_called_verified(tmp_path):
    # An --fp16 CUDA build on a machine without a GPU: what ran is ONNX Runtime on the float32 graph and the
    # host twin, held to the float16 tolerance; the library itself is not verified, and the console says so.
    result = run_cli("compile", "--model", "test_mixer", "--target", "cuda", "--fp16", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    verify = json.loads((tmp_path / "a" / "manifest.json").read_text())["verify"]
    assert verify["passed"] and not verify["library_verified"]
    assert verify["compiled_library"].startswith("not run here: no cuda device")
    assert set(verify["checks"]) == {"onnxruntime", "tvm-host"} and "float32 graph" in verify["checks"]["onnxruntime"]
    assert "float16" in verify["checks"]["tvm-host"] and "not the target's schedules" in verify["checks"]["tvm-host"]
    [twin] = [c for c in verify["outputs"] if c["name"].startswith("tvm-host/")]
    assert twin["atol"] == 1e-2 and twin["passed"] and twin["max_abs"] > 1e-6  # really float16, at its tolerance
    assert "library NOT verified" in result.stderr and "✓ library verified" not in result.stderr


def test_a_library_that_ran_is_verified(compiled):
    _, manifest = compiled("test_mixer")
    assert manifest["verify"]["library_verified"] and manifest["verify"]["checks"]["tvm"].endswith("ran on this host")


def test_build_id_names_what_was_built_not_what_was_checked(tmp_path, monkeypatch):
    """The same build, once verified under qemu and once (no emulator) through its host twin: one build_id."""
    if not emulator_available():
        pytest.skip("needs the aarch64 emulator of scripts/setup_aarch64_runtime.sh")
    spec = BuildSpec(model="test_gmlp", target="rpi4")
    _, emulated = compile_model(spec, tmp_path / "emulated")
    monkeypatch.setenv("PIPELINE_AARCH64_ROOT", str(tmp_path / "no-emulator"))
    _, twinned = compile_model(spec, tmp_path / "twinned")
    assert emulated["verify"]["checks"].keys() != twinned["verify"]["checks"].keys()
    assert emulated["build_id"] == twinned["build_id"] == runtime.build_id(twinned)
    assert emulated["files"] == twinned["files"]  # byte-identical files: the build is reproducible


def test_the_manifest_says_which_pipeline_built_it_and_no_build_host_path(compiled):
    _, manifest = compiled("test_mixer", "cuda")
    assert manifest["pipeline"]["version"] and manifest["pipeline"]["commit"]  # this checkout is a git repository
    assert manifest["created_at"] and manifest["tuning"]["database"].startswith("$PIPELINE_CACHE_DIR/tuning/")
    cuda = manifest["target"]["build"]["cuda"]
    assert "JetPack" not in cuda["min_driver"] and cuda["jetpack"] is None  # the generic target is no Jetson


@pytest.fixture()
def artifact(compiled, tmp_path):
    return shutil.copytree(compiled("test_mixer")[0], tmp_path / "art")


def test_an_edited_manifest_is_refused(artifact, capsys):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["tolerance"]["atol"] = 1.0  # loosened after the build
    (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert runtime.main([str(artifact)]) == 2
    assert "was modified after the build" in capsys.readouterr().err
    # resealing the file alone does not do: the build_id no longer matches what the manifest says was built
    runtime.write_manifest(artifact, manifest)
    with pytest.raises(BundleError, match="was modified after the build"):
        make_bundle(artifact)
    (artifact / runtime.MANIFEST_SEAL).unlink()
    with pytest.raises(BundleError, match="no manifest.sha256"):
        runtime.read_manifest(artifact)


def _keys(tmp_path, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_signed_bundles(artifact, tmp_path, capsys):
    private, public = _keys(tmp_path, "owner")
    _, stranger = _keys(tmp_path, "stranger")
    result = run_cli("package", str(artifact), "--out", str(tmp_path / "signed.tar"), "--sign", str(private))
    assert result.returncode == 0, result.stderr
    signed, unsigned = tmp_path / "signed.tar", make_bundle(artifact, tmp_path / "unsigned.tar")
    assert runtime.main([str(signed), "--repeat", "1", "--public-key", str(public)]) == 0
    assert "signature checked" in capsys.readouterr().out
    assert runtime.main([str(signed), "--repeat", "1"]) == 0
    assert "signed, signature not checked" in capsys.readouterr().out
    assert runtime.main([str(signed), "--public-key", str(stranger)]) == 2
    assert "is not a signature of its manifest" in capsys.readouterr().err
    assert runtime.main([str(unsigned), "--public-key", str(public)]) == 2
    assert "is not signed" in capsys.readouterr().err

    # A re-issued manifest (build_id and seal renewed: it would pass without a key) no longer matches the signature.
    board = tmp_path / "board"
    with tarfile.open(signed) as tar:
        tar.extractall(board, filter="data")
    manifest = json.loads((board / "signed" / "manifest.json").read_text())
    manifest["tolerance"]["atol"] = 1.0
    manifest["build_id"] = runtime.build_id(manifest)
    runtime.write_manifest(board / "signed", manifest)
    assert runtime.main([str(board / "signed"), "--repeat", "1"]) == 0
    capsys.readouterr()
    assert runtime.main([str(board / "signed"), "--public-key", str(public)]) == 2
    assert "is not a signature of its manifest" in capsys.readouterr().err
