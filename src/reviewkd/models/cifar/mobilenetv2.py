"""MobileNetV2 (Sandler et al. 2018) at half width for 32x32 inputs, as used in CIFAR-100
distillation benchmarks ("MobileNetV2" there means expansion 6, width multiplier 0.5).

Stem: 3x3 stride-2 conv to 16 channels. Seven groups of inverted residual blocks
(8/12/16/32/48/80/160 channels, strides 1/1/2/2/1/2/1), a 1x1 conv to 1280 channels, global pool,
linear classifier. The four stages are the outputs of groups 1, 2, 4 and 6 (12/16/48/160 channels
at 16/8/4/2 for a 32x32 input). Blocks end with a linear projection (no activation), so a
stage's pre-activation is its output.
"""
from __future__ import annotations

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from ..registry import register_model
from .common import conv1x1, conv3x3, conv_bn_relu, init_weights

# (expansion, output channels, blocks, first stride) at full width
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
_STAGE_GROUPS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise (strided) - BN - ReLU - 1x1 project - BN, with an
    identity shortcut when the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            conv1x1(in_ch, hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            conv3x3(hidden, hidden, stride, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            conv1x1(hidden, out_ch),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, last_channels: int = 1280):
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, in_ch, 3, stride=2)
        groups = []
        for t, c, n, s in _SETTINGS:
            out_ch = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last = int(last_channels * width_mult) if width_mult > 1.0 else last_channels
        self.conv2 = conv_bn_relu(in_ch, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_weights(self, linear="small_normal")
        # blocks end with BN (no activation): pre = post; bn = the last block's final BatchNorm
        last_bn = {g: f"blocks.{g}.{len(self.blocks[g]) - 1}.conv.7" for g in _STAGE_GROUPS}
        self.feature_spec = FeatureSpec(
            tuple(Stage(post=Tap(f"blocks.{g}"), pre=Tap(f"blocks.{g}"), bn=last_bn[g]) for g in _STAGE_GROUPS),
            pooled=Tap("avgpool"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("MobileNetV2")
def mobilenetv2(num_classes=100, **kw) -> nn.Module:
    return MobileNetV2(num_classes, **kw)
