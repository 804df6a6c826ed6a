"""Model registry, timm-style: each family file registers one tiny function per variant.

A variant's cfg lives in its family module's ``default_cfgs`` under the function's name, so
the registry knows input size, opset and tolerances without building the model.
"""
from __future__ import annotations

import difflib
import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelCfg:
    """What the compiler needs to know about a variant before building it."""

    family: str
    input_size: tuple[int, int, int] = (3, 224, 224)  # C, H, W
    num_classes: int = 1000
    opset: int = 17
    # fp32 tolerance of every runtime's outputs against PyTorch (|d| <= atol + rtol*|ref|). The worst
    # error measured over the zoo on x86 was 8.6e-7 (cyclemlp_b5 logits): 10x headroom.
    atol: float = 1e-5
    rtol: float = 1e-4
    # With --fp16 (float16 weights and activations, float32 accumulators). Worst measured on x86 (LLVM fp16)
    # with float16 accumulators: 4.4e-3 on cyclemlp_b1 logits of magnitude 0.56, 2.9e-3 on mixer_s32_224.
    fp16_atol: float = 1e-2
    fp16_rtol: float = 1e-2
    params_m: float | None = None  # published parameter count (millions); None for test variants
    test_variant: bool = False  # a tiny variant for fast tests, not a published architecture


_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_cfgs: dict[str, ModelCfg] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; its cfg comes from its module's ``default_cfgs``."""
    name = fn.__name__
    cfgs = getattr(sys.modules[fn.__module__], "default_cfgs")
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} registered twice")
    _model_entrypoints[name] = fn
    _model_cfgs[name] = cfgs[name]
    return fn


class UnknownModelError(KeyError):
    def __init__(self, name: str):
        self.name = name
        self.suggestions = difflib.get_close_matches(name, list(_model_entrypoints), n=3, cutoff=0.5)
        super().__init__(name)

    def __str__(self) -> str:
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"unknown model {self.name!r}{hint} (see `python -m pipeline list-models`)"


def list_models(pattern: str = "*", include_test: bool = True) -> list[str]:
    return sorted(
        n for n, cfg in _model_cfgs.items()
        if fnmatch.fnmatch(n, pattern) and (include_test or not cfg.test_variant)
    )


def get_model_cfg(name: str) -> ModelCfg:
    if name not in _model_cfgs:
        raise UnknownModelError(name)
    return _model_cfgs[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a variant with random weights (timm init); ``kwargs`` override its hyperparameters."""
    if name not in _model_entrypoints:
        raise UnknownModelError(name)
    return _model_entrypoints[name](**kwargs)
