"""Auto-tuning with MetaSchedule: tasks, the tuning database, tuning, and applying records.

Tasks are the fused TIR functions that ``compile`` builds (``stages.optimize.lower``), one per
distinct workload (structural hash), so a workload tuned for one model serves every model that
has it. Functions already marked ``tirx.is_scheduled`` (our hand-written CycleFC kernel) are
listed but not tuned.

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
import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler
from tvm.s_tir.schedule import ScheduleError

from targets import TargetSpec
from .errors import PipelineError
from .stages.build import tvm_target

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
NOTES = "pipeline_notes.json"  # ours: [workload index, key, value] lines, keys in WorkloadStats
LOCK = ".lock"
LOCK_TIMEOUT_S = 60.0
TRIALS_PER_BATCH = 8  # candidates measured together; records are saved after each batch
BUILD_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 30.0
RPC_SESSION_TIMEOUT_S = 60
FAILED_RUN_S = 1e9  # MetaSchedule records a failed trial with run_secs [1e10]


class TuningDatabaseError(PipelineError):
    """The tuning database cannot be read or written."""


class TuningDatabaseCorrupt(TuningDatabaseError):
    """A line of the tuning database does not parse; it is never used."""


class TuningFailed(PipelineError):
    """A tune measured candidates but none of them built and ran."""


class TuningUnsupported(PipelineError):
    """The target or task selection cannot be tuned as asked."""

    exit_code = 2


class RpcUnavailable(PipelineError):
    """The RPC tracker cannot be reached or has no board under the key."""


# ---------------------------------------------------------------------------------------------
# Where the database lives


def cache_root() -> Path:
    """``$PIPELINE_CACHE_DIR``, else ``~/.cache/pipeline``."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "pipeline").expanduser()


def database_dir(spec: TargetSpec) -> Path:
    """The target's database: ``<cache>/tuning/<target name>-<hash of the TVM target and TVM version>``.

    Records measured for one TVM target (CPU, core count, features) never apply to another, and a
    TVM upgrade starts a fresh database.
    """
    key = hashlib.sha256(f"{tvm_target(spec)}|tvm {tvm.__version__}".encode()).hexdigest()[:12]
    return cache_root() / "tuning" / f"{spec.name}-{key}"


# ---------------------------------------------------------------------------------------------
# The database


def _is_valid(record: TuningRecord) -> bool:
    return record.run_secs is not None and all(float(s) < FAILED_RUN_S for s in record.run_secs)


def _us(secs: float | None) -> float | None:
    return None if secs is None else 1e6 * secs


