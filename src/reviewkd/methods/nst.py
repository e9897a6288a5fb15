"""Huang & Wang, 2017: "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".

Features: every stage output (post-activation, shallow -> deep; the pooled entry is not used). In
one stage, each channel's spatial map is a sample of the network's "neuron selectivity"
distribution: it is flattened over the H x W positions and L2-normalised. The loss is the squared
maximum mean discrepancy between the teacher's C_t maps and the student's C_s maps of the same
image with the polynomial kernel ``k(x, y) = (x.y + c)^d``, d = 2, c = 0:

    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i),

averaged over the batch and summed over stages (the teacher term is a constant, kept so the value is
the MMD itself). Channel counts may differ; where the spatial sizes differ, the larger feature is
average-pooled to the smaller size first.

Defaults: polynomial kernel d = 2, c = 0 (the paper's choice), ``weight = 50`` on the sum over
stages, cross-entropy weight 1, no KD term -- the CIFAR-100 benchmark recipe (RepDistiller / CRD
``NSTLoss`` and mdistiller ``NST``). Stages are paired one to one from the shallow end, as the
benchmark does; when one network has more stages its deepest extra stages are not used (pick
stages with the Distiller's ``student_stages`` / ``teacher_stages`` otherwise). The loss is per
sample, so under DistributedDataParallel each rank's loss uses its own batch and nothing needs
gathering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import float32, match_spatial, require_stage_maps
from .base import DistillMethod, Reads, RunContext, Step, register_method


def poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """N x Ca x D, N x Cb x D -> N x Ca x Cb of (a_i . b_j + c)^degree."""
    return (a @ b.transpose(1, 2) + c).pow(degree)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One stage: squared MMD between the normalised channel maps, averaged over the batch."""
    with float32(f_s):
        f_s, f_t = match_spatial(f_s.float(), f_t.float())
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        return poly_kernel(t, t).mean() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


@register_method
class NST(DistillMethod):
    name = "nst"
    paper = "Huang, Wang, 2017: Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 50.0):
        super().__init__()
        self.weight = float(weight)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        require_stage_maps(probe, self.name)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        pairs = zip(step.student_features[:-1], step.teacher_features[:-1])
        return {"nst": self.weight * sum(nst_loss(f_s, f_t) for f_s, f_t in pairs)}
