"""The student's training set in cGAN-KD: the real training set plus M^g processed fakes.

* ``balanced_subsample``: classification draws M^g // C fakes from every class and the remainder
  M^g - C * (M^g // C) more from the last class, each class's draw without replacement from a
  seeded permutation of that class's pool. As released, the classes are the stored (teacher-
  adjusted) labels, a class holding fewer than its share gives all it has (the set is then smaller
  than M^g), and a pool of at most M^g fakes is used whole;
* ``uniform_subsample``: regression draws M^g fakes uniformly without replacement (all of a pool
  holding at most M^g; the pipeline refuses such a recipe before its first stage);
* ``pixel_stats``: the input normalisation recomputed on real + fake images (per stored channel,
  on the 0..1 scale, population std over every pixel), used for the test set too.

The mixed set reaches the training engine through the run config: ``data.generated`` names the
subsampled store (appended to the real training set) and ``data.mean`` / ``data.std`` carry the
recomputed statistics, which an export then records as its preprocessing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..data.loader import derive_seed

_SUBSAMPLE_STREAM = 11


def balanced_subsample(labels: torch.Tensor, total: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices into ``labels``: ``total // num_classes`` per class, the remainder on the last
    class, at most what a class holds; every index when ``total >= len(labels)``."""
    if total < 0:
        raise ValueError(f"the number of fakes M^g must be >= 0, got {total}")
    if total >= len(labels):
        return torch.arange(len(labels))
    per_class = total // num_classes
    want = [per_class] * num_classes
    want[-1] += total - per_class * num_classes
    generator = torch.Generator().manual_seed(derive_seed(seed, _SUBSAMPLE_STREAM))
    order = torch.randperm(len(labels), generator=generator)
    picked = [order[labels[order] == c][:n] for c, n in enumerate(want)]
    return torch.sort(torch.cat(picked)).values


def uniform_subsample(count: int, total: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``total`` of ``count`` items, uniformly without replacement; every index
    when ``total >= count`` (as the balanced draw, and the released scripts)."""
    if total < 0:
        raise ValueError(f"the number of fakes M^g must be >= 0, got {total}")
    if total >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(derive_seed(seed, _SUBSAMPLE_STREAM))
    return torch.sort(torch.randperm(count, generator=generator)[:total]).values


def pixel_stats(*image_sets: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel on the 0..1 scale over every pixel of every set together (uint8
    N x C x H x W, same C), in float64, in chunks so large sets need little memory."""
    total = sq = None
    count = 0
    for images in image_sets:
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk].double().div_(255.0)
            s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
            total, sq = (s, q) if total is None else (total + s, sq + q)
            count += x.shape[0] * x.shape[2] * x.shape[3]
    if not count:
        raise ValueError("no images to compute the normalisation on")
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def subsample(labels: torch.Tensor, total: int, num_classes: Optional[int], seed: int = 0) -> torch.Tensor:
    """Balanced for classification (``num_classes`` given), uniform for regression (None)."""
    if num_classes is None:
        return uniform_subsample(len(labels), total, seed)
    return balanced_subsample(labels, total, num_classes, seed)


__all__ = ["balanced_subsample", "pixel_stats", "subsample", "uniform_subsample"]
