"""Offline tuning: candidates built here, timed on a board this host cannot reach, their times read back.

A batch is one tar file in a bundle's layout (``pipeline.bundle.write_tar``: one directory of plain files)::

    BATCH/batch.json          id, device, CUDA arch, threads, MetaSchedule's evaluator settings, and per
                              candidate its file, sha256 and argument shapes
    BATCH/c0000.so ...        the candidates, linked here for the target (cubins inside for CUDA)
    BATCH/time_candidates.py  pipeline/time_candidates.py: times them on the board (numpy + TVM runtime)
    BATCH/runtime.py          pipeline/runtime.py, which it uses

What each candidate *is* stays here, in the database directory: ``offline/<batch id>.json`` holds the sha256
of the batch's batch.json and, per candidate, its tuning record without a time (a schedule trace on a
workload of the database) or the workload whose default schedule it is. Importing a results file checks
it whole (its own sha256, the batch's id and batch.json's sha256, one result per candidate) and only then
appends the records to the database through ``TuningDatabase.commit_tuning_record``, the journal, lock and
truncation rules every tune uses, and notes the default schedules' times. A batch imports once: its file
is renamed ``<id>.imported.json`` first, so an import cut short loses at most its own records, never adds
a record twice.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.s_tir.meta_schedule.database import TuningRecord

from .. import runtime, time_candidates
from ..bundle import SUFFIXES, stem, write_tar
from ..time_candidates import BATCH_FORMAT, BATCH_MANIFEST, RESULTS_FORMAT, TIMER, BatchError, digest
from .database import FAILED_RUN_S, TuningDatabase

PENDING = "offline"  # in the database directory: one file per exported batch
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 100}  # MetaSchedule's EvaluatorConfig defaults
_BATCH_ID = re.compile(r"[0-9a-f]{32}\Z")


@dataclass
class Candidate:
    """A built candidate: a schedule of ``workload`` (``record``: its trace, no time yet), or, without a
    record, the workload's default schedule."""

    workload: tvm.IRModule
    artifact: str  # the linked library, from the builder
    args_info: list  # MetaSchedule ArgInfos, as the built function takes its arguments
    record: TuningRecord | None = None


def _args(args_info: list) -> list:
    return [[[int(d) for d in info.shape], str(info.dtype)] for info in args_info]


def write_batch(out: Path, candidates: list[Candidate], database: TuningDatabase, device: str,
                cuda_arch: str | None, threads: int | None) -> str:
    """Write the batch file ``out`` and its pending file in ``database``; return the batch id."""
    if not out.name.endswith(SUFFIXES) or not runtime.PLAIN_NAME.match(stem(out)):
        raise BatchError(f"{out}: name a batch NAME.tar (or .tar.gz), NAME of letters, digits and . _ + -")
    batch_id = secrets.token_hex(16)
    entries, pending = [], []
    with tempfile.TemporaryDirectory(prefix="pipeline-batch-") as tmp:
        members = []
        for i, candidate in enumerate(candidates):
            name = f"c{i:04d}"
            members.append((Path(candidate.artifact), f"{name}.so"))
            entries.append({"id": name, "file": f"{name}.so", "sha256": runtime.sha256_file(Path(candidate.artifact)),
                            "args": _args(candidate.args_info)})
            pending.append({"id": name, "record": database.record_line(candidate.record)} if candidate.record else
                           {"id": name, "default_of": database.workload_index(candidate.workload)})
        batch = {"format": BATCH_FORMAT, "batch_id": batch_id, "device": device, "cuda_arch": cuda_arch,
                 "threads": threads, "evaluator": EVALUATOR, "candidates": entries}
        manifest = Path(tmp) / BATCH_MANIFEST
        manifest.write_text(json.dumps(batch, indent=1))
        members += [(manifest, BATCH_MANIFEST), (Path(time_candidates.__file__), TIMER),
                    (Path(runtime.__file__), "runtime.py")]
        write_tar(out, stem(out), members)
        _write_json(database.path / PENDING / f"{batch_id}.json",
                    {"batch_sha256": runtime.sha256_file(manifest), "batch": str(out), "candidates": pending})
    return batch_id


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(partial, path)


