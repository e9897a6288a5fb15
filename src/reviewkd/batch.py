"""The one batch type every loader yields: named inputs, targets and dataset indices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Batch:
    """``inputs`` by name (``{"image": x}``; ``{"images": [...]}`` for detection; a second
    modality under its own name); ``targets``: int64 labels, float values or detection target
    dicts; ``index``: the samples' positions in the training set (None where a loader has none)."""

    inputs: dict[str, Any]
    targets: Any
    index: Optional[torch.Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> torch.Tensor:
        return self.inputs["image"]

    def __len__(self) -> int:
        return len(self.targets)


def move_to(value, device: torch.device):
    """Tensors (inside lists and dicts too) on ``device``; other values unchanged."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device) for v in value)
    return value


def batch_to(batch: Batch, device: torch.device) -> Batch:
    return Batch(move_to(batch.inputs, device), move_to(batch.targets, device),
                 None if batch.index is None else batch.index.to(device, non_blocking=True), batch.meta)
