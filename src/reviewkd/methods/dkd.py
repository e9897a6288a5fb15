"""Zhao, Cui, Song, Qiu, Liang, CVPR 2022: "Decoupled Knowledge Distillation".

Logits only. With softened probabilities ``p = softmax(z / T)`` the KD loss splits into

* TCKD, target-class KD: KL between the binary distributions ``b = [p_target, 1 - p_target]`` of
  teacher and student;
* NCKD, non-target KD: KL between the distributions over the non-target classes, i.e. the softmax
  of the logits with the target class removed (here, as in the authors' code, by subtracting 1000
  from its logit / T, which gives it probability 0 in float32).

``DKD = alpha * TCKD + beta * NCKD``, each KL summed over classes, averaged over the batch and
multiplied by T^2. Computed in float32; the binary log-probabilities come from log-sum-exp sums
(the authors' code takes the log of summed probabilities, equal up to rounding).

Defaults = the authors' CIFAR-100 recipe (megvii-research/mdistiller ``DKD`` and
``configs/cifar100/dkd/*``): ``alpha = 1``, ``T = 4``, cross-entropy weight 1, and the DKD term
ramped linearly over ``warmup_epochs = 20``. ``beta`` is set per teacher/student pair in those
configs: 2 for resnet56 -> resnet20 and resnet110 -> resnet32; 6 for vgg13 -> vgg8,
vgg13 -> MobileNetV2, wrn_40_2 -> wrn_16_2 and wrn_40_2 -> wrn_40_1; 8 (their default) for the
others (resnet32x4 -> resnet8x4 / ShuffleV1 / ShuffleV2, ResNet50 -> MobileNetV2,
wrn_40_2 -> ShuffleV1). ``beta=None`` (the default) looks the pair up by model name in that table
and uses 8 for pairs not in it; a number overrides it.

Warm-up: the released trainer counts epochs from 1 and weighs epoch e by ``min(e / 20, 1)``. Here
``step.epoch`` counts from 0 (fractions allowed), so the factor is ``min((epoch + 1) / warmup, 1)``:
1/20 during the first epoch, full weight from the 20th. ``warmup_epochs=0`` disables the ramp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DistillMethod, Reads, RunContext, Step, register_method

# beta of the authors' CIFAR-100 configs, (teacher, student) -> beta; other pairs use 8
BENCHMARK_BETA: dict[tuple[str, str], float] = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
}
DEFAULT_BETA = 8.0


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD`` (both batch-mean KL(teacher || student), times T^2)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    gt = F.one_hot(targets, s.shape[1]).bool()
    batch = s.shape[0]

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.masked_fill(~gt, float("-inf")).logsumexp(1)
        log_other = log_p.masked_fill(gt, float("-inf")).logsumexp(1)
        return torch.stack([log_target, log_other], dim=1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="sum", log_target=True)
    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    log_q_t = F.log_softmax(t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="sum", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2 / batch


@register_method
class DKD(DistillMethod):
    name = "dkd"
    paper = "Zhao, Cui, Song, Qiu, Liang, CVPR 2022: Decoupled Knowledge Distillation"
    reads = Reads(logits=True, targets=True)

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float | None = None,
        temperature: float = 4.0,
        warmup_epochs: float = 20.0,
    ):
        super().__init__()
        self.weight, self.alpha, self.temperature = float(weight), float(alpha), float(temperature)
        self.beta = None if beta is None else float(beta)
        self.warmup_epochs = float(warmup_epochs)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        if self.beta is None:
            self.beta = BENCHMARK_BETA.get((probe.teacher_name, probe.student_name), DEFAULT_BETA)

    def warmup_factor(self, epoch: float) -> float:
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, (epoch + 1.0) / self.warmup_epochs)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        beta = DEFAULT_BETA if self.beta is None else self.beta
        loss = dkd_loss(step.student_logits, step.teacher_logits, step.targets, self.alpha, beta, self.temperature)
        return {"dkd": self.weight * self.warmup_factor(step.epoch) * loss}
