"""Fashion-MNIST from its four IDX gzip files (Debian: package dataset-fashion-mnist)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .idx import read_idx

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_root() -> str:
    return os.environ.get("REVIEWKD_FASHION_MNIST", DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: install Debian's package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or point data.root at a "
        f"folder with the four IDX files"
    )


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(images uint8 N x 1 x 28 x 28, labels int64 N)``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or default_root())
    images_file, labels_file = (_find(root, stem) for stem in _FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {root} have unexpected shapes {tuple(images.shape)}, {tuple(labels.shape)}")
    return images.unsqueeze(1).contiguous(), labels.long()
