"""Tian, Krishnan, Isola, ICLR 2020: "Contrastive Representation Distillation".

Features: the globally pooled feature of each network (the last entry of the feature list, N x C).
A linear embedding per side maps it to ``feat_dim`` = 128 and L2-normalises it. Two memory banks
over the training set (one of student embeddings, one of teacher embeddings, N x 128 each) supply
the negatives. The loss is the NCE objective of the paper (eq. 18), computed twice and summed:

* student-anchored: the student embedding of sample i against the teacher bank rows of i (the
  positive) and of ``nce_k`` negatives; gradients reach the student and its embedding;
* teacher-anchored: the teacher embedding against the student bank rows; gradients reach the
  teacher's embedding only (the teacher itself is frozen).

With ``P = exp(v . m / nce_t) / Z`` for a bank row ``m``, ``K`` negatives and the uniform noise
probability ``1/N``, one side's loss is ``-(1/B) sum_i [log P_i+ / (P_i+ + K/N) +
sum_j log (K/N) / (P_ij + K/N)]`` (plus 1e-7 in the denominators, as in the released code).

Details as in the authors' code (HobbitLong/RepDistiller ``crd/``; mdistiller ``CRD``):

* ``Z`` is a constant per side, estimated once on the first batch as ``mean(exp(v . m / nce_t)) * N``
  over the batch's positives and negatives, then kept (it is a buffer, so it is checkpointed);
* the banks and the negative sampler are :class:`~reviewkd.methods.memory.ContrastMemory` (shared
  with HKD): banks start uniform in [-1/sqrt(dim/3), 1/sqrt(dim/3)]; after each training step the
  rows of the batch's samples become ``normalize(nce_m * row + (1 - nce_m) * embedding)`` with
  ``nce_m = 0.5`` (no update in eval mode);
* negatives in the benchmark's "exact" mode: the positive is the sample's own bank row and the
  ``nce_k`` negatives are drawn uniformly from samples of the other classes, without replacement
  (with replacement for a class that has fewer negatives than ``nce_k``, as the benchmark's sampler
  does). They are drawn on the device for the whole batch, and scores are read from one (B x N)
  product of the embeddings with the bank, which equals the released code's gathered
  (B x (K+1) x dim) product.

Defaults = the CIFAR-100 benchmark (RepDistiller ``-r 1 -a 0 -b 0.8``, mdistiller CRD config):
``nce_k = 16384`` (clipped to the number of training samples), ``nce_t = 0.07``, ``nce_m = 0.5``,
``weight = 0.8``, cross-entropy weight 1. ``kd_weight > 0`` adds KD at ``temperature`` (the
benchmark's "CRD+KD" row uses ``kd_weight=1.0``).

Needs the run context (``num_samples``, ``train_targets``, optionally ``num_classes``) at set-up
and the batch's dataset indices (``step.index``).

Under DistributedDataParallel the loss uses each rank's own batch (its own anchors and negatives),
while the memory banks are updated with the batches of all ranks gathered (every rank applies the
same update, so the banks stay identical and equal to a single process's over the global batch),
and ``Z`` is estimated from the mean over ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import mean_over_ranks
from ._common import OptionalKD, float32
from .base import DistillMethod, Reads, RunContext, Step, register_method
from .memory import ContrastMemory

_EPS = 1e-7  # the released code's constant in the NCE denominators


def nce_loss(p: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of one side; ``p`` is B x (1 + K): the positive's P in column 0, then K negatives."""
    k = p.shape[1] - 1
    noise = k / float(num_samples)  # K * P_n with the uniform noise distribution P_n = 1/N
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + _EPS))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


@register_method
class CRD(ContrastMemory, OptionalKD, DistillMethod):
    name = "crd"
    paper = "Tian, Krishnan, Isola, ICLR 2020: Contrastive Representation Distillation"
    reads = Reads(student_features="post", teacher_features="post", logits=False, index=True, tasks=('classification',))

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__()
        self.weight, self.feat_dim, self.nce_k = float(weight), int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m = float(nce_t), float(nce_m)
        self.init_kd(kd_weight, temperature)
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        self.embed_s = nn.Linear(probe.student_features[-1].shape[1], self.feat_dim)
        self.embed_t = nn.Linear(probe.teacher_features[-1].shape[1], self.feat_dim)
        self.init_memory(context, "crd", self.feat_dim, self.nce_k, ("memory_s", "memory_t"), clip_k=True)
        self.register_buffer("z", torch.full((2,), -1.0))  # [student-anchored, teacher-anchored]; < 0: unset

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        idx = step.index
        if idx is None:
            raise ValueError("crd needs the batch's dataset indices: call distiller(images, targets, indices=...)")
        idx = idx.to(self.memory_s.device, torch.long, non_blocking=True)
        f_s = step.student_features[-1].flatten(1)
        f_t = step.teacher_features[-1].flatten(1)
        with float32(f_s):
            v_s = F.normalize(self.embed_s(f_s.float()), dim=1)
            v_t = F.normalize(self.embed_t(f_t.float()), dim=1)
            contrast = torch.cat([idx.unsqueeze(1), self.sample_negatives(self.labels[idx])], dim=1)
            # exp(score / t) for the positive (column 0) and the negatives, each anchor against the
            # other side's bank
            out_s = torch.exp(torch.gather(v_s @ self.memory_t.T, 1, contrast) / self.nce_t)
            out_t = torch.exp(torch.gather(v_t @ self.memory_s.T, 1, contrast) / self.nce_t)
            with torch.no_grad():
                estimate = mean_over_ranks(torch.stack([out_s.mean(), out_t.mean()])) * self.num_samples
                z = torch.where(self.z < 0, estimate, self.z)
                self.z.copy_(z)
            loss = nce_loss(out_s / z[0], self.num_samples) + nce_loss(out_t / z[1], self.num_samples)
            if self.training:
                self.update_memory(idx, {"memory_s": v_s, "memory_t": v_t}, self.nce_m)
        return self.add_kd({"crd": self.weight * loss}, step)
