"""Command line: parse, validate, call the library, print. No compiler logic lives here."""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Column, Table

import targets
from . import version
from .errors import PipelineError
from .spec import Board, BuildSpec

console = Console(stderr=True)
stdout = Console()


class StageProgress:
    """Shows a spinner while a stage runs and a line with its time when it ends."""

    def __init__(self) -> None:
        self._status = None

    def __call__(self, stage: str, seconds: float | None) -> None:
        if seconds is None:
            if self._status is not None:  # the last stage raised, and the command went on (`--fp16 auto`)
                self._status.stop()
            self._status = console.status(f"{stage}…")
            self._status.start()
            return
        self._status.stop()
        self._status = None
        console.print(f"[green]✓[/green] {stage:<13} {seconds:7.2f} s")


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def reports_errors(interrupted: str = "interrupted"):
    """A command's errors as one line and their exit code (pipeline.errors); Ctrl-C as ``interrupted``, 130."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except PipelineError as e:
                _fail(str(e), e.exit_code)
            except KeyboardInterrupt:
                _fail(interrupted, 130)

        return wrapper

    return decorate


def _check_name(name: str, lookup) -> None:
    try:
        lookup(name)
    except KeyError as e:  # the registries' UnknownModelError / UnknownTargetError
        raise click.BadParameter(str(e)) from None


def _validated(lookup):
    """A click callback that rejects unknown names with the registry's own message (close names suggested)."""
    def callback(_ctx, _param, value):
        if value is not None:
            _check_name(value, lookup)
        return value

    return callback


def _model_cfg(name: str):
    """The zoo's cfg of ``name``; models (and so torch, seconds to import) load only when a model is named."""
    import models

    return models.get_model_cfg(name)


model_option = click.option("--model", "model_name", required=True, metavar="NAME", callback=_validated(_model_cfg),
                            help="Model variant (see `list-models`).")


def target_option(help_text: str = "Target device (see `list-targets`)."):
    return click.option("--target", "target_name", default="x86", show_default=True, metavar="NAME",
                        callback=_validated(targets.get_target), help=help_text)


def _patterns(_ctx, _param, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())


keep_fp32_option = click.option(
    "--keep-fp32", multiple=True, callback=_patterns, metavar="PATTERN",
    help="With --fp16: compute these layers in float32 all the same. A PyTorch module path (network.2.1.attn.sfc_h, "
         "with its submodules), an fnmatch pattern over paths ('*.norm*'), a module class (LayerNorm) or an ONNX op "
         "type (Softmax). Repeat it or separate with commas; `diagnose` lists the paths.")


def build_options(command):
    """--batch, --weights, --seed and --cuda-arch: what is built, for `compile` and `diagnose` alike."""
    for option in reversed((
        click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Batch size compiled in."),
        click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="A PyTorch state_dict checkpoint (timm / official layout). Default: seeded random weights."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of random weights and reference inputs."),
        click.option("--cuda-arch", default=None, metavar="sm_XY",
                     help="GPU architecture for the generic `cuda` target (default sm_87)."),
    )):
        command = option(command)
    return command


