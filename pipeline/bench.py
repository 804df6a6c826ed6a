"""Latency of a compiled artifact, measured so that a CI run on a noisy machine can trust it.

Everything timed is a *timer*: ``timer(number) -> seconds per call``, the mean of ``number`` back-to-back
calls: the TVM library (``tvm``), a fixed TVM matmul that probes the machine's speed (``reference``), and the
peers asked for (``onnxruntime`` on the artifact's model.sim.onnx, ``torch`` eager with the same weights).
:func:`measure` warms each one up, sizes ``number`` so that one sample lasts about ``Budget.sample_ms``, and
then takes samples in interleaved rounds, one sample of each timer per round in rotating order with a short
pause between timers (so one runtime's spinning worker threads do not slow the next), until every median is
known within ``Budget.rel_ci`` (a distribution-free 95 % confidence interval) or the time budget is spent.

On a machine shared with other jobs, contention comes and goes; it only ever adds time, and it slows a
parallel kernel far more than a mostly serial model, so neither all samples nor samples divided by a
reference kernel give a stable number (measured here, test_cyclemlp at one thread while other jobs ran:
medians from 0.85 to 1.55 ms between runs, the fastest sample 0.845-0.88 ms in every run). So each timer's
statistics are taken over its *quiet samples*, those within ``QUIET_SLACK`` of its fastest in the run: the
median of the undisturbed runs, with its 95 % interval; the spread over all samples is reported beside it.
The reference kernel's quiet median measures the machine's undisturbed speed: ``tvm / reference`` is the
machine-speed-independent number `pipeline regress` compares, and ``peer / tvm`` compares the peers.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import targets
from . import runtime
from .bundle import open_artifact
from .errors import BadInput
from .run import StageListener, compile_model, default_out_dir
from .spec import Board, BuildSpec

Timer = Callable[[int], float]
# The reference workload: a float32 REFERENCE_SIZE^3 matmul. Not 256: with power-of-two rows its time depended on
# where the buffers landed (cache-set conflicts: 0.91 to 1.54 ms over 8 allocations); 240 varies by 1 %.
REFERENCE_SIZE = 240
QUIET_SLACK = 0.10  # a quiet sample: within 10 % of the timer's fastest sample in the run


class BenchError(BadInput):
    """The artifact cannot be measured as asked (another model or target, a library for a board, ...)."""


@dataclass(frozen=True)
class Budget:
    """How long to measure. The time budget is checked after each round; ``min_rounds`` are always taken."""

    # One sample: enough back-to-back calls to last this long (at least one call). Short, so that many samples
    # fall between other jobs' time slices: at load 4 on 2 cores, 7 % of 20 ms samples were quiet, 25 % of 5 ms.
    sample_ms: float = 5.0
    rel_ci: float = 0.02  # stop once every median's 95 % interval is within +-2 % of it ...
    min_rounds: int = 8  # ... each over at least this many quiet samples
    max_rounds: int = 2000
    max_seconds: float = 30.0  # ... or once this much time is spent
    # Idle time before each sample, then one untimed call: the runtime timed before has stopped spinning its
    # thread pool, and this one's is awake. After a call TVM's workers spin (300000 yields by default,
    # TVM_THREAD_POOL_SPIN_COUNT): a full core for 160 ms after a cyclemlp_b1 inference here. With 2 ms pauses
    # and no warm call, the pools fought: a ConvMixer 1x1 conv layer measured TVM at 0.56-0.92x ONNX Runtime's
    # speed over four runs, and ONNX Runtime at 0.4x its own speed in some runs with 30 ms pauses; with 200 ms
    # each runtime runs as it does alone (that layer: TVM at 1.01-1.13x ONNX Runtime's speed in three runs).
    pause_ms: float = 200.0
    warm_call: bool = True
    warmup_s: float = 0.2  # untimed calls before sizing the samples (at least 3)


# Per-kernel timing: many timers, each a short sample; only the ranking and rough size matter.
KERNEL_BUDGET = Budget(sample_ms=2.0, rel_ci=0.05, min_rounds=5, max_rounds=100, max_seconds=10.0, pause_ms=0.0,
                       warm_call=False, warmup_s=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95 % confidence interval of the median: the order statistics at ranks
    n/2 -+ z*sqrt(n)/2 (the normal approximation of Binomial(n, 1/2)); with 10 samples or fewer, min and max."""
    s = sorted(values)
    n = len(s)
    half = z * math.sqrt(n) / 2
    return s[max(0, math.floor(n / 2 - half) - 1)], s[min(n - 1, math.ceil(1 + n / 2 + half) - 1)]


