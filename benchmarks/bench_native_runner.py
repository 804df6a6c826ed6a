"""Per-inference overhead of the native runner against run.py, on the same bundle, side by side.

    python benchmarks/bench_native_runner.py ARTIFACT_OR_BUNDLE [--rounds 5] [--repeat 200] [--threads 2]

An artifact directory is packed first (into a temporary directory, with the native runner for this machine's CPU).
Each round runs, one after the other on the same extracted bundle, with --threads TVM threads:

- ``runner --repeat N``: the native runner; its median is the wall time of each ``Model::run()`` of the C++ API
  (the call into the VM, the run, the outputs' unpacking), timed with steady_clock;
- ``python3 run.py --repeat N``: its median is TVM's ``time_evaluator`` over ``invoke_stateful`` (a loop in C++,
  no Python between runs);
- a Python loop of ``vm["main"](*args)`` timed with perf_counter, in a process of its own: what an application in
  Python pays per inference (pipeline.runtime.run_vm's call).

Each command's whole process time (start to exit: loading the runtime, checks, all runs) is measured too. The table
gives the median over rounds of each round's median (and p90), and each process time; ratios are to the runner's.
Only this machine's CPU is measured: on a busy host, rerun (another job only ever adds time).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import bundle, runtime  # noqa: E402
from pipeline.toolchain import native_runner  # noqa: E402

LATENCY = re.compile(r"latency: median ([0-9.]+) ms, p90 ([0-9.]+) ms")
# Runs in its own interpreter: argv = directory, repeat; prints the median and p90 in ms of a Python call loop.
PYTHON_LOOP = r"""
import sys, time, numpy as np
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import run as rt
d, n = Path(sys.argv[1]), int(sys.argv[2])
m = rt.read_manifest(d); rt.verify_files(d, m)
params, inputs, ref = rt.load_arrays(d, m)
vm, dev = rt.load_vm(d / "lib.so", m["target"]["device"])
args = rt.to_device([*inputs.values(), *params.values()], dev)
f = vm["main"]
for _ in range(10): f(*args)
ms = []
for _ in range(n):
    t = time.perf_counter(); f(*args); ms.append((time.perf_counter() - t) * 1e3)
print(f"latency: median {np.median(ms):.4f} ms, p90 {np.percentile(ms, 90):.4f} ms")
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(median ms, p90 ms, process seconds) of one command that prints a latency line."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    median, p90 = LATENCY.search(proc.stdout).groups()
    return float(median), float(p90), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="an artifact directory or a bundle (.tar) with a native runner")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=200, help="timed runs per command and round")
    ap.add_argument("--threads", type=int, default=2, help="TVM threads of every command")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        packed = args.artifact if args.artifact.is_file() else bundle.make_bundle(args.artifact, Path(tmp) / "b.tar")
        board = runtime.extract_bundle(packed, Path(tmp) / "board")
        (board / "runner").chmod(0o755)  # extract_bundle keeps no modes; tar xf would
        env = {**os.environ, "TVM_NUM_THREADS": str(args.threads),
               "TVM_LIBRARY_PATH": native_runner.host_library_path()}
        repeat = ["--repeat", str(args.repeat), "--warmup", "10"]
        commands = {
            "native runner (Model::run, steady_clock)": [str(board / "runner"), str(board), *repeat],
            "run.py (time_evaluator, C++ loop)": [sys.executable, str(board / "run.py"), str(board), *repeat],
            "Python loop of vm['main'](*args)": [sys.executable, "-c", PYTHON_LOOP, str(board), str(args.repeat)],
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                results[name].append(timed(cmd, env))
                time.sleep(0.2)  # TVM's workers spin ~160 ms after a run: let them stop before the next command
    rows = {name: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for name, runs in results.items()}
    base_ms, _, base_s = rows[next(iter(rows))]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{args.artifact.name}: {cpu}, {os.cpu_count()} CPUs, {args.threads} TVM threads, "
          f"{args.rounds} rounds of {args.repeat} timed runs (medians over rounds)")
    print(f"| {'command':42} | median ms |  p90 ms | ratio | process s | ratio |")
    print(f"|{'-' * 44}|-----------|---------|-------|-----------|-------|")
    for name, (median, p90, seconds) in rows.items():
        print(f"| {name:42} | {median:9.4f} | {p90:7.4f} | {median / base_ms:5.2f} | {seconds:9.2f} | "
              f"{seconds / base_s:5.1f} |")


if __name__ == "__main__":
    main()
