"""FFSD's trainable modules besides the networks (shapes as in the authors' code, SJLeo/FFSD).

* :class:`FusionModule`: the ``m`` common students' deepest maps, concatenated (m*C channels) ->
  depthwise 3x3 conv -> BN -> ReLU -> 1x1 conv to C -> BN -> ReLU (the fused map) -> global average
  pool -> linear classifier. Returns (logits, fused map).
* :class:`TransFusion`: the leader's head on its own deepest map, depthwise 3x3 conv -> BN -> ReLU ->
  1x1 conv C -> m*C -> BN -> ReLU; used only in a loss, never for classification.
* :class:`SelfDistillationDecoder`: K-1 blocks of ConvTranspose2d(3, stride 2, padding 1,
  output_padding 1, no bias) -> BN -> ReLU, from the deepest map (C_K) up to the shallowest tap.
  Block k outputs tap k's channels: the code halves the channels block by block, or lists them for
  DenseNet-40 ([456, 312, 168]) and GoogLeNet ([1024, 832, 480]); both are the taps' channels for
  every network it trains, and reading them from the taps covers any other network. Each block
  doubles the spatial size, so the taps must halve in size from one to the next.

Convolutions of the first two are He-normal (std sqrt(2 / (k*k*out_channels))), BatchNorms weight 1 /
bias 0, the linear layer PyTorch's default; the decoders keep PyTorch's default initialisation, as
in the code.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models.cifar.common import init_weights


def _depthwise_then_pointwise(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class FusionModule(nn.Module):
    def __init__(self, channels: int, peers: int, num_classes: int):
        super().__init__()
        self.fuse = nn.Sequential(*_depthwise_then_pointwise(channels * peers, channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fuse(x)
        return self.classifier(torch.flatten(self.pool(fused), 1)), fused


class TransFusion(nn.Sequential):
    def __init__(self, channels: int, peers: int):
        super().__init__(*_depthwise_then_pointwise(channels, channels * peers))
        init_weights(self)


class SelfDistillationDecoder(nn.Module):
    """``channels``: the taps' channels, shallow to deep (the deepest is the input)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        widths = list(channels)[::-1]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1, bias=False),
                          nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The blocks' outputs, shallowest first (output k lines up with tap k)."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs[::-1]
