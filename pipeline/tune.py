"""The tuner: MetaSchedule over the fused TIR functions a compile builds; `python -m pipeline tune`.

Tasks are the fused TIR functions of the module ``compile`` builds (pipeline.run.front_end, then the optimize
stage's ``lower``), one per distinct workload (structural hash), so a workload tuned for one model serves every
model that has it. Hand-scheduled functions (our CycleFC kernel) are listed but not tuned. Each task's default
schedule is timed first, so that ``compile`` applies only records that beat it. Records go to the target's
database (pipeline.tuning.database: resumable, shared between processes); candidates are built and measured by
pipeline.tuning.measure.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
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
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

from targets import TargetSpec
from tvm_schedules.scheduled import is_scheduled
from .errors import PipelineError
from .run import front_end, untimed
from .spec import Board, BuildSpec, resolve_target
from .stages.optimize import apply_default_schedules, lower
from .tuning.database import TRIALS_PER_BATCH, TuningDatabase, database_dir, mean_secs, open_database
from .tuning.measure import RPC_SESSION_TIMEOUT_S, TuningUnsupported, builder_and_runner, first_line, only_own_tensor_intrinsics
from .tvm_targets import to_tvm_target


log = logging.getLogger(__name__)


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
    return lower(front.mod, front.params, resolve_target(spec), spec.fp16)[0]


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


def _default_schedules(tasks: list[Task], target: TargetSpec) -> list[tuple[Task, tvm.IRModule]]:
    """Each task's workload as an untuned build schedules it (``stages.optimize``'s default schedules),
    for the tasks that have one."""
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


def _search(tasks: list[Task], states: list[TaskState], target: TargetSpec, database: TuningDatabase, builder,
            runner, progress: _Progress, stop: _Stop, seed: int | None) -> None:
    """MetaSchedule's evolutionary search on ``tasks`` until each state has its goal (or ``stop``)."""
    tvm_target = to_tvm_target(target)
    missing = [state.goal - state.trials for state in states]
    per_batch = min(TRIALS_PER_BATCH, max(missing))
    # A small batch needs no 512-candidate population per search round (MetaSchedule's default,
    # sized for 64 per round): it would dominate tiny tunes.
    population = min(512, 64 * per_batch)
    contexts = [ms.TuneContext(mod=task.mod, target=tvm_target, space_generator="post-order-apply",
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


def tune(mod: tvm.IRModule, target: TargetSpec, database: TuningDatabase, *, trials: int,
         time_budget_s: float | None = None, board: Board | None = None, timeout: float = RPC_SESSION_TIMEOUT_S,
         task_pattern: str = "*",
         listener: TuneListener = lambda _states: None, seed: int | None = None) -> TuneReport:
    """Tune ``mod``'s tasks until each has ``trials`` valid records in ``database``.

    Each task's default schedule is timed first (once per workload). A run measures at most the
    records a task lacks; ``time_budget_s`` stops starting new batches; Ctrl-C too, then raises
    KeyboardInterrupt. Raises TuningFailed when candidates were measured but none built and ran.
    """
    start = time.monotonic()
    tasks = [t for t in extract_tasks(mod, target) if fnmatch.fnmatchcase(t.name, task_pattern)]
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
    untimed_tasks = [task for task, state in zip(tasks, states) if state.goal and state.default_us is None]
    defaults = _default_schedules(untimed_tasks, target)  # timed once per workload, tuned or not
    progress = _Progress([states[i] for i in todo], listener)
    stop = _Stop(deadline=None if time_budget_s is None else start + time_budget_s)
    if todo or defaults:
        builder, runner = builder_and_runner(target, board, timeout)  # fails fast: target, tracker
    listener(states)
    if todo or defaults:
        with only_own_tensor_intrinsics(to_tvm_target(target)), _stop_on_interrupt(stop):
            _measure_defaults(defaults, target, database, builder, runner)
            for task, state in zip(tasks, states):
                state.default_us = _us(database.stats(task.mod).default_secs)
            if todo:
                _search([tasks[i] for i in todo], [states[i] for i in todo], target, database, builder, runner,
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


def tune_model(spec: BuildSpec, *, trials: int, db: Path | None = None, **options) -> TuneReport:
    """``tune`` the module ``compile`` builds for ``spec`` into ``db`` (default: the target's database, the one
    ``compile`` applies)."""
    target = resolve_target(spec)
    database = open_database(db or database_dir(target))
    return tune(tuning_module(spec), target, database, trials=trials, **options)
