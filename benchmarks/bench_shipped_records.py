"""The shipped tuning records against the default schedules, whole models, side by side in one run on this host.

    python benchmarks/bench_shipped_records.py [MODEL ...] [--target x86] [--threads N] [--max-seconds 20] [--json F]

Default models: every full-size model in the registry. For each, in one process: ``compile`` twice into a fresh
cache (no user database), once with the repository's shipped records (``tvm_schedules/records/``) and once with
none (default schedules only); both libraries are checked against the PyTorch reference, then timed in
interleaved rounds (``pipeline bench``'s measurement). ``default/shipped`` > 1: the shipped records are faster.
A model none of whose functions has a shipped record is listed as such, not timed (both builds are the same).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description="shipped tuning records vs default schedules (see docstring)")
    ap.add_argument("models", nargs="*", help="zoo model names (default: every full-size model)")
    ap.add_argument("--target", default="x86", help="a target whose libraries run on this host")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="measuring budget per model")
    ap.add_argument("--json", type=Path, help="also write every row here")
    return ap.parse_args(argv)


def bench_one(name: str, opts, work: Path) -> dict:
    import targets
    from pipeline import paths
    from pipeline.bench import Budget, checked_for_timing, headline, local_library, measure
    from pipeline.run import compile_model
    from pipeline.spec import BuildSpec

    shipped_root = paths.shipped_records_dir()
    manifests, timers = {}, {}
    for label, records in (("shipped", shipped_root), ("default", work / "no-records")):
        os.environ[paths.SHIPPED_ENV] = str(records)
        try:
            _, manifests[label] = compile_model(BuildSpec(model=name, target=opts.target), work / f"{name}-{label}")
        finally:
            os.environ[paths.SHIPPED_ENV] = str(shipped_root)
        if not manifests["shipped"]["tuning"]["records_applied"]:
            return {"model": name, "records_applied": 0}  # both builds would be the same
    row = {"model": name, "records_applied": manifests["shipped"]["tuning"]["records_applied"]}
    target = targets.get_target(opts.target)
    for label in manifests:
        directory = work / f"{name}-{label}"
        vm, dev, timers[label], _, _ = local_library(directory, target, opts.threads)
        checked_for_timing(vm, dev, directory, manifests[label], f"{label}/")
    budget = Budget(max_seconds=opts.max_seconds)
    m = measure(timers, budget)
    row["ms"] = {label: headline(samples, budget.min_rounds) for label, samples in m.samples_ms.items()}
    row["stopped"] = m.stopped
    return row


def main() -> None:
    opts = _parse_args()
    import models
    from pipeline import paths
    from pipeline.bench import configure_threads, device_fingerprint

    configure_threads(opts.threads)
    names = opts.models or [m for m in models.list_models() if not m.startswith("test_")]
    cpu = device_fingerprint()
    print(f"{opts.target}, batch 1, float32, {opts.threads} thread(s); {cpu['cpu']} ({cpu['cores']} cores); shipped "
          f"records {paths.shipped_records_dir()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'model':28s} {'recs':>5s} {'default ms':>11s} {'shipped ms':>11s} {'default/shipped':>16s}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shipped-") as tmp:
        os.environ[paths.CACHE_ENV] = str(Path(tmp) / "cache")  # no user database
        for name in names:
            row = bench_one(name, opts, Path(tmp))
            rows.append(row)
            if "ms" not in row:
                print(f"{name:28s} {0:5d}  no shipped record applies: not timed", flush=True)
                continue
            d, s = row["ms"]["default"]["median"], row["ms"]["shipped"]["median"]
            print(f"{name:28s} {row['records_applied']:5d} {d:11.2f} {s:11.2f} {d / s:16.3f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
