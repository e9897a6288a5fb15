"""Distiller: a student, a frozen teacher and a distillation method, as one trainable module."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureSpec, FeatureTaps, feature_spec_of, stage_batchnorms
from .methods import DistillMethod, Step, create_method


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


class Distiller(nn.Module):
    """``distiller(images, targets, epoch=e)`` -> ``(student_logits, {loss_name: tensor})``.

    The teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
    ``torch.inference_mode``. The method configures itself from one probe pass of both networks on
    a dummy batch of ``input_size``; ``student_stages`` / ``teacher_stages`` (1-based) pick stages
    when the two networks have different numbers of them. Loss terms come weighted; their sum is
    the training objective.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        method: str | DistillMethod = "reviewkd",
        *,
        input_size: Sequence[int] = (3, 32, 32),
        ce_weight: float | None = None,
        student_spec: FeatureSpec | None = None,
        teacher_spec: FeatureSpec | None = None,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        context: dict | None = None,
        **method_options,
    ):
        super().__init__()
        self.student = student
        self.method = create_method(method, **method_options) if isinstance(method, str) else method
        if method_options and not isinstance(method, str):
            raise ValueError("pass method options to the method object itself, not to Distiller")
        self.ce_weight = float(self.method.ce_weight if ce_weight is None else ce_weight)
        if self.method.needs_teacher and teacher is None:
            raise ValueError(f"method {self.method.name!r} needs a teacher; pass teacher=... or use method='vanilla'")
        self.teacher = teacher if self.method.needs_teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        self._student_taps = self._taps(student, student_spec, student_stages, self.method.student_features)
        self._teacher_taps = (
            self._taps(self.teacher, teacher_spec, teacher_stages, self.method.teacher_features)
            if self.teacher is not None
            else None
        )
        self.input_size = tuple(int(v) for v in input_size)
        self._probe_and_setup(dict(context or {}))

    @staticmethod
    def _taps(model, spec, stages, kind) -> FeatureTaps | None:
        if kind is None:
            return None
        spec = (spec or feature_spec_of(model)).select(stages)
        return FeatureTaps(model, spec, kind)

    def _device(self) -> torch.device:
        return next(self.student.parameters()).device

    @torch.no_grad()
    def _probe_and_setup(self, context: dict) -> None:
        if self._teacher_taps is not None:
            # The BatchNorm before each teacher stage's final ReLU (OFD derives margins from it).
            context.setdefault("teacher_bn", stage_batchnorms(self.teacher, self._teacher_taps.spec))
        # Eval mode for the probe: a batch of 2 must not move any BatchNorm statistics.
        was_training = self.student.training
        self.student.eval()
        try:
            x = torch.randn(2, *self.input_size, device=self._device())
            try:
                probe = self._run(x, targets=None, epoch=0.0, extra=context)
            except RuntimeError as exc:
                raise ValueError(
                    f"probe forward with input_size={self.input_size} failed for "
                    f"{_name(self.student)} / {_name(self.teacher) if self.teacher is not None else '-'}: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            self.method.setup(probe)
        finally:
            self.student.train(was_training)
        self.method.to(self._device())

    def _run(self, images, targets, epoch, extra) -> Step:
        if self._student_taps is not None:
            logits, s_feats = self._student_taps(images)
        else:
            logits, s_feats = self.student(images), None
        t_logits = t_feats = None
        if self.teacher is not None:
            with torch.inference_mode():
                if self._teacher_taps is not None:
                    t_logits, t_feats = self._teacher_taps(images)
                else:
                    t_logits = self.teacher(images)
            # Inference tensors cannot be saved for backward; the losses need ordinary copies.
            t_logits = t_logits.clone()
            t_feats = None if t_feats is None else [f.clone() for f in t_feats]
        return Step(
            student_logits=logits,
            targets=targets,
            teacher_logits=t_logits,
            student_features=s_feats,
            teacher_features=t_feats,
            epoch=float(epoch),
            extra=extra,
            student_name=_name(self.student),
            teacher_name=_name(self.teacher) if self.teacher is not None else "teacher",
        )

    def forward(self, images: torch.Tensor, targets: torch.Tensor, epoch: float = 0.0, pretrain: bool = False, **extra):
        """``extra`` reaches the method as ``step.extra`` (e.g. ``indices`` of the samples).

        ``pretrain=True`` gives the method's pre-training losses instead (see DistillMethod).
        """
        step = self._run(images, targets, epoch, extra)
        if pretrain:
            return step.student_logits, self.method.pretrain_losses(step)
        losses = {"ce": self.ce_weight * F.cross_entropy(step.student_logits, targets)}
        losses.update(self.method(step))
        return step.student_logits, losses

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and method modules (ABFs, connectors); never the teacher."""
        yield from self.student.parameters()
        yield from self.method.parameters()

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """What the method's pre-training stage optimises (empty when it has none)."""
        return self.method.pretrain_parameters(self.student) if self.method.pretrain_epochs > 0 else []
