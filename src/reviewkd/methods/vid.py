"""Ahn, Hu, Damianou, Lawrence, Dai, CVPR 2019: "Variational Information Distillation for Knowledge Transfer".

VID maximises a variational lower bound on the mutual information between teacher and student
features: the teacher feature ``t`` is modelled as a Gaussian whose mean ``mu(s)`` is regressed from
the student feature and whose variance is one learned value per teacher channel. The loss is the
negative log-likelihood, as the authors' released code computes it (the constant 0.5 log 2 pi left
out)::

    var_c = softplus(log_scale_c) + eps
    loss  = mean over (n, c, h, w) of 0.5 * ((mu(s) - t)^2 / var_c + log var_c)

summed over the paired stages and multiplied by ``weight``.

Features: post-activation outputs of every stage (not the stem, not the pooled feature), student
stage i with teacher stage i; where their spatial sizes differ the larger map is average-pooled to
the smaller one before the regressor. Regressor per stage: 1x1 conv (student -> mid channels), ReLU,
1x1 conv, ReLU, 1x1 conv (-> teacher channels), no biases; ``mid_channels=None`` takes the teacher's
channels as the released code and the CIFAR-100 benchmark do.

Defaults (CIFAR-100 benchmark of RepDistiller/CRD, same in mdistiller): ``weight=1.0`` with CE at
1.0 and no KD term, ``init_pred_var=5.0`` (the variance every channel starts from), ``eps=1e-5``.
The variance is learned (``log_scale`` is a parameter trained with the student, as in the released
code and RepDistiller; mdistiller keeps it in a plain list, which leaves it fixed at 5.0).
No batch-level statistics are involved, so DistributedDataParallel needs nothing special.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import match_spatial, require_equal_stage_counts
from .base import DistillMethod, Reads, RunContext, Step, register_method


def vid_nll(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gaussian negative log-likelihood of ``target`` (N x C x H x W), per-channel variance, in float32."""
    var = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
    diff = pred_mean.float() - target.float()
    return 0.5 * (diff.pow(2) / var + var.log()).mean()


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


@register_method
class VID(DistillMethod):
    name = "vid"
    paper = "Ahn, Hu, Damianou, Lawrence, Dai, CVPR 2019: Variational Information Distillation for Knowledge Transfer"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5, mid_channels: int | None = None):
        super().__init__()
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var must exceed eps={eps}, got {init_pred_var}")
        self.weight, self.init_pred_var, self.eps = float(weight), float(init_pred_var), float(eps)
        self.mid_channels = mid_channels
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        n = require_equal_stage_counts(probe, "VID")
        # softplus(log_scale) + eps == init_pred_var at the start
        start = math.log(math.expm1(self.init_pred_var - self.eps))
        for s, t in zip(probe.student_features[:n], probe.teacher_features[:n]):
            cs, ct = s.shape[1], t.shape[1]
            mid = self.mid_channels or ct
            self.regressors.append(
                nn.Sequential(_conv1x1(cs, mid), nn.ReLU(), _conv1x1(mid, mid), nn.ReLU(), _conv1x1(mid, ct))
            )
            self.log_scales.append(nn.Parameter(torch.full((ct,), start)))

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        total = 0.0
        for i, regressor in enumerate(self.regressors):
            s, t = match_spatial(step.student_features[i], step.teacher_features[i])
            total = total + vid_nll(regressor(s), t, self.log_scales[i], self.eps)
        return {"vid": self.weight * total}
