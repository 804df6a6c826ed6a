"""CycleMLP, with CycleFC written as two plain convolutions (exportable to standard ONNX Conv ops).

Paper: `CycleMLP: A MLP-like Architecture for Dense Prediction` - https://arxiv.org/abs/2107.10224
Module tree and state_dict keys follow the official release (github.com/ShoufaChen/CycleMLP, ``cycle_mlp.py``,
``CycleNet`` / ``CycleMLP_B1..B5``): patch_embed.proj, network.{0,2,4,6}.M (``CycleBlock``: norm1,
attn.{mlp_c,sfc_h,sfc_w,reweight.fc1,reweight.fc2,proj}, norm2, mlp.{fc1,fc2}), network.{1,3,5}.proj
(``Downsample``), norm, head, including each CycleFC's persistent ``offset`` buffer, so official checkpoints
load unchanged.

Differences from the official file, none of which changes eval outputs or state_dict keys:
  * CycleFC uses no torchvision ``deform_conv2d`` (see ``CycleFC``);
  * ``skip_lam`` (always 1.0, a division by 1) and drop-path (training only) are left out;
  * ``PatchEmbedOverlapping.norm`` (an ``nn.Identity`` its forward never calls) is left out;
  * the dense-prediction (``fork_feat``, mmdet/mmseg) variants are not included.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import ModelCfg, get_model_cfg, register_model
from .layers import Mlp, to_2tuple, trunc_normal_

__all__ = ['CycleFC', 'CycleMLP', 'CycleBlock', 'CycleNet']

default_cfgs = {
    'cyclemlp_b1': ModelCfg(family='cyclemlp', params_m=15.2),
    'cyclemlp_b2': ModelCfg(family='cyclemlp', params_m=26.8),
    'cyclemlp_b3': ModelCfg(family='cyclemlp', params_m=38.4),
    'cyclemlp_b4': ModelCfg(family='cyclemlp', params_m=51.8),
    'cyclemlp_b5': ModelCfg(family='cyclemlp', params_m=75.7),
    'test_cyclemlp': ModelCfg(family='cyclemlp', input_size=(3, 64, 64), num_classes=10, test_variant=True),
}


class CycleFC(nn.Module):
    """Cycle fully-connected layer: a per-channel spatial shift, then a 1x1 projection. NCHW in and out.

    Official definition: ``deform_conv2d(x, offset, weight, bias)`` with a 1x1 ``weight`` (out, in/groups, 1, 1)
    and a fixed integer ``offset`` (1, 2*C, 1, 1) from ``gen_offset``, one offset group per input channel:
    channel ``i`` is read at ``(y + dy_i, x + dx_i)`` with ``(i + k // 2) % k - k // 2`` as ``dx_i`` for a
    (1, k) kernel (``dy_i = 0``) or as ``dy_i`` for a (k, 1) kernel, and zeros outside the image. Integer
    offsets make the bilinear sampling an exact pixel pick.

    Export form used here (numerically the same, up to float summation order in the 1x1 projection):
      1. a depthwise ``conv2d`` (groups=C, no bias) with a one-hot (kh, kw) kernel per channel, 1 at
         ``(dy_i + kh // 2, dx_i + kw // 2)``, and zero padding ``(kh // 2, kw // 2)``, i.e. the shift;
      2. ``conv2d`` with ``weight`` and ``bias`` (1x1, ``groups``), i.e. the projection.
    Both are standard ONNX ``Conv`` nodes; the compiler pattern-matches "depthwise one-hot conv followed by
    1x1 conv" back into a CycleFC. The one-hot kernel is a non-persistent buffer (``shift_kernel``) derived
    from ``offset``, so ``state_dict`` holds exactly the official ``weight``, ``bias`` and ``offset``; it is
    re-derived whenever an ``offset`` is loaded.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,  # (1, k) or (k, 1): the spatial extent of the staircase, k odd
            stride: int = 1,
            padding: int = 0,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = True,
    ):
        super().__init__()
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError('in_channels and out_channels must be divisible by groups')
        if stride != 1 or padding != 0:
            raise ValueError('CycleFC supports stride 1 and padding 0 only')
        kernel_size = to_2tuple(kernel_size)
        if min(kernel_size) != 1 or kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
            raise ValueError(f'kernel_size must be (1, k) or (k, 1) with k odd, got {kernel_size}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.groups = groups
        # dilation only scales the (1x1) kernel taps, so it has no effect; kept for signature parity

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.register_buffer('offset', self.gen_offset())
        self.register_buffer('shift_kernel', self._shift_kernel(self.offset), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init, as the official layer; CycleNet re-inits with trunc_normal(.02)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1 / self.weight[0].numel() ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def gen_offset(self) -> torch.Tensor:
        """Offsets (1, 2*C, 1, 1) as (dy, dx) pairs per channel, identical to the official ``gen_offset``."""
        kh, kw = self.kernel_size
        k = kh * kw  # the kernel's long side, the other is 1
        shifts = (torch.arange(self.in_channels, device='cpu') + k // 2) % k - k // 2
        offset = torch.zeros(self.in_channels, 2, device='cpu')  # tiny; stays real under a meta device
        offset[:, 1 if kh == 1 else 0] = shifts.float()  # (1, k) shifts along W (dx), (k, 1) along H (dy)
        return offset.reshape(1, 2 * self.in_channels, 1, 1)

    def _shift_kernel(self, offset: torch.Tensor) -> torch.Tensor:
        """The depthwise one-hot kernel (C, 1, kh, kw) that reads each channel at its (dy, dx)."""
        kh, kw = self.kernel_size
        if not torch.equal(offset, offset.round()):
            raise ValueError('CycleFC offsets must be integers')
        dy, dx = offset.detach().reshape(self.in_channels, 2).round().long().unbind(1)
        rows, cols = dy + kh // 2, dx + kw // 2
        if not (0 <= rows.min() and rows.max() < kh and 0 <= cols.min() and cols.max() < kw):
            raise ValueError(f'offsets do not fit kernel_size {self.kernel_size}')
        kernel = torch.zeros(self.in_channels, 1, kh, kw, dtype=offset.dtype, device=offset.device)
        kernel[torch.arange(self.in_channels, device=offset.device), 0, rows, cols] = 1.
        return kernel

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # keep the derived one-hot kernel in sync with a loaded offset (validated before anything is copied)
        offset = state_dict.get(prefix + 'offset')
        kernel = None
        if offset is not None and offset.shape == self.offset.shape:
            kernel = self._shift_kernel(offset.to(self.offset))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if kernel is not None:
            self.shift_kernel = kernel.to(self.shift_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        x = F.conv2d(x, self.shift_kernel, padding=(kh // 2, kw // 2), groups=self.in_channels)
        return F.conv2d(x, self.weight, self.bias, groups=self.groups)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        return s


class CycleMLP(nn.Module):
    """Token mixer on B, H, W, C: CycleFC along W (``sfc_h``, kernel (1, 3)) and along H (``sfc_w``, (3, 1))
    plus a channel FC (``mlp_c``), mixed by softmax weights from a squeeze (``reweight``), then ``proj``."""

    def __init__(self, dim: int, qkv_bias: bool = False, proj_drop: float = 0.):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x_nchw = x.permute(0, 3, 1, 2)
        h = self.sfc_h(x_nchw).permute(0, 2, 3, 1)
        w = self.sfc_w(x_nchw).permute(0, 2, 3, 1)
        c = self.mlp_c(x)

        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)  # B, C
        # (B, 3C) -> (B, C, 3): the three branch weights of channel j are outputs 3j, 3j+1, 3j+2
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        a_h, a_w, a_c = a.unbind(0)  # exports as one Split, not three Gathers whose indices TVM cannot bound
        x = h * a_h + w * a_w + c * a_c
        return self.proj_drop(self.proj(x))


class CycleBlock(nn.Module):
    """Residual ``norm1 -> CycleMLP`` then residual ``norm2 -> Mlp`` on B, H, W, C."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CycleMLP(dim, qkv_bias=qkv_bias)
        self.drop_path = nn.Identity()  # stochastic depth is training-only
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbedOverlapping(nn.Module):
    """Overlapping patch stem: conv 7x7, stride 4, padding 2 (NCHW out)."""

    def __init__(self, patch_size: int = 7, stride: int = 4, padding: int = 2, in_chans: int = 3,
                 embed_dim: int = 64):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Stage transition on B, H, W, C: conv 3x3, stride 2, padding 1."""

    def __init__(self, in_embed_dim: int, out_embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class CycleNet(nn.Module):
    """CycleMLP network: stem, then stages of ``CycleBlock`` with a ``Downsample`` between consecutive stages
    (``network`` = [stage0, down0, stage1, down1, ...], the official layout with all ``transitions`` True)."""

    def __init__(
            self,
            layers,
            embed_dims,
            mlp_ratios,
            in_chans: int = 3,
            num_classes: int = 1000,
            qkv_bias: bool = False,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        assert len(layers) == len(embed_dims) == len(mlp_ratios)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.patch_embed = PatchEmbedOverlapping(in_chans=in_chans, embed_dim=embed_dims[0])
        network = []
        for i, (depth, dim, ratio) in enumerate(zip(layers, embed_dims, mlp_ratios)):
            if i > 0:
                network.append(Downsample(embed_dims[i - 1], dim))
            # NOTE: the official basic_blocks() drops norm_layer, blocks always get nn.LayerNorm
            network.append(nn.Sequential(*[
                CycleBlock(dim, mlp_ratio=ratio, qkv_bias=qkv_bias) for _ in range(depth)]))
        self.network = nn.ModuleList(network)
        self.norm = norm_layer(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official ``cls_init_weights``: trunc_normal(.02) Linear and CycleFC, zero biases; convs keep defaults."""
        if isinstance(m, (nn.Linear, CycleFC)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B, C, H, W -> B, H, W, C
        for stage in self.network:
            x = stage(x)
        B, H, W, C = x.shape
        return self.norm(x.reshape(B, H * W, C))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cyclemlp(variant: str, **kwargs) -> CycleNet:
    cfg = get_model_cfg(variant)
    kwargs.setdefault('num_classes', cfg.num_classes)
    kwargs.setdefault('in_chans', cfg.input_size[0])
    return CycleNet(**kwargs).eval()


@register_model
def cyclemlp_b1(**kwargs) -> CycleNet:
    return _create_cyclemlp(
        'cyclemlp_b1', layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], **kwargs)


@register_model
def cyclemlp_b2(**kwargs) -> CycleNet:
    return _create_cyclemlp(
        'cyclemlp_b2', layers=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], **kwargs)


@register_model
def cyclemlp_b3(**kwargs) -> CycleNet:
    return _create_cyclemlp(
        'cyclemlp_b3', layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], **kwargs)


@register_model
def cyclemlp_b4(**kwargs) -> CycleNet:
    return _create_cyclemlp(
        'cyclemlp_b4', layers=[3, 8, 27, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], **kwargs)


@register_model
def cyclemlp_b5(**kwargs) -> CycleNet:
    return _create_cyclemlp(
        'cyclemlp_b5', layers=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4], **kwargs)


@register_model
def test_cyclemlp(**kwargs) -> CycleNet:
    """Tiny CycleMLP for fast tests: 64x64 input (16x16 tokens after the stem), 3 stages of 1 block with
    widths 16, 20, 28 (none divisible by 3, so the cyclic shifts wrap mid-pattern), 2 downsamples, 10 classes."""
    return _create_cyclemlp(
        'test_cyclemlp', layers=[1, 1, 1], embed_dims=[16, 20, 28], mlp_ratios=[2, 2, 2], **kwargs)
