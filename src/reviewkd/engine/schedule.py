"""The run's schedule: one counter (iterations) for epoch- and iteration-based runs."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RunSchedule:
    """One counter for epoch- and iteration-based runs: everything is in iterations, and the LR
    schedule's unit is ``unit`` iterations (an epoch; 1 for iteration-based schedules)."""

    unit: int  # iterations per schedule unit
    length: int  # run length in units
    kind: str = "multistep"  # multistep | cosine | constant
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup: float = 0.0  # in units
    warmup_start: float = 0.0  # LR factor at the start of the warm-up
    eval_period: int = 1  # iterations; 0: only at the end
    checkpoint_period: int = 1
    log_period: int = 1
    x_key: str = "epoch"  # what the history's rows count (epoch | iteration)

    @property
    def total(self) -> int:
        return self.length * self.unit

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of the base LR after ``iteration`` steps (multistep changes at unit boundaries)."""
        t = iteration / self.unit
        if self.warmup > 0 and t < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * (t + 1e-8) / self.warmup
        if self.kind == "multistep":
            return self.gamma ** sum(float(iteration // self.unit) >= m for m in self.milestones)
        if self.kind == "cosine":
            progress = min(1.0, (t - self.warmup) / max(1e-8, self.length - self.warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
