"""The numerics check must be able to fail, and must say which output failed and by how much."""
import numpy as np
import pytest

from pipeline.errors import DegenerateReference, VerificationFailed
from pipeline.runtime import run_library
from pipeline.stages.model import load_model
from pipeline.stages.reference import OUTPUT_NAMES
from pipeline.stages.verify import check_reference_varies, compare, verify


def load_artifact_arrays(out):
    return ({k: v for k, v in np.load(out / "params.npz").items()}, dict(np.load(out / "inputs.npz")),
            dict(np.load(out / "outputs.npz")))


def test_a_corrupted_weight_fails_verification(compiled):
    out, manifest = compiled("test_mixer")
    params, inputs, reference = load_artifact_arrays(out)
    name = max(manifest["params"], key=lambda k: params[k].size)
    params[name] = params[name] * 1.01  # a 1% error in the biggest weight
    actual = run_library(out / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)
    with pytest.raises(VerificationFailed) as err:
        verify(reference, {"tvm": actual}, {"tvm": (1e-4, 1e-3)})
    [failure] = err.value.failures
    assert failure.name == "tvm/logits" and failure.max_abs > 1e-4
    assert "tvm/logits" in str(err.value) and "max_abs" in str(err.value)


def test_the_untouched_artifact_reproduces_its_reference(compiled):
    out, _ = compiled("test_mixer")
    params, inputs, reference = load_artifact_arrays(out)
    actual = run_library(out / "lib.so", "cpu", params, inputs, OUTPUT_NAMES)
    [check] = verify(reference, {"tvm": actual}, {"tvm": (1e-5, 1e-4)})
    assert check.passed and check.max_abs < 1e-5


def test_every_failing_output_is_listed():
    reference = {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.float32) * np.arange(3)}
    candidates = {"x": {"a": reference["a"] + 1, "b": reference["b"]}, "y": {"a": reference["a"], "b": -reference["b"]}}
    with pytest.raises(VerificationFailed) as err:
        verify(reference, candidates, {"x": (1e-3, 1e-3), "y": (1e-3, 1e-3)})
    assert [f.name for f in err.value.failures] == ["x/a", "y/b"]
    assert err.value.failures[0].max_abs == pytest.approx(1.0)


def test_shape_mismatch_and_nan_fail():
    expected = np.zeros((2, 3), np.float32) + np.arange(3)
    assert not compare("o", np.zeros((3, 2), np.float32), expected, 1e-3, 1e-3).passed
    assert not compare("o", np.full((2, 3), np.nan, np.float32), expected, 1e-3, 1e-3).passed


def test_constant_reference_is_refused():
    with pytest.raises(DegenerateReference):
        check_reference_varies({"logits": np.full((1, 10), 0.25, np.float32)})


def test_zero_initialised_head_is_redrawn():
    # timm zero-inits Mixer's head: without the re-draw every logit equals the (zero) bias.
    model, _, weights = load_model("test_mixer", None, seed=0)
    assert "head.weight" in weights["redrawn_zero_weights"]
    assert model.head.weight.abs().sum() > 0
