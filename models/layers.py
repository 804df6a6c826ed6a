"""Layers shared between model families (timm-compatible module and parameter names).

Only the eval-time behaviour matters here: dropout layers are kept as modules (identity in eval)
so the module tree matches timm, stochastic depth is not implemented (always ``nn.Identity``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn


def to_2tuple(x) -> tuple:
    if isinstance(x, (tuple, list)):
        assert len(x) == 2, x
        return tuple(x)
    return (x, x)


# --------------------------------------------------------------------------------------------
# weight init helpers (timm.layers.weight_init, timm.models._manipulate.named_apply)
# --------------------------------------------------------------------------------------------

def trunc_normal_(tensor: torch.Tensor, mean: float = 0., std: float = 1., a: float = -2., b: float = 2.):
    """Truncated normal N(mean, std) on the absolute interval ``[a, b]``, by inverse-CDF sampling.

    Same sampling procedure (and so the same values for a given RNG state) as timm's ``trunc_normal_``, which
    timm and the official CycleMLP use; ``nn.init.trunc_normal_`` has the same distribution, other draws.
    """
    def cdf(v: float) -> float:  # standard normal CDF
        return 0.5 * (1. + math.erf(v / math.sqrt(2.)))

    with torch.no_grad():
        lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_()  # erfinv(2p - 1) * sqrt(2) is the normal quantile
        tensor.mul_(std * math.sqrt(2.)).add_(mean).clamp_(min=a, max=b)
    return tensor


def trunc_normal_tf_(tensor: torch.Tensor, mean: float = 0., std: float = 1., a: float = -2., b: float = 2.):
    """timm ``trunc_normal_tf_``: N(0, 1) truncated to ``[a, b]``, then scaled by std and shifted by mean."""
    trunc_normal_(tensor, 0., 1., a, b)
    with torch.no_grad():
        tensor.mul_(std).add_(mean)
    return tensor


def lecun_normal_(tensor: torch.Tensor):
    """timm ``lecun_normal_`` (fan-in variance scaling, truncated normal, as in Flax)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(tensor)
    # .8796... is the std of a standard normal truncated to (-2, 2)
    return trunc_normal_tf_(tensor, std=math.sqrt(1.0 / fan_in) / .87962566103423978)


def named_apply(fn: Callable, module: nn.Module, name: str = '', include_root: bool = False) -> nn.Module:
    """Depth-first ``fn(module=..., name=...)`` over the tree: children before their parent."""
    for child_name, child in module.named_children():
        child_name = f'{name}.{child_name}' if name else child_name
        named_apply(fn, child, child_name, include_root=True)
    if include_root:
        fn(module=module, name=name)
    return module


# --------------------------------------------------------------------------------------------
# MLPs (timm.layers.mlp)
# --------------------------------------------------------------------------------------------

class Mlp(nn.Module):
    """fc1 -> act -> [gate] -> fc2, as in ViT / MLP-Mixer (keys ``fc1.*``, ``fc2.*``) and, with a ``gate_layer``,
    gMLP (timm's GatedMlp: ``gate.*``; ``gate_layer(hidden_features)`` must halve the width, as the spatial
    gating unit does)."""

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop: float = 0.,
            gate_layer: Optional[Callable[[int], nn.Module]] = None,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        if gate_layer is not None:
            assert hidden_features % 2 == 0, hidden_features
            self.gate = gate_layer(hidden_features)
            hidden_features //= 2
        else:
            self.gate = nn.Identity()
        self.norm = nn.Identity()  # timm's optional hidden norm, unused by these models
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.drop1(self.act(self.fc1(x))))
        return self.drop2(self.fc2(self.norm(x)))


class GatedMlp(Mlp):
    """timm's name for the gated form (gMLP's channel MLP); pass ``gate_layer``."""


# --------------------------------------------------------------------------------------------
# stems / pooling
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv(k=stride=patch) then NCHW -> NLC (keys ``proj.*``)."""

    def __init__(
            self,
            img_size=224,
            patch_size=16,
            in_chans: int = 3,
            embed_dim: int = 768,
            norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the token-mixing MLPs are sized for exactly num_patches tokens
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'input size {tuple(x.shape[-2:])} != model img_size {self.img_size}')
        x = self.proj(x).flatten(2).transpose(1, 2)  # B, C, H, W -> B, N, C
        return self.norm(x)


class GlobalAvgPool2d(nn.Module):
    """Global average pool + flatten, module names as timm ``SelectAdaptivePool2d('avg', flatten=True)``."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))
