"""Building blocks shared by the CIFAR zoo: convolutions, channel shuffle, init, feature specs."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, groups=groups, bias=False)


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """``Sequential(conv, bn, relu)``: state-dict keys ``0.weight`` and ``1.*``."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU())


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut of a residual block, or None where the identity fits."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class ChannelShuffle(nn.Module):
    """Interleave channel groups: (N, g*k, H, W) -> view (N, g, k) -> transpose -> (N, k*g, H, W)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


LinearInit = Literal["default", "zero_bias", "small_normal"]


@torch.no_grad()
def init_weights(model: nn.Module, linear: LinearInit = "default") -> None:
    """He-normal convs (std sqrt(2 / (k*k*out_channels))), zero conv biases, BN weight 1 / bias 0.

    ``linear``: keep PyTorch's default Linear init, zero only its bias, or draw its weight from
    N(0, 0.01) with a zero bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "small_normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def residual_stages(
    model: nn.Module, layers: Sequence[str], pooled: str = "avgpool", last_bn: str | None = None
) -> FeatureSpec:
    """Spec for nets whose stages are ``nn.Sequential``s of blocks ending in a ``relu_out`` module.

    post = the stage output; pre = the input of the last block's ``relu_out`` (its pre-activation);
    ``last_bn``, if given, names the last block's BatchNorm that ends its residual branch.
    """
    stages = []
    for name in layers:
        last = len(getattr(model, name)) - 1
        bn = f"{name}.{last}.{last_bn}" if last_bn else None
        stages.append(Stage(post=Tap(name), pre=Tap(f"{name}.{last}.relu_out", "input"), bn=bn))
    return FeatureSpec(tuple(stages), Tap(pooled))
