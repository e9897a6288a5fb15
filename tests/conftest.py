"""Shared test fixtures: real Fashion-MNIST batches and small zoo pairs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from reviewkd.data.fashion_mnist import default_root, load_fashion_mnist

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def fashion_available() -> bool:
    return os.path.isfile(os.path.join(default_root(), "t10k-images-idx3-ubyte.gz"))


@pytest.fixture(scope="session")
def fashion_test_set():
    if not fashion_available():
        pytest.fail(f"Fashion-MNIST missing in {default_root()}: run `make test` (installs dataset-fashion-mnist)")
    return load_fashion_mnist(split="test")


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """N x 1 x 28 x 28 uint8 -> N x 3 x 32 x 32 float, normalised (zero padding after normalising)."""
    x = (images_uint8.float() / 255.0 - FASHION_MEAN) / FASHION_STD
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


@pytest.fixture(scope="session")
def fashion_batch(fashion_test_set):
    """A fixed batch of 64 real images (3 x 32 x 32) and labels."""
    images, labels = fashion_test_set
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(images), generator=g)[:64]
    return to_model_input(images[idx]), labels[idx]
