"""ShuffleNet V1 (Zhang et al. 2018) for 32x32 inputs, 3 groups: "ShuffleV1".

A 1x1 stem to 24 channels (stride 1), then three stages (240/480/960 channels at 16/8/4 for a
32x32 input) of 4/8/4 units. The first unit of a stage halves the resolution and concatenates an
average-pooled copy of its input to the branch output; the others add the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .common import ChannelShuffle, conv1x1, conv3x3, residual_stages


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - 3x3 depthwise (strided) - grouped 1x1, merged with the shortcut by
    concatenation (stride 2) or addition; ``relu_out`` activates the merged tensor."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        self.stride = stride
        mid = out_ch // 4
        self.conv1 = conv1x1(in_ch, mid, groups=first_groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = conv3x3(mid, mid, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_ch, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu_out(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, stage_channels=(240, 480, 960), stage_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        stem = 24
        self.conv1 = conv1x1(3, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        in_ch = stem
        for i, (channels, n) in enumerate(zip(stage_channels, stage_blocks), start=1):
            units = []
            for j in range(n):
                # the first unit concatenates its input, so its branch makes the remaining channels;
                # the unit reading the stem uses an ungrouped first 1x1 conv (24 channels)
                branch_out = channels - in_ch if j == 0 else channels
                first_groups = 1 if in_ch == stem else groups
                units.append(ShuffleUnit(in_ch, branch_out, 2 if j == 0 else 1, groups, first_groups))
                in_ch = channels
            self.add_module(f"layer{i}", nn.Sequential(*units))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes)
        self.feature_spec = residual_stages(self, ["layer1", "layer2", "layer3"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ShuffleV1")
def shufflev1(num_classes=100, **kw) -> nn.Module:
    return ShuffleNetV1(num_classes=num_classes, **kw)