def summarize(values: list[float]) -> dict:
    """Median with its 95 % interval, and the spread: p10/p90, interquartile range, coefficient of variation."""
    a = np.asarray(values, dtype=np.float64)
    p10, q1, median, q3, p90 = (float(v) for v in np.percentile(a, [10, 25, 50, 75, 90]))
    return {"n": len(a), "median": median, "ci95": list(median_ci(values)), "p10": p10, "p90": p90,
            "iqr": q3 - q1, "cv": float(a.std() / a.mean()), "min": float(a.min()), "max": float(a.max())}


def rel_halfwidth(values: list[float]) -> float:
    low, high = median_ci(values)
    return (high - low) / (2 * float(np.median(values)))


def quiet(values: list[float], slack: float = QUIET_SLACK) -> list[float]:
    """The undisturbed samples: within ``slack`` of the fastest (contention only ever adds time)."""
    floor = min(values)
    return [v for v in values if v <= floor * (1 + slack)]


def headline(values: list[float], min_quiet: int) -> dict:
    """The statistics reported for one timer: over its quiet samples when there are ``min_quiet`` of them, else
    over all its samples (a busy machine: slower, but no median or interval made of one or two lucky samples).
    ``basis`` says which; ``quiet`` how many samples were quiet."""
    q = quiet(values)
    basis, used = ("quiet samples", q) if len(q) >= min_quiet else ("all samples: too few quiet ones", values)
    return {**summarize(used), "basis": basis, "quiet": len(q)}


def ratio(numerator: dict, denominator: dict) -> dict:
    """The ratio of two medians (:func:`summarize`) with a conservative 95 % interval: the ratio of the ends."""
    return {"median": numerator["median"] / denominator["median"],
            "ci95": [numerator["ci95"][0] / denominator["ci95"][1], numerator["ci95"][1] / denominator["ci95"][0]]}


# ---------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    samples_ms: dict[str, list[float]]  # per timer, one value per round
    calls_per_sample: dict[str, int]
    rounds: int
    stopped: str  # why measuring stopped
    seconds: float


