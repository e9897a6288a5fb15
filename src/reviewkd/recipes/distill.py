"""Distiller: a student, a frozen teacher and a registered method, as one recipe.

``distiller(images, targets, epoch=e)`` -> ``(student outputs, {loss name: tensor})`` for direct use;
the loop calls :meth:`Distiller.train_step` with a :class:`~reviewkd.batch.Batch`. Stages: the
method's pre-training stage, if it declares one (:class:`~reviewkd.methods.Pretraining`), then
distillation with one optimiser group over the student and the method's modules.

The teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
``torch.inference_mode``; ``fold_teacher_bn=True`` (what training runs use) runs a copy of it with its
BatchNorms folded into the convolutions, exact up to float rounding. It may read another input of the batch than the student
(``teacher_input``, e.g. a frame of the clip or another resolution), or be a
:class:`~reviewkd.recipes.teachers.PrecomputedTeacher` read by the batch's dataset indices (samples
without an entry are masked: ``Step.teacher_mask``). The method configures itself
from one probe pass of both networks on a dummy batch of ``input_size``; ``student_stages`` /
``teacher_stages`` (1-based) pick stages when the two networks have different numbers of them.

For direct use: a method whose weight warms up over the epochs (ReviewKD, DKD) needs ``epoch=`` (a
call without it is refused rather than trained as epoch 0, where ReviewKD's weight is 0);
``state_dict()`` / ``load_state_dict()`` hold the student and the method's modules, never the frozen
teacher; ``remove()``, or leaving a ``with Distiller(...) as d:`` block, takes the feature taps off
both networks, leaving the student a plain module to evaluate or export.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..features import FeatureSpec, FeatureTaps, feature_spec_of, stage_batchnorms
from ..methods import DistillMethod, RunContext, Step, create_method
from ..models.folding import fold_batchnorms
from .base import Group, Recipe, Stage, StepOutput
from .teachers import PrecomputedTeacher

TaskLoss = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def model_name(model: nn.Module | None, default: str = "-") -> str:
    return default if model is None else getattr(model, "model_name", type(model).__name__)


def _drop_grad(tensor: torch.Tensor) -> None:
    tensor.grad = None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ce": F.cross_entropy(outputs, targets)}


@contextmanager
def batch_statistics(batchnorms: Sequence[nn.Module]):
    """Inside: the BatchNorm layers normalise with the batch's statistics and leave their running
    statistics as they are (no running statistics are passed to the kernel); modes restored on exit."""
    saved = [(bn.training, bn.track_running_stats) for bn in batchnorms]
    for bn in batchnorms:
        bn.training, bn.track_running_stats = True, False
    try:
        yield
    finally:
        for bn, (training, track) in zip(batchnorms, saved):
            bn.training, bn.track_running_stats = training, track


def _drop_teacher_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the frozen teacher is not part of what a Distiller saves."""
    own = f"{prefix}teacher"
    for key in [k for k in state_dict if k.startswith(own + ".")]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == own or k.startswith(own + ".")]:
            del metadata[key]


