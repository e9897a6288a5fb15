"""Batches from an in-memory uint8 dataset held on the training device, augmented there."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ..batch import Batch
from .augment import BatchAugment

# Separate random streams derived from the same (seed, epoch): sample order vs augmentation.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers; (1, 0) and (0, 1) give unrelated seeds. Negative parts
    (e.g. the negative epochs of a pre-training stage) are taken modulo 2**64."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TensorLoader:
    """Iterates :class:`Batch` es (``inputs["image"]`` float, ``targets``, ``index`` int64) over uint8
    images held on ``device``. Targets keep their dtype: int64 class labels, or float values
    (regression).

    The data are copied to ``device`` once. ``set_epoch(epoch)`` fixes the sample order (a
    permutation drawn from ``(seed, epoch)`` when ``shuffle``) and the augmentation randomness
    (drawn from ``(seed, epoch, rank, batch)``), so a run resumed at an epoch sees exactly the
    batches the uninterrupted run would have seen. ``indices`` are positions in ``images``.

    Distributed: ``batch_size`` is the GLOBAL batch; each of the ``world_size`` processes gets
    ``batch_size // world_size`` samples per batch. Every rank draws the same global permutation
    and takes every ``world_size``-th entry starting at ``rank`` (as ``DistributedSampler`` does).
    With ``even_shards`` (training) the permutation is first padded with its own first entries
    (or, with ``drop_last``, cut) to a multiple of ``world_size``, so that all ranks run the same
    number of batches; without it (evaluation) every sample is seen exactly once across ranks and
    shards may differ by one sample.

    ``label_uniform`` (the regression density-ratio model and its autoencoder, as released): an epoch's
    ``len(images)`` draws first pick a label uniformly among the distinct labels, then one image
    carrying it, both with replacement; rare labels are then seen as often as common ones.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        augment: BatchAugment,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        label_uniform: bool = False,
    ):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        if labels.shape[:1] != (len(images_uint8),):
            raise ValueError(f"labels must have {len(images_uint8)} rows, got shape {tuple(labels.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < world_size:
            raise ValueError(f"global batch_size {batch_size} is smaller than world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device, labels.dtype if labels.is_floating_point() else torch.int64)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.augment = augment
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        if label_uniform and not shuffle:
            raise ValueError("label_uniform draws a random order: it needs shuffle=True")
        self.label_uniform = label_uniform
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Any integer; a negative one gives an order unrelated to every epoch >= 0."""
        self.epoch = int(epoch)

    def _shard_length(self) -> int:
        n, world = self.num_samples, self.world_size
        if not self.even_shards:
            return len(range(self.rank, n, world))
        return n // world if self.drop_last else math.ceil(n / world)

    def __len__(self) -> int:
        per_rank, batch = self._shard_length(), self.local_batch_size
        return per_rank // batch if self.drop_last else math.ceil(per_rank / batch)

    def shard_indices(self) -> torch.Tensor:
        """This rank's dataset indices for the current epoch, in iteration order (CPU, int64)."""
        n = self.num_samples
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _ORDER_STREAM))
            order = self._label_uniform_draw(generator) if self.label_uniform else torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.even_shards:
            total = self._shard_length() * self.world_size
            if total > n:  # pad with the permutation's own start, repeated if the data are tiny
                order = order.repeat(math.ceil(total / n))
            order = order[:total]
        return order[self.rank::self.world_size]

    def _label_uniform_draw(self, generator: torch.Generator) -> torch.Tensor:
        labels = self.labels.cpu()
        _, group, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        members = torch.argsort(group, stable=True)  # images grouped by label, in index order
        starts = torch.cumsum(counts, 0) - counts
        n = self.num_samples
        label = torch.randint(len(counts), (n,), generator=generator)
        offset = (torch.rand(n, generator=generator, dtype=torch.float64) * counts[label]).long()
        return members[starts[label] + torch.minimum(offset, counts[label] - 1)]

    def __iter__(self) -> Iterator[Batch]:
        indices = self.shard_indices().to(self.device)
        generator = torch.Generator(device=self.device)
        batch = self.local_batch_size
        for b in range(len(self)):
            batch_indices = indices[b * batch:(b + 1) * batch]
            # Seeded per batch: batch b's augmentation does not depend on how many batches ran before.
            generator.manual_seed(derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, self.rank, b))
            images = self.augment(self.images[batch_indices], generator=generator)
            yield Batch({"image": images}, self.labels[batch_indices], batch_indices)
