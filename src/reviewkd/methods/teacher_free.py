"""Teacher-free regularisers of the output distribution, the comparisons of introspective learning.

* ``label_smoothing`` -- Szegedy et al. 2016: cross-entropy to ``(1 - eps) * onehot + eps / K``.
  Written as ``(1 - eps) * CE`` (the recipe's cross-entropy weight) plus the term
  ``eps * mean_c(-log p_c)``, which together equal ``F.cross_entropy(z, y, label_smoothing=eps)``.
  Default ``epsilon = 0.1`` (the paper's ImageNet value). A config that sets ``method.ce_weight``
  overrides the ``1 - eps``.
* ``confidence_penalty`` -- Pereyra et al. 2017: ``CE - beta * H(p)``, ``H`` the entropy of the
  softmax, batch mean; with ``threshold = G`` the paper's hinged form ``- beta * max(0, G - H(p))``
  per sample. The paper tunes ``beta`` per benchmark by grid search; the default ``beta = 0.1`` is
  chosen here (the same scale as label smoothing's eps).
* ``pskd`` -- Kim, Ji, Yoon, Yoo, ICCV 2021, "Self-Knowledge Distillation with Progressive
  Refinement of Targets", as the authors' code computes it (lgcnsai/PS-KD-Pytorch): the loss
  *replaces* the cross-entropy (the recipe's cross-entropy weight is 0) by the cross-entropy to
  ``(1 - a_t) * onehot + a_t * p_prev``, ``-sum_c target_c log p_c`` averaged over the batch, where
  ``p_prev`` is the softmax the model gave the sample when it last trained on it (in the previous
  epoch: each sample is seen once per epoch) and ``a_t = final_alpha * (t + 1) / epochs`` at epoch
  ``t`` counted from 0 (``final_alpha = 0.8``, reached at the last epoch; ``epochs`` None: the run's
  length). The stored predictions are the training forward pass's own softmax (train mode,
  augmented input), written after the targets are read. A sample not trained on yet uses its one-hot
  label as ``p_prev``; this is the authors' first epoch, and it also covers samples a
  ``drop_last`` loader left out of the previous epoch (their code would use zeros there).
  The predictions (N x K float32, N training samples) and a seen-flag per sample are buffers, so
  they are checkpointed and a resumed run continues exactly; with several processes every rank
  writes the gathered batch of all ranks, so the buffers stay identical everywhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..collectives import gather_batch
from ._common import float32
from .base import DistillMethod, Reads, RunContext, Step, register_method


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of ``softmax(logits)`` (float32)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum_c target_c log softmax(logits)_c``, averaged over the batch (float32)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@register_method
class LabelSmoothing(DistillMethod):
    name = "label_smoothing"
    paper = "Szegedy, Vanhoucke, Ioffe, Shlens, Wojna 2016: Rethinking the Inception Architecture (no teacher)"
    reads = Reads(teacher=False, logits=True)
    ce_weight = 0.9  # 1 - epsilon at the default epsilon

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label_smoothing: epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = float(epsilon)
        self.ce_weight = 1.0 - self.epsilon

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        with float32(step.student_logits):
            uniform = -F.log_softmax(step.student_logits.float(), dim=1).mean(dim=1).mean()
        return {"smoothing": self.epsilon * uniform}


@register_method
class ConfidencePenalty(DistillMethod):
    name = "confidence_penalty"
    paper = ("Pereyra, Tucker, Chorowski, Kaiser, Hinton 2017: Regularizing Neural Networks by Penalizing "
             "Confident Output Distributions (no teacher)")
    reads = Reads(teacher=False, logits=True)

    def __init__(self, beta: float = 0.1, threshold: Optional[float] = None):
        super().__init__()
        if beta < 0:
            raise ValueError(f"confidence_penalty: beta must be >= 0, got {beta}")
        if threshold is not None and threshold <= 0:
            raise ValueError(f"confidence_penalty: threshold must be > 0 (an entropy in nats) or null, got {threshold}")
        self.beta = float(beta)
        self.threshold = None if threshold is None else float(threshold)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        with float32(step.student_logits):
            h = entropy(step.student_logits)
            penalty = h if self.threshold is None else -F.relu(self.threshold - h)
        return {"confidence": -self.beta * penalty.mean()}


@register_method
class PSKD(DistillMethod):
    name = "pskd"
    paper = ("Kim, Ji, Yoon, Yoo, ICCV 2021: Self-Knowledge Distillation with Progressive Refinement of "
             "Targets (no teacher)")
    reads = Reads(teacher=False, logits=True, targets=True, index=True)
    ce_weight = 0.0  # the soft-target cross-entropy below contains the label term

    def __init__(self, final_alpha: float = 0.8, epochs: Optional[int] = None):
        super().__init__()
        if not 0.0 <= final_alpha <= 1.0:
            raise ValueError(f"pskd: final_alpha must be in [0, 1], got {final_alpha}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"pskd: epochs (the length of the alpha ramp) must be >= 1 or null, got {epochs}")
        self.final_alpha = float(final_alpha)
        self.epochs: Optional[float] = None if epochs is None else float(epochs)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        if context.num_samples is None:
            raise ValueError("pskd keeps each training sample's last prediction: pass context={'num_samples': N} "
                             "(the training set's size) to Distiller")
        if self.epochs is None and context.epochs is not None:
            self.epochs = float(context.epochs)
        n, k = int(context.num_samples), probe.student_logits.shape[1]
        self.register_buffer("predictions", torch.zeros(n, k))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))

    def alpha(self, epoch: float) -> float:
        """``final_alpha * (t + 1) / epochs`` in epoch ``t`` (counted from 0), at most ``final_alpha``."""
        if self.epochs is None:
            raise ValueError("pskd ramps its weight over the run: pass context={'epochs': E} to Distiller or set "
                             "method.options.epochs")
        return self.final_alpha * min(1.0, (math.floor(epoch) + 1) / self.epochs)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        if step.index is None or step.targets is None:
            raise ValueError("pskd reads each sample's last prediction by dataset index: call "
                             "distiller(images, targets, indices=...)")
        idx = step.index.to(self.predictions.device, torch.long)
        logits = step.student_logits
        onehot = F.one_hot(step.targets, logits.shape[1]).float()
        with float32(logits):
            previous = torch.where(self.seen[idx].unsqueeze(1), self.predictions[idx], onehot)
            a = self.alpha(step.epoch)
            loss = soft_cross_entropy(logits, (1.0 - a) * onehot + a * previous)
            if self.training:
                self._store(gather_batch(idx), gather_batch(F.softmax(logits.detach().float(), dim=1)))
        return {"pskd": loss}

    @torch.no_grad()
    def _store(self, idx: torch.Tensor, probs: torch.Tensor) -> None:
        self.predictions.index_copy_(0, idx, probs)
        self.seen.index_fill_(0, idx, True)
