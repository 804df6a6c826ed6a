"""Stage: fixed random inputs and the PyTorch outputs every other runtime is checked against."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from models import ModelCfg

# The graph's I/O names, shared by export, import and verification.
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits",)


def make_inputs(cfg: ModelCfg, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {INPUT_NAME: rng.standard_normal((batch, *cfg.input_size), dtype=np.float32)}


def run_torch(model: nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(*(torch.from_numpy(v) for v in inputs.values()))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: t.numpy() for name, t in zip(OUTPUT_NAMES, outs, strict=True)}


def run_torch_layers(model: nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every submodule's output on ``inputs`` (forward hooks), by module path: the reference `diagnose` compares
    the compiled model's layers with. A module that runs more than once, or returns no single tensor, has none."""
    outputs: dict[str, np.ndarray | None] = {}

    def hook(path):
        def record(_module, _args, output):
            once = isinstance(output, torch.Tensor) and path not in outputs
            outputs[path] = output.detach().numpy().copy() if once else None
        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in model.named_modules() if path]
    try:
        run_torch(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {path: value for path, value in outputs.items() if value is not None}
