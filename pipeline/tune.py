"""The tuner: MetaSchedule over the fused TIR functions a compile builds; `python -m pipeline tune`.

Tasks are the fused TIR functions of the module ``compile`` builds (pipeline.run.front_end, then the optimize
stage's ``lower``), one per distinct workload (structural hash), so a workload tuned for one model serves every
model that has it. Hand-scheduled functions (our CycleFC kernel) are listed but not tuned. Each task's default
schedule is timed first, so that ``compile`` applies only records that beat it. Records go to the target's
database (pipeline.tuning.database: resumable, shared between processes); candidates are built and measured by
pipeline.tuning.measure.

Trials go where the time is: each task's share of the model's time is estimated (its default schedule's
measured time, else its FLOPs, times its calls); a task under ``NEGLIGIBLE_SHARE`` is skipped, the others get
``--trials`` in proportion to their share (the largest share gets all of them, every task at least one).

Offline (``export_candidates`` / ``import_results``, pipeline.tuning.offline): the same tasks and search, but
the candidates are built into a batch file that a board times alone; its results go into the same database.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.meta_schedule.database import TuningRecord
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

from targets import TargetSpec
from tvm_schedules.scheduled import is_scheduled
from .errors import PipelineError
from .run import front_end, kept_float32, untimed
from .spec import Board, BuildSpec, resolve_target
from .stages.optimize import apply_default_schedules, lower
from .tuning import offline
from .tuning.database import (FAILED_RUN_S, TRIALS_PER_BATCH, TuningDatabase, database_dir, mean_secs,
                              open_database)
from .tuning.measure import (RPC_SESSION_TIMEOUT_S, TuningUnsupported, builder_and_runner, candidate_builder, first_line,
                             only_own_tensor_intrinsics)
from .tvm_targets import to_tvm_target


log = logging.getLogger(__name__)


# A task under this share of the selected tasks' estimated time is not tuned: at 1 %, even a record twice as
# fast as its default saves the model 0.5 % (test_mixer: 10 of its 15 tasks are reshapes and transposes).
NEGLIGIBLE_SHARE = 0.01


class TuningFailed(PipelineError):
    """A tune measured candidates but none of them built and ran."""


def _us(secs: float | None) -> float | None:
    return None if secs is None else 1e6 * secs


@dataclass(frozen=True)
class Task:
    name: str  # the first fused function with this workload
    mod: tvm.IRModule  # the workload: the function as "main"
    weight: int  # how many calls of it the model makes
    hand_scheduled: bool  # marked tirx.is_scheduled (our CycleFC kernel): not tuned

    @property
    def workload(self) -> str:
        return ms.utils.shash2hex(self.mod)


def extract_tasks(mod: tvm.IRModule, target: TargetSpec) -> list[Task]:
    """One task per distinct fused PrimFunc of ``mod`` (the output of ``stages.optimize.lower``)."""
    return [Task(t.task_name, t.dispatched[0], int(t.weight), is_scheduled(t.mod["main"]))
            for t in ms.relax_integration.extract_tasks(mod, to_tvm_target(target))]


def tuning_module(spec: BuildSpec) -> tvm.IRModule:
    """The module ``compile`` builds for ``spec``, just before records apply.

    The weights do not change it (they stay parameters), so seeded random ones are used.
    """
    with tempfile.TemporaryDirectory(prefix="pipeline-tune-") as tmp:
        front = front_end(BuildSpec(spec.model, spec.target, batch=spec.batch), Path(tmp), untimed)
        kept = kept_float32(spec, front, Path(tmp))  # --keep-fp32: the layers compile keeps in float32
    return lower(front.mod, front.params, resolve_target(spec), spec.fp16, kept.bindings if kept else frozenset())[0]


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
    status: str  # hand-scheduled, negligible, tuned already, queued, tuning, done, stopped, search space exhausted
    new_trials: int = 0  # measured by this run, valid or not
    new_valid: int = 0
    share: float | None = None  # estimated share of the selected tasks' time in the model (see allocate_trials)

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

    @property
    def record_applies(self) -> bool:
        """Whether ``compile`` applies this task's best record (pipeline.tuning.apply's rule)."""
        return self.best_us is not None and (self.default_us is None or self.best_us < self.default_us)


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


def _default_schedules(tasks: list[Task], target: TargetSpec) -> list[tuple[Task, tvm.IRModule]]:
    """Each task's workload as an untuned build schedules it (the optimize stage's default schedules: for CUDA,
    our rules, then dlight's), for the tasks that have a default schedule."""
    scheduled = [(task, apply_default_schedules(task.mod, target)[0]) for task in tasks]
    return [(task, mod) for task, mod in scheduled if is_scheduled(mod["main"])]


