"""Offline tuning: `tune --export-candidates` here, the batch's time_candidates.py on the "board" (this x86 host
natively, an aarch64 one under qemu-user), `tune --import-results` back into the database that `compile` applies.

Tiny: test_mixer, one task (fused_matmul2_add6_add3), one or two candidates per batch.
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import targets
from conftest import assert_consistent, emulator_available, linker_available
from pipeline.run import compile_model
from pipeline.spec import BuildSpec
from pipeline.time_candidates import BatchError, digest
from pipeline.tune import extract_tasks, tuning_module
from pipeline.tuning import offline
from pipeline.tuning.database import NOTES, database_dir, open_database

TASK = "fused_matmul2_add6_add3"
TIMEOUT_S = 240


def tune_cli(*args: str, cache: Path, target: str = "x86"):
    return subprocess.run([sys.executable, "-m", "pipeline", "tune", "--target", target, *args], capture_output=True,
                          text=True, encoding="utf-8", env={**os.environ, "PIPELINE_CACHE_DIR": str(cache)},
                          timeout=TIMEOUT_S)


def export(cache: Path, out: Path, trials: int, target: str = "x86") -> str:
    result = tune_cli("--model", "test_mixer", "--trials", str(trials), "--tasks", TASK, "--export-candidates",
                      str(out), cache=cache, target=target)
    assert result.returncode == 0, result.stderr
    assert "exported batch " in result.stdout and out.is_file()
    return result.stdout


def time_natively(batch: Path) -> Path:
    """What a user does on the board: extract the batch, run its script (here with this host's Python)."""
    with tarfile.open(batch) as tar:
        tar.extractall(batch.parent, filter="data")
    directory = batch.with_suffix("")
    out = batch.with_name(batch.stem + ".results.json")
    result = subprocess.run([sys.executable, str(directory / "time_candidates.py"), "--out", str(out)],
                            capture_output=True, text=True, cwd=batch.parent, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return out


def task_stats(cache: Path, target=targets.get_target("x86")):
    """TASK's stats in the one database under ``cache``."""
    task = next(t for t in extract_tasks(tuning_module(BuildSpec("test_mixer", target.name)), target) if t.name == TASK)
    (path,) = (cache / "tuning").iterdir()
    return open_database(path).stats(task.mod)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Two offline rounds on x86 (1 trial, then 2): returns (cache, first results file, stdout of the 2nd export)."""
    work = tmp_path_factory.mktemp("offline")
    cache = work / "cache"
    export(cache, work / "round1.tar", trials=1)
    first = time_natively(work / "round1.tar")
    imported = tune_cli("--import-results", str(first), cache=cache)
    assert imported.returncode == 0, imported.stderr
    assert "1 records (1 valid), 1 default schedule(s) timed" in imported.stdout
    second = export(cache, work / "round2.tar", trials=2)
    imported = tune_cli("--import-results", str(time_natively(work / "round2.tar")), cache=cache)
    assert imported.returncode == 0, imported.stderr
    return cache, first, second


def test_offline_round_trip_continues_the_search(round_trip):
    cache, _, second = round_trip
    path = next((cache / "tuning").iterdir())
    assert "1 candidate(s) and 0 default schedule(s)" in second  # the default is timed once per workload
    assert assert_consistent(path) == 2  # both records replay on the workload their line points at
    stats = task_stats(cache)
    assert stats.valid == 2 and stats.default_secs is not None and stats.best_secs > 0


def test_imported_records_are_applied_by_compile(round_trip, monkeypatch, tmp_path):
    cache = round_trip[0]
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    path = database_dir(targets.get_target("x86"))
    _, manifest = compile_model(BuildSpec("test_mixer", "x86"), tmp_path / "as-imported")
    tuning = manifest["tuning"]
    (chosen,) = [r for r in (tuning["functions"], tuning["default_faster"]) if TASK in r]
    assert (chosen[TASK]["run_us"] < chosen[TASK]["default_us"]) == (chosen is tuning["functions"])
    with open(path / NOTES, "a") as f:  # the default "takes a second": the imported record must be compiled in
        f.write('[0,"default_secs",1.0]\n')
    _, manifest = compile_model(BuildSpec("test_mixer", "x86"), tmp_path / "record-wins")
    assert TASK in manifest["tuning"]["functions"] and manifest["verify"]["passed"]


def _rewrite(path: Path, change) -> Path:
    results = json.loads(path.read_text())
    change(results)
    out = path.with_name("changed.json")
    out.write_text(json.dumps(results))
    return out


def _resign(results: dict) -> None:
    results["sha256"] = digest({k: v for k, v in results.items() if k != "sha256"})


def test_a_bad_results_file_is_refused(round_trip, tmp_path):
    cache, first, _ = round_trip
    database = open_database(next((cache / "tuning").iterdir()))
    records = len(database)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(first.read_bytes()[: len(first.read_bytes()) // 2])
    edited = _rewrite(first, lambda r: r["results"][0].update(run_secs=[1e-9]))

    def other_batch(results):  # another batch.json, re-signed: the hash of the batch no longer matches
        results["batch_sha256"] = "0" * 64
        _resign(results)

    cases = [(truncated, "not a whole results file"), (edited, "does not match its own sha256"),
             (first, "was imported already")]
    for path, message in cases:
        with pytest.raises(BatchError, match=message):
            offline.import_results(path, database)
    # A batch never exported from this database, and a batch id that was but with another batch.json:
    pending = database.path / offline.PENDING / f"{json.loads(first.read_text())['batch_id']}.imported.json"
    unknown = _rewrite(first, lambda r: (r.update(batch_id="f" * 32), _resign(r)))
    with pytest.raises(BatchError, match="which was not exported from the database"):
        offline.import_results(unknown, database)
    pending.rename(pending.with_name(pending.name.replace(".imported", "")))  # as if never imported
    with pytest.raises(BatchError, match="answers another batch"):
        offline.import_results(_rewrite(first, other_batch), database)
    assert len(open_database(database.path)) == records  # nothing was added by any of them
    # on the command line: one line, exit code 2 (BadInput)
    result = tune_cli("--import-results", str(truncated), cache=cache)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a whole results file" in result.stderr


def test_a_tampered_candidate_is_refused_on_the_board(tmp_path):
    export(tmp_path / "cache", tmp_path / "b.tar", trials=1)
    with tarfile.open(tmp_path / "b.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    with open(tmp_path / "b" / "c0000.so", "ab") as f:
        f.write(b"\0")
    result = subprocess.run([sys.executable, str(tmp_path / "b" / "time_candidates.py")], capture_output=True,
                            text=True, cwd=tmp_path, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "not matching their sha256" in result.stderr
    assert not list(tmp_path.glob("*.results.json"))


@pytest.mark.skipif(not (emulator_available() and linker_available()), reason="no aarch64 emulator or linker")
def test_offline_round_trip_on_emulated_aarch64(tmp_path):
    from pipeline.emulation import run_python_emulated

    cache = tmp_path / "cache"
    export(cache, tmp_path / "arm.tar", trials=1, target="aarch64")
    with tarfile.open(tmp_path / "arm.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    run = run_python_emulated(["arm/time_candidates.py", "--out", "arm.results.json"], tmp_path)
    assert "timed 2 candidate(s) (2 ran)" in run.stdout
    imported = tune_cli("--import-results", str(tmp_path / "arm.results.json"), cache=cache, target="aarch64")
    assert imported.returncode == 0, imported.stderr
    assert "1 records (1 valid), 1 default schedule(s) timed" in imported.stdout
    stats = task_stats(cache, targets.get_target("aarch64"))
    assert stats.valid == 1 and stats.default_secs is not None
