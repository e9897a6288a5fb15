"""GoogLeNet (Szegedy et al. 2015) for 32x32 inputs, as the FFSD paper's CIFAR-100 rows use it.

A 3x3 stem (192 channels, stride 1) replaces the ImageNet stem; then inception modules a3, b3,
a 3x3/2 max-pool, a4 ... e4, a 3x3/2 max-pool, a5, b5, global average pooling and a linear
classifier (32x32 -> 16x16 -> 8x8). Each inception module concatenates four branches: 1x1;
1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (the 5x5 of the paper as two 3x3 convolutions); 3x3 max-pool ->
1x1; every convolution is followed by BatchNorm and ReLU and has a bias. Widths are the paper's
(Table 1), so the stage outputs have 480 (b3), 832 (e4) and 1024 (b5) channels. Convolution
weights are He-normal (std sqrt(2 / (k*k*out_channels))), their biases and the classifier keep
PyTorch's default, BatchNorms start at weight 1 / bias 0, as the FFSD code initialises them.
Parameter names follow that code (``pre_layers``, ``inception_b3.branch3x3.3``, ``linear``).

Stages: the last module of each resolution, b3 (480 x 32 x 32), e4 (832 x 16 x 16) and b5
(1024 x 8 x 8). A module's output concatenates four ReLU outputs, so it has no single
pre-activation tensor: ``pre`` is the same tap as ``post``.
"""
from __future__ import annotations

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from ..registry import register_model


def _conv_bn_relu(*convs: tuple[int, int, int]) -> list[nn.Module]:
    """(in, out, kernel) per convolution -> [conv, BN, ReLU, conv, BN, ReLU, ...]."""
    layers: list[nn.Module] = []
    for in_ch, out_ch, k in convs:
        layers += [nn.Conv2d(in_ch, out_ch, k, padding=k // 2), nn.BatchNorm2d(out_ch), nn.ReLU()]
    return layers


class Inception(nn.Module):
    def __init__(self, in_ch: int, n1x1: int, n3x3_reduce: int, n3x3: int, n5x5_reduce: int, n5x5: int, pool: int):
        super().__init__()
        self.out_channels = n1x1 + n3x3 + n5x5 + pool
        self.branch1x1 = nn.Sequential(*_conv_bn_relu((in_ch, n1x1, 1)))
        self.branch3x3 = nn.Sequential(*_conv_bn_relu((in_ch, n3x3_reduce, 1), (n3x3_reduce, n3x3, 3)))
        self.branch5x5 = nn.Sequential(*_conv_bn_relu((in_ch, n5x5_reduce, 1), (n5x5_reduce, n5x5, 3), (n5x5, n5x5, 3)))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu((in_ch, pool, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1)


# name: 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection (the paper's Table 1)
_MODULES = {
    "a3": (64, 96, 128, 16, 32, 32), "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64), "b4": (160, 112, 224, 24, 64, 64), "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64), "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128), "b5": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu((3, 192, 3)))
        width = 192
        for name, widths in _MODULES.items():
            module = Inception(width, *widths)
            self.add_module(f"inception_{name}", module)
            width = module.out_channels
            if name in ("b3", "e4"):  # the end of a resolution
                self.add_module("maxpool1" if name == "b3" else "maxpool2", nn.MaxPool2d(3, stride=2, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, num_classes)
        self._init()
        self.feature_spec = FeatureSpec(
            tuple(Stage(post=Tap(f"inception_{n}"), pre=Tap(f"inception_{n}")) for n in ("b3", "e4", "b5")),
            pooled=Tap("avgpool"),
        )

    @torch.no_grad()
    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # weights only: the biases keep PyTorch's default
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_layers(x)
        for name in _MODULES:
            x = getattr(self, f"inception_{name}")(x)
            if name == "b3":
                x = self.maxpool1(x)
            elif name == "e4":
                x = self.maxpool2(x)
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("googlenet")
def googlenet(num_classes=100, **kw) -> nn.Module:
    return GoogLeNet(num_classes, **kw)
