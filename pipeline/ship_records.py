"""Shipping tuning records: re-time a tuning database's best records beside their default schedules and write
the ones that win, as the records this repository ships (``tvm_schedules/records/<target>-<hash>/``).

A tune decides "record beats default" from two measurements taken minutes apart, on a machine that may be busy
meanwhile; a record shipped on that word could be slower than the default it replaces everywhere it applies.
Here each workload's best record and its default schedule are built once and timed in interleaved rounds
(record, default, then default, record, ...), and a record is kept only when the median of its rounds beats the
default's by ``margin``. The shipped database holds just those records, with the re-timed medians as their
run time and as the default's note, so ``compile`` (pipeline.tuning.apply) decides from the same measurement.
The directory is written beside its destination and renamed into place: never half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import TuningRecord

from targets import TargetSpec
from .bench import device_fingerprint
from .errors import BadInput
from .stages.optimize import apply_default_schedules
from .tuning.database import database_key, mean_secs, open_database
from .tuning.measure import builder_and_runner, first_line
from .tvm_targets import to_tvm_target

SUMMARY = "shipped.json"  # beside MetaSchedule's files: how each record was judged


@dataclass
class Verdict:
    workload: str  # its structural hash, as the manifest's tuning report names it
    record_us: float | None  # median of the rounds, None where it did not build or run
    default_us: float | None
    shipped: bool
    why: str


def _median_us(results: list) -> float | None:
    secs = [mean_secs(r) for r in results if r.error_msg is None]
    return round(1e6 * statistics.median(secs), 3) if len(secs) == len(results) else None


def _verdict(workload: str, record: list, default: list, margin: float) -> Verdict:
    record_us, default_us = _median_us(record), _median_us(default)
    if record_us is None or default_us is None:
        failed = "record" if record_us is None else "default schedule"
        first = next(r.error_msg for r in (record if record_us is None else default) if r.error_msg)
        return Verdict(workload, record_us, default_us, False, f"the {failed} did not run: {first_line(first)}")
    if record_us < default_us * (1 - margin):
        return Verdict(workload, record_us, default_us, True, f"{default_us / record_us:.2f}x the default")
    return Verdict(workload, record_us, default_us, False,
                   f"not {margin:.0%} faster than the default ({default_us / record_us:.2f}x)")


def ship_records(source: Path, target: TargetSpec, out_root: Path, *, rounds: int = 5, margin: float = 0.03,
                 listener: Callable[[str], None] = lambda _: None) -> tuple[Path, list[Verdict]]:
    """Re-time the best record of every workload in the database ``source`` beside its default schedule on this
    machine (``rounds`` interleaved rounds), and write those that win by ``margin`` to
    ``out_root/<target>-<hash>`` (replacing what was there). Return that directory and a verdict per workload."""
    if rounds < 1:
        raise BadInput("--rounds must be at least 1")
    database = open_database(source, read_only=True)
    pairs = []  # (workload, best record, record's schedule, default schedule)
    for workload in database.workloads():
        record = database.best_record(workload.mod)
        if record is None:
            continue
        sch = Schedule(workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        pairs.append((workload, record, sch.mod, apply_default_schedules(workload.mod, target)[0]))
    if not pairs:
        raise BadInput(f"{source} holds no valid tuning record to ship; tune first (python -m pipeline tune --db ...)")
    listener(f"building {len(pairs)} record(s) and their default schedules")
    builder, runner = builder_and_runner(target, None)
    mods = [mod for _, _, *scheduled in pairs for mod in scheduled]
    built = builder.build([ms.builder.BuilderInput(mod, to_tvm_target(target)) for mod in mods])
    inputs = [ms.runner.RunnerInput(b.artifact_path, target.device,
                                    ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True))
              if b.error_msg is None else None for mod, b in zip(mods, built)]
    results: list[list] = [[] for _ in mods]  # per built module, one runner result per round
    try:
        for r in range(rounds):
            listener(f"round {r + 1}/{rounds}")
            # Interleaved, each pair's order swapped every round: drift and a neighbour's load fall on both.
            order = [i for pair in range(len(pairs)) for i in ((2 * pair, 2 * pair + 1) if r % 2 == 0
                                                               else (2 * pair + 1, 2 * pair))]
            runnable = [i for i in order if inputs[i] is not None]
            for i, future in zip(runnable, runner.run([inputs[i] for i in runnable])):
                results[i].append(future.result())
    finally:
        for b in built:
            if b.error_msg is None:
                shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    verdicts = []
    for p, (workload, *_) in enumerate(pairs):
        unbuilt = [built[i].error_msg for i in (2 * p, 2 * p + 1) if built[i].error_msg is not None]
        workload_hash = ms.utils.shash2hex(workload.mod)
        verdicts.append(Verdict(workload_hash, None, None, False, f"did not build: {first_line(unbuilt[0])}")
                        if unbuilt else _verdict(workload_hash, results[2 * p], results[2 * p + 1], margin))
    out = out_root / database_key(target)
    _write(out, [(pair, v) for pair, v in zip(pairs, verdicts) if v.shipped], verdicts, source, rounds, margin)
    return out, verdicts


def _write(out: Path, shipped: list, verdicts: list[Verdict], source: Path, rounds: int, margin: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        database = open_database(staging)
        for (workload, record, _, _), verdict in shipped:
            committed = database.commit_workload(workload.mod)
            database.commit_tuning_record(TuningRecord(record.trace, committed, [verdict.record_us / 1e6],
                                                       record.target, record.args_info))
            database.note(workload.mod, "default_secs", verdict.default_us / 1e6)
        (staging / ".lock").unlink(missing_ok=True)  # shipped records are read-only: no lock is ever taken
        (staging / SUMMARY).write_text(json.dumps({
            "source": str(source), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": device_fingerprint(), "loadavg_at_end": os.getloadavg()[0], "rounds": rounds, "margin": margin,
            "verdicts": [asdict(v) for v in verdicts]}, indent=1) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

