"""Object detection and instance segmentation (COCO format): torchvision detectors, iteration-based
schedules, COCO box / mask AP."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..batch import batch_to
from ..config import ConfigError
from ..data.preprocessing import detector_preprocessing
from ..detection.coco_eval import evaluate_detector
from ..detection.data import build_detection_data, build_val_set, quiet_coco, resize, resolve, val_loader
from ..detection.distiller import DetectionDistiller
from ..detection.models import (classes_in, create_detector, detector_state_dict, load_detector_weights,
                                parse_name)
from ..engine.runtime import autocast
from ..methods import RunContext
from .base import RunSchedule, Task, TaskData, quiet_torchscript

# solver fields of epoch-based schedules, and what replaces them in a detection config
_EPOCH_FIELDS = {"epochs": "detection.max_iter", "milestones": "detection.steps",
                 "warmup_epochs": "detection.warmup_iters", "schedule": "detection.steps (multistep)",
                 "pretrain_lr": "nothing (no method with a pre-training stage runs on detectors)"}


def detector_kwargs(cfg) -> dict:
    """How the student detector of a config is built, minus the backbone weight file."""
    det = cfg.detection
    frozen = det.frozen_bn if det.frozen_bn is not None else det.backbone_weights is not None
    return {"frozen_bn": bool(frozen), "min_size": det.min_size_test, "max_size": det.max_size_test,
            "options": dict(det.detector_options)}


# Why detectors have no pt2 / ONNX export (measured with torch 2.14, torchvision 0.29): the current
# ONNX exporter and pt2 both start from torch.export, and torchvision's inference branches on how
# many boxes survive each step (batched_nms on boxes.numel() > 4000 and, with that branch taken out,
# on whether any box is left), which torch.export cannot trace.
_NO_TORCH_EXPORT = ("{fmt} export is not available for detectors: it is built on torch.export, which cannot trace "
                    "torchvision's detection post-processing (its control flow depends on how many boxes are left: "
                    "batched_nms branches on boxes.numel() in torchvision/ops/boxes.py); export with "
                    "--formats pt,safetensors,torchscript")


@dataclass
class DetectionData(TaskData):
    """``train``: the detection loaders (endless sampler from an iteration); ``test``: the val set."""

    val_loader: Optional[Callable] = None
    device: Any = None
    masks: bool = False

    def train_batches(self, start: int, earlier: int = 0):
        # The DataLoader's iterator is made now, not at the first batch: making it draws from the
        # global RNG, which the loop restores right after this call when it resumes a run.
        batches = iter(self.train.train_loader(start_iter=start))
        return (batch_to(batch, self.device) for batch in batches)


class DetectionTask(Task):
    name = "detection"
    score_key, score_label, higher_is_better = "box_AP", "box AP", True
    curve_scores = {"box_AP": "box AP", "mask_AP": "mask AP"}
    score_axis = "COCO AP (%)"
    export_formats = ("pt", "safetensors", "torchscript")
    unavailable_export_formats = {fmt: _NO_TORCH_EXPORT.format(fmt=fmt) for fmt in ("pt2", "onnx")}
    schedule_unit = "iteration"

    def check_config(self, cfg) -> None:
        if cfg.detection is None:
            raise ConfigError("not a detection config: set task: detection")
        for key in sorted(cfg.solver.model_fields_set & set(_EPOCH_FIELDS)):
            raise ConfigError(f"solver.{key} is for epoch-based runs; a detection run uses {_EPOCH_FIELDS[key]}")
        for key in ("ce_weight", "student_stages", "teacher_stages"):
            if getattr(cfg.method, key) is not None:
                raise ConfigError(f"method.{key} has no meaning for detection (the detector's losses are added "
                                  "unweighted and every FPN level is used)")
        if cfg.runtime.compile:
            raise ConfigError("runtime.compile is not supported for detection runs")
        if cfg.data.val_split:
            raise ConfigError("data.val_split is not available for detection: select on detection.val_annotations")
        steps = cfg.detection.steps
        if steps != sorted(steps) or any(s >= cfg.detection.max_iter for s in steps):
            raise ConfigError(f"detection.steps {steps} must increase and stay below "
                              f"detection.max_iter={cfg.detection.max_iter}")
        parse_name(cfg.model.name)
        if cfg.teacher is not None:
            parse_name(cfg.teacher.name)

    def num_outputs(self, cfg) -> int:
        """Classes (with background) from the val annotations when they exist; else 2 (enough for
        the architecture probe: the heads' size does not change the FPN levels)."""
        path = resolve(cfg.data.root, cfg.detection.val_annotations)
        if not path.is_file():
            return 2
        return len(quiet_coco(path).getCatIds()) + 1 if cfg.detection.labels == "contiguous" else 91

    def probe_size(self, cfg) -> tuple[int, ...]:
        return (3, 128, 160)

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        det = cfg.detection
        return create_detector(name, num_outputs, backbone_weights=det.backbone_weights,
                               trainable_layers=det.trainable_layers, frozen_bn=det.frozen_bn,
                               min_size=det.min_size_test, max_size=det.max_size_test, options=det.detector_options)

    def load_weights(self, model: nn.Module, path) -> nn.Module:
        return load_detector_weights(model, path)  # reconciles frozen / trainable BatchNorm bookkeeping

    def build_teacher(self, name: str, cfg, num_outputs: int, weights) -> nn.Module:
        """A frozen-BatchNorm detector; its number of classes is read from the checkpoint when it
        differs from the dataset's (feature methods do not need the heads)."""
        det = cfg.detection
        state = detector_state_dict(weights) if weights is not None else None
        classes = (classes_in(state) if state is not None else None) or num_outputs
        model = create_detector(name, classes, frozen_bn=True, min_size=det.min_size_test, max_size=det.max_size_test,
                                options=det.detector_options)
        if state is not None:
            try:
                load_detector_weights(model, state)
            except ValueError as exc:
                raise type(exc)(f"{weights}: {exc}") from None
        model.requires_grad_(False)
        return model.eval()

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        return DetectionDistiller(student, teacher, cfg.method.name, probe_size=input_size, context=context,
                                  **cfg.method.options)

    def schedule(self, cfg, steps_per_epoch: int) -> RunSchedule:
        det = cfg.detection
        return RunSchedule(unit=1, length=det.max_iter, kind="multistep", milestones=tuple(det.steps),
                           gamma=cfg.solver.gamma, warmup=det.warmup_iters, warmup_start=0.001,
                           eval_period=det.eval_period, checkpoint_period=det.checkpoint_period,
                           log_period=det.log_period, x_key=self.schedule_unit)

    def _masks(self, cfg) -> bool:
        return parse_name(cfg.model.name)[0] == "maskrcnn"

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        data = build_detection_data(cfg, masks=self._masks(cfg), rank=rank, world=world_size)
        val = data.val_set
        meta = {"num_classes": data.num_classes, "label_to_cat": {str(k): v for k, v in val.label_to_cat.items()},
                "class_names": {str(k): v for k, v in val.class_names.items()}}
        per_pass = round(1.0 / data.passes_per_iter)
        return DetectionData(data, val, per_pass, self.probe_size(cfg), data.num_classes,
                             RunContext(num_samples=len(data.train_set), num_classes=data.num_classes), meta,
                             num_train=len(data.train_set), val_loader=data.val_loader,
                             device=device, masks=self._masks(cfg))

    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        return evaluate_detector(model, data.val_loader(), data.test, device, autocast(device, precision),
                                 masks=data.masks, progress=progress)

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        text = f"box AP {m['box_AP']:.2f} (AP50 {m['box_AP50']:.2f}, AP75 {m['box_AP75']:.2f})"
        return text + (f", mask AP {m['mask_AP']:.2f}" if "mask_AP" in m else "")

    def build_eval_data(self, cfg, device) -> TaskData:
        """Only the val set (evaluating a checkpoint reads no training annotations)."""
        val = build_val_set(cfg, masks=self._masks(cfg))
        return DetectionData(None, val, 1, self.probe_size(cfg), val.num_classes, RunContext(), {},
                             device=device, masks=self._masks(cfg),
                             val_loader=lambda: val_loader(val, cfg.data.eval_batch_size, cfg.data.workers))

    # ---------------------------------------------------------------- export
    def rebuild(self, meta: dict, cfg, export: bool = True) -> nn.Module:
        # exports leave out the float32-box hooks of autocast: TorchScript runs in float32 anyway
        return create_detector(meta["model_name"], meta["num_classes"], **detector_kwargs(cfg),
                               float_boxes=not export).eval()

    def sample_inputs(self, meta: dict, cfg) -> list[torch.Tensor]:
        """A few val images of the run (else seeded random ones), already at the test size.

        At the test size the detector's own resize is the identity. For other sizes torchvision's
        scripted transform may round a resized side one pixel differently from the eager one, which
        moves detections slightly; the comparison is about the weights and the graph, not that rounding.
        """
        from ..detection.data import CocoDetection

        det = cfg.detection
        try:
            val = CocoDetection(resolve(cfg.data.root, det.val_images), resolve(cfg.data.root, det.val_annotations),
                                train=False)
            images = [val.load(i)[0] for i in range(min(2, len(val)))]
        except (FileNotFoundError, OSError):
            g = torch.Generator().manual_seed(0)
            images = [torch.rand(3, 96, 96 + 24 * i, generator=g) for i in range(2)]
        return [resize(im, {}, det.min_size_test, det.max_size_test)[0] for im in images]

    def preprocessing(self, model: nn.Module, meta: dict, cfg) -> dict:
        """RGB images scaled to 0..1, given as a list: the detector resizes and normalises inside."""
        t = model.transform
        return detector_preprocessing(t.image_mean, t.image_std, t.min_size[-1], t.max_size)  # eval uses min_size[-1]

    def to_torchscript(self, model, inputs):
        with quiet_torchscript():
            return torch.jit.script(model)

    def run_exported(self, model, inputs):
        with warnings.catch_warnings():  # the tuple it announces is taken apart right here
            warnings.filterwarnings("ignore", message="RCNN always returns a", category=UserWarning)
            out = model(inputs)
        return out[1] if isinstance(out, tuple) else out  # scripted detectors return (losses, detections)

    def output_difference(self, expected: list[dict], got: list[dict]) -> float:
        diff = 0.0
        for a, b in zip(expected, got, strict=True):
            if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
                return float("inf")
            for k in a:
                if a[k].numel():
                    diff = max(diff, (a[k].float() - b[k].float()).abs().max().item())
        return diff
