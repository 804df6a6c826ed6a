"""Whole-model batch-1 latency on this x86 host: TVM untuned with our default CPU schedules, TVM without them,
ONNX Runtime and PyTorch, with ratios against ONNX Runtime.

    python benchmarks/bench_models_x86.py [MODEL ...] [--rounds 10] [--threads 2] [--untuned-limit-s 30]

Default models: gmlp_ti16_224 resmlp_12_224 mixer_s32_224 mixer_s16_224 cyclemlp_b1 convmixer_1024_20_ks9_p14.

Each model is compiled with ``pipeline.run.compile_model`` for the ``x86`` target (export, onnxsim, import,
optimize, build, verify against PyTorch): the TVM row is what ``python -m pipeline compile`` gives users,
untuned, with the default schedules (``tvm_schedules.cpu``). ONNX Runtime runs the same simplified ONNX
(``model.sim.onnx``, CPU EP, ``--threads`` intra-op threads), PyTorch the same model and weights in eager mode
(``--threads`` threads); TVM's pool gets ``--threads`` workers too. Those three are timed in one process,
interleaved: every round times each once (a sample of enough calls to last ~``--sample-ms``), and the table
gives the minimum over rounds (the median is printed beside it). "TVM no defaults" is the same optimized
module built without the default-schedule step (what an untuned compile gave before), timed in a child
process, one call per sample; a model whose first call takes longer than ``--untuned-limit-s`` is skipped.
Outputs of every runtime are checked against the PyTorch reference before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = ["gmlp_ti16_224", "resmlp_12_224", "mixer_s32_224", "mixer_s16_224", "cyclemlp_b1",
                  "convmixer_1024_20_ks9_p14"]


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description="whole-model latency, TVM vs ONNX Runtime vs PyTorch (see docstring)")
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="zoo model names")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (min / median over these)")
    ap.add_argument("--sample-ms", type=float, default=200.0, help="approximate length of one timed sample")
    ap.add_argument("--threads", type=int, default=2, help="threads for TVM, ONNX Runtime and PyTorch")
    ap.add_argument("--untuned-limit-s", type=float, default=30.0,
                    help="skip 'TVM no defaults' for a model whose first run takes longer than this")
    ap.add_argument("--untuned-rounds", type=int, default=3, help="runs of 'TVM no defaults' (min over these)")
    ap.add_argument("--no-untuned", action="store_true", help="do not build and time 'TVM no defaults'")
    ap.add_argument("--_untuned-worker", nargs=2, metavar=("ARTIFACT", "LIB"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


OPTS = _parse_args()
os.environ["TVM_NUM_THREADS"] = str(OPTS.threads)  # read when TVM's thread pool starts
os.environ.setdefault("OMP_NUM_THREADS", str(OPTS.threads))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _load_artifact(art: Path):
    manifest = json.loads((art / "manifest.json").read_text())
    params = dict(np.load(art / "params.npz"))
    inputs = dict(np.load(art / "inputs.npz"))
    reference = dict(np.load(art / "outputs.npz"))
    return manifest, [params[k] for k in manifest["params"]], inputs, reference


def _tvm_runner(lib: Path, art: Path):
    from pipeline.runtime import load_vm, to_device

    manifest, params, inputs, reference = _load_artifact(art)
    vm, dev = load_vm(lib, "cpu")
    args = to_device([*inputs.values(), *params], dev)
    vm.set_input("main", *args)

    def run_once():
        vm.invoke_stateful("main")
        dev.sync()

    out = vm["main"](*args)
    first = out if not isinstance(out, (list, tuple)) and hasattr(out, "numpy") else out[0]
    return run_once, first.numpy(), next(iter(reference.values()))


def untuned_worker(art: Path, lib: Path) -> None:
    """Child process: time 'TVM no defaults', one call per sample, printing each as it completes."""
    run_once, _, _ = _tvm_runner(lib, art)
    for i in range(OPTS.untuned_rounds):
        t = time.perf_counter()
        run_once()
        secs = time.perf_counter() - t
        print(json.dumps({"run": i, "s": secs}), flush=True)
        if secs > OPTS.untuned_limit_s:
            return


def build_without_defaults(art: Path, out_lib: Path) -> float:
    """The artifact's model through the same stages, minus the default-schedule step; returns build seconds."""
    import targets
    from pipeline.stages import optimize as optimize_stage
    from pipeline.stages.build import build
    from pipeline.stages.reference import INPUT_NAME
    from pipeline.stages.relax_import import import_onnx

    t = time.perf_counter()
    inputs = dict(np.load(art / "inputs.npz"))
    mod, params = import_onnx(art / "model.sim.onnx", {INPUT_NAME: inputs[INPUT_NAME].shape})
    saved = dict(optimize_stage.DEFAULT_SCHEDULES)
    optimize_stage.DEFAULT_SCHEDULES.clear()
    try:
        mod, params, report = optimize_stage.optimize(mod, params, targets.get_target("x86"))
    finally:
        optimize_stage.DEFAULT_SCHEDULES.update(saved)
    assert not report["default_schedules"]["applied"]
    build(mod, targets.get_target("x86"), out_lib)
    return time.perf_counter() - t


def time_untuned(art: Path, lib: Path) -> tuple[float | None, str]:
    cmd = [sys.executable, __file__, "--_untuned-worker", str(art), str(lib), "--threads", str(OPTS.threads),
           "--untuned-limit-s", str(OPTS.untuned_limit_s), "--untuned-rounds", str(OPTS.untuned_rounds)]
    limit = 60 + (OPTS.untuned_rounds + 1) * OPTS.untuned_limit_s
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        lines = proc.stdout
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    runs = [json.loads(line)["s"] for line in lines.splitlines() if line.startswith("{")]
    if not runs:
        return None, f"skipped (no run finished within {limit:.0f} s)"
    if runs[0] > OPTS.untuned_limit_s:
        return None, f"skipped (> {OPTS.untuned_limit_s:.0f} s per run: {runs[0]:.0f} s)"
    return min(runs), f"min of {len(runs)}"


