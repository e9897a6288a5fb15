"""What a distillation method is, and the registry that names them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, ClassVar, Optional

import torch
from torch import nn


class IncompatiblePairError(ValueError):
    """The student and teacher cannot be paired by this method as they are."""


@dataclass
class Step:
    """Everything a method may read in one training step (or in the probe pass at set-up)."""

    student_logits: torch.Tensor
    targets: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    student_features: Optional[list[torch.Tensor]] = None  # shallow -> deep, pooled entry last
    teacher_features: Optional[list[torch.Tensor]] = None
    epoch: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. dataset indices
    student_name: str = "student"
    teacher_name: str = "teacher"


class DistillMethod(nn.Module):
    """The losses a method adds to the student's cross-entropy.

    Subclasses set ``name`` and ``paper``, declare which feature taps they read
    (``student_features`` / ``teacher_features``: "post", "pre" or None for logits only), build
    their connectors in :meth:`setup` from one probe pass, and return ``{loss_name: tensor}``
    (already weighted) from :meth:`forward`. Their parameters are trained with the student.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    # Weight of the student's cross-entropy that the method's recipe uses (e.g. 0.1 for KD).
    ce_weight: ClassVar[float] = 1.0
    student_features: Optional[str] = None
    teacher_features: Optional[str] = None

    # A method's own pre-training stage (e.g. AB's connector or FT's paraphraser): before the
    # distillation epochs the trainer runs ``pretrain_epochs`` epochs that optimise only
    # ``pretrain_parameters(student)`` on ``pretrain_losses`` (no cross-entropy).
    pretrain_epochs: int = 0

    def setup(self, probe: Step) -> None:
        """Build connectors from the shapes of a probe pass (features on a dummy batch).

        ``probe.extra`` holds the run's context (e.g. ``num_samples``, ``train_targets`` for
        methods with a memory bank over the training set).
        """

    def pretrain_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.parameters())

    def pretrain_losses(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"method {self.name!r} has no pre-training stage")

    def forward(self, step: Step) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def require_stage_maps(method: DistillMethod, probe: Step) -> None:
    """For methods that compare stage feature maps: both networks must declare a stage."""
    if len(probe.student_features) < 2 or len(probe.teacher_features) < 2:
        raise IncompatiblePairError(
            f"{method.name} compares stage feature maps, but {probe.student_name} or {probe.teacher_name} "
            "declares no stage besides the pooled feature: give its FeatureSpec at least one stage"
        )


_METHODS: dict[str, type[DistillMethod]] = {}


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> dict[str, str]:
    """Method name -> the paper it follows."""
    return {name: cls.paper for name, cls in _METHODS.items()}


def method_class(name: str) -> type[DistillMethod]:
    if name not in _METHODS:
        close = get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_options(name: str) -> dict[str, Any]:
    """The options a method accepts, with their defaults."""
    params = list(inspect.signature(method_class(name).__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create_method(name: str, **options) -> DistillMethod:
    cls = method_class(name)
    known = method_options(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {unknown}; its options are: "
            + ", ".join(f"{k}={v!r}" for k, v in known.items())
        )
    return cls(**options)
