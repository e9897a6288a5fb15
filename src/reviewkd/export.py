"""Export the bare student of a run checkpoint (no teacher, ABF or other training module) for
deployment, and check every file: each export is read back the way ``reviewkd.load_student`` reads
it and its outputs are compared with the trained student's.

Formats: ``pt`` (state dict + metadata), ``safetensors``, ``torchscript`` (kept for runtimes that
need it; PyTorch deprecates it), ``pt2`` (``torch.export``) and ``onnx`` (the ``torch.export``
based exporter). ``pt2`` and ``onnx`` come from one ``torch.export`` program whose batch, height
and width are dynamic where the model allows; where it does not they are fixed at the sample
input's size and the result says so. Every file carries the metadata a deployer needs (see
``deployment_metadata``): inside the file (``.pt`` entries, safetensors metadata, ONNX
``metadata_props``, ``reviewkd.json`` extra file of ``.pt2`` / TorchScript) and in ``model.json``
beside them, which also lists the files, their dynamic axes and measured differences.

The task supplies how to rebuild its network, sample inputs, TorchScript conversion, the
preprocessing and the comparison; formats a task cannot export are refused with the reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import apply_override, validate
from .engine.checkpoint import load_checkpoint
from .models.weights import check_state_dict
from .tasks import get_task
from .tasks.base import quiet_torchscript

EXPORT_FORMAT = "reviewkd-export-1"
META_FILE = "model.json"  # the folder's description, beside the exported files
META_KEY = "reviewkd"  # the full metadata as JSON in ONNX / safetensors metadata
META_EXTRA_FILE = "reviewkd.json"  # the same, as an extra file of .pt2 / TorchScript archives
SUFFIXES = {"pt": ".pt", "safetensors": ".safetensors", "torchscript": ".torchscript.pt", "pt2": ".pt2",
            "onnx": ".onnx"}
INPUT_NAME, OUTPUT_NAME = "images", "outputs"


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


def _json_safe(value):
    """NaN / inf (e.g. the AP of an absent object size) become null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def deployment_metadata(task, model: nn.Module, ckpt: dict, cfg, source: str | Path | None = None) -> dict:
    """What a deployer needs next to the weights: task, model, classes, input size, preprocessing
    (``reviewkd.data.preprocessing``), where it was trained from and the run's full config (which
    also rebuilds the network: ``task.rebuild(meta, validate(meta["config"]))``)."""
    from . import __version__

    unit = ckpt.get("unit", "epoch")
    meta = {
        "format": EXPORT_FORMAT, "reviewkd_version": __version__, "task": task.name,
        "model_name": ckpt["model_name"], "method_name": ckpt.get("method_name"),
        "num_classes": ckpt["num_classes"], "class_names": ckpt.get("class_names"),
        "input_size": ckpt.get("input_size"), "preprocessing": task.preprocessing(model, ckpt, cfg),
        "trained": {"checkpoint": str(source) if source is not None else None, "unit": unit,
                    unit: ckpt.get(unit), "metrics": ckpt.get("metrics")},
        "config": ckpt["config"],
    }
    for key in ("label_to_cat", "target_scaler"):
        if ckpt.get(key) is not None:
            meta[key] = ckpt[key]
    return _json_safe(meta)


def flat_metadata(meta: dict, extra: Optional[dict] = None) -> dict[str, str]:
    """String pairs for ONNX ``metadata_props`` / safetensors: the full document under ``reviewkd``
    and its main entries on their own for tools that list them."""
    pre = meta["preprocessing"] or {}
    shown = {"task": meta["task"], "model_name": meta["model_name"], "num_classes": meta["num_classes"],
             "class_names": meta["class_names"], "input_size": meta["input_size"], "mean": pre.get("mean"),
             "std": pre.get("std"), "preprocessing": meta["preprocessing"], "reviewkd_version": meta["reviewkd_version"],
             **(extra or {})}
    flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in shown.items()}
    return {**flat, META_KEY: json.dumps({**meta, **(extra or {})})}


