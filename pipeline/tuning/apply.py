"""Applying tuning records: the optimize stage schedules each fused function with its best record, where
that record beat the function's default schedule.

Records come from two databases: the user's (``database_dir``, what ``tune`` writes) and the ones this
repository ships for the target's class (``shipped_dir``: ``tvm_schedules/records/<target>-<key>``, keyed,
like the user's, by the TVM target and TVM version, read-only). Per function, each database offers its best
record where it beat the default schedule timed beside it; the faster offer wins, the user's on a tie.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import TuningRecord

from targets import TargetSpec
from tvm_schedules.scheduled import is_scheduled, mark_scheduled
from tvm_schedules.workload import contraction
from ..tvm_targets import to_tvm_target
from .database import WORKLOADS, TuningDatabase, database_dir, open_database, shipped_dir

USER = "user database"


def _sources(target: TargetSpec) -> list[tuple[str, TuningDatabase]]:
    """(label, database) of the databases that exist for ``target``, the user's first."""
    user, shipped = database_dir(target), shipped_dir(target)
    return ([(USER, open_database(user))] if (user / WORKLOADS).is_file() else []) + \
        ([(f"shipped: {shipped.name}", open_database(shipped, read_only=True))] if (shipped / WORKLOADS).is_file() else [])


def _offer(database: TuningDatabase, workload: tvm.IRModule) -> tuple[TuningRecord | None, dict]:
    """The database's best record of ``workload`` if it beat the default schedule (or no default was timed),
    and its times."""
    record, stats = database.best_record(workload), database.stats(workload)
    if record is None:
        return None, {}
    times = {"run_us": round(1e6 * stats.best_secs, 3)}
    if stats.default_secs is not None:
        times["default_us"] = round(1e6 * stats.default_secs, 3)
        if stats.default_secs <= stats.best_secs:
            return None, times
    return record, times


def apply_records(mod: tvm.IRModule, target: TargetSpec) -> tuple[tvm.IRModule, dict]:
    """Schedule each fused function with the best record the target's databases offer (see the module's
    docstring); return the module and the manifest's report: per function the record applied and where it
    came from, and where the default schedule stays because it was faster.

    No database: nothing applied. A corrupt one: TuningDatabaseCorrupt (never used silently).
    """
    report = {"database": str(database_dir(target)), "shipped": str(shipped_dir(target)), "records_applied": 0,
              "functions": {}, "default_faster": {}}
    sources = _sources(target)
    if not sources:
        return mod, report
    chosen = ms.database.MemoryDatabase()  # the records to apply, for MetaSchedule's own pass
    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")  # as that pass does
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        workload = normalize(func)
        offers = [(label, *_offer(database, workload)) for label, database in sources]
        applicable = [(times["run_us"], i, label, record) for i, (label, record, times) in enumerate(offers) if record]
        if not applicable:
            slower = next(((label, times) for label, _, times in offers if times), None)
            if slower:
                report["default_faster"][gv.name_hint] = {**slower[1], "source": slower[0]}
            continue
        run_us, i, label, record = min(applicable)
        # Paired with the workload it was tuned on: its trace names that module's blocks, and MetaSchedule
        # swaps in the scheduled copy of it (structurally this function).
        chosen.commit_tuning_record(TuningRecord(record.trace, chosen.commit_workload(record.workload.mod),
                                                 record.run_secs, record.target, record.args_info))
        report["functions"][gv.name_hint] = {"workload": ms.utils.shash2hex(workload), **offers[i][2], "source": label}
    with to_tvm_target(target), chosen:
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    for name in report["functions"]:  # marked as tuned, with the shape the build checks per kernel
        gv = tuned.get_global_var(name)
        tuned.update_func(gv, mark_scheduled(tuned[gv], "tuning record", contraction(mod[name])))
    report["records_applied"] = len(report["functions"])
    repairs = [line for _, database in sources for line in database.repairs]
    if repairs:
        report["repairs"] = repairs
    return tuned, report

