"""Latency regression checks against stored baselines.

A baseline file holds, for one machine (:func:`pipeline.bench.device_fingerprint`: CPU model, core count,
TVM and TVM-FFI versions) and one target, each model's latency as measured by :func:`pipeline.bench.bench_artifact`
and the tolerances it is judged with; it is meant to be committed, and its tolerances edited by hand::

    baselines/<device id>/<target>.json   {"device": ..., "target": ..., "threads": 1, "tolerance": 0.15,
                                            "machine_tolerance": 0.5, "models": {"test_mixer": {...}, ...}}

A run measures each model afresh and compares ``tvm / reference`` (the median of the model's quiet samples
divided by the reference kernel's, see pipeline.bench) with the baseline's: a model is *slower* when that
ratio exceeds 1 + ``tolerance`` and its conservative 95 % interval (now's interval over the baseline's) lies
wholly above 1. It is *not judged* (inconclusive, never silently passed) when either measurement has too few
quiet samples, or when the reference kernel ran more than ``machine_tolerance`` off its baseline time (the
machine in another state, or another machine) -- except that a machine busier than at baseline slows the
fully parallel reference at least as much as the model, so it can only hide a slowdown, never invent one.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bench import Budget, bench_artifact, configure_threads, device_fingerprint, ensure_artifact
from .errors import BadInput, NotJudged, SlowerThanBaseline
from .run import StageListener
from .spec import BuildSpec

SCHEMA = 1
DEFAULT_TOLERANCE = 0.15  # run-to-run spread of tvm / reference seen here: about 2 % (1 thread, test models)
# The reference kernel within a factor 1.5 of its baseline time. Seen here: whole runs in which model and
# reference were both 1.41x slower (probably a busy sibling hyperthread) while tvm / reference stayed within 2 %;
# beyond that factor the machine is in another state than at baseline, or is another machine.
DEFAULT_MACHINE_TOLERANCE = 0.5
# One thread by default: with two on this 2-core machine, any other job halves the speed of a parallel
# kernel, and the measurement mostly measures the other jobs. Pass --threads N on a dedicated runner.
DEFAULT_THREADS = 1


class NoBaseline(BadInput):
    """No baseline for this machine, target or model: comparing another machine's would be meaningless."""


class LatencyRegression(SlowerThanBaseline):
    """At least one model is slower than its baseline beyond the tolerance."""


class Inconclusive(NotJudged):
    """No model is slower, but some could not be judged (the machine was busy, or the measurement too noisy)."""


@dataclass(frozen=True)
class Verdict:
    # "ok", "faster", "slower", "unclear" (too noisy), "busy" (too few undisturbed samples), "changed" (the
    # reference kernel off its baseline time); with --update: "recorded", or "unrecorded" (busy)
    status: str
    ratio: float  # now / baseline of tvm / reference
    low: float  # conservative 95 % interval of ratio
    high: float
    machine: float  # now / baseline of the reference kernel's median


@dataclass
class Comparison:
    model: str
    baseline: dict
    now: dict
    verdict: Verdict
    kernels: list[dict] = field(default_factory=list)  # kernel_diff, largest change first


def device_id(fingerprint: dict) -> str:
    """A directory name that spells out the whole fingerprint."""
    text = (f"{fingerprint['cpu']}-{fingerprint['cores']}cpu-{fingerprint['arch']}-tvm{fingerprint['apache-tvm']}"
            f"-ffi{fingerprint['apache-tvm-ffi']}")
    return re.sub(r"[^a-z0-9._+]+", "-", text.lower()).strip("-")


def baseline_path(root: Path, fingerprint: dict, target: str) -> Path:
    return Path(root) / device_id(fingerprint) / f"{target}.json"


