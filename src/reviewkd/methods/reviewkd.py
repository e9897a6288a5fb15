"""Chen, Liu, Zhao, Jia, CVPR 2021: "Distilling Knowledge via Knowledge Review"."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..review import ReviewFusion, hcl_loss
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method
from .kd import kd_loss


def _stage_hint(n_student: int, n_teacher: int) -> str:
    """Suggest keeping the deepest stages of the side that has more."""
    if n_teacher > n_student:
        return f"teacher_stages={list(range(n_teacher - n_student + 1, n_teacher + 1))}"
    return f"student_stages={list(range(n_student - n_teacher + 1, n_student + 1))}"


@register_method
class ReviewKD(DistillMethod):
    """Review mechanism: ABF fusion deep -> shallow, HCL against the teacher's entries.

    Student features are post-activation stage outputs (``student_preact=True`` takes
    pre-activations, as the released ImageNet code does), teacher features pre-activation; the
    pooled feature is the last entry. The HCL weight ramps as min(1, epoch / warmup_epochs) with
    epochs counted from 0, so the first epoch trains with CE alone (``warmup_epochs=0``: full
    weight from the start, as the released ImageNet script). ``kd_weight > 0`` adds the released
    script's optional KD term (``--use-kl``, T=4).
    """

    name = "reviewkd"
    paper = "Chen, Liu, Zhao, Jia, CVPR 2021: Distilling Knowledge via Knowledge Review"
    reads = Reads(teacher_features="pre", student_features="post", logits=False,
                  tasks=("classification", "detection", "regression"))

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: float = 20.0,
        mid_channels: int | None = None,
        student_preact: bool = False,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__()
        self.weight, self.warmup_epochs = float(weight), float(warmup_epochs)
        self.mid_channels = mid_channels
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        self.reads = replace(self.reads, student_features="pre" if student_preact else "post", logits=self.kd_weight > 0)
        self.fusion: ReviewFusion | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        s, t = probe.student_features, probe.teacher_features
        if len(s) != len(t):
            raise IncompatiblePairError(
                f"{probe.student_name} has {len(s) - 1} stages and {probe.teacher_name} has {len(t) - 1} "
                f"(each plus the pooled feature); the review mechanism pairs them one to one: choose "
                f"stages, e.g. {_stage_hint(len(s) - 1, len(t) - 1)} (1-based, shallow to deep)"
            )
        self.fusion = ReviewFusion(
            [f.shape[1] for f in s],
            [f.shape[1] for f in t],
            [tuple(f.shape[-2:]) for f in t],
            mid_channels=self.mid_channels,
        )

    def warmup_factor(self, epoch: float) -> float:
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, epoch / self.warmup_epochs)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        # The teacher's sizes of this step (equal to the probe's for fixed-size inputs; detection
        # batches change size from step to step).
        fused = self.fusion(step.student_features, [t.shape[-2:] for t in step.teacher_features])
        losses = {"reviewkd": self.weight * self.warmup_factor(step.epoch) * hcl_loss(fused, step.teacher_features)}
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature)
        return losses
