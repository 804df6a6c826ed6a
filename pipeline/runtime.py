"""Run a compiled artifact's library. Needs only the TVM runtime and numpy (no compiler, torch or onnx),
so the same code runs on a board."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def load_vm(lib_path: Path, device: str) -> tuple[VirtualMachine, tvm.runtime.Device]:
    dev = tvm.runtime.device(device)
    return VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev), dev


def run_library(lib_path: Path, device: str, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    vm, dev = load_vm(lib_path, device)
    args = [tvm.runtime.tensor(v, dev) for v in (*inputs.values(), *params.values())]
    out = vm["main"](*args)
    outs = (out,) if isinstance(out, tvm.runtime.Tensor) else tuple(out)
    return {name: t.numpy() for name, t in zip(output_names, outs, strict=True)}
