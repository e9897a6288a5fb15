"""VGG with BatchNorm for 32x32 inputs (no fully connected stack): vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks (64/128/256/512/512 channels); ``block0`` is the stem and ``block1..block4`` are
the four stages. Each block is ``Sequential(conv, bn, relu, ..., conv, bn)``: its final ReLU is the
separate module ``relu{i}``, so a block's output is the stage's pre-activation. Max pools follow
blocks 0-2; the pool after block 3 is applied only to 64x64 inputs, so at 32x32 the last two
stages both run at 4x4.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from ..registry import register_model
from .common import conv3x3, init_weights


def _block(widths: Sequence[int], in_ch: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [conv3x3(in_ch, w, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        in_ch = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(widths, in_ch))
            self.add_module(f"relu{i}", nn.ReLU())
            in_ch = widths[-1]
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self, linear="small_normal")
        # stage i: pre = the output of block i (it ends with a BatchNorm), post = relu{i} of it
        last_bn = {i: f"block{i}.{len(getattr(self, f'block{i}')) - 1}" for i in range(1, 5)}
        self.feature_spec = FeatureSpec(
            tuple(Stage(post=Tap(f"relu{i}"), pre=Tap(f"block{i}"), bn=last_bn[i]) for i in range(1, 5)),
            pooled=Tap("avgpool"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if size == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


@register_model("vgg8")
def vgg8(num_classes=100, **kw) -> nn.Module:
    return VGG(_CFGS["vgg8"], num_classes, **kw)


@register_model("vgg11")
def vgg11(num_classes=100, **kw) -> nn.Module:
    return VGG(_CFGS["vgg11"], num_classes, **kw)


@register_model("vgg13")
def vgg13(num_classes=100, **kw) -> nn.Module:
    return VGG(_CFGS["vgg13"], num_classes, **kw)


@register_model("vgg16")
def vgg16(num_classes=100, **kw) -> nn.Module:
    return VGG(_CFGS["vgg16"], num_classes, **kw)


@register_model("vgg19")
def vgg19(num_classes=100, **kw) -> nn.Module:
    return VGG(_CFGS["vgg19"], num_classes, **kw)
