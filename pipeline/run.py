"""The compile driver: the one place that lists the stages, in order.

:func:`front_end` runs the stages from the PyTorch model to the imported Relax module; the tuner
(pipeline.tune) calls it too, so that it tunes exactly what a compile builds. :func:`compile_model` runs it and
then the rest: optimize, build, verify, package. Each stage is a plain function in pipeline/stages/.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from dataclasses import dataclass

from .errors import BuildError, DiskFull, ExportError, OutputDirError, VerificationFailed
from .spec import BuildSpec, resolve_target

# Called with (stage, None) when a stage starts and (stage, seconds) when it ends.
StageListener = Callable[[str, float | None], None]


def default_out_dir(spec: BuildSpec) -> Path:
    suffix = "".join(part for part, wanted in ((f"-{spec.cuda_arch}", spec.cuda_arch), (f"-b{spec.batch}", spec.batch != 1),
                                                ("-fp16", spec.fp16)) if wanted)
    return Path("artifacts") / f"{spec.model}-{spec.target}{suffix}"


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` that replaces it only once everything inside is written.

    A crash or Ctrl-C removes it; a kill -9 leaves a hidden ``.NAME.partial-*`` without a
    manifest, never something that looks like a finished artifact.
    """
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise OutputDirError(f"{out} exists and is not an artifact; choose another --out or empty it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputDirError(f"cannot write to {out.parent}: {e.strerror}; choose another --out") from None
    try:
        yield work
        os.chmod(work, 0o755)  # mkdtemp makes it 0700
        if out.exists():  # replace an older artifact: move it aside first so `out` is never half-written
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(work, out)
            shutil.rmtree(old)
        else:
            os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


MIN_FREE_BYTES = 16 << 20  # a stage that fails with less room than this where the compile writes: a full disk


@contextlib.contextmanager
def disk_full_is_one_line(work: Path) -> Iterator[None]:
    """A full disk said as such. Often it is not: TVM's build ends in "Compilation error:" and nothing (the C
    compiler's message does not reach it), ONNX export in a RuntimeError; so a failure to write (an OSError, an
    export or build that failed) with (almost) no room left where the compile writes (the artifact's directory, the
    temporary one TVM builds in) is taken for one. Other errors (bad weights, numerics) are never relabelled."""
    try:
        yield
    except (OSError, ExportError, BuildError) as e:
        full = [d for d in (work.parent, Path(tempfile.gettempdir()))
                if shutil.disk_usage(d).free < MIN_FREE_BYTES]
        if not full and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
            raise
        where = ", ".join(map(str, full)) or str(work.parent)
        raise DiskFull(f"no space left on device in {where} ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                       "free some space, or write elsewhere (--out, TMPDIR)") from None


class _Interrupts:
    """Remembers a Ctrl-C, so that the compile stops at the next stage boundary even if it was swallowed.

    A KeyboardInterrupt raised while TVM's C++ calls back into Python comes out of the C++ side as a
    RuntimeError, which a pass may catch (a default schedule rule that fails leaves its function
    unscheduled): the compile would then go on and publish the artifact.
    """

    def __init__(self):
        self.seen = False

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):
            self.seen = True
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _timed(stage: str, timings: dict[str, float], listener: StageListener, interrupts: _Interrupts) -> Iterator[None]:
    listener(stage, None)
    start = time.perf_counter()
    yield
    interrupts.check()
    timings[stage] = time.perf_counter() - start
    listener(stage, timings[stage])


Stage = Callable[[str], contextlib.AbstractContextManager]  # `with stage(name):` times one stage


@contextlib.contextmanager
def staged(listener: StageListener) -> Iterator[tuple[Stage, dict[str, float]]]:
    """Stages timed into a dict and told to ``listener``, a Ctrl-C stopping them at the next boundary."""
    timings: dict[str, float] = {}
    interrupts = _Interrupts()
    with interrupts.watch():
        yield (lambda name: _timed(name, timings, listener, interrupts)), timings


@dataclass
class FrontEnd:
    """What the stages up to the Relax import produce (the ONNX files are in the work directory)."""

    model: object  # the torch module
    cfg: object  # its models.ModelCfg
    weights: dict  # where its weights came from (the manifest's model.weights)
    inputs: dict  # reference inputs
    reference: dict  # PyTorch's outputs on them
    mod: object  # the imported Relax module
    params: dict  # its weights, as main's parameters after the inputs


def front_end(spec: BuildSpec, work: Path, stage: Stage, edit_export: Callable[[Path, object, dict], None] | None = None
              ) -> FrontEnd:
    """PyTorch model -> reference -> ONNX -> simplified ONNX -> Relax, writing model.onnx and model.sim.onnx to
    ``work``. ``edit_export(model.onnx, torch model, inputs)`` may rewrite the export before it is simplified (`diagnose`
    adds outputs). Heavy imports here, so `list-models` and `--help` stay fast."""
    from .stages.export import export_onnx
    from .stages.model import load_model
    from .stages.reference import INPUT_NAME, OUTPUT_NAMES, make_inputs, run_torch
    from .stages.relax_import import import_onnx
    from .stages.simplify import simplify_onnx

    with stage("load model"):
        model, cfg, weights = load_model(spec.model, spec.weights, spec.seed)
    with stage("reference"):
        inputs = make_inputs(cfg, spec.batch, spec.seed)
        reference = run_torch(model, inputs)
    with stage("export onnx"):
        export_onnx(model, inputs, OUTPUT_NAMES, cfg.opset, work / "model.onnx")
        if edit_export is not None:
            edit_export(work / "model.onnx", model, inputs)
    with stage("simplify"):
        simplify_onnx(work / "model.onnx", work / "model.sim.onnx")
        if not spec.keep_export:  # as large as the simplified graph and rarely needed after it
            (work / "model.onnx").unlink()
    with stage("import relax"):
        mod, params = import_onnx(work / "model.sim.onnx", {INPUT_NAME: inputs[INPUT_NAME].shape})
    return FrontEnd(model, cfg, weights, inputs, reference, mod, params)


def untimed(_name: str) -> contextlib.AbstractContextManager:
    """A Stage that only runs the stage: for callers that show no progress (the tuner)."""
    return contextlib.nullcontext()


def diagnose_hint(spec: BuildSpec) -> str:
    """The `diagnose` command that finds where the build ``spec`` first goes wrong."""
    options = [("--target", spec.target), ("--batch", spec.batch != 1 and spec.batch), ("--seed", spec.seed),
               ("--weights", spec.weights), ("--cuda-arch", spec.cuda_arch)]
    words = [f"--model {spec.model}", *(f"{flag} {value}" for flag, value in options if value),
             *(["--fp16"] if spec.fp16 else []), *(f"--keep-fp32 '{p}'" for p in spec.keep_fp32)]
    return f"python -m pipeline diagnose {' '.join(words)}"


def kept_float32(spec: BuildSpec, front: FrontEnd, work: Path, why: dict[str, str] | None = None):
    """The layers ``spec.keep_fp32`` selects in the simplified graph (pipeline.stages.layers.KeptLayers), or None."""
    import onnx

    from .stages.layers import keep_float32_layers, module_kinds

    if not spec.keep_fp32:
        return None
    return keep_float32_layers(onnx.load(str(work / "model.sim.onnx")).graph, module_kinds(front.model),
                               spec.keep_fp32, why)


def compile_model(spec: BuildSpec, out: Path | None = None, listener: StageListener = lambda *_: None,
                  kept_why: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Run every stage for ``spec``; return the artifact directory and its manifest. ``kept_why``: per
    ``--keep-fp32`` pattern, why it is kept (the manifest's reason; default: the option's)."""
    from .stages.build import build
    from .stages.optimize import optimize
    from .stages.package import write_artifact
    from .stages.reference import OUTPUT_NAMES
    from .stages.verify import run_compiled_library, run_host_twin, run_onnxruntime, verify

    target = resolve_target(spec)  # bad --target / --cuda-arch: refused before any work
    out = out or default_out_dir(spec)
    with staged(listener) as (stage, timings), staging_dir(out) as work, disk_full_is_one_line(work):
        front = front_end(spec, work, stage)
        cfg, inputs, reference = front.cfg, front.inputs, front.reference
        with stage("optimize"):
            kept = kept_float32(spec, front, work, kept_why)
            keep = kept.bindings if kept else frozenset()
            mod, params, passes = optimize(front.mod, front.params, target, spec.fp16, keep)
            if kept:
                passes["kept_float32"] = kept.manifest()
        with stage("build"):
            build_report = build(mod, target, work / "lib.so")
        with stage("verify"):
            candidates, ran = {}, {}
            candidates["onnxruntime"], ran["onnxruntime"] = run_onnxruntime(work / "model.sim.onnx", inputs)
            library_outputs, library_run = run_compiled_library(target, work / "lib.so", params, inputs, OUTPUT_NAMES)
            if library_outputs is not None:
                candidates["tvm"], ran["tvm"] = library_outputs, f"the compiled library, {library_run}"
            else:  # everything but the target's schedules and codegen, checked here
                candidates["tvm-host"], ran["tvm-host"] = run_host_twin(front.mod, front.params, spec.fp16, inputs,
                                                                        OUTPUT_NAMES, keep, target)
            fp32 = (cfg.atol, cfg.rtol)
            library_tolerance = (cfg.fp16_atol, cfg.fp16_rtol) if spec.fp16 else fp32
            try:
                checks = verify(reference, candidates,
                                {"onnxruntime": fp32, "tvm": library_tolerance, "tvm-host": library_tolerance})
            except VerificationFailed as e:  # diagnosing is another build, minutes on a large model: said, not run
                raise VerificationFailed(e.failures, f"numerics check failed (`{diagnose_hint(spec)}` names the first "
                                                     "layer that diverges)") from None
        with stage("package"):
            manifest = write_artifact(work, model_name=spec.model, cfg=cfg, batch=spec.batch, weights=front.weights,
                                      target=target, inputs=inputs, reference=reference, params=params,
                                      checks=checks, ran=ran, library_run=library_run, tolerance=library_tolerance,
                                      passes=passes, build_report=build_report, timings=timings)
    return out, manifest
