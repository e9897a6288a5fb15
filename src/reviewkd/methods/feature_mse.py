"""FitNet-style hints on every level (Romero et al., ICLR 2015, applied level by level).

Each student level is mapped onto the teacher level it is paired with by its own 1x1 convolution
(with bias; no normalisation or activation, so it can reach features of any sign, such as FPN
outputs), and the loss is the mean squared error between the mapped student feature and the
teacher feature, averaged over the levels and multiplied by ``weight``. Where the sizes of a pair
differ, the larger map is average-pooled to the smaller size.

Levels are paired one to one and must be as many on both sides. In detection these are the FPN
levels (all 256 channels, same sizes, because both networks see the same batched images); in
classification they are the stage outputs followed by the pooled feature (``levels`` selects
some, 1-based, shallow -> deep).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import choose_stages, float32, match_spatial
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method


@register_method
class FeatureMSE(DistillMethod):
    name = "feature_mse"
    paper = "Romero et al., ICLR 2015 (FitNets): hints with a 1x1 regressor on every level"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'detection', 'regression'))

    def __init__(self, weight: float = 1.0, levels: Sequence[int] | None = None):
        super().__init__()
        self.weight = float(weight)
        self.levels = None if levels is None else [int(v) for v in levels]
        self.regressors: nn.ModuleList | None = None

    def _pick(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return features if self.levels is None else [features[i - 1] for i in self.levels]

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        s, t = probe.student_features, probe.teacher_features
        if len(s) != len(t):
            raise IncompatiblePairError(
                f"{probe.student_name} gives {len(s)} levels and {probe.teacher_name} {len(t)}: feature_mse "
                f"pairs them one to one; in classification (stages plus the pooled feature) "
                f"{choose_stages(len(s) - 1, len(t) - 1)}"
            )
        if self.levels is not None and not all(1 <= i <= len(s) for i in self.levels):
            raise IncompatiblePairError(f"levels={self.levels}: choose levels in 1..{len(s)}")
        s, t = self._pick(s), self._pick(t)
        self.regressors = nn.ModuleList(nn.Conv2d(a.shape[1], b.shape[1], kernel_size=1) for a, b in zip(s, t))

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        s, t = self._pick(step.student_features), self._pick(step.teacher_features)
        total = 0.0
        for reg, f_s, f_t in zip(self.regressors, s, t):
            mapped, f_t = match_spatial(reg(f_s), f_t)
            with float32(mapped):
                total = total + F.mse_loss(mapped.float(), f_t.float())
        return {"feature_mse": self.weight * total / len(s)}