def _measure_defaults(defaults: list[tuple[Task, tvm.IRModule]], target: TargetSpec, database: TuningDatabase,
                      builder, runner) -> None:
    """Time the default schedules with the tune's own builder and runner, and note the times in the
    database: ``apply_records`` applies only records that beat them."""
    if not defaults:
        return
    built = builder.build([ms.builder.BuilderInput(mod, to_tvm_target(target)) for _, mod in defaults])
    for (task, _), result in zip(defaults, built):
        if result.error_msg is not None:
            log.warning("the default schedule of %s did not build: %s", task.name, first_line(result.error_msg))
    ok = [(task, mod, result.artifact_path) for (task, mod), result in zip(defaults, built) if result.error_msg is None]
    # Arguments as the built function takes them: a weight the schedule reads in another layout is passed
    # in that layout (the builder drops the layout copy, which runs once at compile time).
    futures = runner.run([ms.runner.RunnerInput(artifact, target.device,
                                                ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True))
                          for task, mod, artifact in ok])
    for (task, _, artifact), future in zip(ok, futures):
        result = future.result()
        if result.error_msg is None:
            database.note(task.mod, "default_secs", mean_secs(result))
        else:
            log.warning("the default schedule of %s did not run: %s", task.name, first_line(result.error_msg))
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
                run_us = 1e6 * mean_secs(ran)
                state.best_us = run_us if state.best_us is None else min(state.best_us, run_us)
            elif self.first_error is None:
                self.first_error = first_line(str(error))
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


def _search_context(task: Task, target: TargetSpec, per_batch: int, seed: int | None) -> ms.TuneContext:
    """MetaSchedule's tuning context for ``task``: evolutionary search over the post-order-apply design space."""
    # A small batch needs no 512-candidate population per search round (MetaSchedule's default,
    # sized for 64 per round): it would dominate tiny tunes.
    population = min(512, 64 * per_batch)
    return ms.TuneContext(mod=task.mod, target=to_tvm_target(target), space_generator="post-order-apply",
                          search_strategy=ms.search_strategy.EvolutionarySearch(population_size=population),
                          task_name=task.name, num_threads=os.cpu_count() or 1,
                          rand_state=-1 if seed is None else seed).clone()


def _search(tasks: list[Task], states: list[TaskState], target: TargetSpec, database: TuningDatabase, builder,
            runner, progress: _Progress, stop: _Stop, seed: int | None) -> None:
    """MetaSchedule's evolutionary search on ``tasks`` until each state has its goal (or ``stop``)."""
    missing = [state.goal - state.trials for state in states]
    per_batch = min(TRIALS_PER_BATCH, max(missing))
    contexts = [_search_context(task, target, per_batch, None if seed is None else seed + i)
                for i, task in enumerate(tasks)]
    with tempfile.TemporaryDirectory(prefix="pipeline-tune-") as work_dir:  # MetaSchedule wants one
        ms.tune_tasks(tasks=contexts, task_weights=[float(task.weight) for task in tasks], work_dir=work_dir,
                      max_trials_global=sum(missing) + per_batch * len(tasks), max_trials_per_task=max(missing),
                      num_trials_per_iter=per_batch, builder=builder, runner=runner, database=database,
                      measure_callbacks=[*ms.MeasureCallback.create("default"), progress],
                      task_scheduler=_RoundRobin(states, stop))


def _select(mod: tvm.IRModule, target: TargetSpec, database: TuningDatabase,
            task_pattern: str) -> tuple[list[Task], list[TaskState]]:
    """The tasks matching ``task_pattern`` and their states as the database has them (goals not set yet)."""
    tasks = [t for t in extract_tasks(mod, target) if fnmatch.fnmatchcase(t.name, task_pattern)]
    if all(t.hand_scheduled for t in tasks):
        raise TuningUnsupported(f"no task to tune matches --tasks {task_pattern!r}")
    states = []
    for task in tasks:
        stats = database.stats(task.mod)
        states.append(TaskState(task.name, task.workload, task.weight, 0, stats.valid, _us(stats.best_secs),
                                _us(stats.default_secs), "hand-scheduled" if task.hand_scheduled else "queued"))
    return tasks, states