def _host_port(_ctx, _param, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host, int(port)


def board_options(what: str, required: bool = False):
    """--device, --rpc-tracker with --rpc-key, and --timeout: the board a command talks to, passed to it as
    ``board`` (a Board, or None when neither address is given and ``required`` is false) and ``timeout``."""
    options = (
        click.option("--device", "device_addr", callback=_host_port, default=None, metavar="HOST:PORT",
                     help=f"{what} on the board's TVM RPC server (see `deploy --help`)."),
        click.option("--rpc-tracker", callback=_host_port, default=None, metavar="HOST:PORT",
                     help=f"{what} on a board registered with this TVM RPC tracker (needs --rpc-key)."),
        click.option("--rpc-key", default=None, metavar="KEY", help="The board's key at the tracker."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
                     metavar="S", help="Give up when the board or tracker does not answer for S seconds."),
    )

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, device_addr, rpc_tracker, rpc_key, **kwargs):
            if (rpc_tracker is None) != (rpc_key is None):
                raise click.UsageError("--rpc-tracker and --rpc-key go together")
            if device_addr and rpc_tracker:
                raise click.UsageError("give either --device or --rpc-tracker, not both")
            if required and not (device_addr or rpc_tracker):
                raise click.UsageError("give either --device HOST:PORT or --rpc-tracker HOST:PORT with --rpc-key")
            board = Board(*device_addr) if device_addr else Board(*rpc_tracker, rpc_key) if rpc_tracker else None
            return command(*args, board=board, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _show_version(ctx, _param, value) -> None:
    if value and not ctx.resilient_parsing:
        commit = version.source_commit()
        click.echo(f"pipeline {version.version()}" + (f" (commit {commit})" if commit else ""))
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version (and the commit of this checkout) and exit.")
def cli() -> None:
    """Compile MLP-style vision models from PyTorch to verified TVM artifacts for edge devices."""


@cli.command("compile")
@model_option
@target_option()
@build_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Artifact directory. Default: artifacts/MODEL-TARGET[-sm_XY][-bN][-fp16].")
@click.option("--fp16", type=click.Choice(["on", "auto"]), is_flag=False, flag_value="on", default=None,
              help="Compute in float16; the library (or, where it cannot run here, its host twin) is held to the "
                   "variant's fp16 tolerance. `--fp16 auto`: if that fails, keep in float32 the layers `diagnose` "
                   "names, one at a time, until it passes (each round is one more build).")
@keep_fp32_option
@click.option("--keep-export", is_flag=True,
              help="Also keep model.onnx, the unsimplified export (as large as model.sim.onnx, which is kept).")
@click.option("--diagnose/--no-diagnose", "diagnose_failures", default=True, show_default=True,
              help="When verification fails, diagnose the build (one more build, minutes on a large model) and name "
                   "the first layer that leaves tolerance in the error.")
@reports_errors("interrupted; no artifact was written")
def compile_cmd(model_name: str, target_name: str, batch: int, weights: Path | None, out: Path | None,
                seed: int, cuda_arch: str | None, fp16: str | None, keep_fp32: tuple[str, ...],
                keep_export: bool, diagnose_failures: bool) -> None:
    """Export, simplify, import, optimize, build, verify and package one model for one target.

    When verification fails, the build is diagnosed (`diagnose`: one more build) and the error names the first
    layer that leaves tolerance."""
    from .diagnose import compile_diagnosed, compile_fp16_auto
    from .run import compile_model

    spec = BuildSpec(model=model_name, target=target_name, batch=batch, weights=weights, seed=seed,
                     cuda_arch=cuda_arch, fp16=fp16 is not None, keep_export=keep_export, keep_fp32=keep_fp32)
    build = compile_fp16_auto if fp16 == "auto" else compile_diagnosed if diagnose_failures else compile_model
    out_dir, manifest = build(spec, out, listener=StageProgress())
    for kept in manifest["passes"].get("kept_float32", []):
        console.print(f"  float32: {kept['layer']} ({kept['kind']}): {kept['why']}", highlight=False, soft_wrap=True)
    print_verdict(manifest["verify"])
    python_only = manifest["target"]["build"]["python_only_builtins"]
    if python_only:
        console.print(f"[yellow]![/yellow] the library calls {', '.join(python_only)}, which only TVM's Python has: "
                      "its bundles run with run.py, not the native runner (package --no-native)", highlight=False,
                      soft_wrap=True)
    stdout.print(f"artifact: {out_dir}  build_id {manifest['build_id'][:16]}", highlight=False, soft_wrap=True)


@cli.command("diagnose")
@model_option
@target_option()
@build_options
@click.option("--fp16", is_flag=True, help="Diagnose the float16 build, held to the variant's fp16 tolerance.")
@keep_fp32_option
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
              help="Also write every layer's comparison to FILE.")
@click.option("--rows", type=click.IntRange(min=1), default=25, show_default=True,
              help="Table rows: the first divergent layer and those after it.")
