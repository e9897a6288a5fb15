"""ImageFolder trees (ImageNet layout: root/train/<class>/*.JPEG, root/val/<class>/*.JPEG)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from .augment import IMAGENET_MEAN, IMAGENET_STD
from ..batch import Batch
from .loader import derive_seed


def imagenet_transforms(
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """The standard ImageNet recipe: RandomResizedCrop + flip for training, Resize + CenterCrop for eval."""
    if train:
        head = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        head = [transforms.Resize(resize_size), transforms.CenterCrop(image_size)]
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(mean, std)])


def load_image_folder(root: str | os.PathLike, split: str, transform=None) -> datasets.ImageFolder:
    """``torchvision.datasets.ImageFolder`` over ``root/split`` with a clear error when it is absent or empty."""
    folder = Path(root) / split
    layout = f"expected {Path(root)}/{split}/<class name>/<image files>"
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found: {layout}")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as exc:  # no class folders, or no image files in them
        raise FileNotFoundError(f"image folder {folder} holds no images ({exc}): {layout}") from None


class IndexedDataset(Dataset):
    """Wraps a dataset so that each item is ``(image, label, index)``; CRD-style methods need the index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank``, no padding: for evaluation, where every
    sample must be seen exactly once across processes (shards may differ by one sample)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_image_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Optional[Sampler] = None,
    num_workers: int = 4,
    pin_memory: bool = True,
    drop_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> DataLoader:
    """A DataLoader for decoded-image datasets; workers stay alive between epochs when there are any.
    ``batch_size`` is per process here; pass a (Distributed)Sampler to shard across processes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=generator,
    )


class ImageFolderLoader:
    """Same interface as ``TensorLoader`` over an ImageFolder (or any dataset of ``(image, target)``
    pairs): ``set_epoch``, ``len()`` and :class:`Batch` es already moved to ``device``.

    ``batch_size`` is the global batch; each of the ``world_size`` processes loads
    ``batch_size // world_size``. Training shards with a ``DistributedSampler`` (padded, shuffled
    from ``(seed, epoch)``; ``drop_last`` drops the short last batch); evaluation with an unpadded
    ``ShardSampler``. The sample order is
    reproducible; the random crops run in worker processes seeded once per worker start, so a
    resumed run does not replay them exactly.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        channels_last: bool = False,
        drop_last: bool = False,
    ):
        if batch_size < world_size:
            raise ValueError(f"global batch_size {batch_size} is smaller than world_size {world_size}")
        self.device = torch.device(device)
        self.seed, self.rank, self.channels_last = seed, rank, channels_last
        self.dataset = IndexedDataset(dataset)
        if train:
            self.sampler: Sampler = DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
            )
        else:
            self.sampler = ShardSampler(len(self.dataset), rank, world_size)
        self.generator = torch.Generator()
        pin = pin_memory and self.device.type == "cuda"
        self.loader = build_image_loader(
            self.dataset, batch_size // world_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin, drop_last=train and drop_last, generator=self.generator,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(derive_seed(self.seed, epoch, self.rank))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        non_blocking = self.loader.pin_memory
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels, indices in self.loader:
            images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=memory_format)
            yield Batch({"image": images}, labels.to(self.device, non_blocking=non_blocking),
                        indices.to(self.device, non_blocking=non_blocking))