def allocate_trials(tasks: list[Task], states: list[TaskState], trials: int, database: TuningDatabase) -> None:
    """Each tunable task's share of the time, goal and status: ``trials`` for the largest share, the others in
    proportion (at least 1), none under NEGLIGIBLE_SHARE ("negligible").

    The share is of weight x default-schedule time when every selected task's default was measured, else of
    weight x FLOPs (an estimate: injective copies count as nothing)."""
    tunable = [(task, state) for task, state in zip(tasks, states) if not task.hand_scheduled]
    measured = all(state.default_us is not None for _, state in tunable)
    costs = [state.weight * (state.default_us if measured else float(estimate_tir_flops(task.mod)))
             for task, state in tunable]
    total = sum(costs)
    shares = [cost / total if total > 0 else 1 / len(costs) for cost in costs]
    for (task, state), share in zip(tunable, shares):
        state.share = share
        if share < NEGLIGIBLE_SHARE:
            state.goal, state.status = 0, "negligible"
            continue
        state.goal = max(1, math.ceil(trials * share / max(shares)))
        done = state.valid >= state.goal or database.stats(task.mod).exhausted
        state.status = "tuned already" if done else "queued"


def tune(mod: tvm.IRModule, target: TargetSpec, database: TuningDatabase, *, trials: int,
         time_budget_s: float | None = None, board: Board | None = None, timeout: float = RPC_SESSION_TIMEOUT_S,
         task_pattern: str = "*",
         listener: TuneListener = lambda _states: None, seed: int | None = None) -> TuneReport:
    """Tune ``mod``'s tasks until each has its goal of valid records in ``database`` (``allocate_trials``).

    Each task's default schedule is timed first (once per workload). A run measures at most the
    records a task lacks; ``time_budget_s`` stops starting new batches; Ctrl-C too, then raises
    KeyboardInterrupt. Raises TuningFailed when candidates were measured but none built and ran.
    """
    start = time.monotonic()
    tasks, states = _select(mod, target, database, task_pattern)
    untimed_tasks = [task for task, state in zip(tasks, states) if not task.hand_scheduled and state.default_us is None]
    defaults = _default_schedules(untimed_tasks, target)  # timed once per workload, tuned or not
    # The goals are known only once the defaults are timed; no task can want more than `trials`.
    work = bool(defaults) or any(not task.hand_scheduled and state.valid < trials and not database.stats(task.mod).exhausted
                                 for task, state in zip(tasks, states))
    stop = _Stop(deadline=None if time_budget_s is None else start + time_budget_s)
    if work:
        builder, runner = builder_and_runner(target, board, timeout)  # fails fast: target, tracker, GPU
    intrinsics = only_own_tensor_intrinsics(to_tvm_target(target)) if work else contextlib.nullcontext()
    with intrinsics, _stop_on_interrupt(stop):
        if defaults:
            _measure_defaults(defaults, target, database, builder, runner)
            for task, state in zip(tasks, states):
                state.default_us = _us(database.stats(task.mod).default_secs)
        allocate_trials(tasks, states, trials, database)
        listener(states)
        todo = [i for i, state in enumerate(states) if state.status == "queued"]
        progress = _Progress([states[i] for i in todo], listener)
        if todo:
            _search([tasks[i] for i in todo], [states[i] for i in todo], target, database, builder, runner,
                    progress, stop, seed)
    for i in todo:
        if states[i].trials >= states[i].goal:
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


# ---- offline: a batch of candidates for a board this host cannot reach ---------------------------------------


@dataclass
class ExportReport:
    batch: Path
    batch_id: str
    database: str
    tasks: list[TaskState]
    candidates: int  # search candidates in the batch
    defaults: int  # default schedules in the batch (timed once per workload)
    build_failures: int  # candidates that did not build: recorded as failed trials, not in the batch
    first_error: str | None


def _generate(task: Task, count: int, target: TargetSpec, database: TuningDatabase, seed: int | None) -> list:
    """Up to ``count`` new candidates for ``task``: one round of MetaSchedule's evolutionary search, seeded with
    the database's best records of the workload and a cost model trained on all its valid ones, as an online
    tune continues."""
    context = _search_context(task, target, count, seed)
    cost_model = ms.CostModel.create("xgb", num_tuning_cores=os.cpu_count() or 1)
    known = database.get_top_k(database.commit_workload(task.mod), 1 << 16)
    if known:
        cost_model.update(context, [r.as_measure_candidate() for r in known],
                          [ms.runner.RunnerResult([float(s) for s in r.run_secs], None) for r in known])
    context.pre_tuning(max_trials=count, num_trials_per_iter=count, design_spaces=context.generate_design_space(),
                       database=database, cost_model=cost_model)
    try:
        return list(context.generate_measure_candidates() or [])
    finally:
        context.post_tuning()