# ------------------------------------------------------------------------------ torch.export
@dataclass
class Program:
    """A ``torch.export`` program of the student and which of its input's axes are dynamic."""

    program: Any
    dynamic: dict[str, bool]
    symbols: dict[str, str] = field(default_factory=dict)  # symbol (e.g. "s77") -> axis name
    note: Optional[str] = None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def export_program(model: nn.Module, inputs: torch.Tensor, task, name: str) -> Program:
    """``torch.export`` with the task's ``dynamic_axes`` dynamic where the model allows: first all
    of them (``Dim.AUTO`` keeps an axis static when the model's code fixes it), then the batch
    alone, then none; an attempt counts when the program also runs on inputs of another size along
    its dynamic axes (a flatten before a linear layer exports, then fails there). Axes left fixed
    are named in ``note``."""
    from torch.export import Dim

    axes = task.dynamic_axes
    attempts = (axes, {d: a for d, a in axes.items() if a == "batch"}, {})
    failures = []
    for wanted in attempts:
        try:
            shapes = ({d: Dim.AUTO for d in wanted},) if wanted else None
            program = torch.export.export(model, (inputs,), dynamic_shapes=shapes)
            dynamic, symbols, sizes = _dynamic_axes(program, axes)
            with torch.no_grad():
                for other in task.other_sample_inputs(inputs, dynamic):
                    program.module()(other)
        except Exception as exc:  # noqa: BLE001 - any failure: try with fewer dynamic axes
            failures.append(_first_line(exc))
            continue
        fixed = [a for a, on in dynamic.items() if not on]
        note = None
        if fixed:
            why = f"with them dynamic: {failures[0]}" if failures else "the model's code fixes them"
            note = (f"{name}: {' and '.join(fixed)} fixed at {' x '.join(str(sizes[a]) for a in fixed)} ({why})")
        return Program(program, dynamic, symbols, note)
    raise RuntimeError(f"torch.export cannot export {name} ({failures[-1]}); leave pt2 and onnx out of --formats")


def _dynamic_axes(program, axes: dict[int, str]) -> tuple[dict[str, bool], dict[str, str], dict[str, Any]]:
    """Per axis: dynamic or not; the symbols (e.g. "s77") of the dynamic ones; every axis' size."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    (user_input,) = program.graph_signature.user_inputs
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_input)
    shape = node.meta["val"].shape
    dynamic = {axis: not is_concrete_int(shape[d]) for d, axis in axes.items()}  # Dim.AUTO may fix an axis
    symbols = {str(shape[d]): axis for d, axis in axes.items() if dynamic[axis]}
    return dynamic, symbols, {axis: shape[d] for d, axis in axes.items()}


def _name_onnx_axes(onnx_program, symbols: dict[str, str]) -> None:
    """Call the dynamic axes batch / height / width instead of torch's symbols (s77, ...)."""
    import onnx_ir as ir

    def renamed(shape):
        if shape is None:
            return None
        dims = [ir.SymbolicDim(symbols[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in symbols else d
                for d in shape.dims]
        return ir.Shape(dims)

    graph = onnx_program.model.graph
    values = [*graph.inputs, *graph.outputs, *(out for node in ir.traversal.RecursiveGraphIterator(graph)
                                               for out in node.outputs)]
    for value in values:
        value.shape = renamed(value.shape)


# ----------------------------------------------------------------------------- writing
@dataclass
class _Job:
    task: Any
    model: nn.Module
    ckpt: dict
    cfg: Any
    meta: dict
    stem: Path
    inputs: Any
    _program: Optional[Program] = None

    def path(self, fmt: str) -> Path:
        return self.stem.parent / (self.stem.name + SUFFIXES[fmt])  # not with_suffix: names may hold dots

    def program(self) -> Program:
        if self._program is None:
            self._program = export_program(self.model, self.inputs, self.task, self.ckpt["model_name"])
        return self._program


def _write_pt(job: _Job) -> tuple[Path, dict]:
    path = job.path("pt")
    torch.save({**job.meta, "model": job.model.state_dict()}, path)
    return path, {}


def _write_safetensors(job: _Job) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    path = job.path("safetensors")
    save_file({k: v.contiguous() for k, v in job.model.state_dict().items()}, str(path),
              metadata=flat_metadata(job.meta))
    return path, {}


def _write_torchscript(job: _Job) -> tuple[Path, dict]:
    path = job.path("torchscript")
    with quiet_torchscript():
        job.task.to_torchscript(job.model, job.inputs).save(str(path), _extra_files={META_EXTRA_FILE: json.dumps(job.meta)})
    return path, {}


def _write_pt2(job: _Job) -> tuple[Path, dict]:
    path = job.path("pt2")
    program = job.program()
    extra = {"dynamic_axes": program.dynamic}
    torch.export.save(program.program, str(path), extra_files={META_EXTRA_FILE: json.dumps({**job.meta, **extra})})
    return path, {**extra, "note": program.note}


def _write_onnx(job: _Job) -> tuple[Path, dict]:
    path = job.path("onnx")
    program = job.program()
    onnx_program = torch.onnx.export(program.program, (job.inputs,), dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], verbose=False)
    _name_onnx_axes(onnx_program, program.symbols)
    extra = {"dynamic_axes": program.dynamic}
    onnx_program.model.metadata_props.update(flat_metadata(job.meta, extra))
    onnx_program.save(str(path))
    return path, {**extra, "note": program.note}


WRITERS: dict[str, Callable[[_Job], tuple[Path, dict]]] = {
    "pt": _write_pt, "safetensors": _write_safetensors, "torchscript": _write_torchscript, "pt2": _write_pt2,
    "onnx": _write_onnx,
}


def check_formats(task, formats) -> list[str]:
    """The formats asked for (default: all the task's), refused with a one-line reason."""
    formats = list(formats or task.export_formats)
    for fmt in formats:
        if fmt in task.unavailable_export_formats:
            raise ValueError(task.unavailable_export_formats[fmt])
    unknown = [f for f in formats if f not in task.export_formats]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown} for {task.name}; choose from {', '.join(task.export_formats)}")
    return formats


