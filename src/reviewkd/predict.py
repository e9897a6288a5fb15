"""Inference with a trained student: ``load_student(path)`` reads a run checkpoint (``best.pt`` /
``last.pt``), an export folder written by ``reviewkd export`` (its ``model.json`` names the files)
or one exported file (``.pt``, ``.safetensors``, ``.pt2``, ``.torchscript.pt``, ``.onnx``), and
returns a :class:`LoadedStudent`: the eval-mode network, its metadata (classes, input size,
preprocessing, ...) and ``preprocess`` / ``predict`` for image files (video files for a ``task:
video`` network of clips, scored as evaluation scores a video: the softmax averaged over its clips).

A folder is read through its state dict by default (``.pt``, then ``.safetensors``, ``.pt2``,
TorchScript, ONNX: the first present); ``format=`` picks another. Networks from state dicts are
rebuilt by the task's ``rebuild`` from the run's config stored in the metadata, the same path
``reviewkd export`` and ``reviewkd eval`` take.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .config import validate
from .data.preprocessing import ImageLike, ImagePreprocessor, find_images, open_image
from .data.video import VIDEO_SUFFIXES, VideoPreprocessor, find_videos
from .engine.checkpoint import FORMAT as CHECKPOINT_FORMAT
from .export import (EXPORT_FORMAT, META_EXTRA_FILE, META_FILE, META_KEY, SUFFIXES, deployment_metadata,
                     student_from_checkpoint)
from .models.weights import check_state_dict
from .tasks import get_task
from .tasks.base import quiet_torchscript

FORMAT_PREFERENCE = ("pt", "safetensors", "pt2", "torchscript", "onnx")
PREDICTABLE_TASKS = ("classification", "regression", "video")
_REEXPORT = "export the run again with `reviewkd export CHECKPOINT`"


# ------------------------------------------------------------------------------- readers
def _parse_meta(text, path: Path) -> dict:
    try:
        meta = json.loads(text)
    except (TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} carries no reviewkd export metadata (written by another tool or an older "
                         f"reviewkd): {_REEXPORT}")
    return meta


def _rebuild(meta: dict, state: dict, path: Path) -> torch.nn.Module:
    task = get_task(meta["task"])
    model = task.rebuild(meta, validate(dict(meta["config"]), str(path)))
    check_state_dict(model, state, what=str(path))
    model.load_state_dict(state)
    return model.eval()


def _read_pt(path: Path):
    obj = _torch_load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ValueError(f"{path} is not a reviewkd export")
    meta = _parse_meta(json.dumps({k: v for k, v in obj.items() if k != "model"}), path)
    return _rebuild(meta, obj["model"], path), meta


def _read_safetensors(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {path} as safetensors ({exc})") from None
    meta = _parse_meta(text, path)
    return _rebuild(meta, state, path), meta


def _read_torchscript(path: Path):
    extra = {META_EXTRA_FILE: ""}
    try:
        with quiet_torchscript():
            model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as TorchScript ({str(exc).strip().splitlines()[0]})") from None
    return model.eval(), _parse_meta(extra[META_EXTRA_FILE] or None, path)


def _read_pt2(path: Path):
    extra = {META_EXTRA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - whatever torch.export raises for a file it cannot read
        raise ValueError(f"cannot read {path} as a torch.export program ({type(exc).__name__})") from None
    # the program was exported in eval mode: its module has no train/eval switch
    return program.module(), _parse_meta(extra[META_EXTRA_FILE] or None, path)


class OnnxModel:
    """An ONNX Runtime session called like a module: a float tensor in, the first output out."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"cannot read {path} as an ONNX model ({type(exc).__name__})") from None
        self.input_name = self.session.get_inputs()[0].name

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out, *_) = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out)


def _read_onnx(path: Path):
    model = OnnxModel(path)
    return model, _parse_meta(model.metadata().get(META_KEY), path)


READERS: dict[str, Callable[[Path], tuple[Any, dict]]] = {
    "pt": _read_pt, "safetensors": _read_safetensors, "torchscript": _read_torchscript, "pt2": _read_pt2,
    "onnx": _read_onnx,
}


def read_export(path: str | os.PathLike, fmt: str) -> tuple[Any, dict]:
    """(the network in eval mode, or a callable for ONNX; the metadata inside the file)."""
    return READERS[fmt](Path(path))


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files it cannot read
        raise ValueError(f"cannot read {path} ({type(exc).__name__}): the file is corrupted or not a model "
                         f"file") from None


