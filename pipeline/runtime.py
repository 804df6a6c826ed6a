"""Run a compiled artifact's library. Needs only the TVM runtime and numpy (no compiler, torch or onnx),
so the same code runs on a board."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


class RuntimeUnavailable(RuntimeError):
    """This TVM runtime cannot run the library here (no device support, or no device)."""


def load_vm(lib_path: Path, device: str) -> tuple[VirtualMachine, tvm.runtime.Device]:
    if not tvm.runtime.enabled(device):
        # The PyPI aarch64 wheel links libcudart.so.13; on a CUDA 12 board (JetPack 6) it loads
        # without CUDA and says nothing, so say it here.
        raise RuntimeUnavailable(
            f"this TVM runtime ({tvm.__file__}) has no {device} support; on a Jetson, build TVM's runtime "
            f"against the board's CUDA (see README, 'Running on a Jetson')")
    dev = tvm.runtime.device(device)
    if not dev.exist:
        raise RuntimeUnavailable(f"no {device} device found by the TVM runtime on this machine")
    return VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev), dev


def run_library(lib_path: Path, device: str, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    vm, dev = load_vm(lib_path, device)
    args = [tvm.runtime.tensor(v, dev) for v in (*inputs.values(), *params.values())]
    out = vm["main"](*args)
    outs = (out,) if isinstance(out, tvm.runtime.Tensor) else tuple(out)
    return {name: t.numpy() for name, t in zip(output_names, outs, strict=True)}
