"""Export the bare student (no ABF or other distillation module) for deployment, and check it."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .engine.checkpoint import load_checkpoint
from .models import create_model

FORMATS = ("pt", "safetensors", "torchscript", "onnx")


def student_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the trained student of a run checkpoint (eval mode, CPU, float32)."""
    ckpt = load_checkpoint(path)
    model = create_model(ckpt["model_name"], num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["student"])
    return model.eval(), ckpt


def export_student(checkpoint: str | Path, out_dir: str | Path, formats=FORMATS, atol: float = 1e-4) -> dict[str, dict]:
    """Write the student in each format and compare each export's outputs with the model's.

    Returns ``{format: {"path": ..., "max_abs_diff": ...}}``; raises if an export disagrees.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    model, ckpt = student_from_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ckpt["model_name"]
    x = torch.randn(4, *ckpt["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    results = {}
    for fmt in formats:
        path, got = _EXPORTERS[fmt](model, x, out_dir / stem, ckpt)
        diff = (torch.as_tensor(got) - expected).abs().max().item()
        if not diff <= atol:
            raise RuntimeError(f"{fmt} export {path} differs from the trained student by {diff:.3g} (> {atol})")
        results[fmt] = {"path": str(path), "max_abs_diff": diff}
    return results


def _fresh(ckpt) -> nn.Module:
    return create_model(ckpt["model_name"], num_classes=ckpt["num_classes"]).eval()


def _export_pt(model, x, stem, ckpt):
    path = stem.with_suffix(".pt")
    torch.save({"model_name": ckpt["model_name"], "num_classes": ckpt["num_classes"],
                "input_size": ckpt["input_size"], "model": model.state_dict()}, path)
    reloaded = _fresh(ckpt)
    reloaded.load_state_dict(torch.load(path, weights_only=True)["model"])
    with torch.no_grad():
        return path, reloaded(x)


def _export_safetensors(model, x, stem, ckpt):
    from safetensors.torch import load_file, save_file

    path = stem.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model_name": ckpt["model_name"], "num_classes": str(ckpt["num_classes"])})
    reloaded = _fresh(ckpt)
    reloaded.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return path, reloaded(x)


def _export_torchscript(model, x, stem, ckpt):
    path = stem.with_suffix(".torchscript.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return path, loaded(x)


def _export_onnx(model, x, stem, ckpt):
    import onnxruntime as ort

    path = stem.with_suffix(".onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


_EXPORTERS = {"pt": _export_pt, "safetensors": _export_safetensors, "torchscript": _export_torchscript, "onnx": _export_onnx}
