"""Latency measurement, baselines and regression checks (pipeline.bench, pipeline.regress).

The unmarked tests check the logic (statistics, the verdict, baseline files, another machine's
baselines) in well under a second and run in the default suite. The `latency` tests measure real
artifacts for minutes and run with `python -m pytest -m latency`: against the baselines committed in
baselines/ for this machine, and on a real regression (a build without the default CPU schedules
judged against the normal build's baseline).
"""
import json
from pathlib import Path

import numpy as np
import pytest

import pipeline.stages.optimize as optimize
from conftest import run_cli
from conftest import RPC_HOST as HOST
from pipeline.bench import Budget, device_fingerprint, measure, median_ci, quiet, ratio, summarize
from pipeline.runtime import require_outputs_match
from pipeline.errors import VerificationFailed
from pipeline.regress import (DEFAULT_MACHINE_TOLERANCE, DEFAULT_TOLERANCE, baseline_path, decide, device_id,
                              kernel_diff, load_baselines, missing_device_message, save_baselines)
from pipeline.run import compile_model
from pipeline.spec import BuildSpec

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = {"cpu": "AMD EPYC", "cores": 2, "arch": "x86_64", "apache-tvm": "0.27.0.post1",
               "apache-tvm-ffi": "0.1.14.post0"}


# ---------------------------------------------------------------------------------------------------------------
# Logic (default suite)


def test_statistics_and_adaptive_interleaved_measuring():
    values = [float(v) for v in range(1, 101)]
    assert median_ci(values[:10]) == (1.0, 10.0)  # up to 10 samples: min and max
    assert median_ci(values) == (40.0, 61.0)  # ranks 50 -+ 9.8 (Binomial(100, 1/2))
    stats = summarize(values)
    assert [stats[k] for k in ("median", "p10", "p90", "iqr", "n")] == pytest.approx([50.5, 10.9, 90.1, 49.5, 100])
    # contention only adds time: the quiet samples are the ones within 10 % of the fastest
    assert quiet([1.0, 1.05, 3.0, 1.2, 1.09]) == [1.0, 1.05, 1.09]
    assert ratio({"median": 2.0, "ci95": [1.8, 2.2]}, {"median": 1.0, "ci95": [0.9, 1.1]}) == \
        {"median": 2.0, "ci95": [1.8 / 1.1, 2.2 / 0.9]}

    order = []

    def fake(name, series):
        samples = iter(series)
        return lambda number: order.append((name, number)) or (next(samples) if number > 1 else 1e-3)

    # "b" is disturbed in every other round: it still converges, on its quiet samples, and the rounds interleave
    m = measure({"a": fake("a", [2e-3] * 400), "b": fake("b", [1e-3, 5e-3] * 200)},
                Budget(sample_ms=2.0, min_rounds=8, pause_ms=0.0, warmup_s=0.0))
    assert m.stopped.startswith("quiet medians within") and m.rounds == 15
    assert m.calls_per_sample == {"a": 2, "b": 2}
    # after 3 warm-up calls each, rotating order, one untimed call right before each sample
    assert order[6:14] == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 1), ("b", 2), ("a", 1), ("a", 2)]
    assert summarize(quiet(m.samples_ms["b"]))["median"] == pytest.approx(1.0)


def test_a_runtime_that_computes_something_else_is_not_timed():
    manifest = {"outputs": [{"name": "logits"}], "tolerance": {"atol": 1e-5, "rtol": 1e-4}}
    require_outputs_match({"logits": np.zeros(3)}, {"logits": np.zeros(3)}, manifest, prefix="torch/")
    with pytest.raises(VerificationFailed, match="torch/logits: max_abs 1"):
        require_outputs_match({"logits": np.ones(3)}, {"logits": np.zeros(3)}, manifest, prefix="torch/")


def entry(tvm_ms: float, reference_ms: float, spread: float = 0.01, busy: bool = False) -> dict:
    stat = lambda v: {"median": v, "ci95": [v * (1 - spread), v * (1 + spread)]}  # noqa: E731
    return {"tvm_ms": stat(tvm_ms), "reference_ms": stat(reference_ms),
            "normalized": {"median": tvm_ms / reference_ms,
                           "ci95": [tvm_ms * (1 - spread) / reference_ms / (1 + spread),
                                    tvm_ms * (1 + spread) / reference_ms / (1 - spread)]},
            "busy": busy, "kernels": {}}