def _mean_secs(measured) -> float:
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

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.memory = ms.database.MemoryDatabase()
        self.repairs: list[str] = []  # what loading had to fix or leave out (a truncated last line)
        self.unreplayable = 0  # well-formed records whose schedule trace does not replay on their workload
        self._workloads: list[Workload] = []  # by line number in WORKLOADS, as records refer to them
        self._offsets = dict.fromkeys((WORKLOADS, RECORDS, NOTES), 0)  # bytes of each file read so far
        self._lines = dict.fromkeys((WORKLOADS, RECORDS, NOTES), 0)
        self._valid: Counter[int] = Counter()  # valid records per workload (its first line number)
        self._notes: dict[int, dict] = {}  # per workload, from NOTES
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TuningDatabaseError(f"cannot create tuning database {self.path}: {e.strerror}; "
                                      "choose another --db or PIPELINE_CACHE_DIR") from None
        with self._locked():
            self._sync()

    # -- files -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
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

    def _workload_at(self, index) -> Workload:
        if not (isinstance(index, int) and 0 <= index < len(self._workloads)):
            raise ValueError(f"workload index {index!r} out of range ({len(self._workloads)} workloads)")
        return self._workloads[index]

    def _add_record(self, obj) -> None:
        if not (isinstance(obj, list) and len(obj) == 2):
            raise ValueError("not a [workload index, record] pair")
        record = TuningRecord.from_json(obj[1], self._workload_at(obj[0]))
        self.memory.commit_tuning_record(record)
        self._valid[self._index(record.workload)] += _is_valid(record)

    def _add_note(self, obj) -> None:
        if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[2], _NOTE_TYPES.get(obj[1], ()))):
            raise ValueError(f"not a [workload index, {' or '.join(_NOTE_TYPES)}, value] note")
        self._notes.setdefault(self._index(self._workload_at(obj[0])), {})[obj[1]] = obj[2]

    def _index(self, workload: Workload) -> int:
        return next(i for i, w in enumerate(self._workloads) if w.same_as(workload))

    # -- what the tuner and the CLI ask -------------------------------------------------------

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
        return WorkloadStats(self._valid[index], None if best is None else _mean_secs(best),
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


def open_database(path: Path) -> TuningDatabase:
    """Load and verify the database at ``path`` (created if missing); see :class:`TuningDatabase`."""
    return TuningDatabase(path)


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    name: str  # the first fused function with this workload
    mod: tvm.IRModule  # the workload: the function as "main"
    weight: int  # how many calls of it the model makes
    hand_scheduled: bool  # marked tirx.is_scheduled (our CycleFC kernel): not tuned

    @property
    def workload(self) -> str:
        return ms.utils.shash2hex(self.mod)


def extract_tasks(mod: tvm.IRModule, spec: TargetSpec) -> list[Task]:
    """One task per distinct fused PrimFunc of ``mod`` (the output of ``stages.optimize.lower``)."""
    return [Task(t.task_name, t.dispatched[0], int(t.weight),
                 bool(t.mod["main"].attrs.get("tirx.is_scheduled", False)))
            for t in ms.relax_integration.extract_tasks(mod, tvm_target(spec))]


def tuning_module(model: str, spec: TargetSpec, batch: int = 1, fp16: bool = False) -> tvm.IRModule:
    """The module ``compile`` builds for (model, target, batch, fp16), just before records apply.

    The weights do not change it (they stay parameters), so seeded random ones are used.
    """
    from .stages.export import export_onnx
    from .stages.model import load_model
    from .stages.optimize import lower
    from .stages.reference import INPUT_NAME, OUTPUT_NAMES, make_inputs
    from .stages.relax_import import import_onnx
    from .stages.simplify import simplify_onnx

    torch_model, cfg, _ = load_model(model, None, 0)
    inputs = make_inputs(cfg, batch, 0)
    with tempfile.TemporaryDirectory(prefix="pipeline-tune-") as tmp:
        export_onnx(torch_model, inputs, OUTPUT_NAMES, cfg.opset, Path(tmp) / "model.onnx")
        simplify_onnx(Path(tmp) / "model.onnx", Path(tmp) / "model.sim.onnx")
        mod, params = import_onnx(Path(tmp) / "model.sim.onnx", {INPUT_NAME: inputs[INPUT_NAME].shape})
    return lower(mod, params, spec, fp16)[0]


# ---------------------------------------------------------------------------------------------
# Tuning


@dataclass(frozen=True)
class RpcTracker:
    host: str
    port: int
    key: str


@dataclass
class TaskState:
    """One task's progress; the listener gets the list of them after every measured batch."""

    name: str
    workload: str
    weight: int
    goal: int  # valid records wanted (--trials); 0 for a hand-scheduled task
    valid: int  # valid records in the database when this run started
    best_us: float | None  # best valid record so far
    default_us: float | None  # its default schedule, when measured
    status: str  # hand-scheduled, tuned already, queued, tuning, done, stopped, search space exhausted
    new_trials: int = 0  # measured by this run, valid or not
    new_valid: int = 0

    @property
    def trials(self) -> int:
        """Progress towards ``goal``: a run measures at most ``goal - valid`` candidates, so a task
        whose candidates all fail is retried by the next run, not tuned forever."""
        return self.valid + self.new_trials

    @property
    def expected_us(self) -> float | None:
        """What a compile runs: the best record, or the default schedule where that is faster."""
        known = [us for us in (self.best_us, self.default_us) if us is not None]
        return min(known) if known else None


TuneListener = Callable[[list[TaskState]], None]


@dataclass
class TuneReport:
    database: str
    tasks: list[TaskState]
    new_records: int
    new_valid: int
    seconds: float
    first_error: str | None
    stopped_by_time_budget: bool
    repairs: list[str]

    @property
    def estimated_latency_us(self) -> float | None:
        """Sum of weight x expected time over the tasks measured (an estimate: kernels timed alone)."""
        parts = [t.weight * t.expected_us for t in self.tasks if t.expected_us is not None]
        return sum(parts) if parts else None


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params) -> tvm.runtime.Module:
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``.

    That import takes ~38 s in every fresh builder worker, past the 30 s build timeout, so every
    trial timed out. Candidates arrive scheduled (tensorized blocks already expanded), so building
    needs no intrinsic registry.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_shared_library(rt_mod: tvm.runtime.Module, triple: str | None) -> str:
    """Link the candidate here, into a shared library (``triple``: with the cross linker, as
    ``stages.build`` does), so the runner or board only loads it: no compiler needed there."""
    from pipeline.cross_link import cross_linker

    path = os.path.join(tempfile.mkdtemp(prefix="pipeline-tune-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cross_linker(triple) if triple else None)
    return path


def _alloc_arguments(device, args_info, alloc_repeat: int) -> list:
    """Candidates' arguments: floats uniform in [0, 1), integers 0, made here and copied to the device.

    MetaSchedule's default fills integers at random too: the index argument of a gather (``take``)
    then reads out of bounds and kills the runner ("Subprocess terminated"). 0 is a valid index into
    any axis. Its default also fills on the device with
    ``tvm.contrib.random``, which the runtime-only TVM that boards install lacks ("Unable to find
    function ... random_fill_for_measure").
    """
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)
    return alloc_argument_common(
        lambda t: t.copyfrom(rng.uniform(size=tuple(t.shape)).astype(str(t.dtype))), device, args_info, alloc_repeat)


def _alloc_remote_arguments(_session, device, args_info, alloc_repeat: int) -> list:
    return _alloc_arguments(device, args_info, alloc_repeat)


@contextlib.contextmanager
def _only_own_tensor_intrinsics(target: tvm.target.Target) -> Iterator[None]:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule does) without the other targets' intrinsics.

    Registering them all takes 15-40 s on this 2-core host (CUDA's alone ~30 s), for nothing on a
    CPU target. The stand-ins are removed afterwards, so a later ``import
    tvm.s_tir.tensor_intrin.cuda`` (dlight, in a CUDA build) still gets the real module.
    """
    foreign = ["cuda", "rocm", "hexagon"] + ([] if "arm_cpu" in target.keys else ["arm_cpu"])
    names = [f"tvm.s_tir.tensor_intrin.{name}" for name in foreign]
    if target.kind.name != "llvm" or "tvm.s_tir.tensor_intrin" in sys.modules:
        yield
        return
    sys.modules.update({name: types.ModuleType(name) for name in names})
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers this target's intrinsics)
        yield
    finally:
        for name in names:
            del sys.modules[name]
            with contextlib.suppress(AttributeError):
                delattr(sys.modules["tvm.s_tir.tensor_intrin"], name.rpartition(".")[2])


def _first_line(message: str) -> str:
    """The informative line of a builder / runner error (the exception line of a traceback)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and "occurred" in lines[0]:  # "LocalBuilder: An exception occurred" + traceback
        return f"{lines[0]}: {lines[-1]}"
    return lines[0] if lines else message


def check_tracker(rpc: RpcTracker) -> int:
    """The number of boards registered under the key; RpcUnavailable (fast) when there are none."""
    try:
        socket.create_connection((rpc.host, rpc.port), timeout=5).close()
    except OSError as e:
        raise RpcUnavailable(f"cannot reach the RPC tracker at {rpc.host}:{rpc.port} ({e.strerror or e}); "
                             "start one with `python -m tvm.exec.rpc_tracker`") from None
    config = ms.runner.RPCConfig(rpc.host, rpc.port, rpc.key, session_timeout_sec=RPC_SESSION_TIMEOUT_S)
    try:
        servers = config.count_num_servers(allow_missing=True)
    except (ValueError, OSError, RuntimeError) as e:
        raise RpcUnavailable(f"RPC tracker {rpc.host}:{rpc.port} did not answer: {_first_line(str(e))}") from None
    if servers == 0:
        raise RpcUnavailable(f"no board is registered under key {rpc.key!r} at the RPC tracker "
                             f"{rpc.host}:{rpc.port}; check `python -m tvm.exec.query_rpc_tracker "
                             f"--host {rpc.host} --port {rpc.port}`")
    return servers


def _use_threads(threads: int) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the worker's thread pool starts, at its first run


def local_runner(spec: TargetSpec) -> ms.runner.LocalRunner:
    """A runner that measures with the threads the target has (its ``num-cores``), as ``bench`` runs libraries.

    Left alone, TVM sizes a worker's pool at half the CPUs (it assumes two hyperthreads per core): 1 thread on
    this 2-vCPU host. There a record that beat our default schedule single-threaded (8.6 ms against 11.9 ms,
    convmixer_768_32's 1x1 conv) was applied, and the 2-thread model ran 279 ms instead of 248."""
    threads = int(tvm_target(spec).attrs.get("num-cores", 0) or os.cpu_count() or 1)
    return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, f_alloc_argument=_alloc_arguments,
                                 initializer=functools.partial(_use_threads, threads))


