"""Stage: build the PyTorch model, with a checkpoint or seeded random weights."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

import models
from ..errors import UnknownModel, WeightsError
from ..runtime import sha256_file

_CHECKPOINT_WRAPPERS = ("model", "state_dict", "model_state", "model_ema")


def load_model(name: str, weights: Path | None, seed: int) -> tuple[nn.Module, models.ModelCfg, dict]:
    """Return the model in eval mode, its cfg, and a description of where its weights came from."""
    try:
        cfg = models.get_model_cfg(name)
    except models.UnknownModelError as e:
        raise UnknownModel(str(e)) from None
    torch.manual_seed(seed)
    model = models.create_model(name).eval()
    if weights is not None:
        try:
            model.load_state_dict(read_state_dict(weights, model))
        except ValueError as e:  # a value the model refuses, e.g. a CycleFC offset that is no integer shift
            raise WeightsError(f"{weights} does not fit {name}: {e}") from None
        return model, cfg, {"source": "checkpoint", "path": str(weights), "sha256": sha256_file(weights)}
    redrawn = redraw_zero_weights(model, seed)
    return model, cfg, {"source": "random", "seed": seed, "redrawn_zero_weights": redrawn}


def redraw_zero_weights(model: nn.Module, seed: int, std: float = 0.02) -> list[str]:
    """Re-draw weight matrices that init left at zero (timm zero-inits classifier heads).

    With a zero head every logit equals the bias, so any numerics comparison would pass.
    """
    generator = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
                redrawn.append(name)
    return redrawn


def read_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read a checkpoint and check it fits ``model`` key for key and shape for shape."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        # weights_only=True: a file holding anything but tensors and containers is refused, never executed.
        raise WeightsError(f"{path} is not a PyTorch state_dict checkpoint that loads with weights_only=True "
                           f"({type(e).__name__})") from None
    state = blob
    while isinstance(state, dict):
        wrapper = next((k for k in _CHECKPOINT_WRAPPERS if isinstance(state.get(k), dict)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state_dict (expected a dict of tensors, optionally under 'model')")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
        if items
    ]
    if problems:
        raise WeightsError(f"{path} does not fit this model: " + "; ".join(problems))
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise WeightsError(f"{path} holds NaN or Inf in {len(not_finite)} tensor(s): {', '.join(not_finite[:5])}"
                           f"{', ...' if len(not_finite) > 5 else ''}; fix or re-export the checkpoint")
    return state
