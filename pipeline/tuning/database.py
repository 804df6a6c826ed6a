"""The tuning database: MetaSchedule's records per workload, shared by every model that has the workload.

The database is one directory per target (``database_dir``), in MetaSchedule's JSONDatabase
format: ``database_workload.json`` and ``database_tuning_record.json``, one JSON line per entry,
records pointing at workloads by line number. :class:`TuningDatabase` reads and writes it:

* every append (one ``write`` of one whole line) happens under an exclusive ``flock`` on
  ``.lock``, after reading what other processes appended, so concurrent tunes on one database
  keep the line numbers consistent;
* records are appended as each measured batch completes, so an interrupted tune (Ctrl-C,
  ``kill -9``) loses only the batch in flight (at most ``TRIALS_PER_BATCH`` trials); running the
  same command again continues: tasks that already have ``--trials`` valid records (or whose
  search space ran out) are skipped, the others get the trials they still lack, their search
  seeded with their best records so far;
* beside MetaSchedule's files, ``pipeline_notes.json`` (same journal rules) notes per workload
  the measured time of its default schedule (``tvm_schedules``, what an untuned build runs) and
  whether its search space ran out. A record is applied only where it beats that default: on tiny
  kernels MetaSchedule's multi-threaded candidates lose to the defaults;
* a last line without its newline (an append cut short) is dropped and reported; any other line
  that does not parse makes the database refuse to load (:class:`TuningDatabaseCorrupt`), so a
  damaged database is never used silently. A well-formed record whose schedule trace does not
  replay on its workload (MetaSchedule writes some) is left out and reported.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload
from tvm.ir.utils import derived_object
from tvm.s_tir.schedule import ScheduleError

from targets import TargetSpec
from .. import paths
from ..errors import PipelineError
from ..tvm_targets import to_tvm_target

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
NOTES = "pipeline_notes.json"  # ours: [workload index, key, value] lines, keys in WorkloadStats
LOCK = ".lock"
LOCK_TIMEOUT_S = 60.0
TRIALS_PER_BATCH = 8  # candidates measured together; records are saved after each batch
FAILED_RUN_S = 1e9  # MetaSchedule records a failed trial with run_secs [1e10]


class TuningDatabaseError(PipelineError):
    """The tuning database cannot be read or written."""


class TuningDatabaseCorrupt(TuningDatabaseError):
    """A line of the tuning database does not parse; it is never used."""


def database_key(target: TargetSpec) -> str:
    """``<target name>-<hash of the TVM target and TVM version>``: what makes a record valid.

    Records measured for one TVM target (CPU, core count, features; GPU arch) never apply to another,
    and a TVM upgrade starts afresh.
    """
    key = hashlib.sha256(f"{to_tvm_target(target)}|tvm {tvm.__version__}".encode()).hexdigest()[:12]
    return f"{target.name}-{key}"


def database_dir(target: TargetSpec) -> Path:
    """The target's database: ``<cache>/tuning/<database_key>``."""
    return paths.tuning_dir() / database_key(target)


def shipped_dir(target: TargetSpec) -> Path:
    """Where this repository ships tuned records for the target's class: ``tvm_schedules/records/<database_key>``
    (read-only; it need not exist)."""
    return paths.shipped_records_dir() / database_key(target)


def _is_valid(record: TuningRecord) -> bool:
    return record.run_secs is not None and all(float(s) < FAILED_RUN_S for s in record.run_secs)


def mean_secs(measured) -> float:
    """The mean of a tuning record's or runner result's ``run_secs``."""
    return sum(float(s) for s in measured.run_secs) / len(measured.run_secs)


_NOTE_TYPES = {"default_secs": float, "exhausted": bool}  # the notes NOTES holds, and their JSON types


class WorkloadStats(NamedTuple):
    valid: int  # valid records
    best_secs: float | None  # the best one's mean run time
    default_secs: float | None  # the mean run time of its default schedule, when measured
    exhausted: bool  # a tune ran out of new candidates for it: more trials would find nothing new


def _record_json(record: TuningRecord):
    """``record.as_json()``, which fails on a trace with a layout rewrite (MetaSchedule's RewriteLayout, when a
    model weight is read in another layout): its IndexMaps are written in TVM's own JSON, the string that
    ``TuningRecord.from_json`` reads back in their place."""
    def unpack(obj):
        if obj is None or isinstance(obj, (int, float, str)):
            return obj
        if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            return obj.value
        if isinstance(obj, tvm_ffi.Array):
            return [unpack(x) for x in obj]
        if isinstance(obj, tvm_ffi.Map):
            return {unpack(k): unpack(v) for k, v in obj.items()}
        return tvm.ir.save_json(obj)

    return unpack(ms._ffi_api.TuningRecordAsJSON(record))  # noqa: SLF001