def _builder_and_runner(spec: TargetSpec, rpc: RpcTracker | None):
    if spec.cuda is not None:
        raise TuningUnsupported(f"tuning {spec.name} (CUDA) is not supported yet; tune a CPU target")
    if rpc is None and spec.runner != "host":
        raise TuningUnsupported(f"{spec.name} cannot be measured on this host; pass --rpc-tracker HOST:PORT "
                                "--rpc-key KEY of a board registered with a TVM RPC tracker")
    builder = ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=BUILD_TIMEOUT_S, f_build=_build,
                                      f_export=functools.partial(_export_shared_library, triple=spec.cross_triple))
    if rpc is None:
        return builder, local_runner(spec)
    config = ms.runner.RPCConfig(rpc.host, rpc.port, rpc.key, session_timeout_sec=RPC_SESSION_TIMEOUT_S)
    return builder, ms.runner.RPCRunner(config, f_alloc_argument=_alloc_remote_arguments, max_workers=check_tracker(rpc))


def _default_schedules(tasks: list[Task], spec: TargetSpec) -> list[tuple[Task, tvm.IRModule]]:
    """Each task's workload as an untuned build schedules it (``stages.optimize``'s default schedules),
    for the tasks that have one."""
    from .stages.optimize import apply_default_schedules

    scheduled = [(task, apply_default_schedules(task.mod, spec)[0]) for task in tasks]
    return [(task, mod) for task, mod in scheduled if mod["main"].attrs.get("tirx.is_scheduled", False)]