def export_candidates(mod: tvm.IRModule, target: TargetSpec, database: TuningDatabase, out: Path, *, trials: int,
                      task_pattern: str = "*", seed: int | None = None) -> ExportReport:
    """Build the candidates the next round of tuning would measure (and the default schedules not timed yet)
    into the batch file ``out`` (pipeline.tuning.offline), for a board to time with the batch's
    time_candidates.py; ``import_results`` reads its results back."""
    tasks, states = _select(mod, target, database, task_pattern)
    defaults = _default_schedules([task for task, state in zip(tasks, states)
                                   if not task.hand_scheduled and state.default_us is None], target)
    allocate_trials(tasks, states, trials, database)
    todo = [(task, state) for task, state in zip(tasks, states) if state.status == "queued"]
    tvm_target = to_tvm_target(target)
    with only_own_tensor_intrinsics(tvm_target):
        searched = [(task, c) for i, (task, state) in enumerate(todo)
                    for c in _generate(task, state.goal - state.valid, target, database,
                                       None if seed is None else seed + i)]
        wanted = [(task.mod, c.sch.mod, list(c.args_info), c) for task, c in searched]
        wanted += [(task.mod, sched, list(ms.arg_info.ArgInfo.from_entry_func(sched, remove_preproc=True)), None)
                   for task, sched in defaults]
        built = candidate_builder(target).build([ms.builder.BuilderInput(m, tvm_target) for _, m, _, _ in wanted])
    candidates, failures, first_error = [], 0, None
    for (workload, _, args_info, searched_candidate), result in zip(wanted, built):
        record = None if searched_candidate is None else TuningRecord(
            searched_candidate.sch.trace, database.commit_workload(workload), None, tvm_target, args_info)
        if result.error_msg is None:
            candidates.append(offline.Candidate(workload, result.artifact_path, args_info, record))
            continue
        failures += 1
        first_error = first_error or first_line(result.error_msg)
        if record is not None:  # a trial that failed, as MetaSchedule records one
            database.commit_tuning_record(TuningRecord(record.trace, record.workload, [10 * FAILED_RUN_S],
                                                       tvm_target, args_info))
    if not candidates:
        raise TuningFailed(f"nothing to export: {failures} candidate(s) failed to build (first error: {first_error})"
                           if failures else "nothing to export: every selected task has its records "
                           "(raise --trials to continue)")
    try:
        threads = int(tvm_target.host.attrs["num-cores"] if target.cuda else tvm_target.attrs["num-cores"])
        batch_id = offline.write_batch(out, candidates, database, target.device,
                                       target.cuda.arch if target.cuda else None, threads)
    finally:
        offline.remove_artifacts(candidates)
    return ExportReport(out, batch_id, str(database.path), states,
                        sum(c.record is not None for c in candidates), sum(c.record is None for c in candidates),
                        failures, first_error)


def _database(spec: BuildSpec, db: Path | None) -> tuple[TargetSpec, TuningDatabase]:
    target = resolve_target(spec)
    return target, open_database(db or database_dir(target))


def tune_model(spec: BuildSpec, *, trials: int, db: Path | None = None, **options) -> TuneReport:
    """``tune`` the module ``compile`` builds for ``spec`` into ``db`` (default: the target's database, the one
    ``compile`` applies)."""
    target, database = _database(spec, db)
    return tune(tuning_module(spec), target, database, trials=trials, **options)


def export_model(spec: BuildSpec, out: Path, *, trials: int, db: Path | None = None, **options) -> ExportReport:
    """``export_candidates`` of the module ``compile`` builds for ``spec``, from ``db`` (default: the target's)."""
    target, database = _database(spec, db)
    return export_candidates(tuning_module(spec), target, database, out, trials=trials, **options)


def import_results(spec: BuildSpec, results: Path, db: Path | None = None) -> offline.ImportReport:
    """Add a board's results of a batch exported for ``spec``'s target to ``db`` (default: the target's)."""
    return offline.import_results(results, _database(spec, db)[1])
