import sys
from pathlib import Path

import pytest

import models
import targets
from pipeline.run import compile_model
from pipeline.spec import BuildSpec

TEST_MODELS = models.list_models("test_*")
FULL_SIZE_MODELS = models.list_models(include_test=False)
# The one full-size model the default suite compiles end to end; the rest run under -m slow.
DEFAULT_FULL_SIZE = "cyclemlp_b1"
ALL_TARGETS = [t.name for t in targets.list_targets()]
CUDA_TARGETS = [t.name for t in targets.list_targets() if t.cuda]


def run_cli(*args: str, **kwargs):
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, encoding="utf-8", **kwargs)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Compile (model, target) once per session; returns (artifact dir, manifest)."""
    cache: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(model: str, target: str = "x86") -> tuple[Path, dict]:
        if (model, target) not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"{model}-{target}"
            cache[(model, target)] = compile_model(BuildSpec(model=model, target=target), out)
        return cache[(model, target)]

    return get


@pytest.fixture(autouse=True, scope="session")
def isolated_tuning_cache(tmp_path_factory):
    """Compiles in tests must not pick up a developer's own tuning database (~/.cache/pipeline/tuning)."""
    import os

    old = os.environ.get("PIPELINE_CACHE_DIR")
    os.environ["PIPELINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("pipeline-cache"))
    yield
    if old is None:
        os.environ.pop("PIPELINE_CACHE_DIR")
    else:
        os.environ["PIPELINE_CACHE_DIR"] = old
