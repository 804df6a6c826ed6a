"""gMLP: the ``MlpMixer`` backbone with spatial gating blocks.

Paper: `Pay Attention to MLPs` - https://arxiv.org/abs/2105.08050
Module tree, state_dict keys and init follow timm ``timm/models/mlp_mixer.py`` (``SpatialGatingBlock``,
``SpatialGatingUnit``, ``GatedMlp``: blocks.N.norm, blocks.N.mlp_channels.fc1, blocks.N.mlp_channels.gate.norm,
blocks.N.mlp_channels.gate.proj, blocks.N.mlp_channels.fc2, ...).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from ._registry import ModelCfg, register_model
from .layers import GatedMlp
from .mlp_mixer import MlpMixer, _create_mixer

__all__ = ['SpatialGatingUnit', 'SpatialGatingBlock']

default_cfgs = {
    'gmlp_ti16_224': ModelCfg(family='gmlp', params_m=5.87),
    'gmlp_s16_224': ModelCfg(family='gmlp', params_m=19.4),
    'gmlp_b16_224': ModelCfg(family='gmlp', params_m=73.1),
    'test_gmlp': ModelCfg(family='gmlp', input_size=(3, 32, 32), num_classes=10, test_variant=True),
}


class SpatialGatingUnit(nn.Module):
    """Split channels in halves (u, v); gate u by a linear projection of norm(v) across tokens."""

    def __init__(self, dim: int, seq_len: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim // 2)  # NOTE: default LayerNorm eps (1e-5), as in timm
        self.proj = nn.Linear(seq_len, seq_len)

    def init_weights(self) -> None:
        # near-identity gate at init; runs after (and overrides) the generic Linear init
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return u * v.transpose(-1, -2)


class SpatialGatingBlock(nn.Module):
    """Residual ``norm -> GatedMlp(gate=SpatialGatingUnit)``."""

    def __init__(
            self,
            dim: int,
            seq_len: int,
            mlp_ratio: float = 4,
            mlp_layer: Callable[..., nn.Module] = GatedMlp,
            norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop: float = 0.,
    ):
        super().__init__()
        self.norm = norm_layer(dim)
        sgu = partial(SpatialGatingUnit, seq_len=seq_len)
        self.mlp_channels = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, gate_layer=sgu, drop=drop)
        self.drop_path = nn.Identity()  # stochastic depth is training-only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


def _create_gmlp(variant: str, **kwargs) -> MlpMixer:
    return _create_mixer(variant, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, **kwargs)


@register_model
def gmlp_ti16_224(**kwargs) -> MlpMixer:
    return _create_gmlp('gmlp_ti16_224', patch_size=16, num_blocks=30, embed_dim=128, **kwargs)


@register_model
def gmlp_s16_224(**kwargs) -> MlpMixer:
    return _create_gmlp('gmlp_s16_224', patch_size=16, num_blocks=30, embed_dim=256, **kwargs)


@register_model
def gmlp_b16_224(**kwargs) -> MlpMixer:
    return _create_gmlp('gmlp_b16_224', patch_size=16, num_blocks=30, embed_dim=512, **kwargs)


@register_model
def test_gmlp(**kwargs) -> MlpMixer:
    """Tiny gMLP for fast tests: 32x32 input, 16 patches of 8x8, 2 blocks, width 32 (gate 96), 10 classes."""
    return _create_gmlp('test_gmlp', patch_size=8, num_blocks=2, embed_dim=32, **kwargs)