def loop_timer(run_once: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Timer:
    """A timer that calls ``run_once`` ``number`` times in a Python loop, then ``sync`` (a device's)."""
    def timer(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            run_once()
        sync()
        return (time.perf_counter() - start) / number

    return timer


def calls_per_sample(timer: Timer, budget: Budget) -> int:
    """Warm ``timer`` up (at least 3 calls and ``budget.warmup_s``); the calls that make a sample ~sample_ms."""
    start, per_call = time.perf_counter(), []
    while len(per_call) < 3 or time.perf_counter() - start < budget.warmup_s:
        per_call.append(timer(1))
    return max(1, round(budget.sample_ms / 1e3 / float(np.median(per_call[-3:]))))


def measure(timers: dict[str, Timer], budget: Budget) -> Measurement:
    """Interleaved rounds until every timer has ``budget.min_rounds`` quiet samples whose median is tight
    (``budget.rel_ci``), or the budget is spent."""
    numbers = {name: calls_per_sample(timer, budget) for name, timer in timers.items()}
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    stopped = f"max rounds ({budget.max_rounds})"
    for r in range(budget.max_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(budget.pause_ms / 1e3)
            if budget.warm_call:
                timers[name](1)
            samples[name].append(timers[name](numbers[name]) * 1e3)
        if all(len(q := quiet(v)) >= budget.min_rounds and rel_halfwidth(q) <= budget.rel_ci
               for v in samples.values()):
            stopped = f"quiet medians within +-{budget.rel_ci:.0%} (95% CI)"
            break
        if r + 1 >= budget.min_rounds and time.perf_counter() - start >= budget.max_seconds:
            stopped = f"time budget ({budget.max_seconds:g} s)"
            break
    return Measurement(samples, numbers, len(samples[names[0]]), stopped, time.perf_counter() - start)


def configure_threads(threads: int) -> None:
    """Give TVM's thread pool ``threads`` threads. TVM sizes the pool once, when it first starts, from
    TVM_NUM_THREADS, so this must run before any TVM code runs in this process. (Without it TVM picks 1 on
    this 2-core machine, yet ran test_cyclemlp 2.5x slower than with TVM_NUM_THREADS=1.)"""
    import tvm

    runtime.use_threads(threads)
    actual = tvm.get_global_func("runtime.NumThreads")()
    if actual != threads:
        raise BenchError(f"TVM's thread pool already runs {actual} thread(s) in this process, not {threads}; "
                         f"measure in a fresh process (python -m pipeline bench) or set TVM_NUM_THREADS={threads}")


def device_fingerprint() -> dict:
    """What latencies depend on besides the artifact: this CPU, its core count, and the TVM runtime."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "arch": platform.machine(),
            **{pkg: importlib.metadata.version(pkg) for pkg in ("apache-tvm", "apache-tvm-ffi")}}


# ---------------------------------------------------------------------------------------------------------------
# What is timed


def evaluator_timer(module, func_name: str, dev, *args) -> Timer:
    """A timer that runs where ``module`` lives (here or on a board): TVM's time_evaluator, a C++ loop of
    ``number`` calls after one untimed call."""
    return lambda number: module.time_evaluator(func_name, dev, number=number, repeat=1)(*args).mean


def reference_kernel(target: targets.TargetSpec):
    """The machine-speed probe: a parallel, vectorized float32 matmul built with TVM for the CPU of ``target``
    (the host CPU of a GPU target), run by the same thread pool as the model. Fixed code: its time changes
    only with the machine, its load and TVM."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    n = REFERENCE_SIZE
    a, b = te.placeholder((n, n), name="A"), te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    sch = Schedule(te.create_prim_func([a, b, c]))
    i, j, kk = sch.get_loops(sch.get_sblock("C"))
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(i, jo, kk, ji)
    sch.parallel(i)
    sch.vectorize(ji)
    cpu = tvm.target.Target(target.tvm_host if target.cuda else target.tvm_target)
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=cpu)


def reference_args(dev) -> list:
    import tvm

    rng = np.random.default_rng(0)
    shape = (REFERENCE_SIZE, REFERENCE_SIZE)
    return [*(tvm.runtime.tensor(rng.standard_normal(shape, dtype=np.float32), dev) for _ in range(2)),
            tvm.runtime.tensor(np.zeros(shape, np.float32), dev)]


REFERENCE_HOW = f"TVM float32 matmul {REFERENCE_SIZE}^3 (parallel rows, 16-wide vectors), time_evaluator"

# The FMA probe: per thread, FMA_CHAINS independent vector accumulators (more than FMA latency x FMA pipes on
# the cores we target: 4 x 2) each updated FMA_STEPS times, nothing else: no load, no store in the loop.
FMA_CHAINS = 12
FMA_STEPS = 1 << 20


def fma_peak_gflops(threads: int, target_name: str = "x86", repeats: int = 5) -> float:
    """This CPU's float32 FMA rate on ``threads`` threads (best of ``repeats``), the limit no kernel passes:
    unlike a library's matmul (torch.mm ran 1.4-2.2x slower than our kernels on a Zen 5), it measures only the
    cores' vector units at the clock they sustain under load. Needs TVM's pool sized first (configure_threads)."""
    import tvm
    from tvm.script import tirx as T
    from tvm_schedules.cpu.isa import cpu_vector_lanes

    target = tvm.target.Target(targets.get_target(target_name).tvm_target)
    lanes = cpu_vector_lanes(target)
    width = FMA_CHAINS * lanes

    @T.prim_func
    def main(out: T.Buffer((threads, width), "float32"), b: T.float32, c: T.float32):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((width,), "float32", scope="local")  # a stack array LLVM keeps in registers
            for i in T.vectorized(width):
                acc[i] = T.float32(0)
            for _ in range(FMA_STEPS):
                for chain in T.unroll(FMA_CHAINS):
                    for lane in T.vectorized(lanes):
                        acc[chain * lanes + lane] = acc[chain * lanes + lane] * b + c
            for i in T.vectorized(width):
                out[t, i] = acc[i]

    lib = tvm.compile(tvm.IRModule({"main": main}), target=target).mod
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((threads, width), np.float32), dev)
    seconds = min(lib.time_evaluator("main", dev, number=3, repeat=repeats)(out, 1.0, 1e-7).results)
    return 2 * threads * width * FMA_STEPS / seconds / 1e9


def local_library(directory: Path, target: targets.TargetSpec, threads: int) -> tuple:
    """(vm, device, tvm timer, reference timer, how) for the library loaded here."""
    import tvm

    if target.runner != "host":
        raise BenchError(f"{target.name} libraries do not run on this machine; measure them on the board "
                         "(--device HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY)")
    try:
        vm, dev = runtime.load_vm(directory / runtime.LIBRARY, target.device)
    except runtime.RuntimeUnavailable as e:
        raise BenchError(str(e)) from None
    reference = evaluator_timer(reference_kernel(targets.get_target("x86")).mod, "main", tvm.cpu(),
                                *reference_args(tvm.cpu()))
    # The model is timed by a Python loop around the stateful call, like the peers: with time_evaluator every
    # sample of a slow model would also pay one untimed call.
    tvm_timer = loop_timer(lambda: vm.invoke_stateful("main"), dev.sync)
    return vm, dev, tvm_timer, reference, f"Relax VM (TVM {importlib.metadata.version('apache-tvm')}), {threads} " \
        "thread(s), stateful calls in a Python loop"


def board_library(board: Board, directory: Path, manifest: dict, target: targets.TargetSpec, work: Path,
                  timeout: float) -> tuple:
    """(vm, device, tvm timer, reference timer, how) for the library on a board, through pipeline.deploy's
    session (connect, check the board can run it); both timers run on the board, each sample bounded by ``timeout``."""
    from tvm.runtime.vm import VirtualMachine

    from .deploy import check_board, connect, remote_step
    from .toolchain.cross_link import cross_linker

    remote = connect(board, timeout)
    arch = check_board(remote, board, directory, manifest, timeout)
    kernel = reference_kernel(target)
    kernel.export_library(str(work / "reference.so"), fcompile=cross_linker(target.cross_triple)
                          if target.cross_triple else None)
    with remote_step("uploading and loading the library and the reference kernel", board, timeout):
        remote.upload(str(directory / runtime.LIBRARY))
        remote.upload(str(work / "reference.so"))
        dev = remote.device(target.device)
        vm = VirtualMachine(remote.load_module(runtime.LIBRARY), dev)
        reference = evaluator_timer(remote.load_module("reference.so"), "main", remote.cpu(),
                                    *reference_args(remote.cpu()))
        threads = remote.get_function("runtime.NumThreads")()

    def bounded(timer: Timer, what: str) -> Timer:
        def sample(number: int) -> float:
            with remote_step(what, board, timeout):
                return timer(number)
        return sample

    tvm_timer = bounded(evaluator_timer(vm.module, "invoke_stateful", dev, "main"), "timing the model")
    return vm, dev, tvm_timer, bounded(reference, "timing the reference kernel"), \
        f"Relax VM on {board} ({arch or 'arch not reported'}), its {threads} threads, time_evaluator on the board"


def onnxruntime_timer(directory: Path, manifest: dict, inputs: dict[str, np.ndarray], threads: int
                      ) -> tuple[Timer, dict[str, np.ndarray], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(directory / "model.sim.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, inputs), strict=True))
    return (loop_timer(lambda: session.run(names, inputs)), outputs,
            f"ONNX Runtime {ort.__version__} on model.sim.onnx, CPU EP, {threads} intra-op thread(s)")


def torch_timer(directory: Path, manifest: dict, inputs: dict[str, np.ndarray], threads: int
                ) -> tuple[Timer, dict[str, np.ndarray], str]:
    """PyTorch eager, the model rebuilt as compile built it: the recorded seed, or the recorded checkpoint."""
    import torch

    from .stages.model import load_model
    from .stages.reference import run_torch

    recorded = manifest["model"]["weights"]
    checkpoint = Path(recorded["path"]) if recorded["source"] == "checkpoint" else None
    model, _, weights = load_model(manifest["model"]["name"], checkpoint, recorded.get("seed", 0))
    if weights.get("sha256") != recorded.get("sha256"):
        raise BenchError(f"{checkpoint} changed since the artifact was compiled (sha256 differs); "
                         "PyTorch cannot be run with the artifact's weights")
    torch.set_num_threads(threads)
    x = [torch.from_numpy(v) for v in inputs.values()]

    def run_once():
        with torch.inference_mode():
            model(*x)

    return loop_timer(run_once), run_torch(model, inputs), f"PyTorch {torch.__version__} eager, {threads} thread(s)"


PEER_TIMERS = {"onnxruntime": onnxruntime_timer, "torch": torch_timer}


# ---------------------------------------------------------------------------------------------------------------
# Per-kernel timing


def _kernel_module(library, symbol: str):
    """The module (the library itself or one it imports) that holds the compiled function ``symbol``, or None."""
    pending = [library]
    while pending:
        module = pending.pop()
        if module.implements_function(symbol):
            return module
        pending.extend(module.imports)
    return None


def profile_kernels(lib_path: Path, device: str, args: list, budget: Budget = KERNEL_BUDGET) -> list[dict]:
    """Time each compiled kernel (PrimFunc) the model calls, largest total first.

    One run of "main" under a VM instrument records every kernel call and its arguments (TVM 0.27's VM has
    no profiler); each distinct kernel is then timed alone with those arguments by TVM's time_evaluator
    (a C++ loop), in interleaved rounds like the model: ``ms`` is the median of its quiet samples times the
    calls per run. Alone and warm in cache, kernels run a little faster than inside the model.
    """
    import tvm

    vm, dev = runtime.load_vm(lib_path, device)
    library = tvm.runtime.load_module(str(lib_path))
    calls: dict[str, tuple] = {}  # symbol -> (module holding it or None for a VM builtin, arguments of its first call)
    counts: Counter = Counter()

    def record(_func, symbol, before, _ret, *call_args):
        if before:
            if symbol not in calls:
                calls[symbol] = (_kernel_module(library, symbol), call_args)
            counts[symbol] += 1
        return 0  # tvm.runtime.vm.VMInstrumentReturnKind.NO_OP

    vm.set_instrument(record)
    vm.set_input("main", *args)
    vm.invoke_stateful("main")

    m = measure({s: evaluator_timer(module, s, dev, *a) for s, (module, a) in calls.items() if module is not None},
                budget)
    medians = {s: float(np.median(quiet(v))) for s, v in m.samples_ms.items()}
    rows = [{"kernel": s, "calls": counts[s], "ms_per_call": ms, "ms": counts[s] * ms} for s, ms in medians.items()]
    total = sum(r["ms"] for r in rows)
    return sorted(({**r, "share": r["ms"] / total} for r in rows), key=lambda r: -r["ms"])


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def ensure_artifact(spec: BuildSpec, root: Path | None = None, listener: StageListener = lambda *_: None) -> Path:
    """The artifact of ``spec`` under ``root`` (default: artifacts/), compiled first when it is missing."""
    out = default_out_dir(spec) if root is None else Path(root) / default_out_dir(spec).name
    if not (out / runtime.MANIFEST).is_file():
        compile_model(spec, out, listener)
    return out


def checked_for_timing(vm, dev, directory: Path, manifest: dict, prefix: str) -> tuple[list, dict, dict]:
    """Run the library once on the artifact's inputs, require its outputs to match the reference (only a runtime
    that computes the artifact's model is timed: manifest tolerances), and leave those inputs set for the timer's
    stateful calls. Return the device arguments (inputs, then params) and the host inputs and reference outputs."""
    params, inputs, reference = runtime.load_arrays(directory, manifest)
    args = runtime.to_device([*inputs.values(), *params.values()], dev)
    runtime.require_outputs_match(runtime.run_vm(vm, args, tuple(reference)), reference, manifest, prefix=prefix)
    vm.set_input("main", *args)
    return args, inputs, reference


def bench_artifact(path: Path, *, peers: tuple[str, ...] = (), per_layer: bool = False, threads: int | None = None,
                   budget: Budget = Budget(), expect: BuildSpec | None = None, board: Board | None = None,
                   timeout: float = 60.0) -> dict:
    """Measure the artifact (directory or bundle) at ``path``, here or on ``board``,
    with ``peers`` interleaved (here only); return the result.

    ``expect``: refuse an artifact of another model, target or batch size."""
    threads = threads or os.cpu_count() or 1
    if board is None:
        configure_threads(threads)
    elif peers or per_layer:
        raise BenchError("peers and per-kernel timing run on this machine only; measure them without a board")
    load_start = os.getloadavg()
    with open_artifact(path) as (directory, manifest), tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
        target = targets.get_target(manifest["target"]["name"])
        holds = (manifest["model"]["name"], target.name, manifest["model"]["batch"])
        if expect is not None and holds != (expect.model, targets.get_target(expect.target).name, expect.batch):
            raise BenchError(f"{path} holds {holds[0]} for {holds[1]} at batch {holds[2]}, not {expect.model} for "
                             f"{expect.target} at batch {expect.batch}")
        vm, dev, tvm_timer, reference_timer, how_tvm = (
            local_library(directory, target, threads) if board is None
            else board_library(board, directory, manifest, target, Path(work), timeout))
        args, inputs, reference = checked_for_timing(vm, dev, directory, manifest, "tvm/")
        timers = {"tvm": tvm_timer, "reference": reference_timer}
        how = {"tvm": how_tvm, "reference": REFERENCE_HOW}
        for peer in peers:
            timers[peer], outputs, how[peer] = PEER_TIMERS[peer](directory, manifest, inputs, threads)
            runtime.require_outputs_match(outputs, reference, manifest, prefix=f"{peer}/")
        m = measure(timers, budget)
        kernels = profile_kernels(directory / runtime.LIBRARY, target.device, args) if per_layer else None
    latency = {name: headline(v, budget.min_rounds) for name, v in m.samples_ms.items()}
    return {
        "schema": 1,
        "artifact": str(Path(path).resolve()),
        "model": manifest["model"]["name"],
        "target": target.name,
        "batch": manifest["model"]["batch"],
        "build_id": manifest["build_id"],
        "device": device_fingerprint() if board is None else {"board": str(board)},
        "threads": threads if board is None else None,  # None: the board's TVM runtime's own
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": {"start": load_start[0], "end": os.getloadavg()[0]},
        "method": {"budget": asdict(budget), "rounds": m.rounds, "quiet_slack": QUIET_SLACK,
                   "busy": any(s["quiet"] < budget.min_rounds for s in latency.values()),  # too few quiet samples
                   "stopped": m.stopped, "seconds": round(m.seconds, 2), "calls_per_sample": m.calls_per_sample,
                   "runtimes": how},
        "samples_ms": m.samples_ms,
        "latency_ms": latency,  # over each timer's quiet samples, or all of them when too few are quiet
        "all_rounds_ms": {name: summarize(v) for name, v in m.samples_ms.items()},  # the noise, as measured
        # the machine-speed-independent latency `regress` compares
        "normalized": ratio(latency["tvm"], latency["reference"]),
        # > 1: the peer is slower than the TVM library
        "vs_tvm": {peer: ratio(latency[peer], latency["tvm"]) for peer in peers},
        "kernels": kernels,
    }


def bench_model(spec: BuildSpec, artifact: Path | None = None, *, peers: tuple[str, ...] = (), per_layer: bool = False,
                threads: int | None = None, budget: Budget = Budget(), board: Board | None = None,
                timeout: float = 60.0,
                listener: StageListener = lambda *_: None) -> dict:
    """`pipeline bench`: measure ``artifact``, or the default artifact of ``spec`` (compiled when missing)."""
    if board is None:
        configure_threads(threads or os.cpu_count() or 1)  # before a compile's verify step starts TVM's thread pool
    return bench_artifact(artifact or ensure_artifact(spec, listener=listener), peers=peers, per_layer=per_layer,
                          threads=threads, budget=budget, expect=spec, board=board, timeout=timeout)
