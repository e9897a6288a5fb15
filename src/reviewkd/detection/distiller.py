"""DetectionDistiller: the Distiller recipe for a torchvision student detector and a frozen teacher
detector. Only the passes through the two networks differ from classification; the rest (frozen
teacher, method set-up, loss assembly, stages, optimiser groups) is the Distiller's.

``distiller.losses(batch, epoch)`` -> ``(None, {loss name: tensor})``: the student detector's own
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

from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from ..batch import Batch
from ..methods import IncompatiblePairError
from ..recipes.distill import Distiller, model_name


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


class DetectionDistiller(Distiller):
    """Student detector + frozen teacher detector + method.

    ``probe_size`` (C, H, W) is the dummy batch the method configures itself from (channels and
    number of levels; sizes at run time come from each batch). The detector's losses are added
    unweighted (``ce_weight`` 1).
    """

    task = "detection"

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, method="reviewkd", *,
                 probe_size: Sequence[int] = (3, 128, 160), **options):
        super().__init__(student, teacher, method, input_size=probe_size, ce_weight=1.0, **options)

    def _build_taps(self, student_spec, teacher_spec, student_stages, teacher_stages) -> None:
        reads, student, teacher = self.method.reads, self.student, self.teacher
        if any(v is not None for v in (student_spec, teacher_spec, student_stages, teacher_stages)):
            raise ValueError("detection distils every FPN level: feature specs and stages do not apply")
        self.retinanet = isinstance(student, RetinaNet)
        self.uses_features = reads.features and teacher is not None
        self.uses_logits = reads.teacher and reads.logits
        if self.uses_logits and (self.retinanet or isinstance(teacher, RetinaNet)):
            raise IncompatiblePairError(
                f"method {self.method.name!r} distils the box head's class logits of the proposals, which "
                "RetinaNet does not have: use Faster / Mask R-CNN, or a feature method (reviewkd, feature_mse)"
            )
        if teacher is not None and type(teacher) is not type(student) and self.uses_logits:
            raise IncompatiblePairError("logit distillation needs the teacher to be the same kind of detector")
        self._roi_tap = _RoiTap(student.roi_heads) if self.uses_logits else None
        self._student_taps = self._teacher_taps = None  # the FPN levels are the features

    def probe_batch(self) -> Batch:
        images = list(torch.randn(2, *self.input_size, device=self._device()))
        return Batch({"images": images}, None)

    def _student_pass(self, batch: Batch):
        s = self.student
        if batch.targets is None:  # the probe: FPN levels of the normalised batch
            tensors = torch.stack(batch.inputs["images"])
            features = s.backbone(tensors)
            return None, list(features.values()), {}, {"tensors": tensors, "student_logits": None,
                                                        "levels": len(features)}
        images, targets = s.transform(batch.inputs["images"], batch.targets)
        features = s.backbone(images.tensors)
        if self._roi_tap is not None:
            self._roi_tap.recording = True
        try:
            raw = self._detector_losses(images, features, targets)
        finally:
            if self._roi_tap is not None:
                self._roi_tap.recording = False
        losses = {k.removeprefix("loss_"): v for k, v in raw.items()}
        shared = {"tensors": images.tensors, "image_sizes": images.image_sizes, "student_logits": None,
                  "levels": len(features)}
        if self._roi_tap is not None:
            shared["student_logits"], shared["proposals"] = self._roi_tap.logits, self._roi_tap.proposals
            self._roi_tap.logits = self._roi_tap.proposals = None
        return None, list(features.values()) if self.uses_features else None, losses, shared

    def _teacher_pass(self, batch: Batch, shared: dict):
        t_features = self.teacher.backbone(shared["tensors"])
        if self.uses_features and len(t_features) != shared["levels"]:
            raise IncompatiblePairError(
                f"{model_name(self.student)} and {model_name(self.teacher)} have different numbers of FPN "
                "levels: pair detectors of the same kind (RetinaNet with RetinaNet)"
            )
        logits = None
        if self.uses_logits and "proposals" in shared:
            heads = self.teacher.roi_heads
            pooled = heads.box_roi_pool(t_features, shared["proposals"], shared["image_sizes"])
            logits, _ = heads.box_predictor(heads.box_head(pooled))
        return logits, list(t_features.values()) if self.uses_features else None

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

    def forward(self, *args, **kwargs):
        """``(batch, stage, epoch)`` from the loop, or ``(images, targets, epoch=...)`` ->
        ``{loss name: tensor}`` for direct use (training mode only)."""
        if args and isinstance(args[0], Batch):
            return self.train_step(*args, **kwargs)
        if not self.training:
            raise RuntimeError("DetectionDistiller computes training losses: call .train() (evaluate distiller.student)")
        images, targets = args[0], args[1] if len(args) > 1 else kwargs.pop("targets")
        epoch = self._direct_epoch(kwargs.pop("epoch", None))
        if kwargs:
            raise TypeError(f"DetectionDistiller got unknown keyword argument(s) {sorted(kwargs)}; it takes targets "
                            "and epoch")
        return self.losses(Batch({"images": list(images)}, list(targets)), epoch)[1]

    def _hooks(self) -> list:
        return super()._hooks() + ([self._roi_tap] if self._roi_tap is not None else [])
