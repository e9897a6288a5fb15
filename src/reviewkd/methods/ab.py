"""Heo, Lee, Yun, Choi, AAAI 2019: "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons".

AB transfers where the teacher's neurons switch on and off (the sign of each pre-activation) rather
than their values. The paper's differentiable surrogate, the "alternative" margin loss, on a
connected student pre-activation ``s`` and the teacher pre-activation ``t`` with margin ``m``::

    (s + m)^2  where t <= 0 and s > -m     (should be off: push below -m)
    (s - m)^2  where t > 0  and s <= m     (should be on: push above +m)

summed over all elements of a stage. As in the released code and the CIFAR-100 benchmark, stage i
of n (0 = shallowest) is weighted 2^(i - n + 1) (the deepest stage 1, halving towards the input),
each stage's sum is divided by the batch size, and the total is scaled by 3 / 1000.

Features: pre-activation outputs (before the final ReLU) of every stage of both networks, paired
one to one; not the stem, not the pooled feature. Connector per stage, as in the benchmark: none
when channels and size already match, else a convolution followed by BatchNorm: 3x3 stride 2 when
the student map is twice the teacher's, 4x4 stride 2 transposed when it is half, otherwise a
stride 1 convolution of kernel (1 + Hs - Ht) x (1 + Ws - Wt) (1x1 for equal sizes).

Two stages, following the CIFAR-100 benchmark code (RepDistiller/CRD) and the paper:

1. Pre-training (``pretrain_epochs=30``): the AB loss alone trains the connectors and the student's
   layers (the benchmark trains the student's feature modules, i.e. everything but the classifier;
   here all student parameters are handed over, and the classifier gets no gradient from this loss:
   the optimiser skips parameters without gradients). The benchmark uses a fresh SGD (momentum 0.9,
   weight decay 5e-4) at the run's base learning rate, constant, and the student's feature layers
   in train mode: ``Pretraining(epochs, lr=None, student_train=True)`` says so.
2. Distillation epochs: cross-entropy only. The benchmark script passes ``-b 1`` but its training
   loop sets the AB term to zero, so ``weight=0.0`` by default; ``weight > 0`` keeps adding the AB
   loss (with the connectors still training) to the cross-entropy.

Defaults: ``margin=1.0`` (paper, released code, benchmark), CE weight 1.0.
No batch-level statistics besides the connectors' BatchNorm (per-rank under DistributedDataParallel).
"""
from __future__ import annotations


import torch
from torch import nn

from ._common import require_equal_stage_counts, resize_conv
from .base import DistillMethod, IncompatiblePairError, Pretraining, Reads, RunContext, Step, register_method


def ab_stage_loss(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """The alternative margin loss of one stage, summed over all elements (float32)."""
    s = source.float()
    on = target > 0
    push_off = (s + margin).pow(2) * ((s > -margin) & ~on)
    push_on = (s - margin).pow(2) * ((s <= margin) & on)
    return (push_off + push_on).sum()


def ab_loss(sources: list[torch.Tensor], targets: list[torch.Tensor], margin: float) -> torch.Tensor:
    """Stage losses weighted 2^(i - n + 1), divided by the batch size, scaled by 3 / 1000, summed."""
    n, batch = len(sources), sources[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(sources, targets)):
        total = total + 2.0 ** (i - n + 1) * ab_stage_loss(s, t, margin)
    return total / batch * 3.0 / 1000.0


def _connector(s_shape: torch.Size, t_shape: torch.Size, where: str) -> nn.Module:
    (cs, hs, ws), (ct, ht, wt) = tuple(s_shape[1:]), tuple(t_shape[1:])
    if cs == ct and (hs, ws) == (ht, wt):
        return nn.Identity()
    conv = resize_conv((cs, hs, ws), (ct, ht, wt))
    if conv is None:
        raise IncompatiblePairError(
            f"AB's connector at {where} cannot map a {hs}x{ws} student map to a {ht}x{wt} teacher map "
            "(it upsamples by 2 at most): choose stages (student_stages/teacher_stages) whose sizes "
            "differ by a factor of 2 or less"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(ct))


@register_method
class AB(DistillMethod):
    name = "ab"
    paper = (
        "Heo, Lee, Yun, Choi, AAAI 2019: Knowledge Transfer via Distillation of Activation Boundaries "
        "Formed by Hidden Neurons"
    )
    reads = Reads(student_features="pre", teacher_features="pre", logits=False, tasks=('classification', 'regression'))
    # Pre-training optimiser: None = the run's base learning rate (benchmark), constant.

    def __init__(self, weight: float = 0.0, margin: float = 1.0, pretrain_epochs: int = 30):
        super().__init__()
        self.weight, self.margin = float(weight), float(margin)
        self.pretraining = Pretraining(int(pretrain_epochs)) if pretrain_epochs > 0 else None
        self.connectors = nn.ModuleList()

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        n = require_equal_stage_counts(probe, "AB")
        for i in range(n):
            where = f"stage {i + 1} ({probe.student_name} -> {probe.teacher_name})"
            self.connectors.append(
                _connector(probe.student_features[i].shape, probe.teacher_features[i].shape, where)
            )

    def _loss(self, step: Step) -> torch.Tensor:
        connected = [c(f) for c, f in zip(self.connectors, step.student_features)]
        return ab_loss(connected, step.teacher_features[: len(connected)], self.margin)

    def pretrain_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.connectors.parameters()) + list(student.parameters())

    def pretrain_losses(self, step: Step) -> dict[str, torch.Tensor]:
        return {"ab": self._loss(step)}

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        return {"ab": self.weight * self._loss(step)}
