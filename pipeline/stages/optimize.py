"""Stage: everything between import and build: our graph rewrites, then lowering to fused TIR
functions (the units MetaSchedule tunes), where tuning records and default schedules apply."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from targets import TargetSpec
from tvm_schedules.passes.cancel_chain_transposes import cancel_chain_transposes
from tvm_schedules.passes.canonicalize_block_names import canonicalize_block_names
from tvm_schedules.passes.fold_batch_norm import fold_batch_norm
from tvm_schedules.passes.fold_weight_transforms import fold_weight_transforms
from tvm_schedules.passes.fuse_cycle_token_mixer import TARGET_KINDS as MIXER_TARGET_KINDS, fuse_cycle_token_mixer
from tvm_schedules.passes.keep_float32 import keep_float32
from tvm_schedules.passes.mark_weight_arguments import mark_weight_arguments
from tvm_schedules.passes.rewrite_cyclefc import rewrite_cyclefc
from tvm_schedules.passes.unflatten_linear_chains import unflatten_linear_chains
from tvm_schedules.cpu import apply_default_schedules as cpu_default_schedules
from tvm_schedules.cuda import apply_default_schedules as cuda_default_schedules
from ..tuning.apply import apply_records
from ..tvm_targets import to_tvm_target

# Each graph pass: (mod, params, tvm target, compute dtype, keep, float16 accumulator) -> (mod, params, report), with
# the TVM target kinds it runs for (None: all). Applied to every model, in order, before ToMixedPrecision: a kernel a
# pass puts in computes in the dtype it is given (float16 in --fp16), accumulating float16 in the target's
# accumulator (TargetSpec.float16_accumulator), as ToMixedPrecision's convs and matmuls do; a site with a binding in
# ``keep`` (kept in float32) is left for keep_float32. The token mixer's pass first: it reads the CycleFC sites it
# fuses in their export form; the transposes around a token MLP cancel once its chain runs unflattened. Those two run for every target: fewer launches
# on CUDA; on the x86 host (2 threads, Zen 5, quiet, interleaved, both against neither) gmlp_s16_224 0.87x and
# gmlp_ti16_224 0.89x the time, mixer_s16_224 0.97x, mixer_b16_224 0.98x, resmlp_12_224 and mixer_b32_224 1.01x.
GRAPH_PASSES = ((fold_batch_norm, None), (fuse_cycle_token_mixer, MIXER_TARGET_KINDS), (rewrite_cyclefc, None),
                (unflatten_linear_chains, None), (cancel_chain_transposes, None))

# Default schedules for the fused functions that neither our kernels nor tuning records scheduled, by TVM
# target kind: (mod, tvm target) -> (mod, report). The llvm pipeline schedules nothing, which left untuned
# CPU builds 100-300x slower than ONNX Runtime; the CUDA pipeline's dlight rules have no convolution rule,
# and say nothing of which rule took which kernel. Every function comes out marked with its rule.
DEFAULT_SCHEDULES = {"llvm": cpu_default_schedules, "cuda": cuda_default_schedules}
# Target kinds whose default schedules run after the weight-only computation is folded: the fold builds
# that computation for this host's CPU, which GPU-scheduled functions cannot run on; the CUDA rules copy no
# weights into other layouts, which is what folding after the CPU rules is for.
SCHEDULE_AFTER_FOLD = frozenset({"cuda"})


def lower_to_fused_tir(mod: tvm.IRModule) -> tvm.IRModule:
    """Legalize operators to TIR and fuse them, as the targets' default pipelines do first.

    Tuning tasks are extracted from, and records applied to, exactly these fused functions, their blocks
    named alike in every model (``canonicalize_block_names``). Each one says which of its arguments are
    model weights (``layout_free_buffers``), so a schedule may read a weight in another layout at no cost
    per call (see ``fold_weight_transforms``).
    """
    return mark_weight_arguments(canonicalize_block_names(tvm.transform.Sequential([
        # FuseOps stops at a binding of one variable to another (the import's alias after each normalization; in
        # ConvMixer the residual add after every depthwise block was a kernel of its own).
        relax.transform.CanonicalizeBindings(),
        # Inference batch_norm as arithmetic fused into the op before it (ConvMixer's conv epilogues), where as one op
        # it was a kernel of its own that reread the whole activation (fold_batch_norm has already folded those whose
        # statistics are weights).
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)))


def lower(mod: tvm.IRModule, params: dict[str, np.ndarray], target: TargetSpec, fp16: bool = False,
          keep_fp32: frozenset[str] = frozenset(), rewrites_as_for: TargetSpec | None = None
          ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Our graph rewrites, then fused TIR: the module whose functions are the tuning tasks (pipeline.tune).
    ``keep_fp32``: with ``fp16``, the bindings (pipeline.stages.layers.KeptLayers) left in float32.
    ``rewrites_as_for``: choose the graph passes as for this target, schedule for ``target`` (a host twin)."""
    reports = {}
    dtype = "float16" if fp16 else "float32"
    kind = to_tvm_target(rewrites_as_for or target).kind.name
    for graph_pass, kinds in GRAPH_PASSES:
        if kinds is not None and kind not in kinds:
            reports[graph_pass.__name__] = {"reason": f"not run for {kind} targets"}
            continue
        mod, params, reports[graph_pass.__name__] = graph_pass(mod, params, to_tvm_target(target), dtype,
                                                               keep_fp32 if fp16 else frozenset(),
                                                               target.float16_accumulator)
    if fp16 and keep_fp32:
        mod, reports["keep_float32"] = keep_float32(mod, keep_fp32)
    if fp16:
        # After our rewrites (ToMixedPrecision leaves their call_tir alone). out_dtype is what convs and matmuls
        # accumulate in: the target's (TargetSpec.float16_accumulator). The same cast of one tensor, put in by
        # several passes or sites, is one cast (one kernel).
        accumulator = target.float16_accumulator
        mod = relax.transform.EliminateCommonSubexpr()(relax.transform.ToMixedPrecision(out_dtype=accumulator)(mod))
        reports["precision"] = f"float16 (ToMixedPrecision: conv/matmul inputs in float16, accumulators in {accumulator})"
    return lower_to_fused_tir(mod), params, reports


