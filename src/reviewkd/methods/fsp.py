"""Yim, Joo, Bae, Kim, CVPR 2017: "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning".

The "flow of solution procedure" (FSP) between two layers is the Gram matrix of their feature
maps over spatial positions::

    G[i, j] = sum over (h, w) of F1[i, h, w] * F2[j, h, w] / (H * W)

(F1 the shallower map with C1 channels, F2 the deeper with C2, so G is C1 x C2). The student is
trained to reproduce the teacher's FSP matrices: for each pair of consecutive stages, the mean
squared difference of the matrices (averaged over batch and entries), summed over the pairs,
equal weights (paper; CIFAR-100 benchmark of RepDistiller/CRD).

Features: post-activation outputs of consecutive stages (the pooled feature is not used); where
the two maps of a pair differ in size the larger is average-pooled to the smaller (benchmark).
The matrices are computed in float32 with autocast off. The student and the teacher must have the
same number of stages and the same channels at every stage (otherwise their matrices differ in
shape): an IncompatiblePairError says how to pick such a pair.

Deviation: the benchmark's feature list starts with the stem output, giving one more matrix
(stem -> first stage); the feature taps here start at the first stage, so a 3-stage network gives
2 matrices (stage 1 -> 2, stage 2 -> 3).

Two stages, as in the paper and the benchmark code:

1. Pre-training (``pretrain_epochs=30``): the FSP loss alone trains the student's layers (the
   benchmark trains the student's feature modules; here all student parameters are handed over
   and the classifier gets no gradient from this loss). Fresh SGD (momentum 0.9, weight decay
   5e-4) at the run's base learning rate, constant (``Pretraining.lr = None``), student layers in
   train mode (``student_train=True``).
2. Distillation epochs: cross-entropy only. The benchmark script passes ``-b 50`` but its training
   loop sets the FSP term to zero, so ``weight=0.0`` by default; ``weight > 0`` keeps adding
   ``weight`` x FSP loss to the cross-entropy.

No batch-level statistics are involved, so DistributedDataParallel needs nothing special.
"""
from __future__ import annotations


import torch
from torch import nn

from ._common import float32, match_spatial, require_equal_stage_counts
from .base import DistillMethod, IncompatiblePairError, Pretraining, Reads, RunContext, Step, register_method


def fsp_matrix(shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """N x C_shallow x C_deep FSP matrices of two feature maps (float32)."""
    shallow, deep = match_spatial(shallow, deep)
    with float32(shallow):
        a, b = shallow.float().flatten(2), deep.float().flatten(2)
        return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive stage pairs of the mean squared difference of the FSP matrices."""
    total = 0.0
    for i in range(len(student) - 1):
        g_s = fsp_matrix(student[i], student[i + 1])
        g_t = fsp_matrix(teacher[i], teacher[i + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


@register_method
class FSP(DistillMethod):
    name = "fsp"
    paper = (
        "Yim, Joo, Bae, Kim, CVPR 2017: A Gift from Knowledge Distillation: Fast Optimization, "
        "Network Minimization and Transfer Learning"
    )
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))
    # Pre-training optimiser: None = the run's base learning rate (benchmark), constant.

    def __init__(self, weight: float = 0.0, pretrain_epochs: int = 30):
        super().__init__()
        self.weight = float(weight)
        self.pretraining = Pretraining(int(pretrain_epochs)) if pretrain_epochs > 0 else None
        self.num_stages = 0

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        n = require_equal_stage_counts(probe, "FSP")
        if n < 2:
            raise IncompatiblePairError(
                f"FSP needs at least two stages per network to form a matrix, got {n}: "
                "select two or more stages (student_stages/teacher_stages)"
            )
        cs = [f.shape[1] for f in probe.student_features[:n]]
        ct = [f.shape[1] for f in probe.teacher_features[:n]]
        if cs != ct:
            raise IncompatiblePairError(
                f"FSP compares C_i x C_(i+1) matrices, so every stage needs equal channels, but "
                f"{probe.student_name} has {cs} and {probe.teacher_name} has {ct}: pair networks of equal "
                "widths (e.g. resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2, resnet56 -> resnet20, "
                "vgg13 -> vgg8) or select stages whose channels match (student_stages/teacher_stages)"
            )
        self.num_stages = n

    def _loss(self, step: Step) -> torch.Tensor:
        n = self.num_stages
        return fsp_loss(step.student_features[:n], step.teacher_features[:n])

    def pretrain_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(student.parameters())

    def pretrain_losses(self, step: Step) -> dict[str, torch.Tensor]:
        return {"fsp": self._loss(step)}

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        return {"fsp": self.weight * self._loss(step)}
