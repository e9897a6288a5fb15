"""Teachers that are not networks run at training time: outputs computed beforehand, read by the
samples' dataset indices (e.g. audio features of each video, one ``.npy`` file per video)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn


class PrecomputedTeacher(nn.Module):
    """Per-sample teacher outputs held in memory, looked up by dataset index.

    ``source``: a tensor (N x D..., row i for dataset index i) or a folder holding one ``.npy``
    file per sample, named ``keys[i] + ".npy"``. A sample whose file is missing gets zeros and
    ``present = False``: the recipe passes that mask to the method (``Step.teacher_mask``), which
    leaves those samples out of its teacher terms. ``kind`` says whether the values stand for the
    teacher's features (given as one N x D x 1 x 1 entry) or its logits.
    """

    def __init__(self, source: torch.Tensor | str | os.PathLike, keys: Optional[Sequence[str]] = None,
                 kind: Literal["features", "logits"] = "features"):
        super().__init__()
        if kind not in ("features", "logits"):
            raise ValueError(f"kind must be 'features' or 'logits', got {kind!r}")
        self.kind = kind
        if torch.is_tensor(source):
            values, present = source.float(), torch.ones(len(source), dtype=torch.bool)
        else:
            values, present = _read_folder(Path(source), keys)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("present", present, persistent=False)
        self.model_name = f"precomputed {kind}"

    @property
    def missing(self) -> int:
        return int((~self.present).sum())

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values of the samples, which of them exist)."""
        if index is None:
            raise ValueError("a precomputed teacher reads the batch's dataset indices, but the loader gives none")
        index = index.to(self.values.device)
        if int(index.max()) >= len(self.values) or int(index.min()) < 0:
            raise IndexError(f"dataset index {int(index.max())} is outside the {len(self.values)} precomputed entries")
        return self.values[index], self.present[index]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.lookup(index)[0]


def _read_folder(folder: Path, keys: Optional[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    if keys is None:
        raise ValueError("a folder of precomputed teacher outputs needs the sample keys (file names without .npy)")
    if not folder.is_dir():
        raise FileNotFoundError(f"precomputed teacher folder not found: {folder}")
    arrays = [np.load(folder / f"{key}.npy") if (folder / f"{key}.npy").is_file() else None for key in keys]
    found = [a for a in arrays if a is not None]
    if not found:
        raise FileNotFoundError(f"none of the {len(keys)} precomputed teacher files exists in {folder} "
                                f"(expected e.g. {folder / (str(keys[0]) + '.npy')})")
    shape = np.asarray(found[0]).reshape(-1).shape
    values = torch.zeros(len(keys), *shape)
    present = torch.zeros(len(keys), dtype=torch.bool)
    for i, a in enumerate(arrays):
        if a is not None:
            a = np.asarray(a, dtype=np.float32).reshape(-1)
            if a.shape != shape:
                raise ValueError(f"{folder / (str(keys[i]) + '.npy')} holds {a.shape[0]} values, the others {shape[0]}")
            values[i], present[i] = torch.from_numpy(a), True
    return values, present
