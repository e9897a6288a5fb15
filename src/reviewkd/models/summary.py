"""Model size and cost: parameter and FLOP counts, the zoo table, and a plain-text table formatter.

FLOP convention: counts come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a
multiply-add as **2** FLOPs (a convolution costs 2 x MACs) and counts only matrix products and
convolutions: BatchNorm, activations, pooling, residual additions and biases are not counted.
Papers that quote "FLOPs" for CNNs usually mean MACs, i.e. half of these numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reviewkd.features import FeatureTaps

from .registry import create_model, list_models, model_family

__all__ = ["count_parameters", "count_flops", "zoo_table", "format_table", "DEFAULT_INPUT_SIZE", "DEFAULT_NUM_CLASSES",
           "ZOO_CONVENTIONS", "write_zoo_table"]

# The zoo's rows as measured, shipped with the package so that `reviewkd models` builds nothing;
# refreshed by `python -m reviewkd.models.summary` (a test checks it against a fresh measurement).
ZOO_TABLE_FILE = Path(__file__).resolve().parent / "zoo_table.json"
ZOO_CONVENTIONS = ("parameters and MFLOPs at each family's default: cifar 100 classes, 3x32x32 input; imagenet "
                   "1000 classes, 3x224x224; video 101 classes, 3x16x112x112; audio 10 classes, 1x40x61 log-mel; "
                   "audio_vector 51 classes, 512-d. FLOPs = 2 x multiply-adds (convolutions and matrix products only). "
                   "channels: the feature stages' output channels.")

# input size (C, H, W) and number of classes a family's models are measured with by default
DEFAULT_INPUT_SIZE: dict[str, tuple[int, ...]] = {"cifar": (3, 32, 32), "imagenet": (3, 224, 224),
                                                 # clips (C, T, H, W), log-mel (1, mels, frames), feature vectors
                                                 "video": (3, 16, 112, 112), "audio": (1, 40, 61), "audio_vector": (512,)}
DEFAULT_NUM_CLASSES: dict[str, int] = {"cifar": 100, "imagenet": 1000, "video": 101, "audio": 10, "audio_vector": 51}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(1, *input_size, device=device, dtype=dtype)


def _measure(model: nn.Module, input_size: Sequence[int], taps: FeatureTaps | None = None):
    """One eval-mode, no-grad forward of a batch of 1; returns (flops, features or None)."""
    was_training = model.training
    model.eval()
    try:
        x = _example_input(model, input_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            feats = taps(x)[1] if taps is not None else (model(x), None)[1]
        return int(counter.get_total_flops()), feats
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """FLOPs of one forward pass of a single ``input_size`` image (multiply-add = 2 FLOPs)."""
    return _measure(model, input_size)[0]


def zoo_table(
    names: Iterable[str] | None = None,
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
    measured: bool = True,
) -> list[dict[str, Any]]:
    """One row per registered model: name, family, parameters, MFLOPs, stages, channels.

    ``num_classes`` / ``input_size`` default per family (CIFAR: 100 classes, 3x32x32; ImageNet:
    1000 classes, 3x224x224); an explicit value applies to every model. ``channels`` lists the
    channels of the feature stages (the pooled entry has the channels of the last stage's output).
    ``measured=False``: rows at the defaults come from the shipped table; only models missing there
    are built and measured.
    """
    names = list(names) if names is not None else list_models()
    if not measured and num_classes is None and input_size is None:
        stored = _stored_rows()
        missing = [n for n in names if n not in stored]
        fresh = {row["name"]: row for row in zoo_table(missing)} if missing else {}
        return [stored[n] if n in stored else fresh[n] for n in names]
    rows = []
    for name in names:
        family = model_family(name)
        classes = num_classes if num_classes is not None else DEFAULT_NUM_CLASSES.get(family, 100)
        size = tuple(input_size) if input_size is not None else DEFAULT_INPUT_SIZE.get(family, (3, 32, 32))
        model = create_model(name, classes)
        spec = getattr(model, "feature_spec", None)
        taps = FeatureTaps(model, spec, "post") if spec is not None else None
        try:
            flops, feats = _measure(model, size, taps)
        finally:
            if taps is not None:
                taps.remove()
        channels = tuple(int(f.shape[1]) for f in feats[:-1]) if feats is not None else ()
        rows.append(
            {
                "name": name,
                "family": family,
                "parameters": count_parameters(model),
                "MFLOPs": flops / 1e6,
                "stages": len(channels),
                "channels": channels,
            }
        )
    return rows


def _stored_rows() -> dict[str, dict[str, Any]]:
    if not ZOO_TABLE_FILE.is_file():
        return {}
    rows = json.loads(ZOO_TABLE_FILE.read_text())
    return {row["name"]: {**row, "channels": tuple(row["channels"])} for row in rows}


def write_zoo_table(path: Path = ZOO_TABLE_FILE) -> None:
    """Measure every zoo model at its family's defaults and store the rows."""
    rows = zoo_table()
    path.write_text(json.dumps([{**r, "channels": list(r["channels"])} for r in rows], indent=1) + "\n")


def _cell(value: Any, fmt: str | Callable[[Any], str] | None) -> str:
    if value is None:
        return ""
    if callable(fmt):
        return fmt(value)
    if fmt:
        return format(value, fmt)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    formats: Mapping[str, str | Callable[[Any], str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Render ``rows`` (dicts) as a plain-text table with aligned columns.

    ``columns`` gives the keys and their order (default: keys in order of first appearance);
    ``formats`` maps a key to a format spec (``".1f"``, ``","``) or a function value -> str;
    ``headers`` renames column titles. Numeric columns are right-aligned, others left-aligned;
    floats default to 2 decimals, lists/tuples are joined with commas, missing values are blank.
    """
    formats = dict(formats or {})
    headers = dict(headers or {})
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = list(columns)
    cells = [[_cell(row.get(c), formats.get(c)) for c in columns] for row in rows]
    titles = [headers.get(c, c) for c in columns]
    numeric = [
        any(c in row for row in rows)
        and all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) for row in rows if row.get(c) is not None)
        for c in columns
    ]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(titles), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


if __name__ == "__main__":
    write_zoo_table()
    print(f"wrote {ZOO_TABLE_FILE}")
