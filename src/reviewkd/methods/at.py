"""Zagoruyko & Komodakis, ICLR 2017: "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer".

Features: every stage output (post-activation, shallow -> deep; the pooled entry is not used).
The activation-based attention map of a stage is ``Q = mean_c |A_c|^p`` (p = 2), flattened over
the spatial positions and L2-normalised per sample; the loss of one stage is the mean over batch
and positions of ``(Q_s / ||Q_s|| - Q_t / ||Q_t||)^2``, summed over stages. Where the two maps
differ in size, the larger feature is average-pooled to the smaller size first.

Defaults follow the CIFAR-100 benchmark (RepDistiller / CRD ``Attention`` and mdistiller ``AT``):
p = 2, ``weight = 1000`` on the sum over stages, cross-entropy weight 1, no KD term. The authors'
code uses the same squared-difference mean with beta = 1000 and a further factor 1/2 (an effective
500); the benchmark's 1000 is kept. The paper uses ``|A|^p`` while the benchmark squares the signed
activation; for p = 2 they coincide.

Stages are paired one to one from the shallow end, as the benchmark does; when one network has
more stages, its deepest extra stages are not used (pick stages with the Distiller's
``student_stages`` / ``teacher_stages`` to pair them otherwise). The loss is per sample, so under
DistributedDataParallel each rank's loss uses its own batch and nothing needs gathering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import float32, match_spatial, require_stage_maps
from .base import DistillMethod, Reads, RunContext, Step, register_method


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """N x C x H x W -> N x HW: channel mean of |f|^p, L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One stage: mean squared difference of the normalised attention maps."""
    with float32(f_s):
        f_s, f_t = match_spatial(f_s.float(), f_t.float())
        return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method
class AT(DistillMethod):
    name = "at"
    paper = "Zagoruyko, Komodakis, ICLR 2017: Paying More Attention to Attention (attention transfer)"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 1000.0, p: float = 2.0):
        super().__init__()
        self.weight, self.p = float(weight), float(p)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        require_stage_maps(probe, self.name)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        pairs = zip(step.student_features[:-1], step.teacher_features[:-1])
        return {"at": self.weight * sum(at_loss(f_s, f_t, self.p) for f_s, f_t in pairs)}
