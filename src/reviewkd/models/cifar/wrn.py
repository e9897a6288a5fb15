"""Wide ResNets (Zagoruyko & Komodakis 2016) for 32x32 inputs: wrn_{depth}_{widen factor}.

Pre-activation blocks: BN-ReLU comes first, so a stage's output is a raw residual sum and the
activation that follows it is applied by the next stage's first block (or the final ``bn1``).
"""
from __future__ import annotations

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from ..registry import register_model
from .common import conv1x1, conv3x3, init_weights


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut: the identity when the width is kept, else a
    1x1 conv applied to the activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.convShortcut = None if in_ch == out_ch else conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideStage(nn.Module):
    def __init__(self, num_blocks: int, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, linear="zero_bias")
        # pre: the stage output after the BN that the following layer applies before its ReLU
        self.feature_spec = FeatureSpec(
            tuple(
                Stage(post=Tap(block), pre=Tap(bn), bn=bn)
                for block, bn in [("block1", "block2.layer.0.bn1"), ("block2", "block3.layer.0.bn1"), ("block3", "bn1")]
            ),
            pooled=Tap("avgpool"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn_16_1")
def wrn_16_1(num_classes=100, **kw) -> nn.Module:
    return WideResNet(16, 1, num_classes, **kw)


@register_model("wrn_16_2")
def wrn_16_2(num_classes=100, **kw) -> nn.Module:
    return WideResNet(16, 2, num_classes, **kw)


@register_model("wrn_40_1")
def wrn_40_1(num_classes=100, **kw) -> nn.Module:
    return WideResNet(40, 1, num_classes, **kw)


@register_model("wrn_40_2")
def wrn_40_2(num_classes=100, **kw) -> nn.Module:
    return WideResNet(40, 2, num_classes, **kw)
