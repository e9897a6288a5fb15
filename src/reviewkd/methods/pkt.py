"""Passalis & Tefas, ECCV 2018: "Learning Deep Representations with Probabilistic Knowledge
Transfer".

Features: the globally pooled feature of each network (flattened to b x C; the dimensions may
differ). Each network's features are turned into conditional probabilities between the samples of
the batch with the cosine-similarity kernel: ``K(x, y) = (1 + cos(x, y)) / 2`` (rows divided by
their norm plus ``eps``), ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` (each row of the b x b
kernel matrix, diagonal included, normalised to sum to one). The loss is the KL divergence between the teacher's and
the student's conditional distributions, written as the authors' code does:
``mean_{i,j} p^t_{ij} log((p^t_{ij} + eps) / (p^s_{ij} + eps))`` (a mean over all b^2 entries).

Defaults: ``eps = 1e-7`` (the authors' code), ``weight = 30000``, cross-entropy weight 1, no KD term
-- the CIFAR-100 benchmark recipe (RepDistiller / CRD ``PKT``, taken from the authors' code, and
mdistiller ``PKT``, both on the pooled features).

The conditional probabilities are batch-level statistics: under DistributedDataParallel they are
computed from each rank's own batch, not from the gathered global batch.
"""
from __future__ import annotations

import torch

from ._common import float32
from .base import DistillMethod, Reads, Step, register_method


def cosine_conditional_probabilities(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """b x d -> b x b: (1 + cosine similarity) / 2, each row normalised to sum to one."""
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    kernel = (f @ f.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    with float32(f_s):
        p_s = cosine_conditional_probabilities(f_s.float().flatten(1), eps)
        p_t = cosine_conditional_probabilities(f_t.float().flatten(1), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method
class PKT(DistillMethod):
    name = "pkt"
    paper = "Passalis, Tefas, ECCV 2018: Learning Deep Representations with Probabilistic Knowledge Transfer"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 30000.0, eps: float = 1e-7):
        super().__init__()
        self.weight, self.eps = float(weight), float(eps)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {"pkt": self.weight * pkt_loss(step.student_features[-1], step.teacher_features[-1], self.eps)}
