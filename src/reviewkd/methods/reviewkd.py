"""Chen, Liu, Zhao, Jia, CVPR 2021: "Distilling Knowledge via Knowledge Review"."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..review import ReviewFusion, hcl_loss
from ._common import OptionalKD, require_equal_stage_counts
from .base import DistillMethod, Reads, RunContext, Step, register_method


@register_method
class ReviewKD(OptionalKD, DistillMethod):
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
        self.reads = replace(self.reads, student_features="pre" if student_preact else "post")
        self.init_kd(kd_weight, temperature)
        self.fusion: ReviewFusion | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        require_equal_stage_counts(probe, "ReviewKD's review mechanism")
        s, t = probe.student_features, probe.teacher_features
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
        loss = self.weight * self.warmup_factor(step.epoch) * hcl_loss(fused, step.teacher_features)
        return self.add_kd({"reviewkd": loss}, step)