def _measure_defaults(defaults: list[tuple[Task, tvm.IRModule]], spec: TargetSpec, database: TuningDatabase,
                      builder, runner) -> None:
    """Time the default schedules with the tune's own builder and runner, and note the times in the
    database: ``apply_records`` applies only records that beat them."""
    if not defaults:
        return
    built = builder.build([ms.builder.BuilderInput(mod, tvm_target(spec)) for _, mod in defaults])
    for (task, _), result in zip(defaults, built):
        if result.error_msg is not None:
            log.warning("the default schedule of %s did not build: %s", task.name, _first_line(result.error_msg))
    ok = [(task, mod, result.artifact_path) for (task, mod), result in zip(defaults, built) if result.error_msg is None]
    # Arguments as the built function takes them: a weight the schedule reads in another layout is passed
    # in that layout (the builder drops the layout copy, which runs once at compile time).
    futures = runner.run([ms.runner.RunnerInput(artifact, spec.device,
                                                ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True))
                          for task, mod, artifact in ok])
    for (task, _, artifact), future in zip(ok, futures):
        result = future.result()
        if result.error_msg is None:
            database.note(task.mod, "default_secs", _mean_secs(result))
        else:
            log.warning("the default schedule of %s did not run: %s", task.name, _first_line(result.error_msg))
        shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)


@derived_object
class _Progress(PyMeasureCallback):
    """Counts each task's trials, keeps the first error and tells the listener after every batch."""

    def __init__(self, states: list[TaskState], listener: TuneListener):
        super().__init__()
        self.states = states
        self.listener = listener
        self.first_error: str | None = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        state = self.states[task_id]
        for built, ran in zip(builder_results, runner_results):
            error = built.error_msg or ran.error_msg
            state.new_trials += 1
            if error is None:
                state.new_valid += 1
                run_us = 1e6 * _mean_secs(ran)
                state.best_us = run_us if state.best_us is None else min(state.best_us, run_us)
            elif self.first_error is None:
                self.first_error = _first_line(str(error))
        self.listener(self.states)


@dataclass
class _Stop:
    """When to start no new batch (shared by the scheduler and the Ctrl-C handler)."""

    deadline: float | None
    by_deadline: bool = False
    interrupted: bool = False


