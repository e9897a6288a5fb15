"""Chen, Xian, Koepke, Shan, Akata, CVPR 2021: "Distilling Audio-Visual Knowledge by Compositional
Contrastive Learning" (CCL), as the authors' code computes it (yanbeic/CCL).

A video student learns from frozen audio and / or image teachers. Per teacher modality, a
composition module turns the teacher feature ``t`` and the student's pooled feature ``v`` into a
compositional embedding ``c = t + W [t^ ; v^] + b`` (``^``: L2-normalised rows, no nonlinearity; the
residual goes onto the raw ``t``) with its own classifier ``z_c = U c``. With
``S(f, g) = L_mc(f, g) + L_mc(g, f)`` and ``J`` below, for one teacher (temperature ``tau``):

* student:      ``L_v = CE(z_v, y) + S(v, c) + S(v, t) + J(z_v, z_c)``
* composition:  ``L_c = CE(z_c, y) + S(v, c) + S(c, t) + J(z_v, z_c)``

With both teachers (``mode: audio_image``) the student's contrastive and J terms of the two are
summed and weighted by ``loss_weight`` (0.5, the released script's default); the composition losses
stay unweighted. The student is updated with the gradient of ``L_v`` alone and each composition
module with that of ``L_c + L_v`` (the reference's zero / backward / step order; the recipe
:class:`reviewkd.recipes.crossmodal.CrossModalDistillation` gets it from the loop's rule by putting
the composition groups first).

* ``L_mc(f, g; y, tau)``: rows of f and g L2-normalised, ``p_jk = softmax_k(cos(f_j, g_k) / tau)`` over
  the batch; positives ``P(j) = {k: y_k = y_j}`` (the paired item ``k = j`` included), negatives the
  rest; ``l_j = -mean_{k in P(j)} log(p_jk + eps) - mean_{k in N(j)} log(1 - p_jk + eps)``, eps 1e-10;
  ``L_mc = mean_j l_j``. It is a per-pair binary objective over a softmax, not InfoNCE.
* ``J(z1, z2) = 0.5 mean_j [KL(p1 || p2) + KL(p2 || p1)]``, ``p = softmax(z)``, with the reference's
  epsilon inside the log ratio: ``KL(p || q) = sum_k p_k log(p_k / q_k + eps)``; called "JSD" there,
  it is half the symmetric KL. Gradients reach both sides.
* Temperatures: 0.5 for audio, 0.1 for image.

Audio masking: only samples with audio enter the audio terms (the composition's cross-entropy,
both contrastive terms and J): ``audio_present`` (where the data give it) and a teacher feature whose
sum is not zero (the reference's test). Their rows and columns leave every audio term, exactly as
computing the terms on the subset would. The image teacher sees every sample.

Where the reference is silent or fails, chosen here:

* a row without negatives (every item of the batch, or of the audio subset, shares its class)
  drops its negative term (the reference divides by zero there and gets NaN);
* when no sample is left for a term (a batch without any audio), the term is zero, still connected
  to the parameters (zero gradients, so processes under torchrun stay in step);
* every loss is computed in float32, also under bf16 / fp16 autocast;
* the log ratio of J is evaluated as ``logaddexp(log p - log q, log eps)``, the same value without
  overflow where q underflows.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import DistillMethod, Reads, RunContext, Step, register_method

EPS = 1e-10  # the reference's epsilon in both losses
MODES = ("audio", "image", "audio_image")
# A finite stand-in for -inf on the logits of masked columns: exp() of it is exactly 0 in float32
# after softmax subtracts the row maximum, while a row of only masked columns stays finite (no NaN
# reaches the gradient).
_MASKED = -1.0e4


# ----------------------------------------------------------------------------- the terms
def _rows(mask: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask.to(device=device, dtype=torch.bool)


def _masked_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the selected rows; 0 (connected to the graph) when none is."""
    w = rows.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def multiclass_contrastive(f: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, temperature: float,
                           mask: Optional[torch.Tensor] = None, eps: float = EPS) -> torch.Tensor:
    """``L_mc(f, g)`` over the samples of ``mask`` (None: all); see the module docstring.

    No host synchronisation: masked rows and columns are removed by weights, not by indexing.
    """
    with torch.autocast(device_type=f.device.type, enabled=False):
        f, g = F.normalize(f.float().flatten(1), dim=1), F.normalize(g.float().flatten(1), dim=1)
        rows = _rows(mask, f.shape[0], f.device)
        logits = (f @ g.T / temperature).masked_fill(~rows[None, :], _MASKED)
        p = logits.softmax(dim=1)
        pair = rows[:, None] & rows[None, :]
        same = labels[:, None] == labels[None, :]
        positive, negative = (same & pair).float(), (~same & pair).float()
        pos = -(torch.log(p + eps) * positive).sum(1) / positive.sum(1).clamp(min=1.0)
        # a row without negatives has a zero sum here: its negative term is dropped
        neg = -(torch.log(1.0 - p + eps) * negative).sum(1) / negative.sum(1).clamp(min=1.0)
        return _masked_mean(pos + neg, rows)


