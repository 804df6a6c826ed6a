"""Numerics diagnosis: where the compiled model first leaves PyTorch, layer by layer; and `--fp16 auto`, which
keeps in float32 the layers that diagnosis names until the model passes.

Method (one extra build): PyTorch's forward hooks record every submodule's output; the export gets each module's
output value (pipeline.stages.layers) as an extra graph output, and that *probe build* goes through the compile's
own stages (pipeline.run.front_end, optimize, build) and runs where the compile's verify stage runs it: on this
host, under qemu for aarch64 targets, and for a library this machine cannot run (CUDA without a GPU) as the host
twin. Each probed value is compared with its module's output in execution order. The extra outputs must be
materialised, so the probe build cannot fuse across a module boundary the way the plain build may: a numerics
change that only one fusion brings about can look different (or vanish) in the probe build; the logits of the
probe build are checked as well and reported beside the layers.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import runtime
from .deploy import outputs_on_board
from .errors import NumericsFailed, VerificationFailed
from .run import StageListener, compile_model, diagnose_hint, front_end, kept_float32, staged
from .runtime import OutputCheck, compare
from .spec import Board, BuildSpec, resolve_target

# --fp16 auto gives up after keeping this many layers: past a few, float16 is no longer the model's precision.
AUTO_MAX_LAYERS = 8
# A layer whose elements break the allclose rule still passes with a relative L2 error within this many rtol:
# float16 rounding accumulates over depth (cyclemlp_b1 --fp16, whose logits pass at allclose 0.27: its last
# stage's layers at rel L2 up to 1.5e-2, allclose up to 1.4, measured), while what breaks a model is far off
# (an overflow: Inf/NaN; the tests' wrong LayerNorm epsilon: rel L2 ~0.7).
LAYER_REL_L2_RTOLS = 5


class LayersDiverged(NumericsFailed):
    """`diagnose` found a layer, or the logits, past tolerance."""


@dataclass(frozen=True)
class LayerCheck:
    """One module's output in the compiled model against PyTorch's."""

    index: int  # execution order
    layer: str  # PyTorch module path
    kind: str  # module class
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    atol: float  # the build's atol scaled by the layer's largest reference magnitude (when over 1)
    rtol: float
    allclose: float  # max |a-b| / (atol + rtol |b|)
    rel_l2: float  # ||a-b|| / ||b||
    nan: int
    inf: int
    passed: bool  # finite, and allclose <= 1 or rel_l2 <= LAYER_REL_L2_RTOLS * rtol


def layer_check(index: int, layer: str, kind: str, actual: np.ndarray, expected: np.ndarray, atol: float,
                rtol: float) -> LayerCheck:
    """The compile's allclose rule, with atol relative to the layer's range (intermediate activations reach
    magnitudes, hundreds, that no output tolerance was set for); or, where elements break it, a relative L2
    error within LAYER_REL_L2_RTOLS rtol."""
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    c = compare(layer, actual, expected, atol * scale, rtol)
    finite = np.isfinite(actual)
    if c.shape == tuple(actual.shape) and finite.all():
        diff = actual.astype(np.float64) - expected
        rel_l2 = float(np.linalg.norm(diff) / max(float(np.linalg.norm(expected)), np.finfo(np.float32).tiny))
    else:
        rel_l2 = float("inf")
    return LayerCheck(index, layer, kind, tuple(expected.shape), c.max_abs, c.max_rel, c.atol, rtol, c.allclose, rel_l2,
                      int(np.isnan(actual).sum()), int((~finite & ~np.isnan(actual)).sum()),
                      c.passed or rel_l2 <= LAYER_REL_L2_RTOLS * rtol)


@dataclass
class Diagnosis:
    model: str
    target: str
    precision: str  # "float32", or "float16" with the layers kept in float32
    kept_float32: list[dict]
    ran: str  # where the probe build ran
    layers: list[LayerCheck]  # every probed module, in execution order
    output: OutputCheck  # the probe build's logits at the model's tolerance
    not_probed: int  # modules PyTorch ran whose output has no value of the same shape in the export
    seconds: float
    timings_s: dict[str, float]

    @property
    def first_divergent(self) -> LayerCheck | None:
        return next((c for c in self.layers if not c.passed), None)

    def where(self) -> str:
        """Where it first goes wrong, in one line (or that no layer does)."""
        first = self.first_divergent
        if first is None:
            return "no layer leaves tolerance in the probe build" + ("" if self.output.passed else
                                                                       f" but its logits do ({self.output.describe()})")
        after = sum(not c.passed for c in self.layers[first.index + 1:])
        return (f"first divergent layer {first.layer} ({first.kind}, #{first.index}: allclose {first.allclose:.3g} "
                f"of 1, max_abs {first.max_abs:.3g}, NaN {first.nan}, Inf {first.inf}), {after} layer(s) after it "
                "past tolerance")

    def raise_if_diverged(self) -> None:
        if self.first_divergent or not self.output.passed:
            raise LayersDiverged(f"{self.model} on {self.target} ({self.precision}): {self.where()}")

    def to_json(self) -> dict:
        first = self.first_divergent
        return {**dataclasses.asdict(self), "first_divergent": first.layer if first else None}

    def table(self, limit: int = 25) -> tuple[list[str], list[list[str]]]:
        """The first divergent layer and up to ``limit`` - 1 after it (every layer when none diverges)."""
        first = self.first_divergent
        rows = self.layers[first.index:first.index + limit] if first else self.layers[-limit:]
        headers = ["#", "layer", "kind", "max abs", "max rel", "allclose", "rel L2", "atol", "rtol", "NaN", "Inf", ""]
        return headers, [[str(c.index), c.layer, c.kind, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.allclose:.3g}",
                          f"{c.rel_l2:.3g}", f"{c.atol:.3g}", f"{c.rtol:g}", str(c.nan), str(c.inf),
                          "ok" if c.passed else "FAILED"] for c in rows]


def diagnose(spec: BuildSpec, listener: StageListener = lambda *_: None,
             kept_why: dict[str, str] | None = None, board: Board | None = None, timeout: float = 60.0) -> Diagnosis:
    """Build ``spec`` with every module's output as an extra output, run it (here, or on ``board`` over TVM RPC,
    as ``deploy`` reaches it), compare each with PyTorch's."""
    from .stages.build import build
    from .stages.layers import add_probe_outputs, module_kinds
    from .stages.optimize import optimize
    from .stages.reference import OUTPUT_NAMES, run_torch_layers
    from .stages.verify import run_compiled_library, run_host_twin, why_not_run_here

    target = resolve_target(spec)
    start = time.perf_counter()
    layer_reference: dict[str, np.ndarray] = {}
    probes = []

    def add_probes(path: Path, model, inputs) -> None:
        layer_reference.update(run_torch_layers(model, inputs))
        probes.extend(add_probe_outputs(path, module_kinds(model), layer_reference, inputs))

    with staged(listener) as (stage, timings), tempfile.TemporaryDirectory(prefix="pipeline-diagnose-") as tmp:
        work = Path(tmp)
        front = front_end(replace(spec, keep_export=False), work, stage, add_probes)
        kept = kept_float32(spec, front, work, kept_why)
        keep = kept.bindings if kept else frozenset()
        names = (*OUTPUT_NAMES, *(p.value for p in probes if p.value not in OUTPUT_NAMES))
        reason = why_not_run_here(target) if board is None else None
        if reason is None:
            with stage("optimize"):
                mod, params, _ = optimize(front.mod, front.params, target, spec.fp16, keep)
            with stage("build"):
                probe = work / "probe"
                probe.mkdir()
                built = build(mod, target, probe / runtime.LIBRARY)
            with stage("run"):
                if board is None:
                    outputs, ran = run_compiled_library(target, probe / runtime.LIBRARY, params, front.inputs, names)
                else:
                    board_manifest = {"target": {"name": target.name, "device": target.device, "build": built}}
                    outputs = outputs_on_board(board, probe, board_manifest, params, front.inputs, names, timeout)
                    ran = f"ran on the board {board} over TVM RPC"
            ran = f"the probe build for {target.name}, {ran}"
        else:  # the host twin's optimize and build for this CPU
            with stage("host twin"):
                outputs, ran = run_host_twin(front.mod, front.params, spec.fp16, front.inputs, names, keep, target)
            ran = f"{target.name}'s library cannot run here ({reason}); the probe build's {ran}"
    cfg = front.cfg
    atol, rtol = (cfg.fp16_atol, cfg.fp16_rtol) if spec.fp16 else (cfg.atol, cfg.rtol)
    layers = [layer_check(i, p.module, p.kind, outputs[p.value], layer_reference[p.module], atol, rtol)
              for i, p in enumerate(probes)]
    [logits] = OUTPUT_NAMES
    return Diagnosis(model=spec.model, target=target.name, precision="float16" if spec.fp16 else "float32",
                     kept_float32=kept.manifest() if kept else [], ran=ran, layers=layers,
                     output=compare(logits, outputs[logits], front.reference[logits], atol, rtol),
                     not_probed=len(layer_reference) - len({p.module for p in probes}),
                     seconds=time.perf_counter() - start, timings_s=timings)


