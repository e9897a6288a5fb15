"""Batched augmentation of uint8 image tensors, run on whatever device the batch lives on.

Replaces the per-image PIL pipeline ``RandomCrop(size, padding) -> RandomHorizontalFlip ->
ToTensor -> Normalize`` used by the CIFAR distillation recipes, for data already held in memory.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

# Normalisation statistics (per channel, on the 0..1 scale).
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}


@functools.lru_cache(maxsize=32)
def _stats_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Cached per device: building it every batch would mean a blocking host-to-device copy.
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def _as_pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


@dataclass(frozen=True)
class BatchAugment:
    """uint8 ``N x C x H x W`` -> normalised float ``N x channels x H' x W'``.

    Steps, in order: symmetric zero padding up to ``pad_to``; (train only) random crop back to
    the same size from the image zero-padded by ``crop_padding`` on each side, with an
    independent offset per sample, and a horizontal flip with probability 0.5 per sample;
    channel repeat for grey images; scaling to 0..1 and normalisation with ``mean``/``std``.

    Padding is applied to the raw pixels, so padded pixels are 0 before normalisation, as with
    torchvision's ``RandomCrop(padding=...)``/``Pad`` on the PIL image followed by ``ToTensor``.
    With ``train=False`` only padding, channel repeat and normalisation happen (deterministic).
    ``mean``/``std`` hold one value (applied to every channel) or one per output channel.
    """

    crop_padding: int = 0
    flip: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pad_to: Optional[Union[int, tuple[int, int]]] = None
    channels: Optional[int] = None  # None: keep the input's channel count
    train: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need the same non-zero length, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def for_dataset(cls, name: str, **options) -> "BatchAugment":
        """The normalisation statistics of ``name`` (a key of ``DATASET_STATS``) plus ``options``."""
        mean, std = DATASET_STATS[name]
        return cls(mean=mean, std=std, **options)

    def evaluation(self) -> "BatchAugment":
        """The same pipeline with the random crop and flip switched off."""
        return dataclasses.replace(self, train=False)

    def output_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the output for an input of size (C, H, W)."""
        channels, height, width = input_size
        if self.pad_to is not None:
            height, width = _as_pair(self.pad_to)
        return (self.channels or channels, height, width)

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        x = self._pad_to_size(images)
        if self.train and (self.crop_padding > 0 or self.flip):
            x = self._random_crop_and_flip(x, generator)
        x = self._repeat_channels(x)
        x = self._normalise(x)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _pad_to_size(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to is None:
            return x
        target_h, target_w = _as_pair(self.pad_to)
        extra_h, extra_w = target_h - x.shape[2], target_w - x.shape[3]
        if extra_h < 0 or extra_w < 0:
            raise ValueError(f"pad_to={self.pad_to} is smaller than the images ({x.shape[2]} x {x.shape[3]})")
        if extra_h == 0 and extra_w == 0:
            return x
        top, left = extra_h // 2, extra_w // 2
        return F.pad(x, (left, extra_w - left, top, extra_h - top))

    def _random_crop_and_flip(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        n, _, height, width = x.shape
        p = self.crop_padding
        device = x.device
        padded = F.pad(x, (p, p, p, p)) if p else x
        # One offset per sample in 0..2p for each axis, as RandomCrop draws them.
        offset_y = torch.randint(0, 2 * p + 1, (n, 1), device=device, generator=generator)
        offset_x = torch.randint(0, 2 * p + 1, (n, 1), device=device, generator=generator)
        rows = offset_y + torch.arange(height, device=device)  # n x H
        cols = torch.arange(width, device=device).expand(n, width)
        if self.flip:
            flipped = torch.rand((n, 1), device=device, generator=generator) < 0.5
            # A flipped crop reads its columns right to left.
            cols = torch.where(flipped, (width - 1) - cols, cols)
        cols = offset_x + cols  # n x W
        sample = torch.arange(n, device=device)
        # Advanced indices around the channel slice put the index dims first: n x H x W x C.
        crops = padded[sample[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crops.permute(0, 3, 1, 2)

    def _repeat_channels(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None or self.channels == x.shape[1]:
            return x
        if x.shape[1] != 1:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
        return x.expand(-1, self.channels, -1, -1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if len(self.mean) not in (1, channels):
            raise ValueError(f"{len(self.mean)} normalisation values for {channels}-channel images")
        mean, std = _stats_tensor(self.mean, x.device), _stats_tensor(self.std, x.device)
        # Same operation order as ToTensor + Normalize, so mean 0 / std 1 gives exactly x / 255.
        return x.float().div_(255.0).sub_(mean).div_(std)