@pytest.mark.parametrize("now, expected", [
    (entry(1.0, 1.0), "ok"),
    (entry(1.1, 1.0), "ok"),  # within the 15 % tolerance
    (entry(1.5, 1.0), "slower"),
    (entry(1.4, 1.4), "ok"),  # model and reference 1.4x slower (a busy sibling hyperthread): normalized away
    (entry(3.0, 1.6), "slower"),  # a much busier machine (reference 1.6x) cannot hide a real slowdown
    (entry(1.0, 1.6), "changed"),  # ... but cannot be judged otherwise
    (entry(1.5, 0.6), "changed"),  # the baseline was recorded on a much busier machine: do not cry wolf
    (entry(1.5, 1.0, spread=0.3), "unclear"),  # 1.5x, but the intervals overlap
    (entry(0.5, 1.0), "faster"),
    (entry(1.5, 1.0, busy=True), "busy"),  # too few undisturbed samples
])
def test_verdict(now, expected):
    verdict = decide(entry(1.0, 1.0), now, DEFAULT_TOLERANCE, DEFAULT_MACHINE_TOLERANCE)
    assert verdict.status == expected
    assert verdict.ratio == pytest.approx(now["normalized"]["median"])


def test_baseline_files_round_trip_and_another_machine_is_named(tmp_path):
    path = baseline_path(tmp_path, FINGERPRINT, "x86")
    assert path == tmp_path / "amd-epyc-2cpu-x86_64-tvm0.27.0.post1-ffi0.1.14.post0" / "x86.json"
    data = {"schema": 1, "device": FINGERPRINT, "target": "x86", "threads": 1, "tolerance": 0.15,
            "machine_tolerance": 0.1, "models": {"test_mixer": entry(0.0123456789, 0.9)}}
    save_baselines(path, data)
    loaded = load_baselines(path)
    assert loaded["models"]["test_mixer"]["tvm_ms"]["median"] == 0.01235  # 4 significant digits on disk
    assert loaded["device"] == FINGERPRINT and loaded["tolerance"] == 0.15

    here = {**FINGERPRINT, "cpu": "Intel Xeon", "apache-tvm": "0.28.0"}
    message = missing_device_message(tmp_path, here, "x86")
    assert str(baseline_path(tmp_path, here, "x86")) in message
    assert device_id(FINGERPRINT) in message and "not comparable" in message
    assert "cpu 'AMD EPYC' (here 'Intel Xeon')" in message and "apache-tvm '0.27.0.post1' (here '0.28.0')" in message
    assert "regress --update" in message

    assert kernel_diff({"a": 1.0, "gone": 0.1}, {"a": 1.2, "new": 3.0}) == [
        {"kernel": "new", "baseline_ms": None, "now_ms": 3.0},
        {"kernel": "a", "baseline_ms": 1.0, "now_ms": 1.2},
        {"kernel": "gone", "baseline_ms": 0.1, "now_ms": None}]