def write_json(diagnosis: Diagnosis, path: Path) -> None:
    path.write_text(json.dumps(diagnosis.to_json(), indent=1, default=str) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class AutoRound:
    kept: tuple[str, ...]
    logits: OutputCheck
    first_divergent: str | None


def choose_float32_layers(spec: BuildSpec, listener: StageListener = lambda *_: None
                          ) -> tuple[tuple[str, ...], dict[str, str], list[AutoRound]]:
    """Keep in float32, one at a time, the first layer where the float16 probe build leaves tolerance (or, when
    none does but the logits fail, the layer furthest out), until the probe build's logits pass; return the
    layers (with ``spec.keep_fp32`` first), why each is kept, and the rounds."""
    keep, why, rounds = list(spec.keep_fp32), {}, []
    while True:
        d = diagnose(replace(spec, fp16=True, keep_fp32=tuple(keep)), listener, why)
        first = d.first_divergent
        rounds.append(AutoRound(tuple(keep), d.output, first.layer if first else None))
        if d.output.passed:
            return tuple(keep), why, rounds
        worst = first or max(d.layers, key=lambda c: c.allclose)
        if worst.layer in keep or len(keep) - len(spec.keep_fp32) >= AUTO_MAX_LAYERS:
            raise NumericsFailed(f"--fp16 auto: {spec.model} still fails its float16 tolerance with {len(keep)} "
                                 f"layer(s) kept in float32 ({', '.join(keep)}; {d.output.describe()}); compile it "
                                 "without --fp16")
        keep.append(worst.layer)
        why[worst.layer] = (f"--fp16 auto, round {len(rounds)}: {'first layer past' if first else 'furthest from'} "
                            f"its float16 tolerance (allclose {worst.allclose:.3g}, max_abs {worst.max_abs:.3g}, "
                            f"NaN {worst.nan}, Inf {worst.inf}) while the logits failed ({d.output.describe()})")


def compile_diagnosed(spec: BuildSpec, out: Path | None = None, listener: StageListener = lambda *_: None
                      ) -> tuple[Path, dict]:
    """`compile`: when verification fails, diagnose the build (one more build: minutes on the largest model) and
    say in the error where it first goes wrong."""
    try:
        return compile_model(spec, out, listener)
    except VerificationFailed as e:
        failed = e
    where = diagnose(spec, listener).where()  # outside the except: its traceback would chain the first failure
    raise VerificationFailed(failed.failures, f"numerics check failed; diagnosed: {where} (`{diagnose_hint(spec)}` "
                                              "for the table)")


def compile_fp16_auto(spec: BuildSpec, out: Path | None = None, listener: StageListener = lambda *_: None
                      ) -> tuple[Path, dict]:
    """`compile --fp16 auto`: the float16 build as is when it passes; otherwise diagnosis rounds choose the
    layers to keep in float32 (:func:`choose_float32_layers`), then the build with them."""
    spec = replace(spec, fp16=True)
    try:
        return compile_model(spec, out, listener)
    except VerificationFailed:
        pass
    keep, why, _ = choose_float32_layers(spec, listener)
    return compile_model(replace(spec, keep_fp32=keep), out, listener, kept_why=why)
