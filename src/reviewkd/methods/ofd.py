"""Heo, Kim, Yun, Park, Kwak, Choi, ICCV 2019: "A Comprehensive Overhaul of Feature Distillation".

Features: every stage's pre-activation (before its final ReLU), on both sides; the pooled feature is
not used. When the two networks have different numbers of stages the deepest ones are paired (as
mdistiller's ``OFD``); ``student_stages`` / ``teacher_stages`` of the Distiller choose others.

* Teacher transform, the margin: the teacher's pre-activation ``x`` of a channel is modelled as
  Gaussian with the mean and standard deviation that its BatchNorm sets (``bias`` and ``|weight|``);
  values below zero are replaced by ``E[x | x < 0] = m - s * phi(m/s) / Phi(-m/s)``, or by ``-3 s``
  when ``Phi(-m/s) <= 0.001`` (the authors' rule). The BatchNorm is the one before the stage's
  final ReLU, named by ``Stage.bn`` in the teacher's feature spec; the margins are computed once in
  :meth:`OFD.setup` from the teacher's current weights (so load the teacher's weights before
  building the Distiller) and kept as buffers.
* Student transform, the connector: 1x1 conv (no bias) + BatchNorm to the teacher's channels,
  applied to the student's pre-activation (He-normal conv, BN weight 1 / bias 0).
* Distance, partial L2: with ``t' = max(t, margin)``, ``sum (s - t')^2`` over the elements where
  ``s > t'`` or ``t' > 0`` (no loss where the student is already below a non-positive target).
  A teacher map of another spatial size is average-pooled to the student's (mdistiller).

Loss, as the authors' CIFAR-100 code (clovaai/overhaul-distillation ``CIFAR-100/distiller.py`` and
``train_with_distillation.py``): stage ``i`` of ``n`` (1-based, shallow -> deep) is divided by
``2^(n - i)``, the sum is divided by the batch size, and the total is weighted by
``weight = 1e-3`` (their ``/ 1000``; mdistiller's CIFAR-100 feature weight 0.001), cross-entropy
weight 1.

Which BatchNorm each zoo family declares: in ResNets no BN comes right before the final ReLU (it
acts on a residual sum), so the BN ending the last block's residual branch stands for it, as in the
authors' code; WRN (pre-activation) uses the BN that the next block (or the
final ``bn1``) applies to the stage output, which is exactly the tapped pre-activation; VGG the
block's last BN; MobileNetV2 blocks end with a BN and no ReLU, and the BN ending the stage's last
block is used (mdistiller). Teachers without ``Stage.bn`` (the ShuffleNets, which neither reference
code supports as an OFD teacher) are refused with :class:`IncompatiblePairError`.

Teacher's BatchNorm mode, ``teacher_bn``: the authors train with the teacher in training mode
(``d_net.t_net.train()`` every epoch in ``train_with_distillation.py``; mdistiller's ``OFD.train``
does the same), so its BatchNorm layers normalise with the statistics of each batch, while its
parameters are not updated (only the student and the connectors are optimised, and the teacher's
features are detached). ``teacher_bn = "train"`` (default) does the same; ``"eval"`` uses the
teacher's running statistics, as every other method does. The authors' training-mode forward also
moves the teacher's running statistics, but nothing reads them afterwards: a training-mode forward
normalises with the batch's statistics, the margins come from the BatchNorm's affine parameters
(``weight``, ``bias``), which are fixed, and the teacher is evaluated only before training. So the
teacher's running statistics are left unchanged here (the teacher a user passes in stays as it
was), which gives the same losses and gradients. Only BatchNorm layers change mode (the zoo's
teachers have no other mode-dependent layer, e.g. no active dropout), and only while the recipe
trains: in eval mode (``distiller.eval()``) and in the probe pass the teacher uses its running
statistics. A training-mode BatchNorm needs more than one value per channel: batches of one sample
work as long as every BatchNorm of the teacher sees maps larger than 1 x 1.

The connector's BatchNorm, and with ``teacher_bn = "train"`` the teacher's, normalise over the batch:
under DistributedDataParallel they use each rank's own batch (convert the connectors to
SyncBatchNorm for gathered statistics); the loss is per sample.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from ..features import FeatureSpec, stage_batchnorms  # noqa: F401  (re-exported)
from ._common import match_spatial
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method


TEACHER_BN_MODES = ("train", "eval")


@torch.no_grad()
def bn_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per channel: E[x | x < 0] for x ~ N(bias, weight^2), or -3|weight| if P(x < 0) <= 0.001."""
    if bn.weight is None or bn.bias is None:
        raise IncompatiblePairError(f"OFD needs an affine BatchNorm for the teacher's margins, got {bn}")
    s = bn.weight.detach().float().abs().clamp_min(1e-12)
    m = bn.bias.detach().float()
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > 1e-3, m - s * pdf / cdf, -3 * s)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``sum (s - t')^2`` where ``s > t'`` or ``t' > 0``, with ``t' = max(t, margin)`` (summed over all)."""
    target = torch.maximum(teacher, margin)
    mask = (student > target) | (target > 0)
    return ((student - target) ** 2 * mask).sum()


def build_connector(s_channels: int, t_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


@register_method
class OFD(DistillMethod):
    """Margin ReLU on the teacher's pre-activations, a 1x1 conv + BN connector on the student's, and
    the partial L2 distance between them, summed over the stages (deeper stages weigh more)."""

    name = "ofd"
    paper = "Heo et al., ICCV 2019: A Comprehensive Overhaul of Feature Distillation"
    reads = Reads(student_features="pre", teacher_features="pre", logits=False, tasks=('classification', 'regression'),
                  teacher_bn="train")

    def __init__(self, weight: float = 1e-3, teacher_bn: str = "train"):
        super().__init__()
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"ofd: teacher_bn must be 'train' (batch statistics, the authors') or 'eval' "
                             f"(running statistics), got {teacher_bn!r}")
        self.weight = float(weight)
        self.reads = replace(type(self).reads, teacher_bn=teacher_bn)
        self.connectors = nn.ModuleList()
        self.num_stages = 0

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        s_feats, t_feats = probe.student_features[:-1], probe.teacher_features[:-1]
        bns: Sequence[nn.BatchNorm2d | None] | None = context.teacher_bn
        if bns is None or len(bns) != len(t_feats):
            raise IncompatiblePairError(
                "OFD needs the teacher's BatchNorm before each stage's final ReLU: the Distiller passes "
                "them as context 'teacher_bn' (one per teacher stage, from Stage.bn of its feature_spec)"
            )
        n = min(len(s_feats), len(t_feats))
        s_feats, t_feats, bns = s_feats[-n:], t_feats[-n:], list(bns)[-n:]
        missing = [len(probe.teacher_features) - 1 - n + i + 1 for i, bn in enumerate(bns) if bn is None]
        if missing:
            raise IncompatiblePairError(
                f"{probe.teacher_name} declares no BatchNorm before the final ReLU of stage(s) {missing}: "
                "declare Stage.bn in its feature_spec (OFD derives its margins from it)"
            )
        for i, (s, t, bn) in enumerate(zip(s_feats, t_feats, bns)):
            if bn.num_features != t.shape[1]:
                raise IncompatiblePairError(
                    f"Stage.bn of {probe.teacher_name}'s stage has {bn.num_features} channels but the stage "
                    f"gives {t.shape[1]}: Stage.bn must name the BatchNorm of that pre-activation"
                )
            self.connectors.append(build_connector(s.shape[1], t.shape[1]))
            self.register_buffer(f"margin{i}", bn_margin(bn).view(1, -1, 1, 1).to(t.device))
        self.num_stages = n

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        n = self.num_stages
        s_feats, t_feats = step.student_features[:-1][-n:], step.teacher_features[:-1][-n:]
        batch = step.student_features[0].shape[0]
        total = 0.0
        for i, (s, t) in enumerate(zip(s_feats, t_feats)):
            s, t = match_spatial(self.connectors[i](s), t, to="first")  # the teacher takes the student's size
            total = total + partial_l2(s.float(), t.float(), getattr(self, f"margin{i}")) / 2 ** (n - 1 - i)
        return {"ofd": self.weight * total / batch}
