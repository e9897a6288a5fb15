"""ImageNet-depth ResNets adapted to 32x32 inputs: 3x3 stride-1 stem, no max pool, four stages
(64/128/256/512 planes at 32/16/8/4 for a 32x32 input)."""
from __future__ import annotations

from torch import nn

from ..registry import register_model
from .resnet import BasicBlock, Bottleneck, ResNet

_PLANES = (64, 128, 256, 512)


def _resnet(block, depths, num_classes, **kw) -> ResNet:
    return ResNet(
        block, 64, _PLANES, depths, num_classes=num_classes, shortcut_name="shortcut", head_name="linear", **kw
    )


@register_model("ResNet18")
def resnet18(num_classes=100, **kw) -> nn.Module:
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, **kw)


@register_model("ResNet50")
def resnet50(num_classes=100, **kw) -> nn.Module:
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, **kw)
