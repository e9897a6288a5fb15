"""Loading weight files into models, with errors that say exactly what does not match."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model it is loaded into."""


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or a dict holding one under 'model' / 'state_dict' / 'student'
    (the last is what this toolkit's run checkpoints hold); strip a 'module.' prefix."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "student"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointMismatchError(
            "file holds no state dict: expected a dict of tensors, or a dict with a 'model' or 'state_dict' entry"
        )
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    name = getattr(model, "model_name", type(model).__name__)
    compare_state(model.state_dict(), state, what, name)


def compare_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str = "checkpoint",
                  name: str = "the model") -> None:
    """One-line error naming ``what`` and the first missing / unexpected / wrongly shaped keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_short(wrong, 4)}")
        raise CheckpointMismatchError(
            f"{what} does not match {name}: " + "; ".join(parts)
            + ". Check that the file was trained for this architecture and number of classes."
        )


def load_file(path: str | os.PathLike):
    """Read a .pt/.pth (torch) or .safetensors file onto the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupted / not a torch file
        raise CheckpointMismatchError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def load_weights(model: nn.Module, source, strict: bool = True) -> nn.Module:
    """Load weights from a path or an in-memory dict into ``model`` (strict by default)."""
    obj = load_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = extract_state_dict(obj)
    if strict:
        check_state_dict(model, state, what=str(source) if isinstance(source, (str, os.PathLike)) else "state dict")
    model.load_state_dict(state, strict=strict)
    return model
