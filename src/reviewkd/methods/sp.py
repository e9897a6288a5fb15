"""Tung & Mori, ICCV 2019: "Similarity-Preserving Knowledge Distillation".

Features: the output of the last stage (post-activation, before global pooling). Each network's
feature of the b samples of a batch is flattened to b x (C*H*W) and turned into the b x b Gram matrix
``G = F F^T``; each row of G is L2-normalised, and the loss is
``||G_t - G_s||_F^2 / b^2``. Channel counts and spatial sizes may differ between the two networks:
only the b x b matrices are compared.

Defaults follow the CIFAR-100 benchmark (RepDistiller / CRD ``Similarity``, "verified by the
original author", and mdistiller ``SP``): the last stage only, ``weight = 3000``, cross-entropy
weight 1, no KD term.

The loss is a batch-level statistic: under DistributedDataParallel it is computed on each rank's own
batch (the per-rank b x b similarities), not on the gathered global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import float32, require_stage_maps
from .base import DistillMethod, Reads, RunContext, Step, register_method


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """b x ... -> b x b Gram matrix of the flattened features, each row L2-normalised."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    with float32(f_s):
        b = f_s.shape[0]
        diff = similarity_matrix(f_t.float()) - similarity_matrix(f_s.float())
        return diff.pow(2).sum() / (b * b)


@register_method
class SP(DistillMethod):
    name = "sp"
    paper = "Tung, Mori, ICCV 2019: Similarity-Preserving Knowledge Distillation"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))

    def __init__(self, weight: float = 3000.0):
        super().__init__()
        self.weight = float(weight)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        require_stage_maps(probe, self.name)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {"sp": self.weight * sp_loss(step.student_features[-2], step.teacher_features[-2])}
