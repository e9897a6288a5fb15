"""Learning-rate schedules as a per-iteration multiplier (so warm-up is smooth within epochs)."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(epoch_float: float, *, schedule: str, epochs: int, milestones, gamma: float, warmup_epochs: float,
              warmup_start: float = 0.0) -> float:
    """Multiplier of the base LR at a (fractional) epoch.

    The unit is the caller's: iteration-based schedules (detection) pass iterations for
    ``epoch_float``, ``epochs``, ``milestones`` and ``warmup_epochs``. Warm-up rises linearly from
    ``warmup_start`` (detectron2-style recipes start at 0.001) to 1.
    """
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return warmup_start + (1.0 - warmup_start) * (epoch_float + 1e-8) / warmup_epochs
    if schedule == "multistep":
        return gamma ** sum(epoch_float >= m for m in milestones)
    if schedule == "cosine":
        start = warmup_epochs
        progress = min(1.0, (epoch_float - start) / max(1e-8, epochs - start))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer, solver, steps_per_epoch: int) -> LambdaLR:
    # Multistep changes at epoch boundaries (as the released scripts); warm-up/cosine per step.
    def factor(step: int) -> float:
        epoch_float = step / steps_per_epoch
        if solver.schedule == "multistep" and epoch_float >= solver.warmup_epochs:
            epoch_float = float(step // steps_per_epoch)
        return lr_factor(epoch_float, schedule=solver.schedule, epochs=solver.epochs,
                         milestones=solver.milestones, gamma=solver.gamma, warmup_epochs=solver.warmup_epochs)

    return LambdaLR(optimizer, factor)
