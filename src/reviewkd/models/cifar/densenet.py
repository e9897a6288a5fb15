"""CIFAR DenseNets for 32x32 inputs. DenseNet-40 (Huang et al. 2017), as the FFSD paper's CIFAR-100 rows use it.

Growth rate 12, no bottleneck and no compression (DenseNet, not DenseNet-BC): a 3x3 stem of 24
channels; three dense blocks of (depth - 4) / 3 = 12 layers, each layer BN-ReLU-conv3x3 adding 12
channels to the concatenation (168, 312 and 456 channels after the blocks); between blocks a
BN-ReLU-conv1x1-avgpool2 transition that keeps the width; a final BN-ReLU, global average pooling
and a linear classifier. Convolutions have no bias and are He-normal initialised
(std sqrt(2 / (k*k*out_channels))), BatchNorms start at weight 1 / bias 0, the classifier keeps
PyTorch's default. Parameter names follow the FFSD code (``dense1.0.bn1``, ``trans1.conv1``,
``bn``, ``fc``), so its state dicts load.

Stages: the blocks are pre-activation (BN-ReLU comes first), as in the wide ResNets, so a stage's
output is the raw concatenation and its activation is applied by what follows (the next
transition's ``bn1``, or the final ``bn``). ``post`` is the block output, ``pre`` the output of
that following BatchNorm; the input of the pooling is ReLU(bn(dense3)), 456 x 8 x 8.

DenseNet-121 (``densenet121``, DenseNet-BC), the CIFAR-100 filter teacher of cGAN-KD's final
version, laid out as in that paper's CIFAR code: a 3x3 stem of 2 x growth = 64 channels at 32x32 (no
7x7 stride-2 stem or max pooling); four dense blocks of 6, 12, 24 and 16 bottleneck layers, each
BN-ReLU-conv1x1 (4 x growth channels) then BN-ReLU-conv3x3 (growth 32), its output concatenated
*before* its input; BN-ReLU-conv1x1-avgpool2 transitions halving the width (compression 0.5:
256 -> 128, 512 -> 256, 1024 -> 512); a final BN-ReLU, global average pooling (the code's 4x4 pooling
at 32x32 input, adaptive here so other sizes run) and a linear classifier (about 7.05M parameters
for 100 classes). Initialisation: PyTorch's defaults, as that code sets none. Names follow it
(``dense1.0.bn1``, ``trans1.conv``, ``bn``, ``linear``), so its state dicts load. Stages: the four
blocks (256, 512, 1024, 1024 channels at 32, 16, 8, 4 pixels), ``pre`` the following BatchNorm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from ..registry import register_model
from .common import conv1x1, conv3x3, init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` channels, concatenated after the input."""

    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv1 = conv3x3(in_ch, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv1(self.relu(self.bn1(x)))), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (same width) then 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv1 = conv1x1(in_ch, out_ch)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(self.relu(self.bn1(x))))


class DenseNet(nn.Module):
    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"a DenseNet without bottlenecks has depth 3n+4, got {depth}")
        n = (depth - 4) // 3
        width = 2 * growth
        self.conv1 = conv3x3(3, width)
        for i in (1, 2, 3):  # registered in forward order: dense1, trans1, dense2, trans2, dense3
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(width, growth))
                width += growth
            self.add_module(f"dense{i}", nn.Sequential(*layers))
            if i < 3:
                self.add_module(f"trans{i}", Transition(width, width))
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)
        self.feature_spec = FeatureSpec(
            tuple(Stage(post=Tap(block), pre=Tap(bn), bn=bn)
                  for block, bn in [("dense1", "trans1.bn1"), ("dense2", "trans2.bn1"), ("dense3", "bn")]),
            pooled=Tap("avgpool"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.dense3(self.trans2(self.dense2(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("densenet40")
def densenet40(num_classes=100, **kw) -> nn.Module:
    return DenseNet(40, 12, num_classes, **kw)


class BottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 (4 x growth) then BN-ReLU-conv3x3 (growth), concatenated before the input."""

    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, 4 * growth)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = conv3x3(4 * growth, growth)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(x))))))
        return torch.cat((out, x), 1)


class CompressionTransition(nn.Module):
    """BN-ReLU-conv1x1 to ``out_ch`` channels then 2x2 average pooling (DenseNet-BC)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = conv1x1(in_ch, out_ch)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs (see the module docstring); ``blocks`` layers per dense block."""

    def __init__(self, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32, reduction: float = 0.5,
                 num_classes: int = 100):
        super().__init__()
        width = 2 * growth
        self.conv1 = conv3x3(3, width)
        last = len(blocks)
        for i, n in enumerate(blocks, start=1):  # registered in forward order: dense1, trans1, ..., dense4
            layers = []
            for _ in range(n):
                layers.append(BottleneckLayer(width, growth))
                width += growth
            self.add_module(f"dense{i}", nn.Sequential(*layers))
            if i < last:
                out = int(math.floor(width * reduction))
                self.add_module(f"trans{i}", CompressionTransition(width, out))
                width = out
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, num_classes)
        self.num_blocks = last
        following_bn = [f"trans{i}.bn" for i in range(1, last)] + ["bn"]
        self.feature_spec = FeatureSpec(
            tuple(Stage(post=Tap(f"dense{i}"), pre=Tap(bn), bn=bn) for i, bn in enumerate(following_bn, start=1)),
            pooled=Tap("avgpool"),
        )

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The globally pooled final BN-ReLU map (N x width), the input of the classifier."""
        x = self.conv1(x)
        for i in range(1, self.num_blocks):
            x = getattr(self, f"trans{i}")(getattr(self, f"dense{i}")(x))
        x = self.relu(self.bn(getattr(self, f"dense{self.num_blocks}")(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooled(x))


@register_model("densenet121")
def densenet121(num_classes=100, **kw) -> nn.Module:
    return DenseNetBC((6, 12, 24, 16), 32, 0.5, num_classes, **kw)
