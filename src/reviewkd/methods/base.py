"""What a distillation method is, and the registry that names them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Any, ClassVar, Optional

import torch
from torch import nn


class IncompatiblePairError(ValueError):
    """The student and teacher cannot be paired by this method as they are."""


TASKS = ("classification", "detection", "regression")


@dataclass(frozen=True)
class Reads:
    """Everything a method reads, declared in one place; the recipe provides exactly this.

    ``student_features`` / ``teacher_features``: "post" or "pre" stage outputs (None: no features);
    ``logits``: the student's (and, with a teacher, the teacher's) logits; ``targets``, ``index``
    (dataset indices of the samples), ``inputs`` (the batch's inputs) and ``input_grads`` (the
    method differentiates the loss w.r.t. the inputs: they get ``requires_grad``); ``tasks``: the
    tasks the method is implemented and tested for. ``teacher_bn``: how the frozen teacher's
    BatchNorm layers normalise while the recipe trains: "eval" (running statistics) or "train"
    (the batch's statistics, running statistics left unchanged; OFD's authors' setting).
    """

    teacher: bool = True
    student_features: Optional[str] = None
    teacher_features: Optional[str] = None
    logits: bool = True
    targets: bool = False
    index: bool = False
    inputs: bool = False
    input_grads: bool = False
    tasks: tuple[str, ...] = ("classification",)
    teacher_bn: str = "eval"

    @property
    def features(self) -> bool:
        return self.student_features is not None or self.teacher_features is not None


@dataclass(frozen=True)
class Pretraining:
    """A method's own stage before distillation (AB's connectors, FT's paraphraser, FSP).

    ``epochs`` of :meth:`DistillMethod.pretrain_losses` alone (no cross-entropy), optimising
    :meth:`DistillMethod.pretrain_parameters` at ``lr`` (None: the run's base LR), constant;
    ``student_train=False`` keeps the student in eval mode (its BatchNorm statistics fixed).
    """

    epochs: int
    lr: Optional[float] = None
    student_train: bool = True


@dataclass
class RunContext:
    """What a method may know about the whole run at set-up (not per step)."""

    num_samples: Optional[int] = None  # training samples; dataset indices are below it
    train_targets: Optional[torch.Tensor] = None  # labels of the training samples (CPU)
    num_classes: Optional[int] = None
    teacher_bn: Optional[list] = None  # the BatchNorm before each teacher stage's final ReLU (or None)
    epochs: Optional[float] = None  # the run's length in epochs (methods whose schedule spans the run)
    probe: bool = False  # the loop's architecture probe: nothing is trained or read yet

    @classmethod
    def of(cls, value: "RunContext | dict | None") -> "RunContext":
        if isinstance(value, RunContext):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown run context key(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**value)


@dataclass
class Step:
    """Everything a method may read in one training step (or in the probe pass at set-up)."""

    student_logits: Optional[torch.Tensor]
    targets: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    student_features: Optional[list[torch.Tensor]] = None  # shallow -> deep, pooled entry last
    teacher_features: Optional[list[torch.Tensor]] = None
    teacher_mask: Optional[torch.Tensor] = None  # per sample: the teacher has an output (precomputed teachers)
    epoch: float = 0.0
    index: Optional[torch.Tensor] = None  # dataset indices of the batch's samples
    inputs: Optional[dict[str, Any]] = None
    student_name: str = "student"
    teacher_name: str = "teacher"


class DistillMethod(nn.Module):
    """The losses a method adds to the student's task loss.

    Subclasses set ``name``, ``paper`` and ``reads`` (what they read, see :class:`Reads`; an
    instance may refine it in ``__init__`` from its options), build their connectors in
    :meth:`setup` from one probe pass, and return ``{loss_name: tensor}`` (already weighted) from
    :meth:`forward`. Their parameters are trained with the student. A method with its own stage
    before distillation sets ``pretraining`` (see :class:`Pretraining`).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    reads: Reads = Reads()
    # Weight of the student's cross-entropy that the method's recipe uses (e.g. 0.1 for KD).
    ce_weight: ClassVar[float] = 1.0
    pretraining: Optional[Pretraining] = None
    # Epochs over which the method's weight ramps up (0: full weight from the start).
    warmup_epochs: float = 0.0

    @classmethod
    def uses_teacher(cls, options: dict) -> bool:
        """Whether a run with these method options needs the config's ``teacher`` section."""
        return cls.reads.teacher

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        """Build connectors from the shapes of a probe pass (features on a dummy batch) and the
        run's context (e.g. ``num_samples``, ``train_targets`` for a memory bank)."""

    def pretrain_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.parameters())

    def pretrain_losses(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"method {self.name!r} has no pre-training stage")

    def forward(self, step: Step) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


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


def describe_method(name: str) -> str:
    """What ``reviewkd methods NAME`` prints: the paper, what the method reads, its options."""
    cls = method_class(name)
    r = cls.reads
    # the class's own docstring, else its module's (never the base class's)
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or inspect.getmodule(cls).__doc__ or "")
    summary = doc.split("\n\n")[0].replace("\n", " ")
    lines = [f"{name}: {cls.paper}", "", summary, ""]
    reads = ["a frozen teacher" if r.teacher else "no teacher"]
    if r.student_features:
        reads.append(f"student {r.student_features}-activation stage features")
    if r.teacher_features:
        reads.append(f"teacher {r.teacher_features}-activation stage features")
    if r.logits:
        reads.append("logits")
    reads += [what for flag, what in ((r.targets, "labels"), (r.index, "dataset indices"),
                                      (r.inputs, "the input images"), (r.input_grads, "input gradients")) if flag]
    lines.append(f"reads: {', '.join(reads)} (the instance may refine this from its options)")
    lines.append(f"tasks: {', '.join(r.tasks)}")
    lines.append(f"cross-entropy weight of its recipe: {cls.ce_weight}")
    if cls.pretraining is not None:
        p = cls.pretraining
        lines.append(f"pre-training stage: {p.epochs} epochs" + (f" at lr {p.lr}" if p.lr else ""))
    options = method_options(name)
    lines += ["", "options (method.options.NAME=VALUE):" if options else "options: none"]
    lines += [f"  {k} = {v!r}" for k, v in options.items()]
    return "\n".join(lines)


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
