"""Park, Kim, Lu, Cho, CVPR 2019: "Relational Knowledge Distillation".

Features: the globally pooled feature of each network (flattened to b x C; the dimensions may
differ). Two relational potentials over the b samples of a batch, each compared with the Huber loss
(``smooth_l1``, delta = 1, mean over all entries):

* distance: the b x b Euclidean distances, each divided by the mean of the off-diagonal (positive)
  distances of its network, ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu``;
* angle: for every triplet, the cosine of the angle at vertex ``i`` between ``t_j - t_i`` and
  ``t_k - t_i`` (unit vectors), ``psi_A(t_i, t_j, t_k) = <e_ij, e_ik>``; as in the authors' code
  the mean runs over all b^3 triplets, the degenerate ones (j = i or k = i) having cosine 0 on
  both sides.

Defaults: ``distance_weight = 25`` and ``angle_weight = 50`` (the paper and its code), overall
``weight = 1``, cross-entropy weight 1, no KD term, as in the CIFAR-100 benchmark (RepDistiller /
CRD ``RKDLoss`` and mdistiller ``RKD``, which apply it to the pooled features). Distances are
computed from ``|x|^2 + |y|^2 - 2 x.y`` clamped at 1e-12 before the square root, as there.

Both potentials are batch-level statistics: under DistributedDataParallel they are computed from
each rank's own batch, not from the gathered global batch. Needs a batch of at least 2 samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import float32
from .base import DistillMethod, Reads, Step, register_method


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """b x d -> b x b Euclidean distances with a zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def distance_potential(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    d = pairwise_distances(e, eps)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum()
    return d / mean


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """b x d -> b x b x b: [i, j, k] = cosine between e_j - e_i and e_k - e_i (0 if degenerate)."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [i, j] = unit(e_j - e_i)
    return unit @ unit.transpose(1, 2)


def rkd_losses(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance loss, angle loss), both unweighted."""
    with float32(f_s):
        s, t = f_s.float().flatten(1), f_t.float().flatten(1)
        loss_d = F.smooth_l1_loss(distance_potential(s, eps), distance_potential(t, eps).detach())
        loss_a = F.smooth_l1_loss(angle_potential(s), angle_potential(t).detach())
        return loss_d, loss_a


@register_method
class RKD(DistillMethod):
    name = "rkd"
    paper = "Park, Kim, Lu, Cho, CVPR 2019: Relational Knowledge Distillation"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.weight = float(weight)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        loss_d, loss_a = rkd_losses(step.student_features[-1], step.teacher_features[-1])
        return {
            "rkd_distance": self.weight * self.distance_weight * loss_d,
            "rkd_angle": self.weight * self.angle_weight * loss_a,
        }