def _verify(job: _Job, fmt: str, path: Path, dynamic: dict[str, bool], atol: float) -> float:
    """Largest difference between the export read back (as ``load_student`` reads it) and the
    trained student, on the sample inputs and, for dynamic axes, on inputs of another size; the
    metadata read back must be the one written."""
    from .predict import read_export

    reloaded, meta = read_export(path, fmt)
    changed = [k for k, v in job.meta.items() if meta.get(k) != v]
    if changed:
        raise RuntimeError(f"{fmt} export {path}: metadata read back differs in {', '.join(changed)}")
    cases = [job.inputs, *job.task.other_sample_inputs(job.inputs, dynamic)] if dynamic else [job.inputs]
    diff = 0.0
    for inputs in cases:
        with torch.no_grad():
            expected = job.model(inputs)
            got = job.task.run_exported(reloaded, inputs)
        case_diff = job.task.output_difference(expected, got)
        if not case_diff <= atol:
            raise RuntimeError(f"{fmt} export {path} differs from the trained student by {case_diff:.3g} (> {atol}) "
                               f"on inputs of shape {_shape(inputs)}")
        diff = max(diff, case_diff)
    return diff


def _shape(inputs) -> str:
    return str(tuple(inputs.shape)) if torch.is_tensor(inputs) else f"{len(inputs)} images"


def export_student(checkpoint: str | Path, out_dir: str | Path, formats=None, atol: float | None = None) -> dict[str, dict]:
    """Write the student in each format (default: all the task's) and ``model.json``, and compare
    each export, read back, with the model. Returns ``{format: {"path", "max_abs_diff",
    "dynamic_axes" (pt2 / onnx), "note" (when an axis had to stay fixed)}}``; raises if an export
    disagrees."""
    model, ckpt, cfg = student_from_checkpoint(checkpoint)
    task = get_task(ckpt["task"])
    formats = check_formats(task, formats)
    atol = atol if atol is not None else (1e-3 if task.name == "detection" else 1e-4)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = deployment_metadata(task, model, ckpt, cfg, source=checkpoint)
    job = _Job(task, model, ckpt, cfg, meta, out_dir / ckpt["model_name"].replace("/", "_").replace(":", "_"),
               task.sample_inputs(ckpt, cfg))
    results = {}
    for fmt in formats:
        path, info = WRITERS[fmt](job)
        diff = _verify(job, fmt, path, info.get("dynamic_axes", {}), atol)
        results[fmt] = {"path": str(path), "max_abs_diff": diff, **{k: v for k, v in info.items() if v is not None}}
    files = {fmt: {"file": Path(r["path"]).name, **{k: v for k, v in r.items() if k != "path"}}
             for fmt, r in results.items()}
    (out_dir / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
    return results
