"""ShuffleNet V2 (Ma et al. 2018) at width 1x for 32x32 inputs: "ShuffleV2".

A 1x1 stem to 24 channels (stride 1), three stages (116/232/464 channels at 16/8/4 for a 32x32
input; a down-sampling unit then 3/7/3 basic units), a 1x1 conv to 1024 channels, global pool and
a linear classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .common import ChannelShuffle, conv1x1, conv3x3, residual_stages


class DownUnit(nn.Module):
    """Two strided branches on the full input, each producing half of the output channels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        # left: depthwise 3x3 (stride 2) - BN - 1x1 - BN - ReLU
        self.conv1 = conv3x3(in_ch, in_ch, 2, groups=in_ch)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = conv1x1(in_ch, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1 - BN - ReLU - depthwise 3x3 (stride 2) - BN - 1x1 - BN - ReLU
        self.conv3 = conv1x1(in_ch, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = conv3x3(mid, mid, 2, groups=mid)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class BasicUnit(nn.Module):
    """Channel split: the first half passes through, the second goes through 1x1 - BN - ReLU -
    depthwise 3x3 - BN - 1x1 - BN - ReLU; concatenate, then shuffle.

    The ReLU (``relu_out``) is applied to the concatenation ``[passthrough, branch]``, whose input is
    the unit's pre-activation. This equals activating the branch alone because every unit input in
    the network is a (shuffled) ReLU output, so the passthrough half is never negative.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        half = channels - self.split
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv3x3(half, half, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU()
        self.relu_out = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, branch = x[:, : self.split], x[:, self.split :]
        branch = self.relu(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        return self.shuffle(self.relu_out(torch.cat([keep, branch], 1)))


class ShuffleNetV2(nn.Module):
    def __init__(
        self, stage_channels=(116, 232, 464), stage_blocks=(3, 7, 3), last_channels: int = 1024, num_classes: int = 100
    ):
        super().__init__()
        stem = 24
        self.conv1 = conv1x1(3, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        in_ch = stem
        for i, (channels, n) in enumerate(zip(stage_channels, stage_blocks), start=1):
            units = [DownUnit(in_ch, channels)] + [BasicUnit(channels) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            in_ch = channels
        self.conv2 = conv1x1(in_ch, last_channels)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last_channels, num_classes)
        self.feature_spec = residual_stages(self, ["layer1", "layer2", "layer3"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ShuffleV2")
def shufflev2(num_classes=100, **kw) -> nn.Module:
    return ShuffleNetV2(num_classes=num_classes, **kw)