def test_cli_refuses_another_machines_baselines_and_peers_on_a_board(tmp_path):
    other = {**FINGERPRINT, "cpu": "Some Other CPU", "cores": 64}
    save_baselines(baseline_path(tmp_path, other, "x86"),
                   {"schema": 1, "device": other, "target": "x86", "threads": 1, "tolerance": 0.15,
                    "machine_tolerance": 0.1, "models": {"test_mixer": entry(1.0, 1.0)}})
    result = run_cli("regress", "--baselines", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "no x86 latency baseline for this machine" in result.stderr
    assert "cpu 'Some Other CPU'" in result.stderr and "Traceback" not in result.stderr

    result = run_cli("bench", "--model", "test_mixer", "--compare", "onnxruntime", "--device", "127.0.0.1:9")
    assert result.returncode == 2 and "cannot be combined with a board" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Measurements (python -m pytest -m latency)

COMMITTED = baseline_path(REPO / "baselines", device_fingerprint(), "x86")  # this machine's, if any


def regress(*args: str, cwd: Path):
    result = run_cli("regress", *args, cwd=cwd)
    if result.returncode == 5:
        pytest.skip(f"the machine was too busy to judge: {result.stderr.strip().splitlines()[-1]}")
    return result


@pytest.mark.latency
def test_committed_baselines_hold(tmp_path):
    """The tiny test variants, compiled now, against the baselines committed for this machine."""
    if not COMMITTED.exists():
        pytest.skip(missing_device_message(REPO / "baselines", device_fingerprint(), "x86"))
    result = regress("--baselines", str(REPO / "baselines"), "--artifacts", str(tmp_path / "artifacts"),
                     "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "regress-x86.json").read_text())
    assert [m["model"] for m in report["models"]] == sorted(load_baselines(COMMITTED)["models"])
    assert all(m["verdict"]["status"] in ("ok", "faster") for m in report["models"])


@pytest.fixture(scope="module")
def fast_and_slow(tmp_path_factory):
    """test_cyclemlp twice: as compiled, and without the default CPU schedules (naive loops: real, slower code)."""
    root = tmp_path_factory.mktemp("regression")
    spec = BuildSpec(model="test_cyclemlp", target="x86")
    compile_model(spec, root / "fast" / "test_cyclemlp-x86")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimize, "DEFAULT_SCHEDULES", {})
        _, manifest = compile_model(spec, root / "slow" / "test_cyclemlp-x86")
    assert manifest["passes"]["default_schedules"]["applied"] is False
    return root


@pytest.mark.latency
def test_a_real_regression_is_caught_and_a_rerun_passes(fast_and_slow):
    root = fast_and_slow
    common = ("--models", "test_cyclemlp", "--baselines", str(root / "baselines"), "--out", str(root / "out"))
    recorded = regress("--update", "--artifacts", str(root / "fast"), *common, cwd=root)
    assert recorded.returncode == 0 and "RECORDED" in recorded.stdout, recorded.stdout + recorded.stderr

    rerun = regress("--artifacts", str(root / "fast"), *common, cwd=root)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "within 15% of their baselines" in rerun.stdout

    slow = regress("--artifacts", str(root / "slow"), *common, cwd=root)
    assert slow.returncode == 4, slow.stdout + slow.stderr
    error = slow.stderr.strip().splitlines()[-1]
    assert "test_cyclemlp" in error and "slower than their x86 baseline" in error
    report = json.loads((root / "out" / "regress-x86.json").read_text())["models"][0]
    assert report["verdict"]["status"] == "slower" and report["verdict"]["ratio"] > 2
    assert report["now"]["tvm_ms"]["median"] > 2 * report["baseline"]["tvm_ms"]["median"]
    # the table names model, target, baseline, now and ratio; the kernel diff says where the time went
    assert "test_cyclemlp" in slow.stdout and "x86" in slow.stdout and "SLOWER" in slow.stdout
    assert "where the time went" in slow.stdout
    top = report["kernels"][0]  # the largest change
    assert top["now_ms"] > 2 * (top["baseline_ms"] or 0)


@pytest.mark.latency
def test_bench_times_the_library_on_a_board(compiled, rpc, tmp_path):
    """`bench --device`: the library and the reference kernel run on a TVM RPC server (here on loopback)."""
    artifact, _ = compiled("test_mixer")
    port = rpc.direct
    result = run_cli("bench", "--model", "test_mixer", "--artifact", str(artifact), "--device", f"{HOST}:{port}",
                     "--max-seconds", "10", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "out" / "test_mixer-x86.bench.json").read_text())
    assert data["device"]["board"] == f"{HOST}:{port}"
    assert "time_evaluator on the board" in data["method"]["runtimes"]["tvm"]
    assert 0 < data["latency_ms"]["tvm"]["median"] < data["latency_ms"]["reference"]["median"]


@pytest.mark.latency
def test_bench_with_peers_and_kernels_writes_the_report(compiled, tmp_path):
    artifact, _ = compiled("test_mixer")
    result = run_cli("bench", "--model", "test_mixer", "--artifact", str(artifact), "--compare", "onnxruntime,torch",
                     "--per-layer", "--threads", "1", "--max-seconds", "10", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "test_mixer-x86.bench.json").read_text())
    assert list(data["latency_ms"]) == ["tvm", "reference", "onnxruntime", "torch"]
    assert set(data["vs_tvm"]) == {"onnxruntime", "torch"} and data["kernels"][0]["ms"] > 0
    assert len(data["samples_ms"]["torch"]) == data["method"]["rounds"]  # interleaved: one sample each per round
    assert (tmp_path / "test_mixer-x86.bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![latency chart](test_mixer-x86.bench.png)" in (tmp_path / "test_mixer-x86.bench.md").read_text()
    for column in ("median ms", "p10", "p90", "IQR", "CV", "vs tvm", "onnxruntime", "torch"):
        assert column in result.stdout
