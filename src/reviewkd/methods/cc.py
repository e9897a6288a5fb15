"""Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, ICCV 2019: "Correlation Congruence for Knowledge
Distillation".

Features: the globally pooled feature of each network (the last entry, post-activation). Each is
mapped by its own linear embedding, Linear(C, ``embed_dim``), and both embeddings are trained with
the student (the teacher's feature itself is detached). Two forms of the loss:

``form = "benchmark"`` (default): the loss of the CIFAR-100 benchmark code every comparison table
uses (RepDistiller / CRD ``distiller_zoo/CC.py`` ``Correlation``, built by ``train_student.py``
with ``--distill correlation``). With ``e_s``, ``e_t`` the b x d embeddings (``LinearEmbed``: no
normalisation) and ``delta = |e_s - e_t|``, it multiplies the differences of consecutive samples
of the batch:

    loss = 1/(b-1) * sum_{i=1..b-1} sum_k delta[i, k] * delta[i+1, k],

weight ``0.02`` (the benchmark's ``-b 0.02``), cross-entropy weight 1, no KD (``-a 0``). A batch of
one sample has no pair: its loss is 0 (the benchmark's mean over no pairs would be NaN).

``form = "kernel"``: the paper's equations. Embeddings are L2-normalised and the correlation
between two samples is the Gaussian RBF kernel ``exp(-gamma ||x - y||^2)`` in its P-order Taylor
expansion; for unit vectors ``||x - y||^2 = 2 - 2 x.y``, so

    k(x, y) ~= sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * (x.y)^p,

and the loss is the mean squared difference of the two b x b correlation matrices,
``||psi(F_t) - psi(F_s)||^2 / b^2``. Defaults ``order = 2``, ``gamma = 0.4`` and ``weight = 100``
come from the Knowledge-Distillation-Zoo (AberHu) re-implementation of this form (the benchmark
code has no kernel to take them from). ``gamma`` and ``order`` belong to this form only, and
setting them with the benchmark form is an error.

Both forms: ``weight = None`` takes the form's default above; ``embed_dim = 128`` is the benchmark's
``feat_dim``; ``embed_dim = None`` compares the pooled features directly (the paper's kernel form;
the benchmark form then needs equal channel counts). The paper's full CCKD objective adds Hinton's
KD at ``temperature`` (its instance congruence): set ``kd_weight`` for it.

The losses are batch-level statistics (the benchmark form even depends on the order of the
samples): under DistributedDataParallel they are computed from each rank's own batch, not from the
gathered global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import OptionalKD, float32
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method

FORMS = ("benchmark", "kernel")
DEFAULT_WEIGHT = {"benchmark": 0.02, "kernel": 100.0}
DEFAULT_GAMMA, DEFAULT_ORDER = 0.4, 2


def consecutive_correlation_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """The benchmark's ``Correlation``: mean over consecutive sample pairs (i, i+1) of
    ``sum_k |e_s - e_t|[i, k] * |e_s - e_t|[i+1, k]`` (0 for a batch of one sample)."""
    with float32(e_s):
        delta = (e_s.float().flatten(1) - e_t.float().flatten(1)).abs()
        pairs = (delta[:-1] * delta[1:]).sum(dim=1)
        return pairs.mean() if pairs.numel() else pairs.sum()


def rbf_correlation(z: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """b x d -> b x b: P-order Taylor expansion of the Gaussian RBF kernel of L2-normalised rows."""
    z = F.normalize(z, dim=1)
    sim = z @ z.t()
    coeffs = [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    corr = torch.full_like(sim, coeffs[0])
    power = torch.ones_like(sim)
    for c in coeffs[1:]:
        power = power * sim
        corr = corr + c * power
    return corr


def cc_loss(z_s: torch.Tensor, z_t: torch.Tensor, gamma: float = DEFAULT_GAMMA, order: int = DEFAULT_ORDER) -> torch.Tensor:
    """The kernel form: mean squared difference of the two RBF correlation matrices."""
    with float32(z_s):
        corr_s = rbf_correlation(z_s.float().flatten(1), gamma, order)
        corr_t = rbf_correlation(z_t.float().flatten(1), gamma, order)
        return (corr_s - corr_t).pow(2).mean()


@register_method
class CC(OptionalKD, DistillMethod):
    """Correlation congruence on embeddings of the pooled features: the CIFAR-100 benchmark's
    consecutive-pair form by default, the paper's RBF-kernel form with ``form="kernel"``.
    ``weight`` None: 0.02 (benchmark) or 100 (kernel); ``gamma`` / ``order`` (kernel form only)
    None: 0.4 / 2."""

    name = "cc"
    paper = "Peng et al., ICCV 2019: Correlation Congruence for Knowledge Distillation"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification',))

    def __init__(
        self,
        form: str = "benchmark",
        weight: float | None = None,
        embed_dim: int | None = 128,
        gamma: float | None = None,
        order: int | None = None,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"cc: form must be one of {', '.join(FORMS)}, got {form!r}")
        if form == "benchmark" and (gamma is not None or order is not None):
            raise ValueError("cc: gamma and order are options of form 'kernel'; set form: kernel or drop them")
        self.form = form
        self.weight = float(DEFAULT_WEIGHT[form] if weight is None else weight)
        self.gamma = float(DEFAULT_GAMMA if gamma is None else gamma)
        self.order = int(DEFAULT_ORDER if order is None else order)
        self.embed_dim = None if embed_dim is None else int(embed_dim)
        self.init_kd(kd_weight, temperature)
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        c_s, c_t = probe.student_features[-1].shape[1], probe.teacher_features[-1].shape[1]
        if self.embed_dim is not None:
            self.embed_s = nn.Linear(c_s, self.embed_dim)
            self.embed_t = nn.Linear(c_t, self.embed_dim)
        elif self.form == "benchmark" and c_s != c_t:
            raise IncompatiblePairError(
                f"cc (benchmark form) subtracts the two pooled features, but {probe.student_name} gives {c_s} "
                f"channels and {probe.teacher_name} {c_t}: keep embed_dim (e.g. 128) or use form: kernel"
            )

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        e_s = self.embed_s(step.student_features[-1].flatten(1))
        e_t = self.embed_t(step.teacher_features[-1].flatten(1))
        if self.form == "benchmark":
            loss = consecutive_correlation_loss(e_s, e_t)
        else:
            loss = cc_loss(e_s, e_t, self.gamma, self.order)
        return self.add_kd({"cc": self.weight * loss}, step)
