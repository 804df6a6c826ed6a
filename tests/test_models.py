"""Model zoo tests: shapes, published parameter counts, checkpoint-compatible state_dict keys, and CycleFC's
two-convolution form against deform_conv2d's definition.

Reference key names/counts come from timm ``timm/models/mlp_mixer.py`` and ``timm/models/convmixer.py``
(huggingface/pytorch-image-models) and the official CycleMLP ``cycle_mlp.py`` (ShoufaChen/CycleMLP).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models import create_model, get_model_cfg, list_models
from models.cyclemlp import CycleFC

FAMILIES = ("cyclemlp", "mixer", "resmlp", "convmixer", "gmlp")
FULL_SIZE = list_models(include_test=False)


def _marked(names, slow):
    return [pytest.param(n, marks=pytest.mark.slow) if slow(n) else n for n in names]


def _build_meta(name):
    """Full-size architecture without allocating or initialising weights (shapes and keys only)."""
    with torch.device("meta"):
        return create_model(name)


# --------------------------------------------------------------------------------------------
# every variant
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", _marked(list_models(), lambda n: not get_model_cfg(n).test_variant))
def test_forward_shape_and_finite(name):
    cfg = get_model_cfg(name)
    torch.manual_seed(0)
    model = create_model(name)
    assert not any(m.training for m in model.modules()), "create_model must return an eval() model"
    x = torch.randn(2, *cfg.input_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, cfg.num_classes)
    assert torch.isfinite(y).all()


def test_families_have_one_test_variant_and_full_size_variants():
    by_family: dict[str, list[str]] = {}
    for name in list_models():
        by_family.setdefault(get_model_cfg(name).family, []).append(name)
    assert sorted(by_family) == sorted(FAMILIES)
    for family, names in by_family.items():
        tests = [n for n in names if get_model_cfg(n).test_variant]
        assert tests == [f"test_{family}"], family
        assert get_model_cfg(tests[0]).params_m is None
        full = [n for n in names if not get_model_cfg(n).test_variant]
        assert full, family
        for n in full:
            cfg = get_model_cfg(n)
            assert cfg.params_m is not None and cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000, n


# --------------------------------------------------------------------------------------------
# full-size variants: published parameter counts, and state_dict sizes checked against the references
# --------------------------------------------------------------------------------------------

# len(state_dict()) of the reference implementations (timm / official CycleMLP), counted when this zoo was written
REFERENCE_NUM_KEYS = {
    "cyclemlp_b1": 222, "cyclemlp_b2": 390, "cyclemlp_b3": 600, "cyclemlp_b4": 873, "cyclemlp_b5": 726,
    "mixer_s32_224": 102, "mixer_s16_224": 102, "mixer_b32_224": 150, "mixer_b16_224": 150, "mixer_l16_224": 294,
    "resmlp_12_224": 150, "resmlp_24_224": 294, "resmlp_36_224": 438, "resmlp_big_24_224": 294,
    "convmixer_1536_20": 289, "convmixer_768_32": 457, "convmixer_1024_20_ks9_p14": 289,
    "gmlp_ti16_224": 306, "gmlp_s16_224": 306, "gmlp_b16_224": 306,
}


def test_reference_table_covers_full_size_variants():
    assert sorted(REFERENCE_NUM_KEYS) == FULL_SIZE


@pytest.mark.parametrize("name", FULL_SIZE)
def test_param_count_matches_published(name):
    cfg = get_model_cfg(name)
    model = _build_meta(name)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n_params - cfg.params_m) / cfg.params_m <= 0.01, f"{name}: {n_params:.3f}M vs {cfg.params_m}M"
    assert len(model.state_dict()) == REFERENCE_NUM_KEYS[name]


# --------------------------------------------------------------------------------------------
# state_dict keys (names from the reference sources)
# --------------------------------------------------------------------------------------------

KNOWN_KEYS = {
    "test_mixer": [
        "stem.proj.weight", "stem.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.mlp_tokens.fc1.weight", "blocks.0.mlp_tokens.fc1.bias", "blocks.0.mlp_tokens.fc2.weight",
        "blocks.0.norm2.weight", "blocks.0.mlp_channels.fc1.weight", "blocks.1.mlp_channels.fc2.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    ],
    "test_resmlp": [
        "stem.proj.weight", "blocks.0.norm1.alpha", "blocks.0.norm1.beta", "blocks.0.linear_tokens.weight",
        "blocks.0.linear_tokens.bias", "blocks.0.norm2.alpha", "blocks.0.mlp_channels.fc1.weight",
        "blocks.0.mlp_channels.fc2.bias", "blocks.0.ls1", "blocks.0.ls2", "norm.alpha", "norm.beta", "head.weight",
    ],
    "test_gmlp": [
        "stem.proj.weight", "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.0.mlp_channels.fc1.weight",
        "blocks.0.mlp_channels.gate.norm.weight", "blocks.0.mlp_channels.gate.proj.weight",
        "blocks.0.mlp_channels.gate.proj.bias", "blocks.0.mlp_channels.fc2.weight", "norm.weight", "head.weight",
    ],
    "test_convmixer": [
        "stem.0.weight", "stem.0.bias", "stem.2.weight", "stem.2.running_mean", "stem.2.running_var",
        "stem.2.num_batches_tracked", "blocks.0.0.fn.0.weight", "blocks.0.0.fn.0.bias", "blocks.0.0.fn.2.weight",
        "blocks.0.0.fn.2.running_var", "blocks.0.1.weight", "blocks.0.1.bias", "blocks.0.3.weight",
        "blocks.1.3.running_mean", "head.weight", "head.bias",
    ],
    "test_cyclemlp": [
        "patch_embed.proj.weight", "patch_embed.proj.bias", "network.0.0.norm1.weight",
        "network.0.0.attn.mlp_c.weight", "network.0.0.attn.sfc_h.weight", "network.0.0.attn.sfc_h.bias",
        "network.0.0.attn.sfc_h.offset", "network.0.0.attn.sfc_w.weight", "network.0.0.attn.sfc_w.offset",
        "network.0.0.attn.reweight.fc1.weight", "network.0.0.attn.reweight.fc2.bias",
        "network.0.0.attn.proj.weight", "network.0.0.attn.proj.bias", "network.0.0.norm2.bias",
        "network.0.0.mlp.fc1.weight", "network.0.0.mlp.fc2.bias", "network.1.proj.weight", "network.1.proj.bias",
        "network.2.0.attn.sfc_h.offset", "network.3.proj.weight", "network.4.0.attn.sfc_w.offset",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    ],
}
ABSENT_KEYS = {
    "test_mixer": ["stem.norm.weight", "blocks.0.mlp_tokens.norm.weight"],
    "test_resmlp": ["blocks.0.norm1.weight", "blocks.0.gamma_1"],
    "test_gmlp": ["blocks.0.norm1.weight", "blocks.0.mlp_channels.norm.weight"],
    "test_convmixer": ["stem.1.weight", "pooling.pool.weight"],
    "test_cyclemlp": ["network.0.0.attn.mlp_c.bias", "patch_embed.norm.weight", "network.0.0.attn.sfc_h.shift_kernel"],
}

# (variant, key, shape) on the real architectures
KNOWN_SHAPES = [
    ("mixer_b16_224", "stem.proj.weight", (768, 3, 16, 16)),
    ("mixer_b16_224", "blocks.11.mlp_tokens.fc1.weight", (384, 196)),
    ("mixer_b16_224", "blocks.11.mlp_channels.fc1.weight", (3072, 768)),
    ("mixer_b16_224", "head.weight", (1000, 768)),
    ("resmlp_12_224", "blocks.0.norm1.alpha", (1, 1, 384)),
    ("resmlp_12_224", "blocks.11.linear_tokens.weight", (196, 196)),
    ("resmlp_12_224", "blocks.0.ls1", (384,)),
    ("gmlp_s16_224", "blocks.29.mlp_channels.fc1.weight", (1536, 256)),
    ("gmlp_s16_224", "blocks.29.mlp_channels.gate.norm.weight", (768,)),
    ("gmlp_s16_224", "blocks.29.mlp_channels.gate.proj.weight", (196, 196)),
    ("gmlp_s16_224", "blocks.29.mlp_channels.fc2.weight", (256, 768)),
    ("convmixer_1536_20", "stem.0.weight", (1536, 3, 7, 7)),
    ("convmixer_1536_20", "blocks.19.0.fn.0.weight", (1536, 1, 9, 9)),
    ("convmixer_1536_20", "blocks.19.1.weight", (1536, 1536, 1, 1)),
    ("convmixer_768_32", "blocks.31.0.fn.0.weight", (768, 1, 7, 7)),
    ("cyclemlp_b1", "patch_embed.proj.weight", (64, 3, 7, 7)),
    ("cyclemlp_b1", "network.0.0.attn.sfc_h.weight", (64, 64, 1, 1)),
    ("cyclemlp_b1", "network.0.0.attn.sfc_h.offset", (1, 128, 1, 1)),
    ("cyclemlp_b1", "network.0.0.attn.reweight.fc1.weight", (16, 64)),
    ("cyclemlp_b1", "network.0.0.attn.reweight.fc2.weight", (192, 16)),
    ("cyclemlp_b1", "network.1.proj.weight", (128, 64, 3, 3)),
    ("cyclemlp_b1", "network.4.3.attn.sfc_w.offset", (1, 640, 1, 1)),
    ("cyclemlp_b1", "network.6.1.mlp.fc1.weight", (2048, 512)),
    ("cyclemlp_b3", "network.0.2.mlp.fc1.weight", (512, 64)),
]


@pytest.mark.parametrize("name", sorted(KNOWN_KEYS))
def test_known_state_dict_keys(name):
    keys = set(create_model(name).state_dict())
    missing = [k for k in KNOWN_KEYS[name] if k not in keys]
    assert not missing, missing
    present = [k for k in ABSENT_KEYS[name] if k in keys]
    assert not present, present


@pytest.mark.parametrize("name", sorted({n for n, _, _ in KNOWN_SHAPES}))
def test_known_state_dict_shapes(name):
    sd = _build_meta(name).state_dict()
    for variant, key, shape in KNOWN_SHAPES:
        if variant == name:
            assert tuple(sd[key].shape) == shape, key


def test_cyclefc_state_dict_and_offsets():
    model = create_model("test_cyclemlp")
    sd = model.state_dict()
    cyclefcs = {n: m for n, m in model.named_modules() if isinstance(m, CycleFC)}
    assert cyclefcs
    for name, m in cyclefcs.items():
        # exactly the official entries; the derived one-hot kernel is a non-persistent buffer
        assert {k for k in sd if k.startswith(name + ".")} == {f"{name}.weight", f"{name}.bias", f"{name}.offset"}
        assert "shift_kernel" in dict(m.named_buffers())
        # official gen_offset: (dy, dx) per channel, the long kernel side k gets (i + k//2) % k - k//2
        k = max(m.kernel_size)
        shifts = torch.tensor([float((i + k // 2) % k - k // 2) for i in range(m.in_channels)])
        pairs = m.offset.reshape(m.in_channels, 2)
        along_w = m.kernel_size[0] == 1
        assert torch.equal(pairs[:, 1 if along_w else 0], shifts)
        assert torch.equal(pairs[:, 0 if along_w else 1], torch.zeros(m.in_channels))


def test_test_cyclemlp_exercises_cyclefc():
    """The tiny CycleMLP covers CycleFC in several stages, both kernel orientations, a downsample, and channel
    counts that are not multiples of the kernel size (the cyclic shift pattern wraps mid-way)."""
    model = create_model("test_cyclemlp")
    stages = {n.split(".")[1] for n, m in model.named_modules() if isinstance(m, CycleFC)}
    assert len(stages) >= 2
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, CycleFC)}
    assert {(1, 3), (3, 1)} <= kernels
    assert any(isinstance(m, models.cyclemlp.Downsample) for m in model.modules())
    assert any(m.in_channels % 3 for m in model.modules() if isinstance(m, CycleFC))


# --------------------------------------------------------------------------------------------
# CycleFC == deform_conv2d (as the official layer calls it), from the definition
# --------------------------------------------------------------------------------------------

def deform_conv2d_1x1_reference(x, offset, weight, bias):
    """torchvision deform_conv2d with a 1x1 kernel, stride 1, no padding, written from its definition.

    ``offset`` (B, 2*G, H, W) holds one (dy, dx) pair per offset group of C/G input channels. Each input
    channel is bilinearly sampled at (y + dy, x + dx); sample corners outside the image count as zero. Then
    out = weight (O, C/groups, 1, 1) applied per channel group, plus bias.
    """
    B, C, H, W = x.shape
    G = offset.shape[1] // 2
    ys = torch.arange(H, dtype=x.dtype).view(H, 1).expand(H, W)
    xs = torch.arange(W, dtype=x.dtype).view(1, W).expand(H, W)
    sampled = torch.zeros_like(x)
    for b in range(B):
        for c in range(C):
            g = c // (C // G)
            py, px = ys + offset[b, 2 * g], xs + offset[b, 2 * g + 1]
            y0, x0 = py.floor(), px.floor()
            for cy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for cx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    inside = (cy >= 0) & (cy <= H - 1) & (cx >= 0) & (cx <= W - 1)
                    val = x[b, c][cy.clamp(0, H - 1).long(), cx.clamp(0, W - 1).long()]
                    sampled[b, c] += torch.where(inside, wy * wx * val, torch.zeros_like(val))
    O, cin_per_group = weight.shape[:2]
    groups = C // cin_per_group
    out = torch.empty(B, O, H, W, dtype=x.dtype)
    o_per_group = O // groups
    for gi in range(groups):
        w = weight[gi * o_per_group:(gi + 1) * o_per_group, :, 0, 0]
        s = sampled[:, gi * cin_per_group:(gi + 1) * cin_per_group]
        out[:, gi * o_per_group:(gi + 1) * o_per_group] = torch.einsum("oi,bihw->bohw", w, s)
    return out + bias.view(1, O, 1, 1)


def test_reference_sampler_sanity():
    """The reference itself: zero offsets give the plain 1x1 conv; a fractional shift interpolates."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 3, 4, 5), torch.randn(2, 3, 1, 1), torch.randn(2)
    zero = torch.zeros(1, 6, 4, 5)
    assert torch.allclose(deform_conv2d_1x1_reference(x, zero, w, b), F.conv2d(x, w, b), atol=1e-6)
    half = torch.zeros(1, 6, 4, 5)
    half[:, 1::2] = 0.5  # dx = 0.5: mean of a pixel and its right neighbour (zero past the edge)
    right = F.pad(x, (0, 1))[..., 1:]
    assert torch.allclose(deform_conv2d_1x1_reference(x, half, w, b), F.conv2d((x + right) / 2, w, b), atol=1e-6)


