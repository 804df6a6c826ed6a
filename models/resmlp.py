"""ResMLP: the ``MlpMixer`` backbone with Affine 'norms', a linear token mixer and LayerScale.

Paper: `ResMLP: Feedforward networks for image classification...` - https://arxiv.org/abs/2105.03404
Module tree and state_dict keys follow timm ``timm/models/mlp_mixer.py`` (``ResBlock``, ``Affine``:
blocks.N.norm1.alpha, blocks.N.linear_tokens.weight, blocks.N.mlp_channels.fc1.weight, blocks.N.ls1, ...).
Facebook's original checkpoints use other names (patch_embed., attn., mlp., gamma_) and 1-D alpha/beta;
remapping those is the checkpoint loader's job, not the model's.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from ._registry import ModelCfg, register_model
from .layers import Mlp
from .mlp_mixer import MlpMixer, _create_mixer

__all__ = ['Affine', 'ResBlock']

default_cfgs = {
    'resmlp_12_224': ModelCfg(family='resmlp', params_m=15.4),
    'resmlp_24_224': ModelCfg(family='resmlp', params_m=30.0),
    'resmlp_36_224': ModelCfg(family='resmlp', params_m=44.7),
    'resmlp_big_24_224': ModelCfg(family='resmlp', params_m=129.1),
    'test_resmlp': ModelCfg(family='resmlp', input_size=(3, 32, 32), num_classes=10, test_variant=True),
}


class Affine(nn.Module):
    """Per-channel ``beta + alpha * x`` on B, N, C tokens (ResMLP's replacement for LayerNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones((1, 1, dim)))
        self.beta = nn.Parameter(torch.zeros((1, 1, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class ResBlock(nn.Module):
    """Residual linear token mixing then channel MLP, each scaled by a LayerScale vector."""

    def __init__(
            self,
            dim: int,
            seq_len: int,
            mlp_ratio: float = 4,
            mlp_layer: Callable[..., nn.Module] = Mlp,
            norm_layer: Callable[[int], nn.Module] = Affine,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            init_values: float = 1e-4,
            drop: float = 0.,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.linear_tokens = nn.Linear(seq_len, seq_len)
        self.drop_path = nn.Identity()  # stochastic depth is training-only
        self.norm2 = norm_layer(dim)
        self.mlp_channels = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls1 = nn.Parameter(init_values * torch.ones(dim))
        self.ls2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.ls2 * self.mlp_channels(self.norm2(x)))
        return x


def _create_resmlp(variant: str, init_values: float = 1e-4, **kwargs) -> MlpMixer:
    block = partial(ResBlock, init_values=init_values)
    return _create_mixer(variant, mlp_ratio=4, block_layer=block, norm_layer=Affine, **kwargs)


@register_model
def resmlp_12_224(**kwargs) -> MlpMixer:
    return _create_resmlp('resmlp_12_224', patch_size=16, num_blocks=12, embed_dim=384, **kwargs)


@register_model
def resmlp_24_224(**kwargs) -> MlpMixer:
    return _create_resmlp('resmlp_24_224', patch_size=16, num_blocks=24, embed_dim=384, init_values=1e-5, **kwargs)


@register_model
def resmlp_36_224(**kwargs) -> MlpMixer:
    return _create_resmlp('resmlp_36_224', patch_size=16, num_blocks=36, embed_dim=384, init_values=1e-6, **kwargs)


@register_model
def resmlp_big_24_224(**kwargs) -> MlpMixer:
    """ResMLP-B24/8: 8x8 patches (784 tokens)."""
    return _create_resmlp('resmlp_big_24_224', patch_size=8, num_blocks=24, embed_dim=768, init_values=1e-6, **kwargs)


@register_model
def test_resmlp(**kwargs) -> MlpMixer:
    """Tiny ResMLP for fast tests: 32x32 input, 16 patches of 8x8, 2 blocks, width 32, 10 classes."""
    return _create_resmlp('test_resmlp', patch_size=8, num_blocks=2, embed_dim=32, **kwargs)
