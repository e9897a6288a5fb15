"""Romero, Ballas, Kahou, Chassang, Gatta, Bengio, ICLR 2015: "FitNets: Hints for Thin Deep Nets".

Features: one middle stage ("hint" on the teacher side, "guided layer" on the student side),
post-activation. A convolutional regressor maps the student's guided layer onto the teacher's hint
and the loss is the mean squared error between the regressed student feature and the hint.

Variant: the CIFAR-100 benchmark's (RepDistiller / CRD ``HintLoss`` + ``ConvReg``, mdistiller
``FitNet``), not the paper's two-stage schedule: hint and cross-entropy are trained together from the
start, with no separate hint pre-training stage and no KD term. Defaults from that benchmark:

* ``hint_stage = 2``: the second stage (1-based, shallow -> deep, stem not counted), which is the
  benchmark's ``hint_layer = 2`` (its feature lists put the stem at index 0); it counts among the
  stages the Distiller passes, i.e. after any ``student_stages`` / ``teacher_stages`` selection;
* regressor = one convolution chosen from the spatial sizes, then BatchNorm and ReLU: a 3x3 stride-2
  conv when the student map is twice the teacher's size, a 4x4 stride-2 transposed conv when it is
  half, otherwise a "valid" conv with kernel ``1 + H_s - H_t`` x ``1 + W_s - W_t`` (1x1 for equal sizes);
  a teacher map larger than the student's by another factor is refused;
* ``weight = 100`` on the MSE (mean over all elements), cross-entropy weight 1.

The regressor's BatchNorm normalises over the batch: under DistributedDataParallel it uses each
rank's own batch (convert it to SyncBatchNorm for gathered statistics); the loss itself is per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import float32, resize_conv
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method


class HintRegressor(nn.Module):
    """conv (chosen from the two spatial sizes) -> BatchNorm -> ReLU, student shape -> teacher shape."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        (_, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        self.conv = resize_conv(s_shape, t_shape)
        if self.conv is None:
            raise IncompatiblePairError(
                f"student hint map {s_h}x{s_w} is smaller than the teacher's {t_h}x{t_w} by a factor other "
                "than 2: choose another hint_stage (or stages) whose sizes are equal, halved or doubled"
            )
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@register_method
class FitNet(DistillMethod):
    name = "fitnet"
    paper = "Romero et al., ICLR 2015: FitNets: Hints for Thin Deep Nets"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 100.0, hint_stage: int = 2):
        super().__init__()
        self.weight, self.hint_stage = float(weight), int(hint_stage)
        self.regressor: HintRegressor | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        n_s, n_t = len(probe.student_features) - 1, len(probe.teacher_features) - 1
        if not 1 <= self.hint_stage <= min(n_s, n_t):
            raise IncompatiblePairError(
                f"hint_stage={self.hint_stage}, but {probe.student_name} has {n_s} stages and "
                f"{probe.teacher_name} has {n_t}: choose hint_stage in 1..{min(n_s, n_t)}"
            )
        i = self.hint_stage - 1
        s_shape = tuple(probe.student_features[i].shape[1:])
        t_shape = tuple(probe.teacher_features[i].shape[1:])
        self.regressor = HintRegressor(s_shape, t_shape)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        i = self.hint_stage - 1
        regressed = self.regressor(step.student_features[i])
        with float32(regressed):
            loss = F.mse_loss(regressed.float(), step.teacher_features[i].float())
        return {"fitnet": self.weight * loss}
