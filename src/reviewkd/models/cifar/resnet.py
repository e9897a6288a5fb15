"""Post-activation ResNets for 32x32 inputs (He et al. 2016): resnet8 ... resnet110, resnet8x4, resnet32x4.

The residual blocks and the network body are shared with the four-stage variants in
``resnet_imagenet_style.py``; the two families differ only in widths, depths and the names the
community checkpoints use for the shortcut (``downsample`` / ``shortcut``) and the classifier
(``fc`` / ``linear``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import register_model
from .common import conv1x1, conv3x3, init_weights, projection, residual_stages


class ResidualBlock(nn.Module):
    """``relu_out(branch(x) + shortcut(x))``; the input of ``relu_out`` is the block's pre-activation."""

    expansion = 1
    last_bn = "bn2"  # the BatchNorm ending the residual branch

    def _add_shortcut(self, in_ch: int, stride: int, name: str) -> None:
        self._shortcut_name = name
        setattr(self, name, projection(in_ch, self.out_channels, stride))
        self.relu_out = nn.ReLU()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = getattr(self, self._shortcut_name)
        identity = x if shortcut is None else shortcut(x)
        return self.relu_out(self.branch(x) + identity)


class BasicBlock(ResidualBlock):
    """Two 3x3 conv-BN layers; the first carries the stride."""

    def __init__(self, in_ch: int, planes: int, stride: int = 1, shortcut_name: str = "downsample"):
        super().__init__()
        self.out_channels = planes
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self._add_shortcut(in_ch, stride, shortcut_name)

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_ch: int, planes: int, stride: int = 1, shortcut_name: str = "downsample"):
        super().__init__()
        self.out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, self.out_channels)
        self.bn3 = nn.BatchNorm2d(self.out_channels)
        self.relu = nn.ReLU()
        self._add_shortcut(in_ch, stride, shortcut_name)

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """3x3 stem (stride 1) + stages ``layer1..layerN`` (the first at stride 1, the others at 2),
    global average pool, linear classifier.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        stem_width: int,
        planes: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 100,
        shortcut_name: str = "downsample",
        head_name: str = "fc",
    ):
        super().__init__()
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        in_ch = stem_width
        self._stage_names = []
        for i, (width, depth) in enumerate(zip(planes, depths), start=1):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(block(in_ch, width, stride, shortcut_name))
                in_ch = blocks[-1].out_channels
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            self._stage_names.append(f"layer{i}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._head_name = head_name
        self.add_module(head_name, nn.Linear(in_ch, num_classes))
        init_weights(self)
        self.feature_spec = residual_stages(self, self._stage_names, last_bn=block.last_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self._stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return getattr(self, self._head_name)(x)


def cifar_resnet(depth: int, widths: Sequence[int], num_classes: int = 100, **kw) -> ResNet:
    """``widths`` = (stem, stage1, stage2, stage3); depth = 6n + 2 with n blocks per stage."""
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet with basic blocks has depth 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, widths[0], widths[1:], [n] * 3, num_classes=num_classes, **kw)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(8, _NARROW, num_classes, **kw)


@register_model("resnet14")
def resnet14(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(14, _NARROW, num_classes, **kw)


@register_model("resnet20")
def resnet20(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(20, _NARROW, num_classes, **kw)


@register_model("resnet32")
def resnet32(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(32, _NARROW, num_classes, **kw)


@register_model("resnet44")
def resnet44(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(44, _NARROW, num_classes, **kw)


@register_model("resnet56")
def resnet56(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(56, _NARROW, num_classes, **kw)


@register_model("resnet110")
def resnet110(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(110, _NARROW, num_classes, **kw)


@register_model("resnet8x4")
def resnet8x4(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(8, _WIDE, num_classes, **kw)


@register_model("resnet32x4")
def resnet32x4(num_classes=100, **kw) -> nn.Module:
    return cifar_resnet(32, _WIDE, num_classes, **kw)
