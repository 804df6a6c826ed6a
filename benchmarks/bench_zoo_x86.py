"""The model zoo on this x86 host at batch 1: TVM (after tuning with a stated budget) beside ONNX Runtime and
PyTorch, measured in the same run.

    python benchmarks/bench_zoo_x86.py [MODEL ...] [--tune-minutes 0] [--trials 64] [--threads N] [--json F]

Default models: every full-size model in the registry (``models.list_models()``, test variants excluded).

For each model, in one process:

1. with ``--tune-minutes M > 0``: ``pipeline tune`` (MetaSchedule, up to ``--trials`` valid records per task,
   stopped after M minutes) into this run's own database (``--cache``: a fresh directory unless given), so the
   budget is what was spent here; tasks another model already tuned count as tuned (shared workloads);
2. ``compile`` for ``x86`` (export, onnxsim, import, our rewrites, the tuning records that beat the default
   schedules, default schedules for the rest, weight layouts folded at compile time, build, verify against
   PyTorch): what ``python -m pipeline compile`` gives a user with that database;
3. ``pipeline bench``'s measurement (``pipeline.bench.bench_artifact``): the library, ONNX Runtime on the same
   model.sim.onnx and PyTorch eager with the same weights, all with ``--threads`` threads, every output checked
   against the PyTorch reference first, then timed in interleaved rounds until each median (over its quiet
   samples) is known within +-2 % or ``--max-seconds`` pass; and each kernel of the library timed alone, to
   name the one that costs most.

The table gives medians in ms; ``ORT/TVM`` and ``torch/TVM`` > 1 mean TVM is faster. ``limit %`` is the share of
this machine's limit the library reaches: the model's multiply-adds (PyTorch's FLOP counter over one forward:
matmuls and convolutions) x 2 / its latency, over the sustained matmul rate (``torch.mm`` of 4096^3 float32 on
the same threads, measured at the start and the end of this run; the faster counts). ``peak %`` (TVM) and
``ORT pk %`` are the same rate over this CPU's float32 FMA peak (``pipeline.bench.fma_peak_gflops``: vector FMAs
on registers only, measured at the start and the end; the faster counts), which no kernel can pass: on a core whose
vector units are wider than the library's matmul uses, torch.mm is no limit. The machine is shared: compare within
a row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description="zoo latency on x86: TVM vs ONNX Runtime vs PyTorch (see docstring)")
    ap.add_argument("models", nargs="*", help="zoo model names (default: every full-size model)")
    ap.add_argument("--tune-minutes", type=float, default=0.0, help="tuning budget per model (0: default schedules)")
    ap.add_argument("--trials", type=int, default=64, help="valid tuning records wanted per task")
    ap.add_argument("--cache", type=Path, help="tuning cache directory (default: a fresh one for this run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for all three runtimes")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="measuring budget per model")
    ap.add_argument("--json", type=Path, help="also write every row (with the full bench results) here")
    return ap.parse_args(argv)


def _tune(name: str, minutes: float, trials: int) -> dict:
    from pipeline.spec import BuildSpec
    from pipeline.tune import tune_model

    start = time.perf_counter()
    report = tune_model(BuildSpec(model=name, target="x86"), trials=trials, time_budget_s=minutes * 60)
    return {"seconds": time.perf_counter() - start, "new_valid_records": report.new_valid,
            "stopped_by_time_budget": report.stopped_by_time_budget}


def matmul_gflops(threads: int, n: int = 4096) -> float:
    """The sustained float32 matmul rate on ``threads`` threads: the best of a few ``torch.mm`` of n^3."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)  # warm-up: packing buffers, thread pool
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_macs(name: str) -> float:
    """Multiply-adds of one batch-1 forward (matmuls and convolutions), by PyTorch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import models

    cfg = models.get_model_cfg(name)
    model = models.create_model(name).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, *cfg.input_size))
    return counter.get_total_flops() / 2


def bench_one(name: str, opts, workdir: Path) -> dict:
    from pipeline.bench import Budget, bench_artifact
    from pipeline.run import compile_model
    from pipeline.spec import BuildSpec

    tuning = _tune(name, opts.tune_minutes, opts.trials) if opts.tune_minutes > 0 else None
    start = time.perf_counter()
    art, manifest = compile_model(BuildSpec(model=name, target="x86"), workdir / name)
    compile_s = time.perf_counter() - start
    result = bench_artifact(art, peers=("onnxruntime", "torch"), per_layer=True, threads=opts.threads,
                            budget=Budget(max_seconds=opts.max_seconds))
    top = result["kernels"][0]
    return {"model": name, "macs": model_macs(name), "tuning": tuning, "compile_s": compile_s,
            "records_applied": manifest["tuning"]["records_applied"],
            "ms": {k: result["latency_ms"][k]["median"] for k in ("tvm", "onnxruntime", "torch")},
            "busy": result["method"]["busy"], "top_kernel": f"{top['kernel']} {top['share']:.0%}",
            "loadavg": result["loadavg"], "bench": result}


def main() -> None:
    opts = _parse_args()
    import models
    from pipeline import paths
    from pipeline.bench import configure_threads, device_fingerprint, fma_peak_gflops

    configure_threads(opts.threads)  # before anything starts TVM's thread pool
    names = opts.models or [m for m in models.list_models() if not m.startswith("test_")]
    cache = opts.cache or Path(tempfile.mkdtemp(prefix="bench-zoo-cache-"))
    os.environ[paths.CACHE_ENV] = str(cache)
    budget = f"tuning budget {opts.tune_minutes:g} min/model, {opts.trials} trials/task" if opts.tune_minutes else \
        "untuned: default schedules"
    cpu = device_fingerprint()["cpu"]
    # The FMA peak first: torch's OpenMP workers spin for a while after torch.mm and would slow TVM's threads.
    peak_start = fma_peak_gflops(opts.threads)
    rate_start = matmul_gflops(opts.threads)
    print(f"x86 ({cpu}), batch 1, float32, {opts.threads} thread(s) each; {budget}; tuning cache {cache}; "
          f"load average at start {os.getloadavg()[0]:.2f}; torch.mm 4096^3: {rate_start:.0f} GFLOP/s; "
          f"FMA peak: {peak_start:.0f} GFLOP/s", flush=True)
    header = (f"{'model':28s} {'tune s':>7s} {'recs':>5s} {'TVM ms':>9s} {'ORT ms':>9s} {'torch ms':>9s} "
              f"{'ORT/TVM':>8s} {'torch/TVM':>9s} {'GMACs':>6s} {'GFLOP/s':>8s} {'peak %':>6s} {'ORT pk %':>8s}  "
              "top kernel (share of TVM time)")
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for name in names:
            row = bench_one(name, opts, Path(tmp))
            rows.append(row)
            ms = row["ms"]
            tune_s = f"{row['tuning']['seconds']:7.0f}" if row["tuning"] else f"{'-':>7s}"
            print(f"{name:28s} {tune_s} {row['records_applied']:5d} {ms['tvm']:9.2f} {ms['onnxruntime']:9.2f} "
                  f"{ms['torch']:9.2f} {ms['onnxruntime'] / ms['tvm']:8.2f} {ms['torch'] / ms['tvm']:9.2f} "
                  f"{row['macs'] / 1e9:6.2f} {2 * row['macs'] / ms['tvm'] / 1e6:8.0f} "
                  f"{2 * row['macs'] / ms['tvm'] / 1e6 / peak_start:6.0%} "
                  f"{2 * row['macs'] / ms['onnxruntime'] / 1e6 / peak_start:8.0%}  "
                  f"{row['top_kernel']}{'  (busy machine: few quiet samples)' if row['busy'] else ''}", flush=True)
    peak = max(peak_start, fma_peak_gflops(opts.threads))
    rate = max(rate_start, matmul_gflops(opts.threads))
    print(f"load average at end {os.getloadavg()[0]:.2f}; the limit (faster torch.mm 4096^3 of start and end): "
          f"{rate:.0f} GFLOP/s; the FMA peak (faster of start and end): {peak:.0f} GFLOP/s; per model, 2 x MACs / "
          "TVM latency over the limit / over the peak:")
    print("  " + ", ".join(f"{row['model']} {2 * row['macs'] / row['ms']['tvm'] / 1e6 / rate:.0%} / "
                           f"{2 * row['macs'] / row['ms']['tvm'] / 1e6 / peak:.0%}" for row in rows))
    if opts.json:
        opts.json.write_text(json.dumps({"cpu": cpu, "matmul_gflops": rate, "fma_peak_gflops": peak, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
