"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DistillMethod, Reads, Step, register_method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, averaged over the batch, times T^2.

    The T^2 factor keeps the gradient scale independent of T (the paper's argument).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_method
class KD(DistillMethod):
    name = "kd"
    paper = "Hinton, Vinyals, Dean 2015: Distilling the Knowledge in a Neural Network"
    # The CIFAR-100 benchmark recipe (CRD / mdistiller): 0.1 CE + 0.9 KD at T=4.
    ce_weight = 0.1
    reads = Reads(logits=True, tasks=("classification", "detection"))

    def __init__(self, weight: float = 0.9, temperature: float = 4.0):
        super().__init__()
        self.weight, self.temperature = float(weight), float(temperature)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {"kd": self.weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature)}
