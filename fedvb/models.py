"""The papers' models (docs/data.md, models), built by name.

``build_model(name, input_shape, num_classes, **options)``:

=================  =====================================================================
softmax            softmax regression, ``Linear(features, classes, bias=False)``
linear             linear regression, ``Linear(features, 1, bias=False)`` (one output)
mlp                MLP, hidden sizes 200-100 and sigmoid by default (``hidden``, ``activation``)
zenke-cnn          "CifarNet" of Zenke et al.: 2x[conv32, conv32, pool, drop .25],
                   2x... with 64, FC 512, drop .5
acar-cnn           FedDyn's CNN: conv5x5 64, pool, conv5x5 64, pool, FC 384, FC 192
resnet20           ResNet-20 with GroupNorm(2 groups), option-A shortcuts, Kaiming init
=================  =====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "MODELS", "build_model"]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _features(input_shape: Sequence[int]) -> int:
    return math.prod(input_shape)


def softmax_regression(input_shape, num_classes) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_features(input_shape), num_classes, bias=False))


def linear_regression(input_shape, num_classes=0) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_features(input_shape), 1, bias=False), nn.Flatten(0))


def mlp(input_shape, num_classes, hidden: Sequence[int] = (200, 100), activation: str = "sigmoid") -> nn.Module:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = _features(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def zenke_cnn(input_shape, num_classes) -> nn.Module:
    channels, height, width = input_shape
    size = ((height - 2) // 2 - 2) // 2  # 'same' conv, 'valid' conv, pool, twice
    size_w = ((width - 2) // 2 - 2) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(64 * size * size_w, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes),
    )  # fmt: skip


def acar_cnn(input_shape, num_classes) -> nn.Module:
    channels, height, width = input_shape
    h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * h * w, 384), nn.ReLU(),
        nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, num_classes),
    )  # fmt: skip


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm; option-A shortcut (strided identity, zero-padded channels)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al. 2016, option A) with GroupNorm(2)."""

    def __init__(self, input_shape, num_classes: int, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), nn.GroupNorm(groups, 16), nn.ReLU()
        )
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


# The smallest image side each CNN leaves at least one pixel of after its convolutions and pools.
SMALLEST_SIDE = {"zenke-cnn": 10, "acar-cnn": 16}

MODELS = {
    "softmax": softmax_regression,
    "linear": linear_regression,
    "mlp": mlp,
    "zenke-cnn": zenke_cnn,
    "acar-cnn": acar_cnn,
    "resnet20": ResNet20,
}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """A freshly initialised model (seed torch beforehand for a reproducible init)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(MODELS)}")
    if name in ("zenke-cnn", "acar-cnn", "resnet20") and len(input_shape) != 3:
        raise ValueError(f"model: {name} needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    if name in SMALLEST_SIDE and min(input_shape[1:]) < SMALLEST_SIDE[name]:
        side = SMALLEST_SIDE[name]
        raise ValueError(f"model: {name} needs images of at least {side}x{side} pixels (its pooling leaves "
                         f"nothing of a smaller one), got {input_shape[1]}x{input_shape[2]}; allowed: larger "
                         "images, or mlp or softmax")  # fmt: skip
    return MODELS[name](tuple(input_shape), num_classes, **options)
