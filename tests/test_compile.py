"""End-to-end compiles: real export, onnxsim, TVM build, and runs on this host."""
import json

import numpy as np
import pytest

from conftest import DEFAULT_FULL_SIZE, FULL_SIZE_MODELS, HOST_TARGETS, TEST_MODELS
from pipeline.spec import sha256_file

EXPECTED_FILES = {"model.onnx", "model.sim.onnx", "lib.so", "params.npz", "inputs.npz", "outputs.npz"}


def check_artifact(out, manifest):
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest, name
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["verify"]["passed"]
    runtimes = {c["name"].split("/")[0] for c in manifest["verify"]["outputs"]}
    assert runtimes == {"tvm", "onnxruntime"}
    # nothing but the artifact was left beside it
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("model", TEST_MODELS)
def test_compile_test_variants(compiled, model, target):
    out, manifest = compiled(model, target)
    check_artifact(out, manifest)
    assert manifest["model"]["name"] == model and manifest["target"]["name"] == target
    assert manifest["params"] == list(np.load(out / "params.npz").files)


def test_compile_one_full_size_model(compiled):
    check_artifact(*compiled(DEFAULT_FULL_SIZE))


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(set(FULL_SIZE_MODELS) - {DEFAULT_FULL_SIZE}))
def test_compile_full_size(compiled, model):
    check_artifact(*compiled(model))


def test_every_registered_model_and_target_is_compiled_by_a_test():
    import models
    import targets

    assert set(TEST_MODELS) | set(FULL_SIZE_MODELS) == set(models.list_models())
    assert {t.name for t in targets.list_targets()} <= set(HOST_TARGETS)