CYCLEFC_CASES = [
    # (in, out, kernel, H, W, groups)
    (7, 5, (1, 3), 5, 7, 1),
    (5, 6, (3, 1), 5, 7, 1),
    (7, 7, (1, 3), 1, 9, 1),
    (5, 3, (3, 1), 1, 9, 1),
    (4, 4, (3, 1), 9, 1, 1),
    (11, 6, (1, 5), 4, 6, 1),
    (9, 4, (5, 1), 7, 3, 1),
    (8, 6, (1, 3), 3, 5, 2),
    (3, 3, (1, 3), 2, 2, 1),
]


@pytest.mark.parametrize("cin,cout,kernel,H,W,groups", CYCLEFC_CASES)
def test_cyclefc_matches_deform_conv2d_definition(cin, cout, kernel, H, W, groups):
    torch.manual_seed(cin * 100 + H * 10 + W)
    layer = CycleFC(cin, cout, kernel, groups=groups).eval()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, cin, H, W)
    offset = layer.offset.expand(2, -1, H, W)  # exactly how the official forward calls deform_conv2d
    with torch.no_grad():
        ref = deform_conv2d_1x1_reference(x, offset, layer.weight, layer.bias)
        out = layer(x)
    assert out.shape == (2, cout, H, W)
    assert (out - ref).abs().max().item() <= 1e-5


def test_cyclefc_rederives_kernel_on_load():
    """Loading a (valid) offset changes the one-hot kernel with it; state_dict round-trips strictly."""
    torch.manual_seed(0)
    src = CycleFC(7, 5, (1, 3))
    sd = src.state_dict()
    sd["offset"] = sd["offset"].roll(2, dims=1)  # another valid integer shift per channel
    dst = CycleFC(7, 5, (1, 3))
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(2, 7, 4, 6)
    with torch.no_grad():
        ref = deform_conv2d_1x1_reference(x, sd["offset"].expand(2, -1, 4, 6), sd["weight"], sd["bias"])
        assert (dst(x) - ref).abs().max().item() <= 1e-5
    bad = dict(sd, offset=sd["offset"] * 0.5)
    with pytest.raises(ValueError):
        dst.load_state_dict(bad)