@derived_object
class TuningDatabase(PyDatabase):
    """MetaSchedule's JSON database, verified on load and safe to share between processes.

    An in-memory ``MemoryDatabase`` answers the queries; the files are the journal it is
    rebuilt from. Every write first reads what other processes appended (under the lock).
    """

    def __init__(self, path: Path, read_only: bool = False):
        super().__init__()
        self.path = Path(path)
        self.read_only = read_only  # shipped records (tvm_schedules/records/): never written, locked or repaired
        self.memory = ms.database.MemoryDatabase()
        self.repairs: list[str] = []  # what loading had to fix or leave out (a truncated last line)
        self.unreplayable = 0  # well-formed records whose schedule trace does not replay on their workload
        self._workloads: list[Workload] = []  # by line number in WORKLOADS, as records refer to them
        self._offsets = dict.fromkeys((WORKLOADS, RECORDS, NOTES), 0)  # bytes of each file read so far
        self._lines = dict.fromkeys((WORKLOADS, RECORDS, NOTES), 0)
        self._valid: Counter[int] = Counter()  # valid records per workload (its first line number)
        self._notes: dict[int, dict] = {}  # per workload, from NOTES
        try:
            if not read_only:
                self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TuningDatabaseError(f"cannot create tuning database {self.path}: {e.strerror}; "
                                      "choose another --db or PIPELINE_CACHE_DIR") from None
        with self._locked():
            self._sync()

    # -- files -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.read_only:
            yield
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TuningDatabaseError(f"cannot open {self.path / LOCK}: {e.strerror}") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TuningDatabaseError(
                            f"{self.path / LOCK} stayed locked for {LOCK_TIMEOUT_S:g} s; "
                            "check for a stuck tune process") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _corrupt(self, name: str, lineno: int, reason: str) -> TuningDatabaseCorrupt:
        return TuningDatabaseCorrupt(
            f"tuning database {self.path} is corrupt: {name} line {lineno}: {reason}; "
            f"move the directory aside (or delete that line) and tune again")

    def _sync(self) -> None:
        """Read the lines appended since the last call (the lock is held)."""
        for name, add in ((WORKLOADS, self._add_workload), (RECORDS, self._add_record),
                          (NOTES, self._add_note)):
            path = self.path / name
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < self._offsets[name]:
                        raise TuningDatabaseCorrupt(f"{path} shrank while in use; "
                                                    "something other than pipeline rewrote it")
                    f.seek(self._offsets[name])
                    data = f.read()
            except FileNotFoundError:
                data = b""
            complete, newline, tail = data.rpartition(b"\n")
            if tail and self.read_only:
                raise self._corrupt(name, self._lines[name] + complete.count(b"\n") + 1, "a truncated last line")
            if tail:  # an append cut short by a crash or kill: it never held a whole record
                os.truncate(path, self._offsets[name] + len(complete) + len(newline))
                self.repairs.append(f"dropped a truncated last line ({len(tail)} bytes) of {path}")
                log.warning("%s", self.repairs[-1])
            if not newline:
                continue
            unreplayable = self.unreplayable
            for line in complete.split(b"\n"):
                self._lines[name] += 1
                try:
                    add(json.loads(line))
                except ScheduleError:
                    # Measured and written whole, but its trace fails to replay on the workload read back
                    # (seen for RFactor reductions: 24 of 419 records of a 20-model tune). MetaSchedule
                    # skips such records itself ("trace replay failures"); so do we, and say so.
                    self.unreplayable += 1
                except (ValueError, TypeError, IndexError, RuntimeError) as e:  # TVM raises RuntimeError kinds
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise self._corrupt(name, self._lines[name], reason[:200]) from None
            if self.unreplayable > unreplayable:
                self.repairs.append(f"left out {self.unreplayable - unreplayable} record(s) of {path} whose "
                                    "schedule does not replay on their workload")
                log.warning("%s", self.repairs[-1])
            self._offsets[name] += len(complete) + len(newline)

    def _append(self, name: str, obj) -> None:
        if self.read_only:
            raise TuningDatabaseError(f"{self.path} holds shipped records: it is never written")
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._offsets[name] += len(line)
        self._lines[name] += 1

    def _add_workload(self, obj) -> None:
        workload = self.memory.commit_workload(Workload.from_json(obj).mod)
        self._workloads.append(workload)

    def workload_at(self, index) -> Workload:
        if not (isinstance(index, int) and 0 <= index < len(self._workloads)):
            raise ValueError(f"workload index {index!r} out of range ({len(self._workloads)} workloads)")
        return self._workloads[index]

    def record_from_line(self, obj) -> TuningRecord:
        """A record from its ``[workload index, record JSON]`` line of RECORDS (ValueError, or ScheduleError
        when its trace does not replay on that workload)."""
        if not (isinstance(obj, list) and len(obj) == 2):
            raise ValueError("not a [workload index, record] pair")
        return TuningRecord.from_json(obj[1], self.workload_at(obj[0]))

    def workload_index(self, mod: tvm.IRModule) -> int:
        """The line of WORKLOADS that holds the workload ``mod`` (committed first if new)."""
        return self._index(self.commit_workload(mod))

    def record_line(self, record: TuningRecord) -> list:
        """``record`` as its line of RECORDS holds it."""
        return [self.workload_index(record.workload.mod), _record_json(record)]

    def _add_record(self, obj) -> None:
        record = self.record_from_line(obj)
        self.memory.commit_tuning_record(record)
        self._valid[self._index(record.workload)] += _is_valid(record)

    def _add_note(self, obj) -> None:
        if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[2], _NOTE_TYPES.get(obj[1], ()))):
            raise ValueError(f"not a [workload index, {' or '.join(_NOTE_TYPES)}, value] note")
        self._notes.setdefault(self._index(self.workload_at(obj[0])), {})[obj[1]] = obj[2]

    def _index(self, workload: Workload) -> int:
        return next(i for i, w in enumerate(self._workloads) if w.same_as(workload))

    # -- what the tuner and the CLI ask -------------------------------------------------------

    def workloads(self) -> list[Workload]:
        """Every workload, in the order of WORKLOADS."""
        return list(self._workloads)

    def best_record(self, mod: tvm.IRModule) -> TuningRecord | None:
        """The fastest valid record of the workload ``mod``, or None."""
        if not self.memory.has_workload(mod):
            return None
        best = self.memory.get_top_k(self.memory.commit_workload(mod), 1)  # commit: finds, writes nothing
        return best[0] if best else None

    def stats(self, mod: tvm.IRModule) -> WorkloadStats:
        if not self.memory.has_workload(mod):
            return WorkloadStats(0, None, None, False)
        index = self._index(self.memory.commit_workload(mod))
        best, notes = self.best_record(mod), self._notes.get(index, {})
        return WorkloadStats(self._valid[index], None if best is None else mean_secs(best),
                             notes.get("default_secs"), notes.get("exhausted", False))

    def note(self, mod: tvm.IRModule, key: str, value) -> None:
        """Write one of WorkloadStats' notes (``default_secs``, ``exhausted``) for the workload ``mod``."""
        workload = self.commit_workload(mod)
        with self._locked():
            self._sync()
            index = self._index(workload)
            self._append(NOTES, [index, key, value])
            self._notes.setdefault(index, {})[key] = value

    # -- the Database interface MetaSchedule calls --------------------------------------------

    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self.memory.has_workload(mod)

    def commit_workload(self, mod: tvm.IRModule) -> Workload:
        if not self.memory.has_workload(mod):
            with self._locked():
                self._sync()  # another process may have added it meanwhile
                if not self.memory.has_workload(mod):
                    workload = self.memory.commit_workload(mod)
                    self._append(WORKLOADS, workload.as_json())
                    self._workloads.append(workload)
        return self.memory.commit_workload(mod)

    def commit_tuning_record(self, record: TuningRecord) -> None:
        with self._locked():
            self._sync()
            index = self._index(record.workload)
            self._append(RECORDS, [index, _record_json(record)])
        self.memory.commit_tuning_record(record)
        self._valid[index] += _is_valid(record)

    def get_top_k(self, workload: Workload, top_k: int) -> list[TuningRecord]:
        return self.memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list[TuningRecord]:
        return self.memory.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self.memory)


def open_database(path: Path, read_only: bool = False) -> TuningDatabase:
    """Load and verify the database at ``path`` (created if missing, unless ``read_only``); see :class:`TuningDatabase`."""
    return TuningDatabase(path, read_only)