def symmetric_contrastive(f: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, temperature: float,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``S(f, g) = L_mc(f, g) + L_mc(g, f)``."""
    return (multiclass_contrastive(f, g, labels, temperature, mask)
            + multiclass_contrastive(g, f, labels, temperature, mask))


def symmetric_kl(z1: torch.Tensor, z2: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 eps: float = EPS) -> torch.Tensor:
    """The reference's "JSD": ``0.5 mean_j [KL(p1 || p2) + KL(p2 || p1)]`` at temperature 1, with
    ``KL(p || q) = sum_k p_k log(p_k / q_k + eps)``, over the samples of ``mask``."""
    with torch.autocast(device_type=z1.device.type, enabled=False):
        log_p, log_q = z1.float().log_softmax(dim=1), z2.float().log_softmax(dim=1)
        log_eps = math.log(eps)
        ratio_pq = torch.logaddexp(log_p - log_q, torch.full_like(log_p, log_eps))
        ratio_qp = torch.logaddexp(log_q - log_p, torch.full_like(log_p, log_eps))
        per_row = (log_p.exp() * ratio_pq).sum(1) + (log_q.exp() * ratio_qp).sum(1)
        return 0.5 * _masked_mean(per_row, _rows(mask, z1.shape[0], z1.device))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        return _masked_mean(ce, _rows(mask, logits.shape[0], logits.device))


class Composition(nn.Module):
    """``c = t + W [t^ ; v^] + b`` and its classifier ``z_c = U c`` (``forward`` returns ``(z_c, c)``)."""

    def __init__(self, teacher_dim: int, student_dim: int, num_classes: int):
        super().__init__()
        self.residual = nn.Linear(teacher_dim + student_dim, teacher_dim)  # W, b
        self.classifier = nn.Linear(teacher_dim, num_classes)  # U

    def forward(self, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, v = t.flatten(1), v.flatten(1)
        c = t + self.residual(torch.cat([F.normalize(t, dim=1), F.normalize(v, dim=1)], dim=1))
        return self.classifier(c), c


# ----------------------------------------------------------------------------- the method
def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ccl: {name} must be a number > 0, got {value!r} (method.options.{name})")
    return float(value)


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"ccl: {name} must be a number >= 0, got {value!r} (method.options.{name})")
    return float(value)


IMAGE_TEACHER_KEYS = ("name", "checkpoint", "config", "features", "overrides", "num_classes")


@register_method
class CCL(DistillMethod):
    """Compositional contrastive learning: a video student learns from frozen audio and / or image
    teachers through learned compositions of teacher and student features, a label-aware
    cross-modal contrastive loss and a symmetric KL between the student's and the composition's
    predictions (composition modules trained by their own SGD optimisers at a constant LR).

    ``mode``: ``audio`` (the config's ``teacher``: an audio network on the clip's audio, or
    ``precomputed`` features), ``image`` (``image_teacher`` on one random frame of the clip; no
    ``teacher`` section), or ``audio_image`` (both). ``image_teacher``: ``{name, checkpoint, config,
    features, overrides, num_classes}`` like a ``teacher`` section (``config`` trains it first when the
    checkpoint is missing; ``num_classes``: the outputs of its weight file, e.g. 1000 for ImageNet).
    ``loss_weight`` weighs the student's cross-modal terms in ``audio_image`` mode only.
    """

    name = "ccl"
    paper = ("Chen, Xian, Koepke, Shan, Akata, CVPR 2021: Distilling Audio-Visual Knowledge by Compositional "
             "Contrastive Learning (video student; audio and / or image teachers)")
    reads = Reads(teacher=True, logits=True, targets=True, inputs=True, tasks=("video",))

    def __init__(self, mode: str = "audio", audio_temperature: float = 0.5, image_temperature: float = 0.1,
                 loss_weight: float = 0.5, image_teacher: Optional[dict[str, Any]] = None,
                 composition_lr: float = 1e-3, composition_momentum: float = 0.9,
                 composition_weight_decay: float = 5e-4):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ccl: mode must be one of {', '.join(MODES)}, got {mode!r} (method.options.mode)")
        self.mode = mode
        self.audio_temperature = _positive("audio_temperature", audio_temperature)
        self.image_temperature = _positive("image_temperature", image_temperature)
        self.loss_weight = _non_negative("loss_weight", loss_weight)
        self.composition_lr = _positive("composition_lr", composition_lr)
        self.composition_momentum = _non_negative("composition_momentum", composition_momentum)
        self.composition_weight_decay = _non_negative("composition_weight_decay", composition_weight_decay)
        self.image_teacher = self._check_image_teacher(image_teacher)

    def _check_image_teacher(self, section: Optional[dict]) -> Optional[dict]:
        if not self.uses_image:
            if section is not None:
                raise ValueError(f"ccl: mode {self.mode!r} uses no image teacher: remove method.options.image_teacher "
                                 "(or set method.options.mode to image or audio_image)")
            return None
        if not isinstance(section, dict) or not section.get("name"):
            raise ValueError(f"ccl: mode {self.mode!r} needs method.options.image_teacher with a name and a checkpoint "
                             "or config, e.g. {name: resnet20, config: .../frame_teacher.yaml}")
        unknown = sorted(set(section) - set(IMAGE_TEACHER_KEYS))
        if unknown:
            raise ValueError(f"ccl: method.options.image_teacher has unknown key(s) {unknown}; known: "
                             f"{', '.join(IMAGE_TEACHER_KEYS)}")
        if section.get("num_classes") is not None and (not isinstance(section["num_classes"], int)
                                                       or section["num_classes"] < 1):
            raise ValueError(f"ccl: method.options.image_teacher.num_classes must be a positive integer, got "
                             f"{section['num_classes']!r}")
        return dict(section)

    @property
    def uses_audio(self) -> bool:
        return self.mode in ("audio", "audio_image")

    @property
    def uses_image(self) -> bool:
        return self.mode in ("image", "audio_image")

    @classmethod
    def uses_teacher(cls, options: dict) -> bool:
        """The config's ``teacher`` section is the audio teacher: the image-only mode has none."""
        return options.get("mode", "audio") != "image"

    def temperature(self, modality: str) -> float:
        return self.audio_temperature if modality == "audio" else self.image_temperature

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        raise self._not_a_distiller()

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        raise self._not_a_distiller()

    def _not_a_distiller(self) -> ValueError:
        return ValueError("method 'ccl' trains composition modules with their own optimisers next to a video student: "
                          "use it in a video-task config (task: video), or reviewkd.recipes.crossmodal directly")

    # ------------------------------------------------------------------ losses
    def student_losses(self, modality: str, v: torch.Tensor, z_v: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                       z_c: torch.Tensor, y: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The student's cross-modal terms of one teacher modality, unweighted: ``S(v, c) + S(v, t)`` and
        ``J(z_v, z_c)``. ``v, z_v``: the student's pooled feature and logits; ``t``: the teacher
        feature; ``c, z_c``: the composition and its logits; ``mask``: the samples that enter (None: all)."""
        tau = self.temperature(modality)
        contrast = symmetric_contrastive(v, c, y, tau, mask) + symmetric_contrastive(v, t, y, tau, mask)
        return {f"contrast_{modality}": contrast,
                f"jsd_{modality}": symmetric_kl(z_v, z_c, mask)}

    def composition_losses(self, modality: str, v: torch.Tensor, z_v: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                           z_c: torch.Tensor, y: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The composition module's loss: ``CE(z_c, y) + S(v, c) + S(c, t) + J(z_v, z_c)``."""
        tau = self.temperature(modality)
        return {"ce": masked_cross_entropy(z_c, y, mask),
                "contrast": symmetric_contrastive(v, c, y, tau, mask) + symmetric_contrastive(c, t, y, tau, mask),
                "jsd": symmetric_kl(z_v, z_c, mask)}

    def student_weight(self) -> float:
        """Weight of the student's cross-modal terms: ``loss_weight`` with both teachers, else 1."""
        return self.loss_weight if self.mode == "audio_image" else 1.0
