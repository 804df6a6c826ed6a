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
