"""Projectors against independent computations written from the reference formulas (§2.3) with plain torch ops."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mobilevlm.model.projector import build_vision_projector

IN, H = 32, 64  # H // 4 = 16 is already a multiple of 8, so the SE squeeze width is 16


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # default init (LayerNorm weight 1 / bias 0, ...) would hide a swapped or missing affine term
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param.ndim == 1 else 0.0) * 0.2)
    return module.eval()


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def hardswish(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def hardsigmoid(x):
    return torch.clamp(x + 3, 0, 6) / 6


def linear(x, sd, prefix):
    return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def channel_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def pointwise(x, weight, bias=None):
    out = torch.einsum("bchw,oc->bohw", x, weight[:, :, 0, 0])
    return out if bias is None else out + bias[None, :, None, None]


def to_map(tokens):
    b, n, c = tokens.shape
    side = math.isqrt(n)
    # token t = row * side + col
    return torch.stack([tokens[:, r * side:(r + 1) * side].transpose(1, 2) for r in range(side)], dim=2)


def to_tokens(grid):
    b, c, h, w = grid.shape
    return torch.cat([grid[:, :, r].transpose(1, 2) for r in range(h)], dim=1)


def inverted_residual(x, sd, prefix, stride):
    y = F.conv2d(x, sd[prefix + "0.0.weight"], None, stride=stride, padding=1, groups=x.shape[1])
    y = hardswish(channel_layer_norm(y, sd[prefix + "0.1.weight"], sd[prefix + "0.1.bias"]))
    scale = y.mean(dim=(2, 3), keepdim=True)
    scale = torch.relu(pointwise(scale, sd[prefix + "1.fc1.weight"], sd[prefix + "1.fc1.bias"]))
    y = y * hardsigmoid(pointwise(scale, sd[prefix + "1.fc2.weight"], sd[prefix + "1.fc2.bias"]))
    y = channel_layer_norm(pointwise(y, sd[prefix + "2.0.weight"]), sd[prefix + "2.1.weight"], sd[prefix + "2.1.bias"])
    return y + x if stride == 1 else y


def reference_ldp(x, sd):
    h = linear(gelu(linear(x, sd, "model.mlp.1.")), sd, "model.mlp.3.")
    grid = inverted_residual(to_map(h), sd, "model.mb_block.1.block.", 1)
    grid = inverted_residual(grid, sd, "model.mb_block.2.block.", 2)
    return to_tokens(grid)


def reference_ldpv2(x, sd):
    h = linear(gelu(linear(x, sd, "mlp.mlp.0.")), sd, "mlp.mlp.2.")
    grid = to_map(h)
    b, c, s, _ = grid.shape
    # the original's AdaptiveAvgPool2d((12, 12)): output cell i averages rows floor(i*s/12) .. ceil((i+1)*s/12)-1
    bins = [(i * s // 12, -(-(i + 1) * s // 12)) for i in range(12)]
    pooled = torch.stack([torch.stack([grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for c0, c1 in bins], dim=-1)
                          for r0, r1 in bins], dim=-2)
    peg = F.conv2d(pooled, sd["peg.peg.0.weight"], sd["peg.peg.0.bias"], padding=1, groups=c)
    return to_tokens(peg + pooled)


@pytest.mark.parametrize("side", [24, 16, 7, 6])
@pytest.mark.parametrize("kind,reference", [("ldpnet", reference_ldp), ("ldpnetv2", reference_ldpv2)])
def test_ldp_projectors_equal_formulas(kind, reference, side):
    projector = randomised(build_vision_projector(kind, IN, H), seed=side)
    x = torch.randn(2, side * side, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = projector(x)
        expected = reference(x, projector.state_dict())
    # LDP halves each side (stride-2 convolution); LDPv2 always pools to 12x12 (a 2x2 pool only for 24x24)
    assert out.shape == (2, ((side + 1) // 2) ** 2 if kind == "ldpnet" else 144, H)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,tokens", [("ldpnet", 64), ("ldpnetv2", 144), ("linear", 256)])
def test_image_token_count_follows_the_projector(kind, tokens):
    from mobilevlm.config import TINY_VISION_TOWER, get_preset

    config = get_preset("tiny_v2", mm_projector_type=kind, mm_vision_tower_config={**TINY_VISION_TOWER, "image_size": 64})
    assert config.num_image_tokens == tokens  # a 16x16 patch grid


def test_ldp_squeeze_width_follows_make_divisible():
    # torchvision's rule: round to the nearest multiple of 8, go one step up if that loses more than 10%.
    # 72 // 4 = 18 -> 16 < 0.9 * 18 -> 24; 100 // 4 = 25 -> 24; 40 // 4 = 10 -> 8 < 9 -> 16
    for hidden, squeeze in ((72, 24), (100, 24), (40, 16)):
        sd = build_vision_projector("ldpnet", IN, hidden).state_dict()
        assert sd["model.mb_block.1.block.1.fc1.weight"].shape == (squeeze, hidden, 1, 1)


def test_ldp_grid_is_row_major():
    # a feature on one token moves only that token's 3x3 neighbourhood in the PEG output
    projector = randomised(build_vision_projector("ldpnetv2", IN, H))
    with torch.no_grad():
        projector.mlp.mlp[0].bias.zero_()
        projector.mlp.mlp[2].bias.zero_()
        projector.peg.peg[0].bias.zero_()
        x = torch.zeros(1, 576, IN)
        x[0, 5 * 24 + 11] = 1.0  # row 5, col 11 of the 24x24 grid -> pooled cell (2, 5) of 12x12
        out = projector(x)[0].abs().sum(dim=1)
    touched = {t for t in range(144) if out[t] > 1e-6}
    assert touched == {r * 12 + c for r in (1, 2, 3) for c in (4, 5, 6)}


def test_linear_and_mlp_projectors():
    x = torch.randn(2, 10, IN)
    lin = randomised(build_vision_projector("linear", IN, H))
    sd = lin.state_dict()
    torch.testing.assert_close(lin(x), x @ sd["weight"].T + sd["bias"])
    mlp = randomised(build_vision_projector("mlp3x_gelu", IN, H))
    sd = mlp.state_dict()
    assert sorted(sd) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    expected = linear(gelu(linear(gelu(linear(x, sd, "0.")), sd, "2.")), sd, "4.")
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_projector_inputs():
    from mobilevlm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="mm_projector_type 'qformer'"):
        build_vision_projector("qformer", IN, H)
    with pytest.raises(ValueError, match="square"):
        build_vision_projector("ldpnetv2", IN, H)(torch.randn(1, 50, IN))
