"""ConvMixer: patch conv stem, then depthwise (residual) + pointwise conv blocks, each conv -> act -> BN.

Paper: `Patches Are All You Need?` - https://arxiv.org/abs/2201.09792
Module tree and state_dict keys follow timm ``timm/models/convmixer.py``: stem.0 (conv), stem.2 (BN),
blocks.N.0.fn.0 (depthwise conv inside ``Residual``), blocks.N.0.fn.2 (BN), blocks.N.1 (1x1 conv),
blocks.N.3 (BN), pooling, head. Init is PyTorch's default, as in timm.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._registry import ModelCfg, get_model_cfg, register_model
from .layers import GlobalAvgPool2d

__all__ = ['ConvMixer']

default_cfgs = {
    'convmixer_1536_20': ModelCfg(family='convmixer', params_m=51.6),
    'convmixer_768_32': ModelCfg(family='convmixer', params_m=21.1),
    'convmixer_1024_20_ks9_p14': ModelCfg(family='convmixer', params_m=24.4),
    'test_convmixer': ModelCfg(family='convmixer', input_size=(3, 32, 32), num_classes=10, test_variant=True),
}


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _conv_act_bn(conv: nn.Conv2d, act_layer: Callable[[], nn.Module]) -> list[nn.Module]:
    return [conv, act_layer(), nn.BatchNorm2d(conv.out_channels)]


class ConvMixer(nn.Module):
    def __init__(
            self,
            dim: int,
            depth: int,
            kernel_size: int = 9,
            patch_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            drop_rate: float = 0.,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = dim
        # timm uses padding="same"; for odd kernels that is exactly kernel_size // 2 on every side
        assert kernel_size % 2 == 1, 'even kernels need asymmetric "same" padding'
        self.stem = nn.Sequential(*_conv_act_bn(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act_layer))
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(*_conv_act_bn(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2), act_layer))),
                *_conv_act_bn(nn.Conv2d(dim, dim, kernel_size=1), act_layer),
            )
            for _ in range(depth)])
        self.pooling = GlobalAvgPool2d()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.pooling(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_convmixer(variant: str, **kwargs) -> ConvMixer:
    cfg = get_model_cfg(variant)
    kwargs.setdefault('num_classes', cfg.num_classes)
    kwargs.setdefault('in_chans', cfg.input_size[0])
    return ConvMixer(**kwargs).eval()


@register_model
def convmixer_1536_20(**kwargs) -> ConvMixer:
    return _create_convmixer('convmixer_1536_20', dim=1536, depth=20, kernel_size=9, patch_size=7, **kwargs)


@register_model
def convmixer_768_32(**kwargs) -> ConvMixer:
    return _create_convmixer(
        'convmixer_768_32', dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU, **kwargs)


@register_model
def convmixer_1024_20_ks9_p14(**kwargs) -> ConvMixer:
    return _create_convmixer('convmixer_1024_20_ks9_p14', dim=1024, depth=20, kernel_size=9, patch_size=14, **kwargs)


@register_model
def test_convmixer(**kwargs) -> ConvMixer:
    """Tiny ConvMixer for fast tests: 32x32 input, 4x4 patches, 2 blocks, width 32, kernel 5, 10 classes."""
    return _create_convmixer('test_convmixer', dim=32, depth=2, kernel_size=5, patch_size=4, **kwargs)
