"""Command line: parse, validate, call the library, print. No compiler logic lives here."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Column, Table

import models
import targets
from .errors import PipelineError
from .spec import BuildSpec

console = Console(stderr=True)
stdout = Console()


class StageProgress:
    """Shows a spinner while a stage runs and a line with its time when it ends."""

    def __init__(self) -> None:
        self._status = None

    def __call__(self, stage: str, seconds: float | None) -> None:
        if seconds is None:
            self._status = console.status(f"{stage}…")
            self._status.start()
            return
        self._status.stop()
        console.print(f"[green]✓[/green] {stage:<13} {seconds:7.2f} s")


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _check_name(name: str, lookup, error_type) -> None:
    try:
        lookup(name)
    except error_type as e:
        raise click.BadParameter(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Compile MLP-style vision models from PyTorch to verified TVM artifacts for edge devices."""


@cli.command("compile")
@click.option("--model", "model_name", required=True, metavar="NAME",
              callback=lambda _c, _p, v: (_check_name(v, models.get_model_cfg, models.UnknownModelError), v)[1],
              help="Model variant (see `list-models`).")
@click.option("--target", "target_name", default="x86", show_default=True, metavar="NAME",
              callback=lambda _c, _p, v: (_check_name(v, targets.get_target, targets.UnknownTargetError), v)[1],
              help="Target device (see `list-targets`).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size compiled in.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A PyTorch state_dict checkpoint (timm / official layout). Default: seeded random weights.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Artifact directory. Default: artifacts/MODEL-TARGET[-bN].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights and reference inputs.")
@click.option("--cuda-arch", default=None, metavar="sm_XY",
              help="GPU architecture for the generic `cuda` target (default sm_87).")
@click.option("--fp16", is_flag=True, help="Compute in float16 (verified with the variant's fp16 tolerance).")
def compile_cmd(model_name: str, target_name: str, batch: int, weights: Path | None, out: Path | None,
                seed: int, cuda_arch: str | None, fp16: bool) -> None:
    """Export, simplify, import, optimize, build, verify and package one model for one target."""
    from .run import compile_model

    if cuda_arch is not None:
        try:
            targets.get_target(target_name).with_cuda_arch(cuda_arch)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--cuda-arch") from None
    spec = BuildSpec(model=model_name, target=target_name, batch=batch, weights=weights, seed=seed,
                     cuda_arch=cuda_arch, fp16=fp16)
    try:
        out_dir, manifest = compile_model(spec, out, listener=StageProgress())
    except PipelineError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; no artifact was written", 130)
    console.print(f"  compiled library: {manifest['verify']['compiled_library']}", highlight=False, soft_wrap=True)
    for check in manifest["verify"]["outputs"]:
        console.print(f"  {check['name']}: max_abs {check['max_abs']:.3g}, max_rel {check['max_rel']:.3g} "
                      f"(atol {check['atol']:g}, rtol {check['rtol']:g})", highlight=False, soft_wrap=True)
    stdout.print(f"artifact: {out_dir}  build_id {manifest['build_id'][:16]}", highlight=False, soft_wrap=True)


@cli.command("list-models")
@click.option("--pattern", default="*", show_default=True, help="Glob over model names.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models_cmd(pattern: str, as_json: bool) -> None:
    """List the model zoo."""
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
def list_targets_cmd() -> None:
    """List the targets and the TVM target each one compiles for."""
    table = Table(Column("target", no_wrap=True), "aliases", "description", "tvm target")
    for spec in targets.list_targets():
        table.add_row(spec.name, ", ".join(spec.aliases), spec.description, json.dumps(spec.tvm_target))
    stdout.print(table)
