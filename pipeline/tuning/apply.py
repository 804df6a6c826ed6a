"""Applying tuning records: the optimize stage schedules each fused function with its best record, where
that record beat the function's default schedule."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import TuningRecord

from targets import TargetSpec
from tvm_schedules.scheduled import is_scheduled, mark_scheduled
from tvm_schedules.workload import contraction
from ..tvm_targets import to_tvm_target
from .database import WORKLOADS, database_dir, open_database


def apply_records(mod: tvm.IRModule, target: TargetSpec) -> tuple[tvm.IRModule, dict]:
    """Schedule each fused function with its best record in the target's database, where that record
    beat the function's default schedule (or no default was measured); return the module and the
    manifest's report: what was applied, and where the default schedule stays because it was faster.

    No database: nothing applied. A corrupt one: TuningDatabaseCorrupt (never used silently).
    """
    path = database_dir(target)
    report = {"database": str(path), "records_applied": 0, "functions": {}, "default_faster": {}}
    if not (path / WORKLOADS).is_file():
        return mod, report
    database = open_database(path)
    chosen = ms.database.MemoryDatabase()  # the records to apply, for MetaSchedule's own pass
    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")  # as that pass does
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
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
    with to_tvm_target(target), chosen:
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    for name in report["functions"]:  # marked as tuned, with the shape the build checks per kernel
        gv = tuned.get_global_var(name)
        tuned.update_func(gv, mark_scheduled(tuned[gv], "tuning record", contraction(mod[name])))
    report["records_applied"] = len(report["functions"])
    if database.repairs:
        report["repairs"] = database.repairs
    return tuned, report
