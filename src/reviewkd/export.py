"""Export the bare student of a run checkpoint (no teacher, ABF or other training module) for
deployment, and check every file: each export is reloaded and its outputs compared with the
trained student's. The formats' writers are shared; the task supplies how to rebuild its network,
sample inputs, TorchScript conversion and the comparison."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .config import apply_override, validate
from .engine.checkpoint import load_checkpoint
from .models.weights import check_state_dict
from .tasks import get_task


def student_from_checkpoint(path: str | Path, overrides=(), export: bool = True) -> tuple[nn.Module, dict, object]:
    """(trained student in eval mode on the CPU, checkpoint, its config with ``overrides`` applied);
    ``export=False`` builds it as training evaluates it (e.g. a detector's float32-box hooks)."""
    ckpt = load_checkpoint(path)
    data = dict(ckpt["config"])
    for item in overrides:
        apply_override(data, item)
    cfg = validate(data, str(path))
    task = get_task(ckpt["task"])
    model = task.rebuild(ckpt, cfg, export=export)
    check_state_dict(model, ckpt["student"], what=str(path))
    model.load_state_dict(ckpt["student"])
    return model.eval(), ckpt, cfg


def _write(fmt: str, task, model, inputs, stem: Path, meta: dict, ckpt, cfg):
    """Write one format; return (path, the reloaded export's outputs on ``inputs``)."""
    if fmt == "pt":
        path = stem.with_suffix(".pt")
        torch.save({**meta, "model": model.state_dict()}, path)
        reloaded = task.rebuild(ckpt, cfg)
        reloaded.load_state_dict(torch.load(path, weights_only=True)["model"])
    elif fmt == "safetensors":
        from safetensors.torch import load_file, save_file

        path = stem.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"model_name": meta["model_name"], "num_classes": str(meta["num_classes"])})
        reloaded = task.rebuild(ckpt, cfg)
        reloaded.load_state_dict(load_file(str(path)))
    elif fmt == "torchscript":
        path = stem.with_suffix(".torchscript.pt")
        task.to_torchscript(model, inputs).save(str(path))
        reloaded = torch.jit.load(str(path))
    else:  # onnx
        import onnxruntime as ort

        path = stem.with_suffix(".onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (inputs,), str(path), dynamo=False, input_names=["images"],
                              output_names=["outputs"], dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return path, torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])
    with torch.no_grad():
        return path, task.run_exported(reloaded, inputs)


def export_student(checkpoint: str | Path, out_dir: str | Path, formats=None, atol: float | None = None) -> dict[str, dict]:
    """Write the student in each format (default: all the task's) and compare each reloaded
    export's outputs with the model's. Returns ``{format: {"path", "max_abs_diff"}}``; raises if
    an export disagrees."""
    model, ckpt, cfg = student_from_checkpoint(checkpoint)
    task = get_task(ckpt["task"])
    formats = list(formats or task.export_formats)
    unknown = [f for f in formats if f not in task.export_formats]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown} for {task.name}; choose from {', '.join(task.export_formats)}")
    atol = atol if atol is not None else (1e-3 if task.name == "detection" else 1e-4)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ckpt["model_name"]
    inputs = task.sample_inputs(ckpt, cfg)
    with torch.no_grad():
        expected = model(inputs)
    meta = {k: ckpt[k] for k in ("model_name", "num_classes", "input_size", "label_to_cat", "class_names",
                                 "target_scaler") if ckpt.get(k) is not None}
    results = {}
    for fmt in formats:
        path, got = _write(fmt, task, model, inputs, stem, meta, ckpt, cfg)
        diff = task.output_difference(expected, got)
        if not diff <= atol:
            raise RuntimeError(f"{fmt} export {path} differs from the trained student by {diff:.3g} (> {atol})")
        results[fmt] = {"path": str(path), "max_abs_diff": diff}
    return results