@dataclass
class ImportReport:
    batch_id: str
    records: int  # tuning records appended
    valid: int  # of which ran
    defaults: int  # default schedules timed
    first_error: str | None


def read_results(path: Path, database: TuningDatabase) -> tuple[dict, dict, Path]:
    """(results, pending batch, pending file) once ``path`` is checked whole against the batch it answers."""
    try:
        results = json.loads(Path(path).read_text())
        body = {k: v for k, v in results.items() if k != "sha256"}
    except (OSError, ValueError, AttributeError) as e:
        raise BatchError(f"{path} is not a whole results file (truncated, or not JSON: {e}); "
                         f"copy it again from the board, or time the batch again") from None
    if results.get("format") != RESULTS_FORMAT:
        raise BatchError(f"{path} is not a results file of {TIMER} (format {results.get('format')!r})")
    if results.get("sha256") != digest(body):
        raise BatchError(f"{path} does not match its own sha256 (edited or corrupted); time the batch again")
    batch_id = results.get("batch_id")
    pending_dir = database.path / PENDING
    if not (isinstance(batch_id, str) and _BATCH_ID.match(batch_id)):
        raise BatchError(f"{path} names no batch id")
    if (pending_dir / f"{batch_id}.imported.json").exists():
        raise BatchError(f"{path}: batch {batch_id} was imported already")
    pending_path = pending_dir / f"{batch_id}.json"
    try:
        pending = json.loads(pending_path.read_text())
    except (OSError, ValueError):
        raise BatchError(f"{path} answers batch {batch_id}, which was not exported from the database "
                         f"{database.path}: import it with the --target (or --db) it was exported for") from None
    if results.get("batch_sha256") != pending["batch_sha256"]:
        raise BatchError(f"{path} answers another batch than {batch_id} (its batch.json sha256 differs from the "
                         "one exported); time the batch exported from here")
    got, want = [r.get("id") for r in results["results"]], [c["id"] for c in pending["candidates"]]
    if got != want:
        raise BatchError(f"{path} has results for {len(got)} candidate(s), batch {batch_id} has {len(want)}; "
                         "time the whole batch again")
    return results, pending, pending_path


def import_results(path: Path, database: TuningDatabase) -> ImportReport:
    """Append the times in the results file ``path`` to ``database`` (see the module's docstring)."""
    results, pending, pending_path = read_results(path, database)
    imported = pending_path.with_name(f"{results['batch_id']}.imported.json")
    os.replace(pending_path, imported)  # first: a second import of this batch is refused
    report = ImportReport(results["batch_id"], 0, 0, 0, None)
    for result, candidate in zip(results["results"], pending["candidates"]):
        secs = result.get("run_secs")
        ran = isinstance(secs, list) and bool(secs) and all(isinstance(s, float) and 0 < s < FAILED_RUN_S for s in secs)
        if not ran and report.first_error is None:
            report.first_error = str(result.get("error", "no run time"))
        if "default_of" in candidate:
            if ran:
                database.note(database.workload_at(candidate["default_of"]).mod, "default_secs", sum(secs) / len(secs))
                report.defaults += 1
            continue
        record = database.record_from_line(candidate["record"])
        # A failed run is recorded as MetaSchedule records one (run_secs 1e10): a trial, never applied.
        database.commit_tuning_record(TuningRecord(record.trace, record.workload, secs if ran else [10 * FAILED_RUN_S],
                                                   record.target, record.args_info))
        report.records += 1
        report.valid += ran
    return report


def remove_artifacts(candidates: list[Candidate]) -> None:
    for candidate in candidates:
        shutil.rmtree(os.path.dirname(candidate.artifact), ignore_errors=True)