@derived_object
class _RoundRobin(PyTaskScheduler):
    """Round-robin over the tasks: each stops at its own trial budget, and no batch starts after
    the deadline or a Ctrl-C (the batches in flight still finish and are saved)."""

    def __init__(self, states: list[TaskState], stop: _Stop):
        super().__init__()
        self.states = states
        self.stop = stop
        self._next = 0

    def next_task_id(self) -> int:
        scheduler = self._outer()
        tasks = scheduler.tasks_
        for i in range(len(tasks)):
            scheduler.touch_task(i)  # collects finished batches
        if self.stop.interrupted:
            return -1
        if self.stop.deadline is not None and time.monotonic() >= self.stop.deadline:
            self.stop.by_deadline = True
            return -1
        for _ in range(len(tasks)):
            i, self._next = self._next, (self._next + 1) % len(tasks)
            if tasks[i].is_terminated:
                continue
            if tasks[i].measure_candidates is not None:
                scheduler.join_running_task(i)
            state = self.states[i]
            if state.trials >= state.goal:
                state.status = "done"
                scheduler.terminate_task(i)
                continue
            state.status = "tuning"
            return i
        return -1


@contextlib.contextmanager
def _stop_on_interrupt(stop: _Stop) -> Iterator[None]:
    """Ctrl-C stops tuning after the batches in flight (saved), then raises KeyboardInterrupt here.

    A KeyboardInterrupt raised inside MetaSchedule's C++ loop comes out as a RuntimeError or a
    segfault, so the first Ctrl-C only asks the scheduler to start nothing new. A second one
    exits at once (code 130): every record already written is a whole line.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(_signum, _frame) -> None:
        if stop.interrupted:
            os.write(2, b"\ninterrupted again: exiting now\n")
            os._exit(130)
        stop.interrupted = True
        log.warning("interrupted: finishing the measurements in flight (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.interrupted:
        raise KeyboardInterrupt


def _search(tasks: list[Task], states: list[TaskState], spec: TargetSpec, database: TuningDatabase, builder, runner,
            progress: _Progress, stop: _Stop, seed: int | None) -> None:
    """MetaSchedule's evolutionary search on ``tasks`` until each state has its goal (or ``stop``)."""
    target = tvm_target(spec)
    missing = [state.goal - state.trials for state in states]
    per_batch = min(TRIALS_PER_BATCH, max(missing))
    # A small batch needs no 512-candidate population per search round (MetaSchedule's default,
    # sized for 64 per round): it would dominate tiny tunes.
    population = min(512, 64 * per_batch)
    contexts = [ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply",
                               search_strategy=ms.search_strategy.EvolutionarySearch(population_size=population),
                               task_name=task.name, num_threads=os.cpu_count() or 1,
                               rand_state=-1 if seed is None else seed + i).clone()
                for i, task in enumerate(tasks)]
    with tempfile.TemporaryDirectory(prefix="pipeline-tune-") as work_dir:  # MetaSchedule wants one
        ms.tune_tasks(tasks=contexts, task_weights=[float(task.weight) for task in tasks], work_dir=work_dir,
                      max_trials_global=sum(missing) + per_batch * len(tasks), max_trials_per_task=max(missing),
                      num_trials_per_iter=per_batch, builder=builder, runner=runner, database=database,
                      measure_callbacks=[*ms.MeasureCallback.create("default"), progress],
                      task_scheduler=_RoundRobin(states, stop))


