"""MLP-Mixer, and the ``MlpMixer`` backbone shared with ResMLP (resmlp.py) and gMLP (gmlp.py).

Paper: 'MLP-Mixer: An all-MLP Architecture for Vision' - https://arxiv.org/abs/2105.01601
Module tree, state_dict keys and init follow timm ``timm/models/mlp_mixer.py`` (stem.proj, blocks.N.norm1,
blocks.N.mlp_tokens.fc1, ..., norm, head), so timm checkpoints load unchanged.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from ._registry import ModelCfg, get_model_cfg, register_model
from .layers import Mlp, PatchEmbed, lecun_normal_, named_apply, to_2tuple

__all__ = ['MixerBlock', 'MlpMixer']

default_cfgs = {
    'mixer_s32_224': ModelCfg(family='mixer', params_m=19.1),
    'mixer_s16_224': ModelCfg(family='mixer', params_m=18.5),
    'mixer_b32_224': ModelCfg(family='mixer', params_m=60.3),
    'mixer_b16_224': ModelCfg(family='mixer', params_m=59.9),
    'mixer_l16_224': ModelCfg(family='mixer', params_m=208.2),
    'test_mixer': ModelCfg(family='mixer', input_size=(3, 32, 32), num_classes=10, test_variant=True),
}


class MixerBlock(nn.Module):
    """Residual token-mixing MLP (across patches) then channel-mixing MLP."""

    def __init__(
            self,
            dim: int,
            seq_len: int,
            mlp_ratio=(0.5, 4.0),
            mlp_layer: Callable[..., nn.Module] = Mlp,
            norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop: float = 0.,
    ):
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in to_2tuple(mlp_ratio))
        self.norm1 = norm_layer(dim)
        self.mlp_tokens = mlp_layer(seq_len, tokens_dim, act_layer=act_layer, drop=drop)
        self.drop_path = nn.Identity()  # stochastic depth is training-only
        self.norm2 = norm_layer(dim)
        self.mlp_channels = mlp_layer(dim, channels_dim, act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class MlpMixer(nn.Module):
    """Patch stem -> ``num_blocks`` x ``block_layer`` on B, N, C tokens -> norm -> token mean -> head.

    ``block_layer`` is called as ``block_layer(dim, seq_len, mlp_ratio, mlp_layer=, norm_layer=, act_layer=,
    drop=)``; ResMLP and gMLP plug their blocks in here.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            img_size=224,
            in_chans: int = 3,
            patch_size: int = 16,
            num_blocks: int = 8,
            embed_dim: int = 512,
            mlp_ratio=(0.5, 4.0),
            block_layer: Callable[..., nn.Module] = MixerBlock,
            mlp_layer: Callable[..., nn.Module] = Mlp,
            norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            nlhb: bool = False,
            stem_norm: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.stem = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if stem_norm else None)
        self.blocks = nn.Sequential(*[
            block_layer(
                embed_dim, self.stem.num_patches, mlp_ratio, mlp_layer=mlp_layer, norm_layer=norm_layer,
                act_layer=act_layer, drop=proj_drop_rate)
            for _ in range(num_blocks)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(nlhb=nlhb)

    def init_weights(self, nlhb: bool = False) -> None:
        head_bias = -math.log(self.num_classes) if nlhb else 0.
        named_apply(partial(_init_weights, head_bias=head_bias), self)  # depth-first

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1)
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module, name: str, head_bias: float = 0.) -> None:
    """timm Mixer init (non-flax branch): xavier Linear, zero head, lecun-normal conv.

    Applied children-first, so a module's own ``init_weights`` (gMLP's gating unit) overrides its children.
    """
    if isinstance(module, nn.Linear):
        if name.startswith('head'):
            nn.init.zeros_(module.weight)
            nn.init.constant_(module.bias, head_bias)
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if 'mlp' in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, 'init_weights'):
        module.init_weights()


def _create_mixer(variant: str, **kwargs) -> MlpMixer:
    """Build an ``MlpMixer`` for ``variant`` in eval mode (shared by the Mixer, ResMLP and gMLP variants).

    Input size and class count default to the variant's registered cfg.
    """
    cfg = get_model_cfg(variant)
    kwargs.setdefault('num_classes', cfg.num_classes)
    kwargs.setdefault('in_chans', cfg.input_size[0])
    kwargs.setdefault('img_size', cfg.input_size[1:])
    return MlpMixer(**kwargs).eval()


@register_model
def mixer_s32_224(**kwargs) -> MlpMixer:
    return _create_mixer('mixer_s32_224', patch_size=32, num_blocks=8, embed_dim=512, **kwargs)


@register_model
def mixer_s16_224(**kwargs) -> MlpMixer:
    return _create_mixer('mixer_s16_224', patch_size=16, num_blocks=8, embed_dim=512, **kwargs)


@register_model
def mixer_b32_224(**kwargs) -> MlpMixer:
    return _create_mixer('mixer_b32_224', patch_size=32, num_blocks=12, embed_dim=768, **kwargs)


@register_model
def mixer_b16_224(**kwargs) -> MlpMixer:
    return _create_mixer('mixer_b16_224', patch_size=16, num_blocks=12, embed_dim=768, **kwargs)


@register_model
def mixer_l16_224(**kwargs) -> MlpMixer:
    return _create_mixer('mixer_l16_224', patch_size=16, num_blocks=24, embed_dim=1024, **kwargs)


@register_model
def test_mixer(**kwargs) -> MlpMixer:
    """Tiny Mixer for fast tests: 32x32 input, 16 patches of 8x8, 2 blocks, width 32, 10 classes."""
    return _create_mixer('test_mixer', patch_size=8, num_blocks=2, embed_dim=32, **kwargs)