@board_options("Run the probe build")
@reports_errors()
def diagnose_cmd(model_name: str, target_name: str, batch: int, weights: Path | None, seed: int,
                 cuda_arch: str | None, fp16: bool, keep_fp32: tuple[str, ...], json_out: Path | None,
                 rows: int, board: Board | None, timeout: float) -> None:
    """Name the first layer where the compiled model leaves PyTorch's numbers, and the layers after it.

    One extra build: every PyTorch module's output becomes an output of the exported graph, compiled through
    the compile's own stages and run where verify runs it (this host; qemu for aarch64 targets; the host twin
    for a library this machine cannot run, e.g. CUDA without a GPU), or with --device / --rpc-tracker on the
    board, over TVM RPC as `deploy` reaches it. Each output is compared with the module's
    output in PyTorch (forward hooks), with the build's tolerance, atol scaled by the layer's range. The extra
    outputs keep fusion from crossing module boundaries: what only a fusion causes may look different here.
    Exit status 3 when a layer or the logits leave tolerance.
    """
    from .diagnose import diagnose, write_json

    spec = BuildSpec(model=model_name, target=target_name, batch=batch, weights=weights, seed=seed,
                     cuda_arch=cuda_arch, fp16=fp16, keep_fp32=keep_fp32)
    result = diagnose(spec, listener=StageProgress(), board=board, timeout=timeout)
    console.print(f"  ran: {result.ran}", highlight=False, soft_wrap=True)
    for kept in result.kept_float32:
        console.print(f"  float32: {kept['layer']} ({kept['kind']})", highlight=False, soft_wrap=True)
    first = result.first_divergent
    title = (f"first divergent layer: {first.layer} ({first.kind}), #{first.index} of {len(result.layers)}" if first
             else f"no layer leaves tolerance ({len(result.layers)} compared); the last {min(rows, len(result.layers))}")
    _print_table(result.table(rows), title=title)
    console.print(f"  {result.output.describe()} (probe build)", highlight=False, soft_wrap=True)
    if json_out is not None:
        write_json(result, json_out)
        console.print(f"  every layer: {json_out}", highlight=False, soft_wrap=True)
    result.raise_if_diverged()
    stdout.print(f"{spec.model} on {result.target} ({result.precision}): every layer within tolerance "
                 f"({len(result.layers)} compared, {result.seconds:.0f} s)", highlight=False, soft_wrap=True)


def _print_checks(outputs: list[dict], prefix: str = "") -> None:
    from .runtime import OutputCheck

    for check in outputs:
        if check["name"].startswith(prefix):
            console.print(f"    {OutputCheck(**check).describe()}", highlight=False, soft_wrap=True)


def print_verdict(verify: dict) -> None:
    """Each check with what ran where, then whether the compiled library itself was verified (only then a tick)."""
    console.print(f"  against {verify['reference']}:", highlight=False, soft_wrap=True)
    for runtime, what in verify["checks"].items():
        console.print(f"  {runtime}: {what}", highlight=False, soft_wrap=True)
        _print_checks(verify["outputs"], f"{runtime}/")
    if verify["library_verified"]:
        console.print(f"[green]✓[/green] library verified: {verify['compiled_library']}", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"[yellow]![/yellow] library NOT verified: {verify['compiled_library']}; verify it where it "
                      "runs (`python -m pipeline deploy`, or the bundle's run.py)", highlight=False, soft_wrap=True)