def optimize(mod: tvm.IRModule, params: dict[str, np.ndarray], target: TargetSpec, fp16: bool = False,
             keep_fp32: frozenset[str] = frozenset(), rewrites_as_for: TargetSpec | None = None
             ) -> tuple[tvm.IRModule, dict[str, np.ndarray], dict]:
    """Return the optimized module, the params it still needs, and a report per step (``rewrites_as_for``: see
    :func:`lower`)."""
    mod, params, reports = lower(mod, params, target, fp16, keep_fp32, rewrites_as_for)
    mod, reports["tuning"] = apply_records(mod, target)  # the target's tuning database, if any
    after_fold = to_tvm_target(target).kind.name in SCHEDULE_AFTER_FOLD
    if not after_fold:
        mod, reports["default_schedules"] = apply_default_schedules(mod, target)
    mod, params, reports["fold_weight_transforms"] = fold_weight_transforms(mod, params, to_tvm_target(target))
    if after_fold:
        mod, reports["default_schedules"] = apply_default_schedules(mod, target)
    return mod, params, reports


def apply_default_schedules(mod: tvm.IRModule, target: TargetSpec) -> tuple[tvm.IRModule, dict]:
    """Schedule what is still unscheduled with the target kind's default rules (none: left to the build)."""
    tvm_target = to_tvm_target(target)
    schedule = DEFAULT_SCHEDULES.get(tvm_target.kind.name)
    if schedule is None:
        return mod, {"applied": False, "reason": f"no default schedules for target kind {tvm_target.kind.name!r}"}
    mod, report = schedule(mod, tvm_target)
    return mod, {"applied": True, **report}