def load_baselines(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NoBaseline(f"cannot read baselines {path}: {e}") from None
    if data.get("schema") != SCHEMA:
        raise NoBaseline(f"{path} has schema {data.get('schema')!r}, expected {SCHEMA}; re-record it with --update")
    return data


def _rounded(value):
    """Floats to 4 significant digits, so that committed baseline files stay readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def save_baselines(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_rounded(data), indent=1, sort_keys=True) + "\n")


def missing_device_message(root: Path, fingerprint: dict, target: str) -> str:
    """Say that this machine has no baseline, and how the machines that have one differ from it."""
    path = baseline_path(root, fingerprint, target)
    others = []
    for other in sorted(Path(root).glob(f"*/{target}.json")):
        try:
            device = json.loads(other.read_text())["device"]
        except (OSError, ValueError, KeyError):
            continue
        diff = ", ".join(f"{k} {device.get(k)!r} (here {v!r})" for k, v in fingerprint.items() if device.get(k) != v)
        others.append(f"{other.parent.name}: {diff}")
    where = f"; baselines exist for other machines or toolchains, not comparable with this one: {'; '.join(others)}" \
        if others else ""
    return (f"no {target} latency baseline for this machine ({path} is missing){where}; "
            f"record one here with `python -m pipeline regress --update --target {target} --models ...`")


def _median(stats: dict) -> dict:
    return {k: stats[k] for k in ("median", "ci95", "n")}


def entry_from(result: dict) -> dict:
    """What a baseline keeps of a bench result (pipeline.bench.bench_artifact): medians with their 95 % interval
    and number of quiet samples, and each kernel's ms per run."""
    return {"build_id": result["build_id"], "measured_at": result["measured_at"], "loadavg": result["loadavg"],
            "rounds": result["method"]["rounds"], "busy": result["method"]["busy"],
            "tvm_ms": _median(result["latency_ms"]["tvm"]), "reference_ms": _median(result["latency_ms"]["reference"]),
            "normalized": result["normalized"],
            "kernels": {row["kernel"]: row["ms"] for row in result["kernels"] or []}}


def decide(baseline: dict, now: dict, tolerance: float, machine_tolerance: float) -> Verdict:
    """Judge ``now`` against ``baseline`` (both :func:`entry_from`), see the module docstring."""
    machine = now["reference_ms"]["median"] / baseline["reference_ms"]["median"]
    b, n = baseline["normalized"], now["normalized"]
    ratio, low, high = n["median"] / b["median"], n["ci95"][0] / b["ci95"][1], n["ci95"][1] / b["ci95"][0]
    if baseline["busy"] or now["busy"]:
        status = "busy"  # too few undisturbed samples for a median
    # A busier machine slows the reference (parallel over all the threads) at least as much as the model, so it
    # can only hide a slowdown: "slower" stands however busy the machine was, unless it was faster than at baseline.
    elif ratio > 1 + tolerance and low > 1 and machine >= 1 / (1 + machine_tolerance):
        status = "slower"
    elif abs(math.log(machine)) > math.log(1 + machine_tolerance):
        status = "changed"
    elif ratio > 1 + tolerance:
        status = "unclear"
    elif ratio < 1 / (1 + tolerance) and high < 1:
        status = "faster"
    else:
        status = "ok"
    return Verdict(status, ratio, low, high, machine)


def kernel_diff(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Per kernel: ms per run at baseline and now (None where it does not exist), largest change first."""
    rows = [{"kernel": name, "baseline_ms": before.get(name), "now_ms": after.get(name)}
            for name in {**before, **after}]
    return sorted(rows, key=lambda r: -abs((r["now_ms"] or 0.0) - (r["baseline_ms"] or 0.0)))


def describe(c: Comparison) -> str:
    v = c.verdict
    what = {"slower": f"{v.ratio:.2f}x slower", "unclear": f"{v.ratio:.2f}x slower but too noisy to be sure "
            f"(95% interval {v.low:.2f}-{v.high:.2f})",
            "busy": "not judged: too few undisturbed samples (machine busy)",
            "changed": f"not judged: the reference kernel ran {v.machine:.2f}x its baseline time (machine in another "
                       "state, or another machine)",
            "unrecorded": "not recorded: too few undisturbed samples (machine busy)"}
    return f"{c.model} {what[v.status]}"


def regress(models: list[str] | None, target: str, *, root: Path, artifacts: Path | None = None, update: bool = False,
            threads: int = DEFAULT_THREADS, budget: Budget = Budget(),
            listener: StageListener = lambda *_: None) -> tuple[list[Comparison], dict, Path]:
    """Measure ``models`` (default: every model in the baseline file) and compare them with their baselines,
    or with ``update`` record them as the new baselines. Returns the comparisons, the baseline file's
    content and its path; the caller raises :func:`verdict_error`'s error, after showing the comparisons."""
    fingerprint = device_fingerprint()
    path = baseline_path(root, fingerprint, target)
    if path.exists():
        data = load_baselines(path)
    elif update:
        data = {"schema": SCHEMA, "device": fingerprint, "target": target, "threads": threads,
                "tolerance": DEFAULT_TOLERANCE, "machine_tolerance": DEFAULT_MACHINE_TOLERANCE, "models": {}}
    else:
        raise NoBaseline(missing_device_message(root, fingerprint, target))
    models = models or sorted(data["models"])
    if not models:
        raise NoBaseline(f"{path} holds no models yet; name them: --models test_mixer,...")
    if data["threads"] != threads and not (update and set(data["models"]) <= set(models)):
        raise NoBaseline(f"{path} was recorded with {data['threads']} thread(s), not {threads}; "
                         f"pass --threads {data['threads']} (or re-record all its models with --update)")
    if data["threads"] != threads:  # --update of every model with another thread count
        data.update(threads=threads, models={})
    missing = [m for m in models if m not in data["models"]]
    if missing and not update:
        raise NoBaseline(f"no baseline for {', '.join(missing)} in {path}; record it with --update --models "
                         f"{','.join(missing)}")
    configure_threads(threads)
    comparisons = []
    for model in models:
        artifact = ensure_artifact(BuildSpec(model=model, target=target), artifacts, listener)
        listener(f"measure {model}", None)
        start = time.perf_counter()
        now = entry_from(bench_artifact(artifact, per_layer=True, threads=threads, budget=budget))
        listener(f"measure {model}", time.perf_counter() - start)
        if update:
            if not now["busy"]:  # never record a baseline from a few lucky samples
                data["models"][model] = now
            status = "unrecorded" if now["busy"] else "recorded"
            comparisons.append(Comparison(model, now, now, Verdict(status, 1.0, 1.0, 1.0, 1.0)))
            continue
        baseline = data["models"][model]
        verdict = decide(baseline, now, data["tolerance"], data["machine_tolerance"])
        comparisons.append(Comparison(model, baseline, now, verdict, kernel_diff(baseline["kernels"], now["kernels"])))
    if update and any(c.verdict.status == "recorded" for c in comparisons):  # a failed --update writes nothing
        data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save_baselines(path, data)
    return comparisons, data, path


def verdict_error(comparisons: list[Comparison], target: str) -> LatencyRegression | Inconclusive | None:
    """The error a run ends with: LatencyRegression if any model is slower, else Inconclusive if any was not judged."""
    slower = [describe(c) for c in comparisons if c.verdict.status == "slower"]
    if slower:
        return LatencyRegression(f"{len(slower)} model(s) slower than their {target} baseline: " + "; ".join(slower))
    unjudged = [describe(c) for c in comparisons if c.verdict.status in ("unclear", "busy", "changed", "unrecorded")]
    if unjudged:
        return Inconclusive("; ".join(unjudged) + "; rerun when the machine is quieter")
    return None
