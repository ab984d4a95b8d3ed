"""Vision-to-language projectors: `ldpnet` (LDP, MobileVLM), `ldpnetv2` (LDPv2, MobileVLM V2), `linear`, `mlpNx_gelu`.

Module and parameter names mirror the official checkpoints (the LDP blocks follow torchvision's MobileNetV3
InvertedResidual layout with timm's channel-wise LayerNorm), so `model.mm_projector.*` keys load unchanged.
Both take any square patch grid (24x24 for CLIP-L/336): LDP halves each side with a stride-2 convolution,
LDPv2 pools to a fixed 12x12.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from mobilevlm.errors import CheckpointError


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"LDP projectors need a square patch grid, got {num_tokens} tokens")
    return side


def _tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    side = _grid_side(n)
    return x.transpose(1, 2).reshape(b, c, side, side)  # token t = row * side + col


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension at every spatial position (timm's LayerNormAct2d without activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expanded == input channels: depthwise conv, SE, pointwise conv."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                          LayerNorm2d(channels, eps=1e-5), nn.Hardswish()),
            SqueezeExcitation(channels, _make_divisible(channels // 4, 8)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-5)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class LDPBlock(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(hidden, 1), InvertedResidual(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _map_to_tokens(self.mb_block(_tokens_to_map(self.mlp(x))))


class LDPNetProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.model = LDPBlock(in_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


LDPV2_GRID = 12  # LDPv2 pools any patch grid to 12x12 = 144 tokens (the original's AdaptiveAvgPool2d((12, 12)))


class TokenDownLayer(nn.Module):
    """Adaptive average pooling of the token grid to 12x12: exactly a 2x2 pool for CLIP-L/336's 24x24 grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _map_to_tokens(F.adaptive_avg_pool2d(_tokens_to_map(x), (LDPV2_GRID, LDPV2_GRID)))


class PosInjectLayer(nn.Module):
    """Positional-encoding generator: depthwise 3x3 conv with bias, plus the input."""

    def __init__(self, hidden: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_map(x)
        return _map_to_tokens(self.peg(grid) + grid)


class LDPNetV2Projector(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.mlp = FeatureIRLayer(in_features, hidden)
        self.dwn = TokenDownLayer()
        self.peg = PosInjectLayer(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(x)))


def build_vision_projector(projector_type: str, in_features: int, hidden: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(in_features, hidden)
    mlp = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if mlp:
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
        for _ in range(int(mlp.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers)
    if projector_type.startswith("ldpnetv2"):  # checked first: "ldpnetv2" also starts with "ldpnet"
        return LDPNetV2Projector(in_features, hidden)
    if projector_type.startswith("ldpnet"):
        return LDPNetProjector(in_features, hidden)
    raise CheckpointError(f"unknown mm_projector_type {projector_type!r} (ldpnet, ldpnetv2, linear, mlpNx_gelu)")