def tune(mod: tvm.IRModule, spec: TargetSpec, database: TuningDatabase, *, trials: int,
         time_budget_s: float | None = None, rpc: RpcTracker | None = None, task_pattern: str = "*",
         listener: TuneListener = lambda _states: None, seed: int | None = None) -> TuneReport:
    """Tune ``mod``'s tasks until each has ``trials`` valid records in ``database``.

    Each task's default schedule is timed first (once per workload). A run measures at most the
    records a task lacks; ``time_budget_s`` stops starting new batches; Ctrl-C too, then raises
    KeyboardInterrupt. Raises TuningFailed when candidates were measured but none built and ran.
    """
    start = time.monotonic()
    tasks = [t for t in extract_tasks(mod, spec) if fnmatch.fnmatchcase(t.name, task_pattern)]
    if all(t.hand_scheduled for t in tasks):
        raise TuningUnsupported(f"no task to tune matches --tasks {task_pattern!r}")
    states = []
    for task in tasks:
        stats = database.stats(task.mod)
        status = ("hand-scheduled" if task.hand_scheduled else
                  "tuned already" if stats.valid >= trials or stats.exhausted else "queued")
        states.append(TaskState(task.name, task.workload, task.weight, 0 if task.hand_scheduled else trials,
                                stats.valid, _us(stats.best_secs), _us(stats.default_secs), status))
    todo = [i for i, state in enumerate(states) if state.status == "queued"]
    untimed = [task for task, state in zip(tasks, states) if state.goal and state.default_us is None]
    defaults = _default_schedules(untimed, spec)  # timed once per workload, tuned or not
    progress = _Progress([states[i] for i in todo], listener)
    stop = _Stop(deadline=None if time_budget_s is None else start + time_budget_s)
    if todo or defaults:
        builder, runner = _builder_and_runner(spec, rpc)  # fails fast: target, tracker
    listener(states)
    if todo or defaults:
        with _only_own_tensor_intrinsics(tvm_target(spec)), _stop_on_interrupt(stop):
            _measure_defaults(defaults, spec, database, builder, runner)
            for task, state in zip(tasks, states):
                state.default_us = _us(database.stats(task.mod).default_secs)
            if todo:
                _search([tasks[i] for i in todo], [states[i] for i in todo], spec, database, builder, runner,
                        progress, stop, seed)
        for i in todo:
            if states[i].trials >= trials:
                states[i].status = "done"
            elif stop.by_deadline:
                states[i].status = "stopped"
            else:  # MetaSchedule ended the task early: its search found no new candidate
                states[i].status = "search space exhausted"
                database.note(tasks[i].mod, "exhausted", True)
        listener(states)
    new_trials = sum(state.new_trials for state in states)
    new_valid = sum(state.new_valid for state in states)
    if new_trials and not new_valid:
        raise TuningFailed(f"no valid tuning record: all {new_trials} measured candidates failed; "
                           f"first error: {progress.first_error}")
    return TuneReport(database=str(database.path), tasks=states, new_records=new_trials, new_valid=new_valid,
                      seconds=time.monotonic() - start, first_error=progress.first_error,
                      stopped_by_time_budget=stop.by_deadline, repairs=database.repairs)


def tune_model(model: str, spec: TargetSpec, *, trials: int, batch: int = 1, fp16: bool = False,
               db: Path | None = None, **options) -> TuneReport:
    """``tune`` the module ``compile`` builds for (model, target, batch, fp16) into ``db`` (default:
    the target's database, the one ``compile`` applies)."""
    database = open_database(db or database_dir(spec))
    return tune(tuning_module(model, spec, batch, fp16), spec, database, trials=trials, **options)


# ---------------------------------------------------------------------------------------------
# Applying records (the optimize stage calls this)


def apply_records(mod: tvm.IRModule, spec: TargetSpec) -> tuple[tvm.IRModule, dict]:
    """Schedule each fused function with its best record in the target's database, where that record
    beat the function's default schedule (or no default was measured); return the module and the
    manifest's report: what was applied, and where the default schedule stays because it was faster.

    No database: nothing applied. A corrupt one: TuningDatabaseCorrupt (never used silently).
    """
    path = database_dir(spec)
    report = {"database": str(path), "records_applied": 0, "functions": {}, "default_faster": {}}
    if not (path / WORKLOADS).is_file():
        return mod, report
    database = open_database(path)
    chosen = ms.database.MemoryDatabase()  # the records to apply, for MetaSchedule's own pass
    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")  # as that pass does
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        workload = normalize(func)
        record, stats = database.best_record(workload), database.stats(workload)
        if record is None:
            continue
        times = {"run_us": round(1e6 * stats.best_secs, 3)}
        if stats.default_secs is not None:
            times["default_us"] = round(1e6 * stats.default_secs, 3)
            if stats.default_secs <= stats.best_secs:
                report["default_faster"][gv.name_hint] = times
                continue
        # Paired with the workload it was tuned on: its trace names that module's blocks, and MetaSchedule
        # swaps in the scheduled copy of it (structurally this function).
        chosen.commit_tuning_record(TuningRecord(record.trace, chosen.commit_workload(record.workload.mod),
                                                 record.run_secs, record.target, record.args_info))
        report["functions"][gv.name_hint] = {"workload": ms.utils.shash2hex(workload), **times}
    with tvm_target(spec), chosen:
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    report["records_applied"] = len(report["functions"])
    if database.repairs:
        report["repairs"] = database.repairs
    return tuned, report