def _kind_of_file(path: Path) -> str:
    """The format of one file: by its name, else (``.pt`` and others) by what it holds."""
    name = path.name.lower()
    if name.endswith(SUFFIXES["torchscript"]):
        return "torchscript"
    for fmt in ("onnx", "pt2", "safetensors"):
        if name.endswith(SUFFIXES[fmt]):
            return fmt
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in n for n in archive.namelist()):
                return "torchscript"
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "checkpoint"
    if isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT:
        return "pt"
    if isinstance(obj, dict) and "model_name" in obj and "model" in obj:
        raise ValueError(f"{path} was exported by an older reviewkd, without its preprocessing: {_REEXPORT}")
    raise ValueError(f"{path} is neither a reviewkd run checkpoint nor a reviewkd export (a bare state dict "
                     f"names no architecture or preprocessing): give best.pt / last.pt of a run or a folder "
                     f"written by `reviewkd export`")


def _from_folder(folder: Path, described_by: Path, fmt: Optional[str]) -> tuple[Any, dict, str, Path]:
    if not described_by.is_file():
        raise FileNotFoundError(f"{folder} holds no {META_FILE}: give a run checkpoint (best.pt / last.pt), a "
                                f"folder written by `reviewkd export`, or one exported file")
    try:
        files = json.loads(described_by.read_text()).get("files", {})
    except (ValueError, AttributeError):
        raise ValueError(f"{described_by} is not valid JSON: {_REEXPORT}") from None
    present = [f for f in FORMAT_PREFERENCE if f in files and (folder / files[f]["file"]).is_file()]
    if fmt is None:
        if not present:
            raise FileNotFoundError(f"{folder} holds none of the files {described_by.name} lists: {_REEXPORT}")
        fmt = present[0]
    elif fmt not in present:
        raise FileNotFoundError(f"{folder} holds no {fmt} export (it has: {', '.join(present) or 'none'})")
    path = folder / files[fmt]["file"]
    model, meta = read_export(path, fmt)
    return model, meta, fmt, path


def load_student(path: str | os.PathLike, format: Optional[str] = None) -> "LoadedStudent":
    """The student of a run checkpoint, an export folder (``format``: which of its files, default
    the first of ``FORMAT_PREFERENCE`` present) or one exported file, ready for inference."""
    path = Path(path)
    if format is not None and format not in FORMAT_PREFERENCE:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMAT_PREFERENCE)}")
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir() or path.suffix.lower() == ".json":
        folder, described_by = (path, path / META_FILE) if path.is_dir() else (path.parent, path)
        model, meta, fmt, path = _from_folder(folder, described_by, format)
        return LoadedStudent(model, meta, fmt, path)
    fmt = _kind_of_file(path)
    if format is not None and format != fmt:
        raise ValueError(f"{path} is a {fmt} file, not {format}")
    if fmt == "checkpoint":
        model, ckpt, cfg = student_from_checkpoint(path)
        meta = deployment_metadata(get_task(ckpt["task"]), model, ckpt, cfg, source=path)
        return LoadedStudent(model, meta, fmt, path)
    model, meta = read_export(path, fmt)
    return LoadedStudent(model, meta, fmt, path)