def calibrated(run_once, sample_s: float):
    """sample() -> seconds per call, averaged over enough calls to last about sample_s."""
    for _ in range(2):
        run_once()
    t0 = time.perf_counter()
    run_once()
    number = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))

    def sample():
        t = time.perf_counter()
        for _ in range(number):
            run_once()
        return (time.perf_counter() - t) / number

    return sample


def bench_model(name: str, workdir: Path) -> dict:
    import onnxruntime as ort
    import torch

    from pipeline.run import compile_model
    from pipeline.spec import BuildSpec
    from pipeline.stages.model import load_model

    art = workdir / name
    t = time.perf_counter()
    _, manifest = compile_model(BuildSpec(model=name, target="x86"), art)
    compile_s = time.perf_counter() - t
    assert manifest["verify"]["passed"], f"{name}: the compiled library failed verification"
    defaults = manifest["passes"]["default_schedules"]

    manifest, params, inputs, reference = _load_artifact(art)
    ref = next(iter(reference.values()))
    tol = lambda a: float(np.abs(a - ref).max())  # noqa: E731

    tvm_run, tvm_out, _ = _tvm_runner(art / "lib.so", art)
    so = ort.SessionOptions()
    so.intra_op_num_threads = OPTS.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(art / "model.sim.onnx"), so, providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, inputs)[0]
    torch.set_num_threads(OPTS.threads)
    model, _, _ = load_model(name, None, manifest["model"]["weights"].get("seed", 0))
    x = [torch.from_numpy(v) for v in inputs.values()]

    def torch_run():
        with torch.inference_mode():
            return model(*x)

    torch_out = torch_run()
    torch_out = (torch_out[0] if isinstance(torch_out, (tuple, list)) else torch_out).numpy()
    errors = {"tvm": tol(tvm_out), "ort": tol(ort_out), "torch": tol(torch_out)}

    samplers = {"tvm": calibrated(tvm_run, OPTS.sample_ms / 1e3),
                "ort": calibrated(lambda: sess.run(None, inputs), OPTS.sample_ms / 1e3),
                "torch": calibrated(torch_run, OPTS.sample_ms / 1e3)}
    times = {k: [] for k in samplers}
    for r in range(OPTS.rounds):
        order = list(samplers)[r % 3:] + list(samplers)[:r % 3]  # rotate who goes first
        for k in order:
            times[k].append(samplers[k]())
            time.sleep(0.05)  # let one runtime's spinning workers settle before the next
    result = {k: (min(v) * 1e3, float(np.median(v)) * 1e3) for k, v in times.items()}

    untuned, untuned_note = None, "not run (--no-untuned)"
    if not OPTS.no_untuned:
        lib = workdir / f"{name}-no-defaults.so"
        build_without_defaults(art, lib)
        untuned, untuned_note = time_untuned(art, lib)
    return {"model": name, "compile_s": compile_s, "defaults": defaults, "errors": errors, "ms": result,
            "untuned_ms": None if untuned is None else untuned * 1e3, "untuned_note": untuned_note}


def main() -> None:
    if OPTS._untuned_worker:
        untuned_worker(Path(OPTS._untuned_worker[0]), Path(OPTS._untuned_worker[1]))
        return
    import onnxruntime as ort
    import torch
    import tvm

    print(f"batch 1, float32, {OPTS.threads} threads each; {OPTS.rounds} interleaved rounds of ~{OPTS.sample_ms:.0f} ms "
          f"samples; min (median) in ms. tvm {tvm.__version__}, onnxruntime {ort.__version__}, torch {torch.__version__}; "
          f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for name in OPTS.models:
            print(f"... {name}", flush=True)
            row = bench_model(name, Path(tmp))
            rows.append(row)
            ms, ort_min = row["ms"], row["ms"]["ort"][0]
            print(f"    compile {row['compile_s']:.0f} s; default schedules {json.dumps(row['defaults']['rules'])}"
                  f"{', unscheduled: ' + ', '.join(row['defaults']['unscheduled']) if row['defaults']['unscheduled'] else ''}; "
                  f"max |out - torch|: " + ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
                  + f"; no defaults: {row['untuned_note']}", flush=True)
    header = (f"{'model':28s} {'TVM defaults':>18s} {'TVM no defaults':>16s} {'ONNX Runtime':>18s} {'PyTorch':>18s}"
              f" {'TVM/ORT':>8s} {'no-def/ORT':>10s} {'torch/ORT':>9s}")
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        ms, ort_min = row["ms"], row["ms"]["ort"][0]
        cell = lambda k: f"{ms[k][0]:8.1f} ({ms[k][1]:7.1f})"  # noqa: E731
        untuned = f"{row['untuned_ms']:16.0f}" if row["untuned_ms"] is not None else f"{'skipped':>16s}"
        ratio_untuned = f"{row['untuned_ms'] / ort_min:10.0f}" if row["untuned_ms"] is not None else f"{'-':>10s}"
        print(f"{row['model']:28s} {cell('tvm'):>18s} {untuned} {cell('ort'):>18s} {cell('torch'):>18s}"
              f" {ms['tvm'][0] / ort_min:8.2f} {ratio_untuned} {ms['torch'][0] / ort_min:9.2f}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (the machine is shared: compare ratios within a row)")


if __name__ == "__main__":
    main()
