"""Generated data on disk: one compressed ``.npz`` holding uint8 images, their labels and a
provenance record (JSON: the stage's settings, seeds, counts, acceptance and filter statistics).

Labels are int64 class indices (classification) or float64 targets (regression; the provenance's
``label_space`` says whether they are in the generator's [0, 1] scale or the data's original
unit). The filter's store also keeps ``teacher_labels``: the teacher's adjusted label of each kept
image, taken from the same pass that scored it (as released). Files are written atomically (a temporary file renamed into place), so a killed stage never
leaves a half-written store that a later run would take for finished output.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STORE_FORMAT = "reviewkd-cgankd-store-1"


@dataclass
class GeneratedSet:
    images: torch.Tensor  # uint8 N x C x H x W
    labels: torch.Tensor  # int64 N (classes) or float64 N (targets)
    provenance: dict = field(default_factory=dict)
    teacher_labels: Optional[torch.Tensor] = None  # the filter's adjusted labels (same dtype rules as labels)

    def __len__(self) -> int:
        return len(self.labels)


def save_generated(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, provenance: dict,
                   teacher_labels: Optional[torch.Tensor] = None) -> Path:
    """Writes the store atomically; ``provenance`` must be JSON-able."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"a store holds uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
    arrays = {"images": images.cpu().numpy()}
    for key, values in (("labels", labels), ("teacher_labels", teacher_labels)):
        if values is None:
            continue
        values = torch.as_tensor(values)
        if values.shape != (len(images),):
            raise ValueError(f"{len(images)} images but {key} of shape {tuple(values.shape)}")
        arrays[key] = (values.long() if not values.is_floating_point() else values.double()).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"format": STORE_FORMAT, **provenance}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays, provenance=np.array(record))
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
            teacher = archive["teacher_labels"] if "teacher_labels" in archive.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a cGAN-KD store of generated data ({type(exc).__name__})") from None
    provenance = json.loads(record)
    if provenance.pop("format", None) != STORE_FORMAT:
        raise ValueError(f"{path} is not a cGAN-KD store of generated data (format {STORE_FORMAT} expected)")
    return GeneratedSet(torch.from_numpy(images), torch.from_numpy(labels), provenance,
                        None if teacher is None else torch.from_numpy(teacher))


__all__ = ["GeneratedSet", "load_generated", "save_generated"]