# ------------------------------------------------------------------------------ inference
@dataclass
class LoadedStudent:
    """A student ready for inference. ``model``: an ``nn.Module`` (a callable session for ONNX)
    taking what ``preprocess`` returns; ``meta``: the export metadata (``task``, ``model_name``,
    ``class_names``, ``input_size``, ``preprocessing``, ``config``, ...); ``format``: what was read
    (``checkpoint``, ``pt``, ``safetensors``, ``pt2``, ``torchscript`` or ``onnx``)."""

    model: Any
    meta: dict
    format: str
    path: Path
    _preprocessor: Union[ImagePreprocessor, VideoPreprocessor, None] = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def class_names(self) -> list[str]:
        """One name per output (the class index as text where the data named none)."""
        names = self.meta.get("class_names")
        if isinstance(names, dict):  # detection: {label: name}
            return [names.get(str(i), str(i)) for i in range(self.meta["num_classes"])]
        return list(names) if names else [str(i) for i in range(self.meta["num_classes"])]

    @property
    def input_size(self) -> Optional[list[int]]:
        return self.meta.get("input_size")

    def preprocess(self, images: Union[ImageLike, Sequence[ImageLike]]):
        """Image files or PIL images -> the model's input, exactly as evaluation prepared images
        (``meta["preprocessing"]``): one N x C x H x W tensor, or a list for detectors. A video
        model takes video files: K clips each (``eval_clips``), one (N * K) x 3 x T x H x W tensor."""
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        self._check_kind(images)
        return self._prepare()(images)

    def _prepare(self) -> Union[ImagePreprocessor, VideoPreprocessor]:
        if self._preprocessor is None:
            spec = self.meta["preprocessing"]
            self._preprocessor = VideoPreprocessor(spec) if self.task == "video" else ImagePreprocessor(spec)
        return self._preprocessor

    def _check_kind(self, inputs: Sequence) -> None:
        """Video files for a video model, images for the others (by the files' suffixes)."""
        is_video = [isinstance(x, (str, os.PathLike)) and Path(x).suffix.lower() in VIDEO_SUFFIXES for x in inputs]
        if self.task == "video" and not all(is_video):
            raise ValueError(f"{self.path} holds a video model: give video files ({', '.join(VIDEO_SUFFIXES)}), "
                             f"not {inputs[is_video.index(False)]}")
        if self.task != "video" and any(is_video):
            raise ValueError(f"{inputs[is_video.index(True)]} is a video but {self.path} holds an image model: "
                             f"give image files")

    def __call__(self, inputs) -> Any:
        """The model's outputs for a prepared input (a tensor, or a list of tensors for detectors)
        or for images (preprocessed first); the same for every format (a scripted detector's
        (losses, detections) pair gives its detections)."""
        if not torch.is_tensor(inputs) and not (isinstance(inputs, list) and inputs and torch.is_tensor(inputs[0])):
            inputs = self.preprocess(inputs)
        with torch.inference_mode():
            return get_task(self.task).run_exported(self.model, inputs)

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], topk: int = 5,
                batch_size: int = 64) -> list[dict]:
        """Per image: ``{"image", "top": [{"index", "class", "probability"}, ...]}`` with the
        ``topk`` most probable classes (all of them when there are fewer), or ``{"image",
        "value"}`` in the targets' unit for a regressor. A video model takes video files and gives
        ``{"video", "top"}``: the softmax averaged over the video's clips, as evaluation scores it
        (``batch_size`` then counts clips)."""
        if self.task not in PREDICTABLE_TASKS:
            raise ValueError(f"predict is for classification (images or videos) and regression: {self.path} holds "
                             f"a {self.task} model; call the loaded model on .preprocess(images) for its raw outputs")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive whole number, got {topk!r}")
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        self._check_kind(images)
        key = "video" if self.task == "video" else "image"
        step = max(1, batch_size // self._prepare().clips) if key == "video" else batch_size
        results = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            outputs = torch.as_tensor(self(chunk)).float()
            names = [str(im) if isinstance(im, (str, os.PathLike)) else f"image {start + i}"
                     for i, im in enumerate(chunk)]
            results.extend({key: n, **p} for n, p in zip(names, self._describe(outputs, len(chunk), topk)))
        return results

    def _describe(self, outputs: torch.Tensor, n: int, topk: int) -> list[dict]:
        """``{"value"}`` or ``{"top"}`` for each of the ``n`` inputs whose outputs these are (a
        video's K clips: their softmax averaged, as video evaluation does)."""
        if self.task == "regression":
            from .data.regression import TargetScaler

            values = TargetScaler.from_dict(self.meta["target_scaler"]).denormalise(outputs.view(-1).double())
            return [{"value": v} for v in values.tolist()]
        probabilities = torch.softmax(outputs, dim=1).view(n, -1, outputs.shape[1]).mean(1)
        top = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
        classes = self.class_names
        return [{"top": [{"index": i, "class": classes[i], "probability": p} for p, i in zip(ps.tolist(), idx.tolist())]}
                for ps, idx in zip(top.values, top.indices)]


def format_predictions(predictions: list[dict]) -> str:
    """Text for people: the image (or video), then one line per class with its probability (or the value)."""
    lines = []
    for p in predictions:
        name = p["video"] if "video" in p else p["image"]
        if "value" in p:
            lines.append(f"{name}: {p['value']:.4g}")
            continue
        lines.append(name)
        lines.extend(f"  {t['probability'] * 100:6.2f}%  {t['class']}" for t in p["top"])
    return "\n".join(lines)


__all__ = ["FORMAT_PREFERENCE", "LoadedStudent", "OnnxModel", "find_images", "find_videos", "format_predictions",
           "load_student", "open_image", "read_export"]
