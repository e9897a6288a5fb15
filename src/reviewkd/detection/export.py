"""Evaluate and export the bare student detector of a detection run checkpoint.

The export holds the student detector only (no teacher, no ABF): ``<name>.pt`` (state dict +
what is needed to rebuild it: detector name, classes, label -> category id map, sizes),
``<name>.safetensors`` (the state dict) and ``<name>.torchscript.pt`` (``torch.jit.script`` of the
torchvision detector; it returns ``(losses, detections)``, with detections as the eager model's).
Each file is reloaded and its detections on sample images are compared with the trained model's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import apply_override, validate
from ..engine.checkpoint import load_checkpoint
from .models import create_detector

FORMATS = ("pt", "safetensors", "torchscript")


def detector_kwargs(cfg) -> dict:
    """How the student detector of a config is built, minus the backbone weight file."""
    det = cfg.detection
    frozen = det.frozen_bn if det.frozen_bn is not None else det.backbone_weights is not None
    return {"frozen_bn": bool(frozen), "min_size": det.min_size_test, "max_size": det.max_size_test,
            "options": dict(det.detector_options)}


def is_detection_checkpoint(path: str | Path) -> bool:
    return load_checkpoint(path).get("task") == "detection"


def student_from_checkpoint(path: str | Path, overrides=(), float_boxes: bool = True) -> tuple[nn.Module, dict, object]:
    """(student detector in eval mode on the CPU, checkpoint, config with ``overrides`` applied);
    ``float_boxes=False`` leaves out the autocast hooks (for TorchScript)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("task") != "detection":
        raise ValueError(f"{path} is not a detection run checkpoint")
    data = dict(ckpt["config"])
    for item in overrides:
        apply_override(data, item)
    cfg = validate(data, str(path))
    model = create_detector(ckpt["model_name"], ckpt["num_classes"], **detector_kwargs(cfg), float_boxes=float_boxes)
    model.load_state_dict(ckpt["student"])
    return model.eval(), ckpt, cfg


def evaluate_checkpoint(path: str | Path, overrides=(), progress: bool = True) -> dict:
    """COCO AP of a checkpoint's student on its config's val set (``data.root=...`` etc. override)."""
    from ..engine.runtime import autocast, resolve_device, resolve_precision
    from .coco_eval import evaluate_detector
    from .data import build_val_set, val_loader

    model, ckpt, cfg = student_from_checkpoint(path, overrides)
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    masks = ckpt["model_name"].startswith("maskrcnn")
    val = build_val_set(cfg, masks=masks)
    if val.num_classes != ckpt["num_classes"]:
        raise ValueError(f"checkpoint has {ckpt['num_classes']} classes, the dataset {val.num_classes}")
    metrics = evaluate_detector(model.to(device), val_loader(val, cfg.data.eval_batch_size, cfg.data.workers), val,
                                device, autocast(device, precision), masks=masks, progress=progress)
    return {"checkpoint": str(path), "model": ckpt["model_name"], "iteration": ckpt["iteration"], **metrics}


def _sample_images(cfg, n: int = 2) -> list[torch.Tensor]:
    """A few val images of the run (else seeded random ones), already at the test size.

    At the test size the detector's own resize is the identity. For other sizes torchvision's
    scripted transform may round a resized side one pixel differently from the eager one, which
    moves detections slightly; the comparison is about the weights and the graph, not that rounding.
    """
    from .data import resize

    det = cfg.detection
    try:
        from .data import CocoDetection, resolve

        val = CocoDetection(resolve(cfg.data.root, det.val_images), resolve(cfg.data.root, det.val_annotations),
                            train=False)
        images = [val.load(i)[0] for i in range(min(n, len(val)))]
    except (FileNotFoundError, OSError):
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, 96, 96 + 24 * i, generator=g) for i in range(n)]
    return [resize(im, {}, det.min_size_test, det.max_size_test)[0] for im in images]


def _max_diff(expected: list[dict], got: list[dict]) -> float:
    diff = 0.0
    for a, b in zip(expected, got, strict=True):
        if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
            return float("inf")
        for k in a:
            if a[k].numel():
                diff = max(diff, (a[k].float() - b[k].float()).abs().max().item())
    return diff


def export_detector(checkpoint: str | Path, out_dir: str | Path, formats=FORMATS, atol: float = 1e-3) -> dict[str, dict]:
    """Write the student in each format and compare each reloaded export's detections with the model's.

    Returns ``{format: {"path": ..., "max_abs_diff": ..., "detections": n}}``; raises if one disagrees.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown detector export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    model, ckpt, cfg = student_from_checkpoint(checkpoint, float_boxes=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ckpt["model_name"]
    images = _sample_images(cfg)
    with torch.no_grad():
        expected = model(images)
    meta = {"model_name": ckpt["model_name"], "num_classes": ckpt["num_classes"], "label_to_cat": ckpt["label_to_cat"],
            "class_names": ckpt["class_names"], "detector_kwargs": detector_kwargs(cfg)}

    def fresh() -> nn.Module:
        return create_detector(ckpt["model_name"], ckpt["num_classes"], **detector_kwargs(cfg), float_boxes=False).eval()

    results = {}
    for fmt in formats:
        if fmt == "pt":
            path = stem.with_suffix(".pt")
            torch.save({**meta, "model": model.state_dict()}, path)
            reloaded = fresh()
            reloaded.load_state_dict(torch.load(path, weights_only=True)["model"])
            with torch.no_grad():
                got = reloaded(images)
        elif fmt == "safetensors":
            from safetensors.torch import load_file, save_file

            path = stem.with_suffix(".safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                      metadata={"model_name": ckpt["model_name"], "num_classes": str(ckpt["num_classes"])})
            reloaded = fresh()
            reloaded.load_state_dict(load_file(str(path)))
            with torch.no_grad():
                got = reloaded(images)
        else:
            path = stem.with_suffix(".torchscript.pt")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.script(model).save(str(path))
                loaded = torch.jit.load(str(path))
                with torch.no_grad():
                    _, got = loaded(images)
        diff = _max_diff(expected, got)
        if not diff <= atol:
            raise RuntimeError(f"{fmt} export {path} differs from the trained student by {diff:.3g} (> {atol})")
        results[fmt] = {"path": str(path), "max_abs_diff": diff, "detections": sum(len(e["boxes"]) for e in expected)}
    return results
