"""`tune`: MetaSchedule records into a per-target database that `compile` applies.

Tuning runs here are tiny (test_mixer, one or two tasks, one or two trials each). Every tune runs
as a subprocess with PIPELINE_CACHE_DIR or --db pointing into tmp_path, so the pytest process and
the user's cache stay untouched.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tvm

import targets
from conftest import assert_consistent, free_port, kill_group
from pipeline import paths
from pipeline.run import compile_model
from pipeline.spec import Board, BuildSpec
from pipeline.stages.optimize import lower_to_fused_tir
from pipeline.tune import extract_tasks, tune, tuning_module
from pipeline.tuning.database import (NOTES, RECORDS, WORKLOADS, TuningDatabaseCorrupt, database_dir, open_database,
                                     shipped_dir)
from pipeline.tuning.measure import RpcUnavailable, TuningUnsupported, check_tracker, local_runner

X86 = targets.get_target("x86")
TIMEOUT_S = 240


def tune_cli(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ("-m", "pipeline")):
    return subprocess.run([sys.executable, *prefix, "tune", "--model", "test_mixer", *args], capture_output=True,
                          text=True, encoding="utf-8", env={**os.environ, **(env or {})}, timeout=TIMEOUT_S)


def valid_records(path: Path, mod: tvm.IRModule, name: str) -> int:
    task = next(t for t in extract_tasks(mod, X86) if t.name == name)
    return open_database(path).stats(task.mod)[0]


@pytest.fixture(scope="module")
def mixer():
    return tuning_module(BuildSpec("test_mixer", "x86"))


# test_mixer's channel fc1 (with GELU) and fc2 (with the residual add): --tasks 'fused_matmul[12]_*'. Not the head:
# its default takes about 2 % of such a pair's time, so a noisy timing can make it negligible (NEGLIGIBLE_SHARE).
TASKS = ("fused_matmul1_add4_divide1_erf1_add5_multiply2_multiply3", "fused_matmul2_add6_add3")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """test_mixer's TASKS tuned (1 trial each) into the default database of a fresh cache, by a tune that
    was killed with SIGKILL once its first record was saved, then run again.

    Returns (cache, records when killed, the second run's output).
    """
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "pipeline", "tune", "--model", "test_mixer", "--trials", "1",
               "--tasks", "fused_matmul[12]_*"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any(p.stat().st_size for p in cache.glob(f"tuning/*/{RECORDS}")):
            assert proc.poll() is None and time.time() < deadline, "the first record was never saved"
            time.sleep(0.05)
        assert proc.poll() is None, "the tune finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the tune itself, mid-way
    finally:
        kill_group(proc)  # and the build / run workers it leaves behind
    killed_at = assert_consistent(next(cache.glob("tuning/*")))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr
    return cache, killed_at, rerun


def test_resume_after_kill_9(tuned, mixer):
    cache, killed_at, rerun = tuned
    path = next(cache.glob("tuning/*"))
    assert killed_at >= 1
    assert "tuned already (skipped): " in rerun.stderr  # the task whose batch was saved is not measured again
    assert "tuned 1 task(s)" in rerun.stdout
    assert assert_consistent(path) > killed_at
    assert all(valid_records(path, mixer, name) == 1 for name in TASKS)


def test_tune_writes_the_targets_database(tuned, monkeypatch):
    cache, _, rerun = tuned
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    path = database_dir(X86)
    assert path.parent == cache / "tuning" and path.name.startswith("x86-") and path.is_dir()
    assert f"database {path}" in rerun.stdout and "estimated" in rerun.stdout
    # progress: each task's trials, best time and its default schedule's time
    assert all(f"{name[:28]:28} ×" in rerun.stderr for name in TASKS) and "µs (default" in rerun.stderr
    # and what compile will make of the records: applied where they beat the default schedule
    assert "compile applies records to " in rerun.stderr


def test_a_workload_tuned_for_one_model_serves_another(tuned, mixer):
    path = next(tuned[0].glob("tuning/*"))
    tuned_task = next(t for t in extract_tasks(mixer, X86) if t.name == TASKS[0])
    (shared,) = [t for t in extract_tasks(tuning_module(BuildSpec("test_resmlp", "x86")), X86) if t.workload == tuned_task.workload]
    assert open_database(path).stats(shared.mod).valid == 1  # whatever the function is called there


def test_database_is_keyed_by_target(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    dirs = {database_dir(t) for t in targets.list_targets()}
    assert len(dirs) == len(targets.list_targets()) and all(d.parent == tmp_path / "tuning" for d in dirs)


def test_compile_applies_records_that_beat_the_default_schedule(tuned, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tuned[0], cache)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    path = database_dir(X86)
    _, manifest = compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "as-tuned")
    tuning = manifest["tuning"]
    assert tuning["database"] == paths.portable(path) == f"$PIPELINE_CACHE_DIR/tuning/{path.name}"  # no host path
    # The tune timed the default schedule too: the record applies only where it is faster.
    (chosen,) = [report for report in (tuning["functions"], tuning["default_faster"]) if TASKS[0] in report]
    times = chosen[TASKS[0]]
    assert (times["run_us"] < times["default_us"]) == (chosen is tuning["functions"])
    assert tuning["records_applied"] == len(tuning["functions"])
    # Where the record is the faster one (here: a later note says the default takes a second), it is
    # compiled in, and the library still matches PyTorch.
    with open(path / NOTES, "a") as f:
        f.write('[0,"default_secs",1.0]\n[1,"default_secs",1.0]\n')
    _, manifest = compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "record-wins")
    assert manifest["tuning"]["records_applied"] == 2 and set(manifest["tuning"]["functions"]) == set(TASKS)
    assert manifest["verify"]["passed"]


def test_compile_without_a_database_applies_nothing(monkeypatch, tmp_path, mixer):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    from pipeline.tuning.apply import apply_records
    applied, report = apply_records(mixer, X86)
    assert report == {"database": str(database_dir(X86)), "shipped": str(shipped_dir(X86)), "records_applied": 0,
                      "functions": {}, "default_faster": {}}
    assert applied.same_as(mixer) and not (tmp_path / "tuning").exists()


def test_truncated_last_line_is_dropped_and_reported(tuned, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(next((tuned[0] / "tuning").iterdir()), db)
    records = (db / RECORDS).read_bytes().count(b"\n")
    with open(db / RECORDS, "ab") as f:
        f.write(b'[0,[[["sample_tile",')  # what a kill in the middle of an append leaves
    database = open_database(db)
    assert len(database) == records and database.repairs and "truncated last line" in database.repairs[0]
    assert (db / RECORDS).read_bytes().endswith(b"]\n") and not open_database(db).repairs


def test_a_record_that_does_not_replay_is_left_out_and_reported(tuned, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(next((tuned[0] / "tuning").iterdir()), db)
    lines = (db / RECORDS).read_bytes().splitlines(keepends=True)
    for k, line in enumerate(lines):  # a trace that inlines the matmul: well-formed, but a ScheduleError on replay
        index, record = json.loads(line)
        steps = record[0][0]
        matmul = next((s[3][0] for s in steps if s[0] == "GetSBlock" and s[2][0] == "matmul"), None)
        inline = next((s for s in steps if s[0] == "ComputeInline"), None)
        if matmul and inline:
            inline[1] = [matmul]
            lines[k] = json.dumps([index, record], separators=(",", ":")).encode() + b"\n"
            break
    else:
        pytest.fail("no record inlines a block")
    (db / RECORDS).write_bytes(b"".join(lines))
    database = open_database(db)
    assert database.unreplayable == 1 and len(database) == len(lines) - 1
    assert database.repairs == [f"left out 1 record(s) of {db / RECORDS} whose schedule does not replay on "
                                "their workload"]


@pytest.mark.parametrize("name, line", [(RECORDS, b"garbage\n"), (RECORDS, b"[7,[]]\n"), (WORKLOADS, b'["1","AAAA"]\n'),
                                        (NOTES, b'[0,"bogus",1]\n')])
def test_corrupt_database_is_refused(tuned, monkeypatch, tmp_path, name, line):
    cache = tmp_path / "cache"
    shutil.copytree(tuned[0], cache)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    path = database_dir(X86)
    lines = (path / name).read_bytes().splitlines(keepends=True)
    (path / name).write_bytes(b"".join(lines[:1] + [line] + lines[1:]))  # not the last line: no repair applies
    with pytest.raises(TuningDatabaseCorrupt, match=f"{name} line 2: .*move the directory aside"):
        open_database(path)
    if name == RECORDS and line == b"garbage\n":  # compile refuses it too, rather than ignoring it
        with pytest.raises(TuningDatabaseCorrupt):
            compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "art")
        assert not (tmp_path / "art").exists()


def test_concurrent_tunes_share_one_database(tmp_path, mixer):
    db = tmp_path / "db"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--model", "test_mixer", "--trials", "1",
                               "--tasks", task, "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8", start_new_session=True)
             for task in ("fused_matmul2_add6_add3", "fused_matmul3_add7")]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    assert (db / WORKLOADS).read_bytes().count(b"\n") == 2
    assert assert_consistent(db) == 2
    assert valid_records(db, mixer, "fused_matmul2_add6_add3") == valid_records(db, mixer, "fused_matmul3_add7") == 1


def test_no_valid_record_fails_loudly(tmp_path):
    # Every build times out: the tune must say so, with the first error, and exit non-zero.
    script = ("import sys, pipeline.tuning.measure; pipeline.tuning.measure.BUILD_TIMEOUT_S = 0.01; from pipeline.cli import cli; "
              "cli(sys.argv[1:], prog_name='pipeline')")
    result = tune_cli("--trials", "1", "--tasks", "fused_matmul3_add7", "--db", str(tmp_path / "db"),
                      prefix=("-c", script))
    assert result.returncode == 1, result.stderr
    assert "error: no valid tuning record: all 1 measured candidates failed" in result.stderr
    assert "LocalBuilder: Timeout" in result.stderr and "Traceback" not in result.stderr


def test_hand_scheduled_cyclefc_is_not_tuned(tmp_path):
    mod = tuning_module(BuildSpec("test_cyclemlp", "x86"))
    tasks = extract_tasks(mod, X86)
    # our kernels: the CycleFCs outside a fused token mixer, the fused mixers and their squeezes
    assert {t.name.rstrip("0123456789") for t in tasks if t.hand_scheduled} == {
        "cyclefc", "cycle_token_mixer", "cycle_token_squeeze"}
    with pytest.raises(TuningUnsupported, match="no task to tune matches"):
        tune(mod, X86, open_database(tmp_path / "db"), trials=1, task_pattern="cyclefc*")


def test_gathers_are_measured_with_indices_in_bounds(tmp_path):
    # A gather's indices, even constant ones, are an argument of its TIR function: random ones read
    # out of bounds and killed the runner, so neither the default schedule nor any candidate was ever timed.
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Gather:
        @R.function
        def main(x: R.Tensor((64, 256), "float32")) -> R.Tensor((4, 256), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.take(x, R.const([5, 0, 63, 2], "int64"), axis=0)
                R.output(y)
            return y

    mod = lower_to_fused_tir(Gather)
    tasks = [t for t in extract_tasks(mod, X86) if t.name.startswith("take")]
    assert len(tasks) == 1
    database = open_database(tmp_path / "db")
    report = tune(mod, X86, database, trials=1, task_pattern="take*")
    assert report.new_valid == report.new_records >= 1 and report.first_error is None
    assert database.stats(tasks[0].mod).default_secs is not None


def test_rpc_arguments_are_checked(tmp_path):
    result = tune_cli("--rpc-tracker", "127.0.0.1:9190")
    assert result.returncode == 2 and "--rpc-tracker and --rpc-key go together" in result.stderr
    result = tune_cli("--rpc-tracker", "nowhere", "--rpc-key", "k")
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr
    with pytest.raises(RpcUnavailable, match="cannot reach the RPC tracker"):
        check_tracker(Board("127.0.0.1", free_port(), "k"))


# ---- RPC: a real tracker and server on loopback (conftest's rpc fixture) -------------------------


def test_rpc_measurement(rpc, tmp_path, mixer):
    tracker, server_log = Board("127.0.0.1", rpc.tracker, rpc.key), rpc.processes.log("tracked")
    with pytest.raises(RpcUnavailable, match="no board is registered under key 'other'"):
        check_tracker(Board(tracker.host, tracker.port, "other"))
    db = tmp_path / "db"
    result = tune_cli("--trials", "1", "--tasks", "fused_matmul2_add6_add3", "--db", str(db),
                      "--rpc-tracker", f"{tracker.host}:{tracker.port}", "--rpc-key", tracker.tracker_key)
    assert result.returncode == 0, result.stderr
    assert "1 new records (1 valid)" in result.stdout
    assert valid_records(db, mixer, "fused_matmul2_add6_add3") == 1
    # measured by the server: it loaded the candidates, linked here (the default schedule and the record)
    assert server_log.read_text().count("load_module") >= 2 and "candidate.so" in server_log.read_text()


def test_local_measurements_use_the_targets_cores():
    runner = local_runner(X86)
    # in the runner's worker process, where MetaSchedule times candidates and our default schedules
    threads = runner.pool.submit(lambda: __import__("tvm").get_global_func("runtime.NumThreads")()).result()
    assert threads == X86.tvm_target["num-cores"] == os.cpu_count()


def test_records_tuned_in_one_model_replay_and_apply_in_another(tmp_path, monkeypatch):
    # test_mixer, test_gmlp and test_resmlp share a mean pooling whose reduction block LegalizeOps names after
    # a Relax variable (lv61_red, lv55_red, lv48_red): a record's trace must find its blocks in all three.
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path)}
    for model, trials in (("test_mixer", "1"), ("test_gmlp", "2")):
        result = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--model", model, "--trials", trials,
                                 "--tasks", "mean"], env=env, capture_output=True, text=True, encoding="utf-8",
                                timeout=TIMEOUT_S)
        assert result.returncode == 0, result.stderr
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    path = database_dir(X86)
    assert assert_consistent(path) >= 2  # test_gmlp's records replay on the workload test_mixer wrote
    with open(path / NOTES, "a") as f:
        f.write('[0,"default_secs",1.0]\n')  # so that the record, not the default schedule, is compiled in
    _, manifest = compile_model(BuildSpec(model="test_resmlp", target="x86"), tmp_path / "art")
    assert "mean" in manifest["tuning"]["functions"] and manifest["verify"]["passed"]


def test_trials_go_where_the_time_is(mixer, tmp_path):
    # Measured default times (weight 1 each): the largest share gets --trials, the others in proportion, a task
    # under 1 % of the selected tasks' time none.
    from pipeline.tune import NEGLIGIBLE_SHARE, TaskState, allocate_trials

    tasks = [t for t in extract_tasks(mixer, X86) if not t.hand_scheduled][:3]
    states = [TaskState(t.name, t.workload, 1, 0, 0, None, us, "queued") for t, us in zip(tasks, (100.0, 50.0, 0.5))]
    allocate_trials(tasks, states, 8, open_database(tmp_path / "db"))
    assert [s.goal for s in states] == [8, 4, 0] and [s.status for s in states] == ["queued", "queued", "negligible"]
    assert states[2].share < NEGLIGIBLE_SHARE and abs(sum(s.share for s in states) - 1) < 1e-9
    # Nothing measured yet: FLOPs x calls estimate the shares; reshapes and transposes (no FLOPs) are skipped.
    tasks = [t for t in extract_tasks(mixer, X86) if not t.hand_scheduled]
    states = [TaskState(t.name, t.workload, t.weight, 0, 0, None, None, "queued") for t in tasks]
    allocate_trials(tasks, states, 8, open_database(tmp_path / "db"))
    skipped = {s.name for s in states if s.status == "negligible"}
    assert any(name.startswith(("reshape", "transpose")) for name in skipped)
    assert max(s.goal for s in states) == 8 and all((s.goal > 0) == (s.share >= NEGLIGIBLE_SHARE) for s in states)
    assert {"fused_conv2d_add", "fused_matmul2_add6_add3"} <= {s.name for s in states if s.status == "queued"}


def test_shipped_records_apply_and_the_users_own_win(tuned, monkeypatch, tmp_path):
    from pipeline import paths
    from pipeline.tuning.apply import USER

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(paths.SHIPPED_ENV, str(tmp_path / "shipped"))
    tuned_db = next((tuned[0] / "tuning").iterdir())
    shutil.copytree(tuned_db, shipped_dir(X86), ignore=shutil.ignore_patterns(".lock"))
    with open(shipped_dir(X86) / NOTES, "a") as f:  # the shipped records beat their defaults
        f.write('[0,"default_secs",1.0]\n[1,"default_secs",1.0]\n')
    shipped = f"shipped: {shipped_dir(X86).name}"
    _, manifest = compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "shipped-only")
    assert {name: f["source"] for name, f in manifest["tuning"]["functions"].items()} == dict.fromkeys(TASKS, shipped)
    assert manifest["verify"]["passed"] and not (shipped_dir(X86) / ".lock").exists()  # never written
    # The user's database: the same record for workload 0 (a tie: the user's wins), none that beats the default of
    # workload 1 (the shipped one applies there).
    shutil.copytree(tuned_db, database_dir(X86))
    with open(database_dir(X86) / NOTES, "a") as f:
        f.write('[0,"default_secs",1.0]\n[1,"default_secs",1e-12]\n')
    _, manifest = compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "both")
    assert sorted(f["source"] for f in manifest["tuning"]["functions"].values()) == sorted([USER, shipped])


# Margins that decide alike on any machine, however busy: every record that ran is kept, or none is.
@pytest.mark.parametrize("margin", [-1e9, 1.0])
def test_shipping_retimes_records_beside_their_defaults(tuned, monkeypatch, tmp_path, margin):
    from pipeline.ship_records import SUMMARY, ship_records
    from pipeline.tuning.apply import USER

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))  # no user database
    monkeypatch.setenv(paths.SHIPPED_ENV, str(tmp_path / "shipped"))
    out, verdicts = ship_records(next((tuned[0] / "tuning").iterdir()), X86, tmp_path / "shipped", rounds=2,
                                 margin=margin)
    assert out == shipped_dir(X86) and len(verdicts) == 2  # test_mixer's two tuned workloads
    assert all(v.record_us and v.default_us for v in verdicts)  # both ran, every round
    assert [v.shipped for v in verdicts] == [margin < 0] * 2, verdicts
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    assert summary["rounds"] == 2 and summary["machine"]["cpu"] and len(summary["verdicts"]) == 2
    assert not (out / ".lock").exists() and [p.name for p in out.parent.iterdir()] == [out.name]  # nothing partial
    shipped = open_database(out, read_only=True)
    assert len(shipped.workloads()) == sum(v.shipped for v in verdicts)
    for workload in shipped.workloads():  # the shipped database holds the re-timed medians
        stats = shipped.stats(workload.mod)
        v = next(v for v in verdicts if v.workload == tvm.s_tir.meta_schedule.utils.shash2hex(workload.mod))
        assert (round(1e6 * stats.best_secs, 3), round(1e6 * stats.default_secs, 3)) == (v.record_us, v.default_us)
    _, manifest = compile_model(BuildSpec(model="test_mixer", target="x86"), tmp_path / "art")
    sources = {f["source"] for f in manifest["tuning"]["functions"].values()}
    # Kept where they were judged faster (here by a margin that keeps the slower too: the note says so).
    assert manifest["tuning"]["records_applied"] == (0 if margin > 0 else sum(
        v.record_us < v.default_us for v in verdicts)) and USER not in sources and manifest["verify"]["passed"]
