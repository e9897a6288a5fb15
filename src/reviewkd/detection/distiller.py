"""DetectionDistiller: a torchvision student detector, a frozen teacher detector and a method.

``distiller(images, targets, epoch=e)`` -> ``{loss name: tensor}``: the student detector's own
losses (RPN + ROI heads, plus masks for Mask R-CNN; focal + box regression for RetinaNet) and the
method's weighted terms. One pass:

1. the student's transform normalises and batches the images once (``images.tensors``);
2. the student backbone (ResNet / MobileNetV2 + FPN) runs on that batch, and so does the teacher's
   backbone (eval mode, ``torch.inference_mode``, outputs cloned), so the FPN levels of both have
   equal sizes whatever the batch's (non-square, per-batch) size is;
3. the student's heads compute the detector losses from its FPN levels;
4. the method gets a :class:`~reviewkd.methods.Step` whose ``student_features`` /
   ``teacher_features`` are the FPN levels (shallow -> deep: P2..P6, or P3..P7 for RetinaNet) and,
   for methods on logits, ``student_logits`` / ``teacher_logits`` are the class logits of the
   student's and the teacher's box heads on the proposals the student's ROI heads sampled.

Methods come from the same registry as in classification and declare what they read: feature taps
(``student_features``/``teacher_features``) get the FPN levels; methods without taps read logits.
ReviewKD therefore runs unchanged: one ABF per FPN level (256 -> mid 256 -> 256, every level
fused but the deepest), HCL per level, sizes taken from this batch's features.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from ..methods import DistillMethod, IncompatiblePairError, Step, create_method

# Methods whose detection use is implemented and tested (features: FPN levels; logits: ROI heads).
DETECTION_METHODS = ("vanilla", "reviewkd", "feature_mse", "kd")


def _name(model) -> str:
    return getattr(model, "model_name", type(model).__name__)


def _uses_features(method: DistillMethod) -> bool:
    return method.student_features is not None or method.teacher_features is not None


def _uses_logits(method: DistillMethod) -> bool:
    return method.needs_teacher and (not _uses_features(method) or getattr(method, "kd_weight", 0.0) > 0)


class _RoiTap:
    """Records, during one student forward, the proposals the box head pooled and its class logits."""

    def __init__(self, roi_heads: nn.Module):
        self.proposals = self.logits = None
        self.recording = False
        self._handles = [
            roi_heads.box_roi_pool.register_forward_hook(self._pool_hook),
            roi_heads.box_predictor.register_forward_hook(self._predictor_hook),
        ]

    def _pool_hook(self, module, args, output):
        if self.recording:
            self.proposals = [p.detach() for p in args[1]]

    def _predictor_hook(self, module, args, output):
        if self.recording:
            self.logits = output[0]

    def remove(self):
        for h in self._handles:
            h.remove()


class DetectionDistiller(nn.Module):
    """Student + frozen teacher + method; ``forward`` returns the weighted loss terms.

    ``probe_size`` (C, H, W) is the dummy batch the method configures itself from (channels and
    number of levels; sizes at run time come from each batch).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        method: str | DistillMethod = "reviewkd",
        *,
        probe_size: Sequence[int] = (3, 128, 160),
        **method_options,
    ):
        super().__init__()
        name = method if isinstance(method, str) else method.name
        if name not in DETECTION_METHODS:
            raise ValueError(f"method {name!r} is not available for detection; choose from {', '.join(DETECTION_METHODS)}")
        self.student = student
        self.method = create_method(method, **method_options) if isinstance(method, str) else method
        if self.method.needs_teacher and teacher is None:
            raise ValueError(f"method {name!r} needs a teacher detector; pass teacher=... or use method='vanilla'")
        self.teacher = teacher if self.method.needs_teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.retinanet = isinstance(student, RetinaNet)
        self.uses_features = _uses_features(self.method) and self.teacher is not None
        self.uses_logits = _uses_logits(self.method)
        if self.uses_logits and (self.retinanet or isinstance(self.teacher, RetinaNet)):
            raise IncompatiblePairError(
                f"method {name!r} distils the box head's class logits of the proposals, which "
                "RetinaNet does not have: use Faster / Mask R-CNN, or a feature method (reviewkd, feature_mse)"
            )
        if self.teacher is not None and type(self.teacher) is not type(student) and self.uses_logits:
            raise IncompatiblePairError("logit distillation needs the teacher to be the same kind of detector")
        self._roi_tap = _RoiTap(student.roi_heads) if self.uses_logits else None
        self.probe_size = tuple(int(v) for v in probe_size)
        self._probe_and_setup()

    def _device(self) -> torch.device:
        return next(self.student.parameters()).device

    @torch.no_grad()
    def _probe_and_setup(self) -> None:
        was_training = self.student.training
        self.student.eval()
        try:
            x = torch.randn(2, *self.probe_size, device=self._device())
            s_feats = list(self.student.backbone(x).values())
            t_feats = list(self.teacher.backbone(x).values()) if self.teacher is not None else None
            if self.uses_features and len(s_feats) != len(t_feats):
                raise IncompatiblePairError(
                    f"{_name(self.student)} has {len(s_feats)} FPN levels and {_name(self.teacher)} "
                    f"{len(t_feats)}: pair detectors of the same kind (RetinaNet with RetinaNet)"
                )
            self.method.setup(Step(
                student_logits=None, student_features=s_feats, teacher_features=t_feats,
                student_name=_name(self.student), teacher_name=_name(self.teacher) if self.teacher is not None else "teacher",
            ))
        finally:
            self.student.train(was_training)
        self.method.to(self._device())

    # ------------------------------------------------------------------ forward
    def _detector_losses(self, images, features, targets) -> dict[str, torch.Tensor]:
        s = self.student
        if self.retinanet:
            levels = list(features.values())
            head_outputs = s.head(levels)
            anchors = s.anchor_generator(images, levels)
            return s.compute_loss(targets, head_outputs, anchors)
        proposals, rpn_losses = s.rpn(images, features, targets)
        _, roi_losses = s.roi_heads(features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def _teacher_logits(self, t_features, proposals, image_sizes) -> torch.Tensor:
        heads = self.teacher.roi_heads
        pooled = heads.box_roi_pool(t_features, proposals, image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        return logits

    def forward(self, images: list[torch.Tensor], targets: list[dict], epoch: float = 0.0, **extra) -> dict[str, torch.Tensor]:
        if not self.training:
            raise RuntimeError("DetectionDistiller computes training losses: call .train() (evaluate distiller.student)")
        s = self.student
        batch, targets = s.transform(images, targets)
        features = s.backbone(batch.tensors)
        t_features = None
        if self.teacher is not None and (self.uses_features or self.uses_logits):
            with torch.inference_mode():
                t_features = self.teacher.backbone(batch.tensors)

        if self._roi_tap is not None:
            self._roi_tap.recording = True
        try:
            raw = self._detector_losses(batch, features, targets)
        finally:
            if self._roi_tap is not None:
                self._roi_tap.recording = False
        losses = {k.removeprefix("loss_"): v for k, v in raw.items()}

        if self.method.name == "vanilla":
            return losses
        s_logits = t_logits = None
        if self.uses_logits:
            s_logits = self._roi_tap.logits
            with torch.inference_mode():
                t_logits = self._teacher_logits(t_features, self._roi_tap.proposals, batch.image_sizes)
            t_logits = t_logits.clone()  # inference tensors cannot be saved for backward
            self._roi_tap.logits = self._roi_tap.proposals = None
        step = Step(
            student_logits=s_logits,
            teacher_logits=t_logits,
            student_features=list(features.values()) if self.uses_features else None,
            teacher_features=[f.clone() for f in t_features.values()] if self.uses_features else None,
            epoch=float(epoch),
            extra=extra,
            student_name=_name(s),
            teacher_name=_name(self.teacher) if self.teacher is not None else "teacher",
        )
        for name, value in self.method(step).items():
            if name in losses:
                raise ValueError(f"method loss {name!r} collides with a detector loss")
            losses[name] = value
        return losses

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and method modules (ABFs, regressors); never the teacher."""
        for p in self.student.parameters():
            if p.requires_grad:
                yield p
        yield from self.method.parameters()
