"""Plain supervised training: cross-entropy only (the Distiller adds it), no teacher."""
from __future__ import annotations

from .base import DistillMethod, Reads, Step, register_method


@register_method
class Vanilla(DistillMethod):
    name = "vanilla"
    paper = "no distillation: cross-entropy on the labels"
    reads = Reads(teacher=False, logits=False, tasks=("classification", "detection", "regression"))

    def forward(self, step: Step) -> dict:
        return {}
