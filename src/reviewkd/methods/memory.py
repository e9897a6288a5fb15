"""Memory banks over the training set and the class-exclusive negative sampler (CRD, HKD).

:class:`ContrastMemory` is a mixin for a :class:`~reviewkd.methods.DistillMethod`: it registers
its banks and sampling tables as buffers of the method itself (so the banks are in the method's
state dict, hence in every checkpoint, under their own names), draws negatives, and applies the
momentum update. What it shares with both authors' codes (RepDistiller's ``crd/``, HKD's
``NCEAverage``):

* a bank is ``num_samples x dim``, initialised uniform in [-1/sqrt(dim/3), 1/sqrt(dim/3)] and left
  unnormalised until its rows are first visited;
* the update of the rows of the batch's samples is ``l2_normalize(m * row + (1 - m) * value)``,
  out of place (the step's scores still need the old bank for backward), with the values of every
  process's batch gathered first, so that the banks stay identical on all ranks and equal to one
  process's banks over the global batch;
* negatives are ``k`` dataset indices drawn uniformly from the samples of other classes, without
  replacement, or with replacement for a class that has fewer than ``k`` other-class samples
  (the authors' samplers decide per class, as here). They are drawn on the batch's device from
  the global torch RNG (checkpointed by the loop, so a resumed run draws the same ones).

``l2_normalize`` divides by the Euclidean norm without an epsilon, as both reference codes do: a
zero row would give NaN (which the loop's NaN guard reports) instead of being silently kept at 0.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from ..collectives import gather_batch
from .base import RunContext


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x / ||x||`` along ``dim``, with no epsilon (the reference codes' normalisation)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True)


def uniform_bank(num_samples: int, dim: int) -> torch.Tensor:
    """A fresh bank: uniform in [-1/sqrt(dim/3), 1/sqrt(dim/3)] (unit variance per row sum)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim).mul_(2 * stdv).sub_(stdv)


class ContrastMemory:
    """Mixin: memory banks over the training set and a class-exclusive negative sampler.

    Call :meth:`init_memory` from ``setup`` (after building the method's own layers, so that the
    RNG draws keep their order), :meth:`sample_negatives` in ``forward`` and
    :meth:`update_memory` after the loss is built. Sets ``num_samples``, ``k`` and
    ``replacement`` (whether some class draws its negatives with replacement).
    """

    def init_memory(self, context: RunContext, method: str, dim: int, k: int, banks: Iterable[str],
                    clip_k: bool = False) -> None:
        """Register the banks (buffers named ``banks``, in that order) and the sampling tables;
        ``clip_k``: at most as many negatives as training samples."""
        if context.train_targets is None:
            raise ValueError(
                f"{method} needs the training set's labels for its memory banks: pass "
                "context={'num_samples': N, 'train_targets': labels, 'num_classes': C} to Distiller"
            )
        labels = torch.as_tensor(context.train_targets, dtype=torch.long).flatten().cpu()
        n = int(context.num_samples or labels.numel())
        if labels.numel() != n:
            raise ValueError(f"{method}: train_targets has {labels.numel()} labels but num_samples is {n}")
        num_classes = int(context.num_classes or int(labels.max()) + 1)
        counts = torch.bincount(labels, minlength=num_classes)
        negatives_per_class = n - counts
        if int(negatives_per_class.min()) < 1:
            raise ValueError(f"{method} samples negatives from other classes, but the training set has a single class")
        if k < 1:
            raise ValueError(f"{method}: the number of negatives must be at least 1, got {k}")
        self.num_samples, self.k = n, min(int(k), n) if clip_k else int(k)
        # per class: too few other-class samples for k distinct ones -> draw with replacement
        with_replacement = self.k > negatives_per_class
        present = counts > 0
        self.replacement = bool(with_replacement[present].any())
        self._mixed_replacement = self.replacement and not bool(with_replacement[present].all())
        for name in banks:
            self.register_buffer(name, uniform_bank(n, dim))
        # for sampling: labels, and the dataset ordered by class with each class's start and size
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_replacement", with_replacement, persistent=False)

    # ------------------------------------------------------------------ negatives

    def sample_negatives(self, classes: torch.Tensor) -> torch.Tensor:
        """B x k dataset indices drawn uniformly from samples whose label differs from ``classes``."""
        if not self.replacement:
            return self._distinct_negatives(classes)
        if not self._mixed_replacement:
            return self._negatives_with_replacement(classes)
        # an imbalanced set where k lies between the classes' numbers of negatives: per row
        draw = self.class_replacement[classes]
        out = torch.empty(classes.shape[0], self.k, dtype=torch.long, device=classes.device)
        out[draw] = self._negatives_with_replacement(classes[draw])
        out[~draw] = self._distinct_negatives(classes[~draw])
        return out

    def _distinct_negatives(self, classes: torch.Tensor) -> torch.Tensor:
        # a uniformly random k-subset: the k smallest random keys, same-class samples excluded
        keys = torch.rand(classes.shape[0], self.num_samples, device=classes.device)
        keys.masked_fill_(self.labels.unsqueeze(0) == classes.unsqueeze(1), 2.0)
        return keys.topk(self.k, dim=1, largest=False, sorted=False).indices

    def _negatives_with_replacement(self, classes: torch.Tensor) -> torch.Tensor:
        # position r among the n - count other-class samples of the class order, skipping the class
        n = self.num_samples
        count, start = self.class_count[classes].unsqueeze(1), self.class_start[classes].unsqueeze(1)
        r = (torch.rand(classes.shape[0], self.k, device=classes.device) * (n - count)).long()
        r = r.clamp_max_(n - count - 1)
        return self.order[r + (r >= start) * count]

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update_memory(self, idx: torch.Tensor, values: Mapping[str, torch.Tensor], momentum: float) -> None:
        """Move the rows ``idx`` of each named bank towards its values (every rank's batch gathered)."""
        idx = gather_batch(idx)
        for name, value in values.items():
            value = gather_batch(value.detach())
            bank = getattr(self, name)
            rows = l2_normalize(bank[idx] * momentum + value * (1 - momentum))
            setattr(self, name, bank.index_copy(0, idx, rows))
