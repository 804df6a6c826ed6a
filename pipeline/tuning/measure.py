"""Building and measuring tuning candidates: MetaSchedule's builder and runners as our targets need them
(candidates linked here, with the cross linker for another CPU; measured with the target's cores, locally
or on the boards of a TVM RPC tracker)."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import tempfile
import types
from collections.abc import Iterator

import tvm
from tvm.s_tir import meta_schedule as ms

from targets import CudaSpec, TargetSpec
from tvm_schedules.passes.small_buffers_on_stack import TIR_PIPELINE
from ..errors import BadInput, PipelineError
from ..runtime import device_problem, use_threads
from ..spec import Board
from ..toolchain.cross_link import cross_linker
from ..toolchain import dynamic_shared
from ..toolchain.cuda_aot import aot_cuda
from ..toolchain.kernel_limits import kernel_limit_violations, with_dynamic_shared_bytes
from ..tvm_targets import to_tvm_target

BUILD_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 30.0
RPC_SESSION_TIMEOUT_S = 60


class TuningUnsupported(BadInput):
    """The target or task selection cannot be tuned as asked."""


class CandidateOverLimits(RuntimeError):
    """A CUDA candidate uses more than its target's GPU allows (MetaSchedule's builder reports it as a failed build)."""


class RpcUnavailable(PipelineError):
    """The RPC tracker cannot be reached or has no board under the key."""


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params, cuda: CudaSpec | None = None) -> tvm.runtime.Module:
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``; for a CUDA target, with
    the device code compiled here to cubins (``aot_cuda``, entered in the builder's worker process, where this runs)
    and every kernel held to the target's limits (``kernel_limits``): a candidate over one fails to build, so
    MetaSchedule drops it instead of recording a schedule whose compile would fail.

    That import takes ~38 s in every fresh builder worker, past the 30 s build timeout, so every
    trial timed out. Candidates arrive scheduled (tensorized blocks already expanded), so building
    needs no intrinsic registry. Without ``aot_cuda``, a GPU-less host would put CUDA *source* in the
    candidate, for the board to compile at load (or fail to: a runtime-only TVM has no NVRTC).
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    device_code = aot_cuda(cuda.arch, cuda.toolchain) if cuda else contextlib.nullcontext()
    with device_code as session, dynamic_shared.recording(TIR_PIPELINE) as (pipeline, dynamic_bytes):
        built = tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target,
                          pipeline=pipeline)  # as the compile builds (register tiles on the stack)
    if session is not None:
        kernels = with_dynamic_shared_bytes([k for out in session.outputs for k in out.kernel_resources()],
                                            dynamic_bytes)
        violations = kernel_limit_violations(kernels, cuda)
        if violations:
            raise CandidateOverLimits(f"over {cuda.arch}'s limits: " + "; ".join(violations))
    return built


def _export_shared_library(rt_mod: tvm.runtime.Module, triple: str | None) -> str:
    """Link the candidate here, into a shared library (``triple``: with the cross linker, as
    ``stages.build`` does), so the runner or board only loads it: no compiler needed there."""
    path = os.path.join(tempfile.mkdtemp(prefix="pipeline-tune-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cross_linker(triple) if triple else None)
    return path


def _alloc_arguments(device, args_info, alloc_repeat: int) -> list:
    """Candidates' arguments: floats uniform in [0, 1), integers 0, made here and copied to the device.

    MetaSchedule's default fills integers at random too: the index argument of a gather (``take``)
    then reads out of bounds and kills the runner ("Subprocess terminated"). 0 is a valid index into
    any axis. Its default also fills on the device with
    ``tvm.contrib.random``, which the runtime-only TVM that boards install lacks ("Unable to find
    function ... random_fill_for_measure").
    """
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)
    return alloc_argument_common(
        lambda t: t.copyfrom(rng.uniform(size=tuple(t.shape)).astype(str(t.dtype))), device, args_info, alloc_repeat)


def _alloc_remote_arguments(_session, device, args_info, alloc_repeat: int) -> list:
    return _alloc_arguments(device, args_info, alloc_repeat)


@contextlib.contextmanager
def only_own_tensor_intrinsics(target: tvm.target.Target) -> Iterator[None]:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule does) without the other targets' intrinsics.

    Registering them all takes 15-40 s on this 2-core host (CUDA's alone ~30 s), for nothing on a
    CPU target. The stand-ins are removed afterwards, so a later ``import
    tvm.s_tir.tensor_intrin.cuda`` (dlight, in a CUDA build) still gets the real module.
    """
    foreign = ["cuda", "rocm", "hexagon"] + ([] if "arm_cpu" in target.keys else ["arm_cpu"])
    names = [f"tvm.s_tir.tensor_intrin.{name}" for name in foreign]
    if target.kind.name != "llvm" or "tvm.s_tir.tensor_intrin" in sys.modules:
        yield
        return
    sys.modules.update({name: types.ModuleType(name) for name in names})
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers this target's intrinsics)
        yield
    finally:
        for name in names:
            del sys.modules[name]
            with contextlib.suppress(AttributeError):
                delattr(sys.modules["tvm.s_tir.tensor_intrin"], name.rpartition(".")[2])


def first_line(message: str) -> str:
    """The informative line of a builder / runner error (the exception line of a traceback)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and "occurred" in lines[0]:  # "LocalBuilder: An exception occurred" + traceback
        return f"{lines[0]}: {lines[-1]}"
    return lines[0] if lines else message


def check_tracker(board: Board) -> int:
    """The number of boards registered under the key; RpcUnavailable (fast) when there are none."""
    try:
        socket.create_connection((board.host, board.port), timeout=5).close()
    except OSError as e:
        raise RpcUnavailable(f"cannot reach the RPC tracker at {board.host}:{board.port} ({e.strerror or e}); "
                             "start one with `python -m tvm.exec.rpc_tracker`") from None
    config = ms.runner.RPCConfig(board.host, board.port, board.tracker_key, session_timeout_sec=RPC_SESSION_TIMEOUT_S)
    try:
        servers = config.count_num_servers(allow_missing=True)
    except (ValueError, OSError, RuntimeError) as e:
        raise RpcUnavailable(f"RPC tracker {board.host}:{board.port} did not answer: {first_line(str(e))}") from None
    if servers == 0:
        raise RpcUnavailable(f"no board is registered under key {board.tracker_key!r} at the RPC tracker "
                             f"{board.host}:{board.port}; check `python -m tvm.exec.query_rpc_tracker "
                             f"--host {board.host} --port {board.port}`")
    return servers


def local_runner(target: TargetSpec) -> ms.runner.LocalRunner:
    """A runner that measures with the threads the target has (its ``num-cores``), as ``bench`` runs libraries.

    Left alone, TVM sizes a worker's pool at half the CPUs (it assumes two hyperthreads per core): 1 thread on
    this 2-vCPU host. There a record that beat our default schedule single-threaded (8.6 ms against 11.9 ms,
    convmixer_768_32's 1x1 conv) was applied, and the 2-thread model ran 279 ms instead of 248."""
    threads = int(to_tvm_target(target).attrs.get("num-cores", 0) or os.cpu_count() or 1)
    return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, f_alloc_argument=_alloc_arguments,
                                 initializer=functools.partial(use_threads, threads))


def candidate_builder(target: TargetSpec) -> ms.builder.LocalBuilder:
    """MetaSchedule's builder for ``target``: candidates linked here into shared libraries (with the cross linker
    for another CPU), CUDA device code compiled here to cubins for the target's arch."""
    return ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=BUILD_TIMEOUT_S,
                                   f_build=functools.partial(_build, cuda=target.cuda),
                                   f_export=functools.partial(_export_shared_library, triple=target.cross_triple))