class TuneProgress:
    """One bar per task (trials / --trials, best record, default schedule's time) and the model's
    estimated time (the faster of the two per task, weighted by calls)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(bar_width=10),
                                  TextColumn("{task.fields[best]}"), console=console)
        self._rows: dict[str, int] = {}

    def __call__(self, states) -> None:
        if not self._rows:
            self._progress.start()
            self._rows["model"] = self._progress.add_task(f"{'model (estimated)':33}", best="")
            for s in states:
                if s.goal:
                    self._rows[s.workload] = self._progress.add_task(f"{s.name[:28]:28} ×{s.weight:<3}", best="")
        estimate = sum(s.weight * s.expected_us for s in states if s.expected_us is not None)
        self._progress.update(self._rows["model"], total=sum(s.goal for s in states),
                              completed=sum(min(s.trials, s.goal) for s in states),
                              best=_microseconds(estimate) if estimate else "")
        for s in states:
            if s.goal:
                best = s.status if s.best_us is None else _microseconds(s.best_us)
                default = "" if s.default_us is None else f" (default {_microseconds(s.default_us)})"
                self._progress.update(self._rows[s.workload], total=s.goal, completed=min(s.trials, s.goal),
                                      best=best + default)

    def stop(self) -> None:
        self._progress.stop()


def _microseconds(us: float) -> str:
    return f"{us:,.1f} µs" if us >= 10 else f"{us:.3g} µs"


@cli.command("tune")
@click.option("--model", "model_name", default=None, metavar="NAME", callback=_validated(_model_cfg),
              help="Model variant (see `list-models`); not needed with --import-results.")
@target_option()
@click.option("--cuda-arch", default=None, metavar="sm_XY", help="GPU architecture for the generic `cuda` target.")
@click.option("--trials", type=click.IntRange(min=1), default=64, show_default=True,
              help="Measured candidates wanted for the task with the largest share of the model's time; the others "
                   "get theirs in proportion, tasks under 1 % none. Tasks that have them already are skipped.")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIN",
              help="Start no new measurement after MIN minutes (the ones in flight finish and are saved).")
@board_options("Measure candidates")
@click.option("--export-candidates", "export_to", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE.tar", help="Measure nothing here: build the next round's candidates into FILE.tar for a "
                                       "board to time (tar xf FILE.tar && python3 FILE/time_candidates.py).")
@click.option("--import-results", "results", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              metavar="FILE", help="Add a board's results of an exported batch to the database.")
@click.option("--db", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Database directory. Default: the target's under $PIPELINE_CACHE_DIR (~/.cache/pipeline)/tuning, "
                   "the one `compile` applies.")
@click.option("--tasks", "task_pattern", default="*", show_default=True, metavar="GLOB",
              help="Tune only the tasks (fused functions) whose name matches.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size, as compiled.")
@click.option("--fp16", is_flag=True, help="Tune the float16 build (`compile --fp16`).")
@keep_fp32_option
@reports_errors("interrupted; the records measured so far are saved: run the same command again to continue")
def tune_cmd(model_name: str | None, target_name: str, cuda_arch: str | None, trials: int, time_budget: float | None,
             board: Board | None, timeout: float, export_to: Path | None, results: Path | None, db: Path | None,
             task_pattern: str, batch: int, fp16: bool, keep_fp32: tuple[str, ...]) -> None:
    """Tune the model's fused TIR functions with MetaSchedule; `compile` applies the records.

    Resumable: records are saved after every measured batch, so running the command again continues.
    Offline, for a board this host cannot reach: --export-candidates, time the batch there, --import-results.
    """
    from .tune import export_model, import_results, tune_model

    if sum(x is not None for x in (board, export_to, results)) > 1:
        raise click.UsageError("give one of --device / --rpc-tracker, --export-candidates and --import-results")
    if results is not None:
        report = import_results(BuildSpec(model=model_name or "", target=target_name, cuda_arch=cuda_arch), results, db)
        error = f" (first error: {report.first_error})" if report.first_error else ""
        stdout.print(f"imported batch {report.batch_id}: {report.records} records ({report.valid} valid), "
                     f"{report.defaults} default schedule(s) timed{error}", highlight=False, soft_wrap=True)
        return
    if model_name is None:
        raise click.UsageError("Missing option '--model'")
    spec = BuildSpec(model=model_name, target=target_name, batch=batch, fp16=fp16, cuda_arch=cuda_arch,
                     keep_fp32=keep_fp32)
    if export_to is not None:
        exported = export_model(spec, export_to, trials=trials, db=db, task_pattern=task_pattern)
        _print_task_statuses(exported.tasks)
        failed = f", {exported.build_failures} did not build (first error: {exported.first_error})" \
            if exported.build_failures else ""
        stdout.print(f"exported batch {exported.batch_id}: {exported.candidates} candidate(s) and {exported.defaults} "
                     f"default schedule(s){failed}: {exported.batch}; on the board: tar xf {exported.batch.name} && "
                     f"python3 {exported.batch.name.split('.tar')[0]}/time_candidates.py, then tune --import-results",
                     highlight=False, soft_wrap=True)
        return
    progress = TuneProgress()
    try:
        report = tune_model(spec, trials=trials, db=db, time_budget_s=None if time_budget is None else 60 * time_budget,
                            board=board, timeout=timeout, task_pattern=task_pattern, listener=progress)
    finally:
        progress.stop()
    for line in report.repairs:
        console.print(f"  [yellow]repaired:[/yellow] {line}", highlight=False, soft_wrap=True)
    _print_task_statuses(report.tasks)
    failed = [t.name for t in report.tasks if t.new_trials and t.best_us is None]
    if failed:
        console.print(f"  [yellow]no valid record for:[/yellow] {', '.join(failed)} "
                      f"(first error: {report.first_error})", highlight=False, soft_wrap=True)
    if report.stopped_by_time_budget:
        console.print("  time budget reached: run the same command again to continue", highlight=False)
    applied = [t.name for t in report.tasks if t.record_applies]
    kept = [t.name for t in report.tasks if not t.record_applies and t.best_us is not None]
    console.print(f"  compile applies records to {len(applied)} function(s){': ' + ', '.join(applied) if applied else ''}"
                  f"{'; keeps the faster default schedule of: ' + ', '.join(kept) if kept else ''}",
                  highlight=False, soft_wrap=True)
    estimate = report.estimated_latency_us
    tuned = sum(1 for t in report.tasks if t.new_trials)
    stdout.print(f"tuned {tuned} task(s): {report.new_records} new records ({report.new_valid} valid) in "
                 f"{report.seconds:.0f} s; estimated {'-' if estimate is None else _microseconds(estimate)}; "
                 f"database {report.database}", highlight=False, soft_wrap=True)


def _print_task_statuses(tasks) -> None:
    for status, label in (("hand-scheduled", "hand-scheduled, not tuned"),
                          ("negligible", "under 1 % of the model's estimated time, not tuned"),
                          ("tuned already", "tuned already (skipped)"),
                          ("search space exhausted", "every candidate measured (fewer than --trials)")):
        names = [f"{t.name} ({100 * t.share:.2g} %)" if status == "negligible" else t.name
                 for t in tasks if t.status == status]
        if names:
            console.print(f"  {label}: {', '.join(names)}", highlight=False, soft_wrap=True)


@cli.command("package")
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Bundle file: NAME.tar, or NAME.tar.gz / NAME.tgz for gzip. Default: ARTIFACT_DIR.tar beside it.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              metavar="KEY.pem", help="Sign the bundle with this Ed25519 private key (openssl genpkey -algorithm "
                                      "ed25519); boards check it with the public key (run.py or runner --public-key).")
@click.option("--no-native", is_flag=True, help="Leave out the native runner (for a library that calls a builtin "
                                               "only TVM's Python has): the bundle runs with run.py alone.")
@reports_errors()
def package_cmd(artifact_dir: Path, out: Path | None, sign_key: Path | None, no_native: bool) -> None:
    """Pack an artifact into one bundle file for a board.

    The bundle holds the library, params, manifest, reference inputs and outputs, run.py, which
    needs only numpy and the TVM runtime, and runner, the same without Python (an executable for the
    library's CPU, with its C++ source and CMakeLists.txt): on the board, `tar xf NAME.tar &&
    NAME/runner` (or `python3 NAME/run.py`) checks every file's sha256, runs the model, compares its
    outputs and prints the latency.
    """
    from .bundle import make_bundle

    bundle = make_bundle(artifact_dir, out, sign_key, native=not no_native)
    stdout.print(f"bundle: {bundle} ({bundle.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


@cli.command("deploy")
@click.argument("artifact", type=click.Path(path_type=Path, exists=True))
@board_options("Run it", required=True)
@click.option("--repeat", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs before timing.")
@click.option("--json-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Result file. Default: ARTIFACT.deploy.json beside the artifact or bundle.")
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              metavar="PUB.pem", help="Refuse a bundle that is not signed with this Ed25519 key's private half.")
@reports_errors()
def deploy_cmd(artifact: Path, board: Board, repeat: int, warmup: int, timeout: float, json_out: Path | None,
               public_key: Path | None) -> None:
    """Run an artifact or bundle on a board over TVM RPC: check its sha256s, verify its outputs there, time it.

    \b
    SECURITY: a TVM RPC server runs whatever is uploaded to it; anyone who can reach its port
    can run code on the board. Run it only on a trusted network, bound to a trusted interface:
      on the board:  python3 -m tvm.exec.rpc_server --host 192.168.55.1 --port 9090
      here:          python -m pipeline deploy artifacts/NAME --device 192.168.55.1:9090
    (192.168.55.1: a Jetson's USB-network address; or --host 127.0.0.1 and an SSH tunnel).
    Never --host 0.0.0.0 on a network you do not control.
    """
    from .deploy import deploy

    result, json_path = deploy(artifact, board, warmup=warmup, repeat=repeat, timeout=timeout, json_out=json_out,
                               public_key=public_key)
    latency = result["latency_ms"]
    console.print(f"  board: {board} ({result['board']['arch'] or 'CPU not reported by its runtime-only TVM'}), "
                  f"device {result['board']['device']}",
                  highlight=False, soft_wrap=True)
    _print_checks(result["verify"]["outputs"])
    stdout.print(f"{result['model']} on {board}: median {latency['median_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms "
                 f"over {latency['runs']} runs on {result['threads']} thread(s) (TVM_NUM_THREADS of the board's "
                 f"rpc_server); result {json_path}", highlight=False, soft_wrap=True)


def _print_table(table: tuple[list[str], list[list[str]]], title: str | None = None) -> None:
    headers, rows = table
    out = Table(*headers, title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for row in rows:
        out.add_row(*row)
    natural = stdout.measure(out, options=stdout.options.update_width(1000)).maximum
    Console(width=max(stdout.width, natural)).print(out)  # never cut cells to fit 80 columns (CI logs)


def _name_list(lookup):
    """A click callback: a comma-separated list of names, each checked with ``lookup`` (KeyError: unknown)."""
    def check(_ctx, _param, value: str | None) -> tuple[str, ...]:
        names = tuple(n.strip() for n in (value or "").split(",") if n.strip())
        for name in names:
            _check_name(name, lookup)
        return names

    return check


def max_seconds_option(default: float, help_text: str):
    return click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=default,
                        show_default=True, help=help_text)


def report_dir_option(formats: str):
    return click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("bench-results"),
                        show_default=True, help=f"Directory of the {formats} report.")


class UnknownPeer(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def _peer(name: str) -> None:
    from .bench import PEER_TIMERS

    if name not in PEER_TIMERS:
        raise UnknownPeer(f"unknown runtime {name!r}; --compare takes {', '.join(PEER_TIMERS)}")


@cli.command("bench")
@model_option
@target_option()
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size, as compiled.")
@click.option("--compare", "peers", default=None, metavar="RUNTIMES", callback=_name_list(_peer),
              help="Also time these, interleaved with the library: onnxruntime (model.sim.onnx), torch (eager, "
                   "same weights).")
@click.option("--artifact", type=click.Path(path_type=Path, exists=True), default=None,
              help="Artifact directory or bundle. Default: artifacts/MODEL-TARGET[-bN], compiled first if missing.")
@click.option("--per-layer", is_flag=True, help="Also time every compiled kernel and list the top ones.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of TVM, ONNX Runtime and PyTorch. Default: this machine's cores, as a deployed library "
                   "runs (regress defaults to 1: it compares with baselines on a machine shared with other jobs).")
@max_seconds_option(30.0, "Stop sampling after this long even when the medians are not yet within +-2%.")
@report_dir_option("JSON, Markdown and PNG")
@board_options("Time the library instead of here")
@reports_errors()
def bench_cmd(model_name: str, target_name: str, batch: int, peers: tuple[str, ...], artifact: Path | None,
              per_layer: bool, threads: int | None, max_seconds: float, out: Path, board: Board | None,
              timeout: float) -> None:
    """Measure the compiled model's latency (and its peers', interleaved in the same run); write a report.

    Samples are taken in interleaved rounds, with a fixed reference kernel, until every median is known
    within +-2% (95% interval) or --max-seconds pass. Each median is over that runtime's quiet samples
    (within 10% of its fastest: other jobs on the machine only ever add time).
    """
    from .bench import Budget, bench_model
    from .report import bench_summary, bench_table, kernel_table, write_bench_report

    if board and (peers or per_layer):
        raise click.UsageError("--compare and --per-layer run on this machine; they cannot be combined with a board")
    spec = BuildSpec(model=model_name, target=target_name, batch=batch)
    result = bench_model(spec, artifact, peers=peers, per_layer=per_layer, threads=threads, board=board,
                         timeout=timeout, budget=Budget(max_seconds=max_seconds), listener=StageProgress())
    paths = write_bench_report(result, out)
    console.print(bench_summary(result), highlight=False, soft_wrap=True)
    _print_table(bench_table(result))
    if result["kernels"]:
        _print_table(kernel_table(result["kernels"], result["latency_ms"]["tvm"]["median"]), title="top kernels")
    stdout.print(f"report: {paths['md']}  chart: {paths['png']}  data: {paths['json']}", highlight=False,
                 soft_wrap=True)


@cli.command("regress")
@click.option("--models", "model_names", default=None, metavar="NAMES",
              callback=_name_list(_model_cfg),
              help="Comma-separated models. Default: every model in this machine's baseline file.")
@target_option("Target (its libraries must run on this machine).")
@click.option("--baselines", type=click.Path(path_type=Path, file_okay=False), default=Path("baselines"),
              show_default=True, help="Root of the baseline files: BASELINES/<machine>/<target>.json.")
@click.option("--artifacts", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Directory of the artifacts MODEL-TARGET (compiled there when missing). Default: artifacts/.")
@click.option("--update", is_flag=True, help="Record the measurements as the new baselines instead of comparing.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="TVM threads; must match the baselines. 1: stable on a machine shared with other jobs.")
@max_seconds_option(60.0, "Sampling time limit per model (reached only while other jobs keep the machine busy).")
@report_dir_option("JSON and Markdown")
@reports_errors("interrupted; no baseline was changed")
def regress_cmd(model_names: tuple[str, ...], target_name: str, baselines: Path, artifacts: Path | None, update: bool,
                threads: int, max_seconds: float, out: Path) -> None:
    """Compare the models' latency with the baselines recorded on this machine; fail if one got slower.

    Exit status: 0 all within tolerance, 4 a model is slower, 5 not judged (the machine was busy or
    the measurement too noisy; rerun), 2 no baseline for this machine, target or model.
    """
    from .bench import Budget
    from .regress import regress, verdict_error
    from .report import kernel_diff_table, regress_table, write_regress_report

    comparisons, data, path = regress(list(model_names), target_name, root=baselines, artifacts=artifacts,
                                      update=update, threads=threads, budget=Budget(max_seconds=max_seconds),
                                      listener=StageProgress())
    paths = write_regress_report(comparisons, data, path, out)
    _print_table(regress_table(comparisons, data["target"]))
    for c in comparisons:
        if c.verdict.status == "slower":
            _print_table(kernel_diff_table(c), title=f"{c.model}: where the time went")
    console.print(f"report: {paths['md']}", highlight=False, soft_wrap=True)
    if update:
        recorded = sum(c.verdict.status == "recorded" for c in comparisons)
        stdout.print(f"recorded {recorded} baseline(s) in {path}", highlight=False, soft_wrap=True)
    error = verdict_error(comparisons, data["target"])
    if error is not None:
        raise error
    if not update:
        stdout.print(f"{len(comparisons)} model(s) within {data['tolerance']:.0%} of their baselines in {path}",
                     highlight=False, soft_wrap=True)


@cli.command("list-models")
@click.option("--pattern", default="*", show_default=True, help="Glob over model names.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models_cmd(pattern: str, as_json: bool) -> None:
    """List the model zoo."""
    import models

    names = models.list_models(pattern)
    if as_json:
        stdout.print_json(json.dumps({n: dataclasses.asdict(models.get_model_cfg(n)) for n in names}))
        return
    table = Table(*(Column(h, no_wrap=True) for h in ("model", "family", "input", "classes", "params (M)")),
                  caption="params '-': a tiny test variant")
    for name in names:
        cfg = models.get_model_cfg(name)
        table.add_row(name, cfg.family, "x".join(map(str, cfg.input_size)), str(cfg.num_classes),
                      f"{cfg.params_m:g}" if cfg.params_m else "-")
    stdout.print(table)


@cli.command("list-targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_targets_cmd(as_json: bool) -> None:
    """List the targets and the TVM target each one compiles for."""
    if as_json:
        stdout.print_json(json.dumps({t.name: dataclasses.asdict(t) for t in targets.list_targets()}))
        return
    rows = [[t.name, ", ".join(t.aliases), t.description, json.dumps(t.tvm_target),
             json.dumps(t.tvm_host) if t.tvm_host else ""] for t in targets.list_targets()]
    _print_table((["target", "aliases", "description", "tvm target", "tvm host"], rows))
