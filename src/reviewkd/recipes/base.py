"""What a recipe is: which networks train, in which stages, with which optimiser groups.

The loop (``engine/loop.py``) owns everything else. Its rule for one training step: the recipe's
``train_step`` returns losses per group; for each group in the stage's order the loop zeroes that
group's gradients and runs the backward pass of that group's losses (keeping the graph for the
groups after it); then it steps every group. So a group's parameters receive the gradients of its
own losses and of the losses of the groups after it that reach them, and nothing from the groups
before it. That one rule expresses both sequential updates with detached inputs (each group's
losses see only its own network) and deliberate routing (put the group that must also receive
another group's loss before that group).

A group named in ``StepOutput.idle`` sits the step out: its gradients are neither zeroed nor
computed, its optimiser does not step (its LR schedule still advances with the iteration) and its
losses, if any, are only logged (e.g. a GAN's generator between its steps). After the optimisers
stepped, the loop calls ``after_step`` (e.g. to update moving averages).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from ..batch import Batch


@dataclass
class Group:
    """One optimiser: its parameters and how it is driven.

    ``lr`` None: the solver's base LR. ``schedule``: "solver" follows the run's LR schedule,
    "constant" keeps ``lr``. ``optimizer`` None: the solver's optimiser; "adam" / "sgd" / "adamw"
    give that one with the solver's weight decay (recipes with several networks may mix them).
    ``clip``: clip this group's gradient norm (None: the solver's ``clip_grad_norm``).
    """

    name: str
    params: list[nn.Parameter]
    lr: Optional[float] = None
    schedule: Literal["solver", "constant"] = "solver"
    optimizer: Optional[str] = None
    clip: Optional[float] = None
    options: dict = field(default_factory=dict)  # extra optimiser keyword arguments (betas, ...)


@dataclass
class Stage:
    """A phase of training: ``epochs`` (None: the run's length from the solver) of ``groups``."""

    name: str
    groups: tuple[str, ...]
    epochs: Optional[int] = None
    logged: bool = True  # a stage whose rows go to the run's history (metrics.csv, curves)
    evaluated: bool = True  # evaluate / pick best.pt during this stage


@dataclass
class StepOutput:
    """What one training step returns: the deployable network's outputs on the batch (for the
    task's training metrics; None where there are none) and ``{group: {loss name: tensor}}``."""

    outputs: Optional[torch.Tensor]
    losses: dict[str, dict[str, torch.Tensor]]
    idle: tuple[str, ...] = ()  # groups that do not step this iteration (their losses only logged)


class Recipe(nn.Module):
    """Networks and how they train. Subclasses implement the methods below."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def groups(self, stage: Stage) -> list[Group]:
        """The optimiser groups of ``stage``, in the order of their backward passes."""
        raise NotImplementedError

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        raise NotImplementedError

    def forward(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        return self.train_step(batch, stage, epoch)

    def enter_stage(self, stage: Stage) -> None:
        """Set train / eval modes for ``stage`` (called after ``.train()``)."""

    def after_step(self, stage: Stage) -> None:
        """Called after each step's optimiser updates (moving averages, step counters)."""

    def deployable(self) -> nn.Module:
        """The network that is evaluated, saved as the student and exported."""
        raise NotImplementedError

    def frozen_teacher(self) -> Optional[nn.Module]:
        """A pretrained teacher the run evaluates once at the start (None: there is none)."""
        return None

    def describe(self) -> list[str]:
        """Lines for ``--dry-run``: what trains and what it reads."""
        return []

    def notes(self, epochs: Optional[float]) -> list[str]:
        """What a person should know before a run of ``epochs`` starts (None: not epoch-based)."""
        return []

    def trained_state(self) -> dict[str, dict]:
        """Named state dicts of everything that trains (saved in checkpoints; frozen parts left out)."""
        return {"student": self.deployable().state_dict()}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        self.deployable().load_state_dict(state["student"])

    def extra_metrics(self, evaluate) -> dict[str, float]:
        """More scores to report at each evaluation (``evaluate(model)`` -> the task's metrics)."""
        return {}