def _gpu_problem(enabled: bool, device, target: TargetSpec, where: str) -> str | None:
    """Why the GPU ``where`` cannot run ``target``'s candidates (no CUDA in its TVM runtime, no device, another
    compute capability), or None."""
    problem = device_problem("cuda", enabled, device, f"{where}'s TVM runtime", target.cuda.arch)
    if problem is None:
        return None
    remedy = {"runtime": f"every {target.name} trial would fail; on a Jetson build TVM's runtime against the board's "
                         "CUDA (scripts/build_tvm_runtime_on_jetson.sh)",
              "device": "check the board's driver (nvidia-smi)",
              "arch": "tune the target of that GPU (python -m pipeline list-targets, --cuda-arch)"}
    return f"{problem[1]}: {remedy[problem[0]]}"


def check_gpu(target: TargetSpec, board: Board | None, timeout: float) -> None:
    """Before the first trial of a CUDA target: the GPU that measures has CUDA and the target's arch
    (TuningUnsupported, one line, otherwise). On a tracker, one of the key's boards is asked."""
    if board is None:
        problem = _gpu_problem(tvm.runtime.enabled("cuda"), tvm.cuda(), target, "this host")
    else:
        from tvm import rpc

        try:
            session = rpc.connect_tracker(board.host, board.port).request(board.tracker_key, max_retry=1,
                                                                          session_timeout=timeout)
            problem = _gpu_problem(bool(session.get_function("runtime.RuntimeEnabled")("cuda")), session.cuda(),
                                   target, f"the board under key {board.tracker_key!r}")
        except (RuntimeError, OSError) as e:  # TVM's RPC errors are RuntimeErrors
            raise RpcUnavailable(f"could not ask the board under key {board.tracker_key!r} for its GPU: "
                                 f"{first_line(str(e))}") from None
    if problem:
        raise TuningUnsupported(problem)


def builder_and_runner(target: TargetSpec, board: Board | None, timeout: float = RPC_SESSION_TIMEOUT_S):
    """MetaSchedule's builder and runner for ``target``: local, or the boards of ``board``'s tracker (each RPC
    session given up after ``timeout`` seconds). For a CUDA target, the measuring GPU is checked first."""
    if board is None and target.runner != "host":
        raise TuningUnsupported(f"{target.name} cannot be measured on this host; pass --rpc-tracker HOST:PORT "
                                "--rpc-key KEY of a board registered with a TVM RPC tracker")
    if board is not None and board.tracker_key is None:
        raise TuningUnsupported("MetaSchedule measures through a TVM RPC tracker: register the board with one "
                                "(rpc_server --tracker HOST:PORT --key KEY) and pass --rpc-tracker HOST:PORT --rpc-key KEY")
    servers = check_tracker(board) if board is not None else 0
    if target.cuda is not None:
        check_gpu(target, board, timeout)
    if board is None:
        return candidate_builder(target), local_runner(target)
    config = ms.runner.RPCConfig(board.host, board.port, board.tracker_key, session_timeout_sec=int(timeout))
    return candidate_builder(target), ms.runner.RPCRunner(config, f_alloc_argument=_alloc_remote_arguments,
                                                          max_workers=servers)
