"""CrossModalDistillation: a video student and frozen teachers of other modalities.

The recipe of the video task for every method: ``ccl`` (:mod:`reviewkd.methods.ccl`: composition
modules, cross-modal contrastive and symmetric-KL terms) and the baselines of its comparison:

* ``vanilla``: the student's cross-entropy alone;
* ``kd``: Hinton's KD from the audio teacher's logits with the registered ``kd`` method's options
  (weight 0.9, T = 4, cross-entropy weight 0.1 unless ``method.ce_weight`` says otherwise); a teacher
  without a classifier (``precomputed`` features) is refused;
* ``fitnet``: a linear hint from the student's pooled feature to the audio teacher's feature, mean
  squared error weighted by the registered ``fitnet`` method's ``weight`` (100), cross-entropy weight
  1; the connector trains with the student.

Samples without audio (``inputs["audio_present"]`` False, or a teacher feature summing to zero) leave
every audio term. The batch: ``inputs["video"]`` (N x 3 x T x H x W, normalised), ``inputs["audio"]``
(what the audio teacher reads; for ``precomputed``, the feature itself) and int64 ``targets``.

Teachers are frozen (no gradients, eval mode also after ``.train()``, run under ``torch.no_grad``).
The image teacher reads one frame of the student's clip, the same random frame index for the whole
batch (drawn from the torch RNG, so a resumed run draws the same), as the reference does.

Optimiser groups, in the loop's backward order: ``composition_audio``, ``composition_image`` (SGD at
the method's ``composition_lr`` 0.001, momentum 0.9, no Nesterov, weight decay 5e-4, constant LR),
then ``student`` (the run's solver and LR schedule). By the loop's rule (``recipes/base.py``) the
student receives the gradient of its own loss only and each composition module that of its loss
plus the student's, the reference's routing. A composition's own loss reads the student's feature
and logits detached: its gradient with respect to the student would be discarded anyway (the
student's group is zeroed before its own backward pass), so this changes no update and saves one
backward pass through the video network per teacher.

Checkpoints hold the student (``student``) and the composition modules / hint connector (``heads``);
only the student is deployed and exported.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..features import FeatureSpec, FeatureTaps, feature_spec_of
from ..methods import DistillMethod, RunContext, create_method
from ..methods.ccl import CCL, Composition, _masked_mean
from .base import Group, Recipe, Stage, StepOutput
from .distill import model_name

METHODS = ("vanilla", "kd", "fitnet", "ccl")


def pooled_taps(model: nn.Module) -> FeatureTaps:
    """Taps giving ``(output, [pooled feature])`` (no stage maps: video models' maps are 5-D)."""
    return FeatureTaps(model, FeatureSpec((), feature_spec_of(model).pooled), "post")


def has_classifier(model: nn.Module) -> bool:
    """A teacher network with logits declares its stages; one that is its own feature (the
    ``precomputed`` teacher, whose input is the feature) does not."""
    return isinstance(getattr(model, "feature_spec", None), FeatureSpec)


def feature_dim(model: nn.Module) -> Optional[int]:
    """The size of a network's pooled feature: the input size of its last linear layer (its
    classifier) or of the pooled tap's module when that is linear; None when there is none."""
    spec = getattr(model, "feature_spec", None)
    if isinstance(spec, FeatureSpec):
        module = dict(model.named_modules()).get(spec.pooled.module)
        if isinstance(module, nn.Linear) and spec.pooled.port == "input":
            return module.in_features
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else getattr(model, "feature_dim", None)


def _freeze(model: Optional[nn.Module]) -> Optional[nn.Module]:
    if model is not None:
        model.requires_grad_(False)
        model.eval()
    return model


class CrossModalDistillation(Recipe):
    """A video ``student`` distilled from the frozen teacher networks ``audio`` and / or ``image`` by
    ``method`` ("vanilla", "kd", "fitnet", "ccl" or an instance of one; ``method_options`` go to it);
    ``num_classes`` sizes the composition classifiers; ``ce_weight`` None: the method's::

        recipe = CrossModalDistillation(student, "ccl", audio=audio_net, num_classes=10, mode="audio")
    """

    def __init__(self, student: nn.Module, method: str | DistillMethod = "ccl", *,
                 audio: Optional[nn.Module] = None, image: Optional[nn.Module] = None,
                 num_classes: int, ce_weight: Optional[float] = None, **method_options):
        super().__init__()
        if method_options and not isinstance(method, str):
            raise ValueError("pass method options to the method object itself, not to CrossModalDistillation")
        name = method if isinstance(method, str) else method.name
        if name not in METHODS:
            raise ValueError(f"method {name!r} is not available for a video student; choose one of {', '.join(METHODS)}")
        if name == "fitnet" and "hint_stage" in method_options:
            raise ValueError("fitnet on a video student hints the pooled feature: remove method.options.hint_stage")
        self.method = create_method(name, **method_options) if isinstance(method, str) else method
        self.ce_weight = float(self.method.ce_weight if ce_weight is None else ce_weight)
        self.student = student
        self._student_taps = pooled_taps(student)
        self.dim = feature_dim(student)
        if self.dim is None:
            raise ValueError(f"cannot tell the pooled feature size of {model_name(student)}: it has no linear classifier")
        ccl = self.method if isinstance(self.method, CCL) else None
        wants_audio = name in ("kd", "fitnet") or (ccl is not None and ccl.uses_audio)
        wants_image = ccl is not None and ccl.uses_image
        if wants_audio and audio is None:
            raise ValueError(f"method {name!r} needs the audio teacher: add a teacher section (name + checkpoint or "
                             "config, or name: precomputed)")
        if wants_image and image is None:
            raise ValueError("ccl in mode " + ccl.mode + " needs the image teacher (method.options.image_teacher)")
        self.audio_teacher = _freeze(audio if wants_audio else None)
        self.image_teacher = _freeze(image if wants_image else None)
        if name == "kd" and not has_classifier(audio):
            raise ValueError(f"kd needs the audio teacher's logits, but {model_name(audio)} has no classifier "
                             "(precomputed features): use fitnet or ccl, or an audio network as the teacher")
        self._audio_taps = pooled_taps(self.audio_teacher) if self.audio_teacher is not None and has_classifier(
            self.audio_teacher) else None
        self._image_taps = pooled_taps(self.image_teacher) if self.image_teacher is not None else None
        self.heads = nn.ModuleDict()
        for modality, teacher in (("audio", self.audio_teacher), ("image", self.image_teacher)):
            if teacher is None:
                continue
            t_dim = self._teacher_dim(teacher, modality)
            if name == "fitnet":
                self.heads["hint"] = nn.Linear(self.dim, t_dim)
            elif ccl is not None:
                if t_dim != self.dim:
                    raise ValueError(f"ccl compares the student's pooled feature ({self.dim}-d) with the {modality} "
                                     f"teacher's ({t_dim}-d, {model_name(teacher)}) in one space: they must have the "
                                     "same size")
                self.heads[f"composition_{modality}"] = Composition(t_dim, self.dim, num_classes)

    def _teacher_dim(self, teacher: nn.Module, modality: str) -> int:
        dim = feature_dim(teacher) if has_classifier(teacher) else getattr(teacher, "feature_dim", None)
        # a precomputed feature's size is known from the data only: the student's is assumed, checked per step
        return self.dim if dim is None else dim

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def _teacher(self, modality: str, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits or None, feature N x D) of a frozen teacher."""
        taps = self._audio_taps if modality == "audio" else self._image_taps
        if taps is None:  # the input is the feature
            return None, self.audio_teacher(x).flatten(1)
        logits, feats = taps(x)
        return logits, feats[-1].flatten(1)

    def _audio(self, batch: Batch) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        logits, t = self._teacher("audio", batch.inputs["audio"])
        self._check_size(t, "audio")
        mask = t.float().sum(dim=1) != 0  # the reference's test for missing audio
        present = batch.inputs.get("audio_present")
        if present is not None:
            mask = mask & present.to(mask.device, torch.bool)
        return logits, t, mask

    def _check_size(self, t: torch.Tensor, modality: str) -> None:
        if not self.heads:
            return  # kd reads logits only
        want = self.heads["hint"].out_features if "hint" in self.heads else self.dim
        if t.shape[1] != want:  # a shape, no host sync
            raise ValueError(f"the {modality} teacher's features are {t.shape[1]}-d, but this run was set up for {want}-d "
                             f"(the student's pooled feature is {self.dim}-d)")

    def _image(self, video: torch.Tensor) -> torch.Tensor:
        frame = int(torch.randint(video.shape[2], ()))  # one frame index for the whole batch (CPU RNG, no sync)
        return self._teacher("image", video[:, :, frame])[1]

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        video, y = batch.inputs["video"], batch.targets
        z_v, feats = self._student_taps(video)
        v = feats[-1].flatten(1)
        student = {"ce": self.ce_weight * F.cross_entropy(z_v.float(), y)}
        losses: dict[str, dict[str, torch.Tensor]] = {}
        name = self.method.name
        if name == "kd":
            z_t, _, mask = self._audio(batch)
            student["kd"] = self.method.weight * _masked_kd(z_v, z_t, self.method.temperature, mask)
        elif name == "fitnet":
            _, t, mask = self._audio(batch)
            student["fitnet"] = self.method.weight * _masked_mse(self.heads["hint"](v), t, mask)
        elif name == "ccl":
            m, w = self.method, self.method.student_weight()
            teachers = []
            if m.uses_audio:
                _, t, mask = self._audio(batch)
                teachers.append(("audio", t, mask))
            if m.uses_image:
                teachers.append(("image", self._image(video), None))
            for modality, t, mask in teachers:
                composition = self.heads[f"composition_{modality}"]
                t = t.float()
                z_c, c = composition(t, v)
                for key, value in m.student_losses(modality, v, z_v, t, c, z_c, y, mask).items():
                    student[key] = w * value
                v_, z_v_ = v.detach(), z_v.detach()
                z_c_, c_ = composition(t, v_)
                losses[f"composition_{modality}"] = m.composition_losses(modality, v_, z_v_, t, c_, z_c_, y, mask)
        losses["student"] = student
        return StepOutput(z_v.detach(), losses)

    # ----------------------------------------------------------------- recipe
    def stages(self) -> list[Stage]:
        return [Stage("train", tuple(g.name for g in self.groups(None)))]

    def groups(self, stage: Optional[Stage]) -> list[Group]:
        groups = []
        m = self.method
        for key in ("composition_audio", "composition_image"):
            if key in self.heads:
                options = {"momentum": m.composition_momentum, "nesterov": False,
                           "weight_decay": m.composition_weight_decay}
                groups.append(Group(key, list(self.heads[key].parameters()), lr=m.composition_lr,
                                    schedule="constant", optimizer="sgd", options=options))
        hint = list(self.heads["hint"].parameters()) if "hint" in self.heads else []
        groups.append(Group("student", [*self.student.parameters(), *hint]))
        return groups

    def enter_stage(self, stage: Stage) -> None:
        for teacher in (self.audio_teacher, self.image_teacher):
            if teacher is not None:
                teacher.eval()

    def deployable(self) -> nn.Module:
        return self.student

    def frozen_teacher(self) -> Optional[nn.Module]:
        """The audio teacher where it has a classifier (the run reports its score once); features
        alone have no score, and the image teacher is scored in its own run."""
        t = self.audio_teacher
        return t if t is not None and has_classifier(t) else None

    def trained_state(self) -> dict[str, dict]:
        return {"student": self.student.state_dict(), "heads": self.heads.state_dict()}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        self.student.load_state_dict(state["student"])
        self.heads.load_state_dict(state.get("heads", {}))

    def describe(self) -> list[str]:
        m = self.method
        lines = [f"# method {m.name} (video student {model_name(self.student)}, pooled feature {self.dim}-d, "
                 f"cross-entropy weight {self.ce_weight:g})"]
        for modality, teacher in (("audio", self.audio_teacher), ("image", self.image_teacher)):
            if teacher is not None:
                kind = "logits and pooled feature" if has_classifier(teacher) else "precomputed features"
                lines.append(f"{modality} teacher {model_name(teacher)} (frozen; {kind})")
        if isinstance(m, CCL):
            lines.append(f"ccl mode {m.mode}: temperatures audio {m.audio_temperature:g}, image {m.image_temperature:g}; "
                         f"student's cross-modal weight {m.student_weight():g}; compositions SGD lr "
                         f"{m.composition_lr:g} (constant), momentum {m.composition_momentum:g}, weight decay "
                         f"{m.composition_weight_decay:g}")
        if getattr(self, "image_plan", None) is not None:
            lines.append(f"image teacher: {self.image_plan}")
        lines.append("optimiser groups (backward order): " + ", ".join(g.name for g in self.groups(None)))
        return lines


def _masked_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               mask: torch.Tensor) -> torch.Tensor:
    """Hinton's KD (``T^2 KL(p_t || p_s)``, summed over classes) averaged over the masked rows."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        per_row = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
        return _masked_mean(per_row, mask) * temperature ** 2


def _masked_mse(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of the masked rows."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _masked_mean((x.float() - target.float()).pow(2).mean(dim=1), mask)


# ----------------------------------------------------------------------------- from a config
def build_crossmodal_recipe(cfg, student: nn.Module, teacher: Optional[nn.Module],
                            context: RunContext) -> CrossModalDistillation:
    """The recipe of a video-task config: the image teacher of ``ccl`` is planned like the run's
    teacher (a missing checkpoint with a config is trained first, outside the architecture probe)."""
    m = cfg.method
    if m.name not in METHODS:
        raise ValueError(f"method {m.name!r} is not available for a video student; choose one of {', '.join(METHODS)}")
    for key in ("student_stages", "teacher_stages"):
        if getattr(m, key) is not None:
            raise ValueError(f"method {m.name!r} on a video student reads pooled features: remove method.{key}")
    options = dict(m.options)
    method = create_method(m.name, **options)
    if isinstance(method, CCL) and not method.uses_audio and cfg.teacher is not None:
        raise ValueError("ccl in mode image uses no audio teacher: remove the teacher section (the image teacher is "
                         "method.options.image_teacher)")
    if teacher is not None and not has_classifier(teacher) and getattr(teacher, "feature_dim", None) is None:
        teacher.feature_dim = getattr(getattr(cfg, "video", None), "audio_dim", None)  # precomputed vectors' size
    num_classes = context.num_classes
    if num_classes is None:
        from ..tasks import get_task

        num_classes = get_task(cfg.task).num_outputs(cfg)
    image_teacher, plan = None, None
    if isinstance(method, CCL) and method.uses_image:
        image_teacher, plan = load_image_teacher(cfg, method.image_teacher, num_classes, probe=context.probe)
    recipe = CrossModalDistillation(student, method, audio=teacher, image=image_teacher,
                                    num_classes=num_classes, ce_weight=m.ce_weight)
    recipe.image_plan = plan
    return recipe


def load_image_teacher(cfg, section: dict, num_classes: int, *, probe: bool) -> tuple[nn.Module, str]:
    """(the frozen image teacher, how it was obtained). Planned like the run's teacher; outside the
    probe a missing checkpoint is first trained from the section's config."""
    from pathlib import Path

    from ..config import ConfigError, TeacherConfig
    from ..engine.loop import Run, plan_teacher
    from ..tasks import get_task

    fields = {k: v for k, v in section.items() if k != "num_classes"}
    try:
        t = TeacherConfig(**fields)
    except Exception as exc:  # pydantic's message spans lines: keep its first
        raise ConfigError(f"method.options.image_teacher: {str(exc).splitlines()[0]}") from None
    checkpoint = Path(t.checkpoint) if t.checkpoint else None
    if t.config is None and (checkpoint is None or not checkpoint.is_file()):
        raise ConfigError(f"ccl's image teacher {t.name}: weights file not found: {t.checkpoint}; set "
                          "method.options.image_teacher.checkpoint to a local file (e.g. torchvision's ImageNet "
                          "weights of the network), or method.options.image_teacher.config to train it first"
                          if t.checkpoint else f"ccl's image teacher {t.name} needs "
                          "method.options.image_teacher.checkpoint (a local weights file) or .config (trained first)")
    try:
        plan = plan_teacher(cfg, section=t)
    except ConfigError as exc:
        raise ConfigError(f"ccl's image teacher (method.options.image_teacher): {exc}") from None
    task = get_task(cfg.task)
    teacher_cfg = cfg.model_copy(update={"teacher": t})
    outputs = section.get("num_classes") or num_classes
    if plan.config is not None and not probe:
        from ..engine.checkpoint import rng_state, set_rng_state

        # the student's run goes on from the random state it had: it does not depend on this training
        state = rng_state()
        Run(plan.config, resume=(plan.config.run_dir / "last.pt").is_file()).fit()
        set_rng_state(state)
    weights = plan.checkpoint if (plan.config is None or not probe) else None
    return task.build_teacher(plan.name, teacher_cfg, outputs, weights), plan.describe()
