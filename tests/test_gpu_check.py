"""The GPU benchmark (scripts/gpu_check.py) end to end on this CPU: prepare a payload, then its dry run, which
does all that needs no GPU (the payload's TVM runtime, each library's cubins and weights, the bundles' file checks,
PyTorch eager, the table)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.toolchain.cuda_toolchains import find_in_nvidia

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.12") is None, reason="NVRTC 12 missing")]


def test_prepare_then_dry_run(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the payload's runtime for this Python
    subprocess.run([sys.executable, str(SCRIPT), "prepare", str(tmp_path / "p"), "--time", "test_mixer",
                    "--verify", "--verify-fp16", "test_mixer", "--python-version", python], check=True, timeout=900)
    run = subprocess.run([sys.executable, str(SCRIPT), "run", str(tmp_path / "p"), "--dry-run", "--repeat", "3",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "r" / "benchmark.json").read_text(encoding="utf-8"))
    assert result["environment"]["tvm runtime"][0].isdigit()  # the payload's runtime imports
    [bundle] = result["bundles"].values()
    assert bundle["exit"] == 1 and "no cuda support" in bundle["log"]  # its files checked, then: no GPU here
    library = result["models"]["test_mixer"]["library"]
    assert all(library[p]["static"]["cubin_arches"] == ["sm_90"] for p in ("fp32", "fp16"))
    eager = result["models"]["test_mixer"]["torch"]["fp16"]["eager"]
    assert eager["check"]["passed"] and eager["check"]["max_abs"] > 0 and eager["ms"] > 0
    table = (tmp_path / "r" / "benchmark.md").read_text(encoding="utf-8")
    assert "| test_mixer |" in table and "GPU none (dry run on the CPU)" in table