def _keep_teacher_state(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a teacher missing from ``state_dict`` keeps its current tensors
    (entries that are present, e.g. in an older full state dict, are loaded)."""
    if module.teacher is not None:
        for name, value in module.teacher.state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}teacher.{name}", value)


class Distiller(Recipe):
    """Student + frozen teacher + method. Loss terms come weighted; their sum is the objective.

    ``task_loss(outputs, targets)`` -> ``{name: loss}`` is the student's own loss (cross-entropy by
    default), scaled by ``ce_weight`` (None: the method's recipe value). ``context`` (a
    :class:`~reviewkd.methods.RunContext` or a dict of its fields) reaches the method's ``setup``.
    ``pretrain_lr`` overrides the learning rate of the method's pre-training stage.
    """

    task = "classification"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        method: str | DistillMethod = "reviewkd",
        *,
        input_size: Sequence[int] = (3, 32, 32),
        ce_weight: float | None = None,
        student_spec: FeatureSpec | None = None,
        teacher_spec: FeatureSpec | None = None,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        context: RunContext | dict | None = None,
        task: str | None = None,
        task_loss: TaskLoss | None = None,
        teacher_input: str = "image",
        teacher_input_size: Sequence[int] | None = None,
        pretrain_lr: float | None = None,
        fold_teacher_bn: bool = False,
        **method_options,
    ):
        super().__init__()
        self.register_state_dict_post_hook(_drop_teacher_state)
        self.register_load_state_dict_pre_hook(_keep_teacher_state)
        self._removed = self._probing = False
        if method_options and not isinstance(method, str):
            raise ValueError("pass method options to the method object itself, not to Distiller")
        self.task = task or type(self).task
        self.student = student
        self.method = create_method(method, **method_options) if isinstance(method, str) else method
        reads = self.method.reads
        if self.task not in reads.tasks:
            raise ValueError(f"method {self.method.name!r} is not available for {self.task}; it supports "
                             f"{', '.join(reads.tasks)}")
        if reads.teacher and teacher is None:
            raise ValueError(f"method {self.method.name!r} needs a teacher; pass teacher=... or use method='vanilla'")
        self.teacher = teacher if reads.teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        if reads.teacher_bn not in ("eval", "train"):
            raise ValueError(f"method {self.method.name!r} asks for teacher_bn={reads.teacher_bn!r}; use 'eval' or 'train'")
        # The teacher's BatchNorm layers a training step switches to batch statistics (see batch_statistics).
        self._teacher_batchnorms = [] if reads.teacher_bn == "eval" or self.teacher is None else [
            m for m in self.teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.ce_weight = float(self.method.ce_weight if ce_weight is None else ce_weight)
        self.task_loss = task_loss or cross_entropy
        self.teacher_input = teacher_input
        self.pretrain_lr = pretrain_lr
        self.input_size = tuple(int(v) for v in input_size)
        self.teacher_input_size = tuple(int(v) for v in (teacher_input_size or self.input_size))
        self._build_taps(student_spec, teacher_spec, student_stages, teacher_stages)
        self._probe_and_setup(RunContext.of(context))
        self.folded_teacher_batchnorms = self._fold_teacher() if fold_teacher_bn else 0

    # ------------------------------------------------------------------ set-up
    def _build_taps(self, student_spec, teacher_spec, student_stages, teacher_stages) -> None:
        reads = self.method.reads

        def taps(model, spec, stages, kind):
            if kind is None or model is None or isinstance(model, PrecomputedTeacher):
                return None
            return FeatureTaps(model, (spec or feature_spec_of(model)).select(stages), kind)

        self._student_taps = taps(self.student, student_spec, student_stages, reads.student_features)
        self._teacher_taps = taps(self.teacher, teacher_spec, teacher_stages, reads.teacher_features)

    def _device(self) -> torch.device:
        return next(self.student.parameters()).device

    def probe_batch(self) -> Batch:
        """A dummy batch of two samples of the configured input sizes."""
        device = self._device()
        inputs = {"image": torch.randn(2, *self.input_size, device=device)}
        if self.teacher_input != "image":
            inputs[self.teacher_input] = torch.randn(2, *self.teacher_input_size, device=device)
        return Batch(inputs, None, torch.arange(2, device=device))

    @torch.no_grad()
    def _probe_and_setup(self, context: RunContext) -> None:
        if self._teacher_taps is not None and context.teacher_bn is None:
            # The BatchNorm before each teacher stage's final ReLU (OFD derives margins from it);
            # a copy, so that a context reused for another teacher keeps its own.
            context = replace(context, teacher_bn=stage_batchnorms(self.teacher, self._teacher_taps.spec))
        # Eval mode for the probe: a batch of 2 must not move any BatchNorm statistics.
        was_training = self.student.training
        self.student.eval()
        self._probing = True  # the teacher, too, uses its running statistics in the probe
        try:
            try:
                self.probe_step, _ = self._step(self.probe_batch(), epoch=0.0)
            except RuntimeError as exc:
                raise ValueError(
                    f"probe forward with input_size={self.input_size} failed for {model_name(self.student)} / "
                    f"{model_name(self.teacher)}: {str(exc).splitlines()[0]}"
                ) from exc
            self.method.setup(self.probe_step, context)
        finally:
            self.student.train(was_training)
            self._probing = False
        self.method.to(self._device())

    def _fold_teacher(self) -> int:
        """The frozen teacher as an inference graph: its BatchNorms folded into the convolutions
        before them (a copy; the network passed in is left as it is), after the method's set-up has
        read what it needs of them. Not done where training steps put the teacher's BatchNorm on batch
        statistics (``teacher_bn: train``). Feature taps are moved to the copy; a tap on a BatchNorm's
        output reads the folded convolution's output, the same values. Returns how many folded."""
        if self.teacher is None or isinstance(self.teacher, PrecomputedTeacher) or self._teacher_batchnorms:
            return 0
        taps = self._teacher_taps
        modules = dict(self.teacher.named_modules())
        protected = [] if taps is None else [
            t.module for t in taps.taps
            if not (t.port == "output" and isinstance(modules[t.module], nn.modules.batchnorm._BatchNorm))]

        def outputs(net, x):
            if taps is None:
                return [net(x)]
            probe = FeatureTaps(net, taps.spec, taps.kind)
            try:
                out, feats = probe(x)
            finally:
                probe.remove()
            return [out, *feats]

        sample = self.probe_batch().inputs[self.teacher_input]
        folded, count = fold_batchnorms(self.teacher, sample, protected, outputs)
        if count:
            if taps is not None:
                taps.remove()
                self._teacher_taps = FeatureTaps(folded, taps.spec, taps.kind)
            self.teacher = folded
        return count

    # -------------------------------------------------------------- one pass
    def _student_pass(self, batch: Batch) -> tuple[torch.Tensor, list | None, dict[str, torch.Tensor], dict]:
        """(outputs, features, task losses, what the teacher pass needs) for image-input tasks."""
        x = batch.inputs["image"]
        if self.method.reads.input_grads and not x.requires_grad:
            x = x.detach().requires_grad_(True)
            # The method reads input gradients with autograd.grad; the training backward must not
            # leave one on the batch's inputs.
            x.register_post_accumulate_grad_hook(_drop_grad)
            batch.inputs["image"] = x
        if self._student_taps is not None:
            outputs, feats = self._student_taps(x)
        else:
            outputs, feats = self.student(x), None
        task_losses = {} if batch.targets is None else self.task_loss(outputs, batch.targets)
        return outputs, feats, task_losses, {}

    def _teacher_pass(self, batch: Batch, shared: dict) -> tuple[torch.Tensor | None, list | None]:
        if isinstance(self.teacher, PrecomputedTeacher):
            values, shared["teacher_mask"] = self.teacher.lookup(batch.index)
            if self.teacher.kind == "logits":
                return values, None
            return None, [values.view(*values.shape, *(1,) * max(0, 4 - values.dim()))]
        if self.teacher_input not in batch.inputs:
            raise KeyError(f"the teacher reads input {self.teacher_input!r}, the batch has {sorted(batch.inputs)}")
        x = batch.inputs[self.teacher_input]
        if self._teacher_taps is not None:
            return self._teacher_taps(x)
        return self.teacher(x), None

    def _teacher_norm(self):
        """The context the teacher runs in: batch statistics while training, if the method asks."""
        if self._teacher_batchnorms and self.training and not self._probing:
            return batch_statistics(self._teacher_batchnorms)
        return nullcontext()

    def _step(self, batch: Batch, epoch: float) -> tuple[Step, dict[str, torch.Tensor]]:
        if self._removed:
            raise RuntimeError("this Distiller's feature taps were removed (remove() or the end of its with block): "
                               "build a new Distiller to train again")
        outputs, s_feats, task_losses, shared = self._student_pass(batch)
        t_logits = t_feats = None
        if self.teacher is not None:
            with torch.inference_mode(), self._teacher_norm():
                t_logits, t_feats = self._teacher_pass(batch, shared)
            # Inference tensors cannot be saved for backward; the losses need ordinary copies.
            t_logits = None if t_logits is None else t_logits.clone()
            t_feats = None if t_feats is None else [f.clone() for f in t_feats]
            if "teacher_mask" in shared:
                shared["teacher_mask"] = shared["teacher_mask"].clone()
        reads = self.method.reads
        step = Step(
            student_logits=shared.get("student_logits", outputs),
            targets=batch.targets,
            teacher_logits=t_logits,
            student_features=s_feats,
            teacher_features=t_feats,
            teacher_mask=shared.get("teacher_mask"),
            epoch=float(epoch),
            index=batch.index if reads.index else None,
            inputs=batch.inputs if (reads.inputs or reads.input_grads) else None,
            student_name=model_name(self.student),
            teacher_name=model_name(self.teacher, "teacher"),
        )
        return step, task_losses

    def losses(self, batch: Batch, epoch: float, pretrain: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(student outputs, weighted loss terms) of one batch; ``pretrain``: the method's
        pre-training losses instead."""
        step, task_losses = self._step(batch, epoch)
        if pretrain:
            return step.student_logits, self.method.pretrain_losses(step)
        losses = {name: self.ce_weight * value for name, value in task_losses.items()}
        for name, value in self.method(step).items():
            if name in losses:
                raise ValueError(f"method loss {name!r} collides with a task loss")
            losses[name] = value
        return step.student_logits, losses

    def forward(self, *args, **kwargs):
        """``(batch, stage, epoch)`` from the loop, or ``(images, targets, epoch=..., pretrain=...,
        index=...)`` -> ``(outputs, losses)`` for direct use."""
        if args and isinstance(args[0], Batch):
            return self.train_step(*args, **kwargs)
        images, targets = args[0], args[1] if len(args) > 1 else kwargs.pop("targets")
        index = kwargs.pop("index", kwargs.pop("indices", None))
        inputs, epoch, pretrain = kwargs.pop("inputs", {}), kwargs.pop("epoch", None), kwargs.pop("pretrain", False)
        if kwargs:
            raise TypeError(f"Distiller got unknown keyword argument(s) {sorted(kwargs)}; it takes targets, epoch, "
                            "pretrain, index (or indices) and inputs")
        batch = Batch({"image": images, **inputs}, targets, index)
        return self.losses(batch, self._direct_epoch(epoch, pretrain), pretrain=pretrain)

    def _direct_epoch(self, epoch, pretrain: bool = False) -> float:
        """The epoch of a direct call; required where the method's weight depends on it."""
        warmup = self.method.warmup_epochs
        if epoch is None and warmup > 0 and not pretrain:
            # Defaulting to epoch 0 would silently train without (ReviewKD) or with 1/warm-up of
            # (DKD) the distillation loss.
            raise TypeError(f"method {self.method.name!r} warms its weight up over {warmup:g} epochs: pass the "
                            "epoch, counted from 0, as distiller(images, targets, epoch=e)")
        return float(epoch or 0.0)

    # ---------------------------------------------------------------- recipe
    def stages(self) -> list[Stage]:
        pre = self.method.pretraining
        main = Stage("train", ("main",))
        if pre is None or pre.epochs <= 0:
            return [main]
        return [Stage("pretrain", ("pretrain",), epochs=pre.epochs, logged=False, evaluated=False), main]

    def groups(self, stage: Stage) -> list[Group]:
        if stage.name == "pretrain":
            lr = self.pretrain_lr or self.method.pretraining.lr
            return [Group("pretrain", self.method.pretrain_parameters(self.student), lr=lr, schedule="constant")]
        return [Group("main", list(self.trainable_parameters()))]

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        outputs, losses = self.losses(batch, epoch, pretrain=stage.name == "pretrain")
        return StepOutput(outputs.detach() if torch.is_tensor(outputs) else None, {stage.groups[0]: losses})

    def enter_stage(self, stage: Stage) -> None:
        pre = self.method.pretraining
        if stage.name == "pretrain" and not pre.student_train:
            self.student.eval()  # the method's recipe keeps the student's BatchNorm fixed here

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def remove(self) -> None:
        """Take the feature taps (forward hooks) off the student and the teacher; the Distiller
        computes no losses afterwards. Idempotent."""
        for taps in self._hooks():
            taps.remove()
        self._removed = True

    def _hooks(self) -> list:
        """Everything that registered hooks on the networks (each with a ``remove()``)."""
        return [t for t in (self._student_taps, self._teacher_taps) if t is not None]

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def deployable(self) -> nn.Module:
        return self.student

    def trained_state(self) -> dict[str, dict]:
        return {"student": self.student.state_dict(), "method": self.method.state_dict()}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and method modules (ABFs, connectors); never the teacher."""
        for p in self.student.parameters():
            if p.requires_grad:
                yield p
        yield from self.method.parameters()

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """What the method's pre-training stage optimises (empty when it has none)."""
        return self.method.pretrain_parameters(self.student) if self.method.pretraining else []

    def frozen_teacher(self) -> nn.Module | None:
        return self.teacher

    def feature_pairs(self) -> list[tuple[tuple, tuple]]:
        """(student shape, teacher shape) of each feature entry of the probe pass."""
        s, t = self.probe_step.student_features or [], self.probe_step.teacher_features or []
        return [(tuple(a.shape[1:]), tuple(b.shape[1:]) if b is not None else ()) for a, b in zip(s, t)]

    def notes(self, epochs: float | None) -> list[str]:
        warmup = self.method.warmup_epochs
        if epochs is not None and warmup > 0 and epochs < warmup:
            return [f"note: this run ({epochs:g} epochs) is shorter than {self.method.name}'s warm-up ({warmup:g} epochs): "
                    "its weight never reaches full strength (set method.options.warmup_epochs to change it)"]
        return []

    def describe(self) -> list[str]:
        reads = self.method.reads
        sides = [f"{side} {kind} features" for side, kind in (("student", reads.student_features),
                                                              ("teacher", reads.teacher_features)) if kind]
        sides += [name for name in ("logits", "targets", "index", "inputs", "input_grads") if getattr(reads, name)]
        own = sum(p.numel() for p in self.method.parameters())
        lines = [f"# method {self.method.name} (reads {', '.join(sides) or 'nothing'}; {own:,} trainable parameters "
                 "of its own)"]
        if self._teacher_batchnorms:
            lines.append("teacher BatchNorm: batch statistics while training (running statistics unchanged)")
        lines += [f"entry {i + 1}: student {s} -> teacher {t}" for i, (s, t) in enumerate(self.feature_pairs())]
        return lines
