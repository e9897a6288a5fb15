"""Generated data on disk: one compressed ``.npz`` holding uint8 images, their labels and a
provenance record (JSON: the stage's settings, seeds, counts, acceptance and filter statistics).

Labels are int64 class indices (classification) or float64 targets (regression; the provenance's
``label_space`` says whether they are in the generator's [0, 1] scale or the data's original
unit). Files are written atomically (a temporary file renamed into place), so a killed stage never
leaves a half-written store that a later run would take for finished output.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

STORE_FORMAT = "reviewkd-cgankd-store-1"


@dataclass
class GeneratedSet:
    images: torch.Tensor  # uint8 N x C x H x W
    labels: torch.Tensor  # int64 N (classes) or float64 N (targets)
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def save_generated(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, provenance: dict) -> Path:
    """Writes the store atomically; ``provenance`` must be JSON-able."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"a store holds uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
    labels = labels.long() if not labels.is_floating_point() else labels.double()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"format": STORE_FORMAT, **provenance}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, images=images.cpu().numpy(), labels=labels.cpu().numpy(), provenance=np.array(record))
    os.replace(tmp, path)
    return path


def load_generated(path: str | os.PathLike) -> GeneratedSet:
    """The store at ``path``; one-line errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generated-data file not found: {path} (run the cGAN-KD pipeline that writes it, "
                                "or fix data.generated)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels, record = archive["images"], archive["labels"], str(archive["provenance"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a cGAN-KD store of generated data ({type(exc).__name__})") from None
    provenance = json.loads(record)
    if provenance.pop("format", None) != STORE_FORMAT:
        raise ValueError(f"{path} is not a cGAN-KD store of generated data (format {STORE_FORMAT} expected)")
    return GeneratedSet(torch.from_numpy(images), torch.from_numpy(labels), provenance)


__all__ = ["GeneratedSet", "load_generated", "save_generated"]
