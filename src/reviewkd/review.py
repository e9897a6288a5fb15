"""The review mechanism of "Distilling Knowledge via Knowledge Review" (Chen et al., CVPR 2021).

Student features are fused from deep to shallow by attention based fusion (ABF) blocks; each fused
output is compared with the teacher feature of its level by the hierarchical context loss (HCL).
Parameter names follow the released code (``abfs.0`` is the deepest entry) so its checkpoints load.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _size(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])


class ABF(nn.Module):
    """Attention based fusion of one student entry with the residual coming from the deeper entry."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        # Two 1-channel attention maps: one weighs this entry, the other the deeper residual.
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size: tuple[int, int] | None = None):
        x = self.conv1(x)
        if self.att_conv is not None:
            x = self._fuse(x, residual)
        if out_size is not None and _size(x) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x

    def _fuse(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """z = sigmoid(att_conv([x, up(residual)])); x * z[:, 0] + up(residual) * z[:, 1].

        The same arithmetic as the released block up to float rounding, in fewer passes over memory:
        the 1x1 attention convolution is split into its x and residual halves (no concatenated copy),
        and the residual half runs at the residual's own resolution before the nearest upsampling
        (a 1x1 convolution commutes with it exactly).
        """
        conv = self.att_conv[0]
        channels, size = x.shape[1], _size(x)
        logits_residual = F.conv2d(residual, conv.weight[:, channels:], conv.bias)
        if _size(residual) != size:
            residual = F.interpolate(residual, size=size, mode="nearest")
            logits_residual = F.interpolate(logits_residual, size=size, mode="nearest")
        z = torch.sigmoid(F.conv2d(x, conv.weight[:, :channels]) + logits_residual)
        return torch.addcmul(x * z[:, 0:1], residual, z[:, 1:2])


class ReviewFusion(nn.Module):
    """The deep-to-shallow ABF chain.

    ``student_channels`` / ``teacher_channels`` / ``teacher_sizes`` are given shallow -> deep (the last
    entry is the pooled 1x1 feature). ``forward`` takes student features in the same order and
    returns fused features shallow -> deep, each shaped like the teacher entry of its level.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        teacher_sizes: Sequence[tuple[int, int]],
        mid_channels: int | None = None,
    ):
        super().__init__()
        n = len(student_channels)
        if not (n == len(teacher_channels) == len(teacher_sizes)) or n < 1:
            raise ValueError(
                f"student has {len(student_channels)} entries, teacher {len(teacher_channels)}: they must match"
            )
        self.mid_channels = int(mid_channels or min(512, student_channels[-1]))
        self.teacher_sizes = [tuple(int(v) for v in s) for s in teacher_sizes]
        # abfs.0 is the deepest entry and is the only one without fusion (nothing deeper to fuse).
        self.abfs = nn.ModuleList(
            ABF(student_channels[i], self.mid_channels, teacher_channels[i], fuse=i < n - 1)
            for i in reversed(range(n))
        )

    def forward(
        self, student_features: Sequence[torch.Tensor], out_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """``out_sizes`` (shallow -> deep) overrides the teacher sizes given at construction, for
        inputs whose size changes from batch to batch (detection: the sizes of this batch's
        teacher features)."""
        if len(student_features) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} student features, got {len(student_features)}")
        deep_first = list(reversed(student_features))
        sizes = [tuple(int(v) for v in s) for s in (self.teacher_sizes if out_sizes is None else out_sizes)]
        if len(sizes) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} output sizes, got {len(sizes)}")
        sizes = list(reversed(sizes))
        outputs, residual = [], None
        for abf, feature, size in zip(self.abfs, deep_first, sizes):
            out, residual = abf(feature, residual, size)
            outputs.append(out)
        return outputs[::-1]


HCL_LEVELS = (4, 2, 1)


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over entries.

    Per pair of height h: MSE at full resolution with weight 1, plus MSE after adaptive average
    pooling to LxL for L in 4, 2, 1 (only where L < h) with weights 1/2, 1/4, 1/8 (halving per level
    used), normalised by the sum of the weights used.
    """
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        levels = [level for level in HCL_LEVELS if level < s.shape[-2]]
        loss = F.mse_loss(s, t)
        weight, weight_sum = 1.0, 1.0
        for pooled_s, pooled_t in zip(pooled_pyramid(s, levels), pooled_pyramid(t, levels)):
            weight /= 2.0
            loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
            weight_sum += weight
        total = total + loss / weight_sum
    return total


def pooled_pyramid(x: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
    """``adaptive_avg_pool2d(x, L)`` for each L of ``levels`` (largest first), reading the full map once
    where the bins allow: when x divides evenly into L x L blocks, a coarser level dividing L is pooled
    from those block means (a mean of equal-sized block means is the block mean; equal up to float
    rounding), so the backward pass also writes one full-resolution gradient instead of one per level.
    """
    height, width = x.shape[-2:]
    source, pooled_maps = x, []
    for level in levels:
        if source is not x and source.shape[-1] % level:
            source = x
        pooled = F.adaptive_avg_pool2d(source, level)
        pooled_maps.append(pooled)
        if height % level == 0 and width % level == 0:
            source = pooled
    return pooled_maps
