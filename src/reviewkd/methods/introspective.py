"""Gu, Wu, Tresp, ACCV 2020: "Introspective Learning by Distilling Knowledge from Online
Self-explanation" -- a **reconstruction**: the paper's method section was not available, and no code
was released. What the abstract states: no teacher and no peers; the model's own explanations,
computed online, are distilled back into it, supplying the two things the authors found that make KD
work (responses in the non-ground-truth classes, and class similarity). The construction below is
a hypothesis consistent with that abstract, to be corrected if the paper's text becomes available;
every choice the abstract leaves open is an option, and its default is stated here.

At each training step, with the current weights and the training forward pass itself:

1. **Explanations.** For each sample, the explanation ``E_c`` of class ``c`` is one of
   (``explanation``):

   * ``"input_gradient"`` (default): ``dz_c / dx`` over all channels and pixels, signed (not its
     absolute value: two classes that push the same pixels in opposite directions are dissimilar);
   * ``"gradient_input"``: ``x * dz_c / dx`` (element-wise);
   * ``"gradcam"``: Grad-CAM on the last stage's output ``A`` (the deepest stage feature map before
     pooling): ``relu(sum_k a_k A_k)`` with ``a_k`` the spatial mean of ``dz_c / dA_k``.

   One backward pass of the summed class logits per explained class gives every sample's map at
   once (``autograd.grad`` w.r.t. the inputs or ``A`` only: no parameter receives a gradient, and
   nothing is stored in ``.grad``; the Distiller also keeps the training backward from storing one on
   the inputs). They reuse the training forward pass, so BatchNorm layers are in
   training mode: each one subtracts, per channel, the batch mean of the backward signal, as for any
   input-gradient computed in training mode (a per-sample Jacobian would cost one pass per sample).
   With several processes each one explains its own share of the batch.
2. **Similarities.** ``s_c = sim(E_y, E_c)`` for the other classes, ``sim`` = ``"cosine"`` (default)
   or ``"pearson"`` (cosine of the mean-centred maps), both in [-1, 1]; the ground-truth class gets
   ``s_y = 1``, the similarity's maximum, so it always keeps the largest mass. With ``top_k = k`` only
   the ground truth and the k other classes with the highest logits are explained (``k + 1`` backward
   passes instead of the number of classes); the others get ``s_c = -1``, the minimum.
3. **Target.** ``q = softmax(s / temperature)``, a constant (the maps are computed without a graph).
   Default ``temperature = 0.25``: with unrelated explanations (``s = 0``) and 10 classes the ground
   truth keeps ``1 / (1 + 9 e^-4) = 0.86`` of the mass, and a class whose explanation is as similar
   as ``s = 0.5`` gets ``e^2 = 7.4`` times less than the ground truth.
4. **Loss.** ``CE(y, p) + weight * T^2 * KL(q || softmax(z / T))`` with ``T = student_temperature``
   (default 1: the student's plain softmax) and ``weight`` = lambda (default 1), batch mean.

The maps are cast to float32 before they are reduced (Grad-CAM's weights and sum, the similarities,
the target and the loss are float32 under bf16 / fp16 autocast); the backward passes themselves run
in the precision of the forward pass. Cost: one extra backward pass to the inputs per explained
class (10 on 10 classes; ``top_k`` bounds it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import float32
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method

EXPLANATIONS = ("input_gradient", "gradient_input", "gradcam")
SIMILARITIES = ("cosine", "pearson")
_EPS = 1e-12  # a zero map (e.g. an all-negative Grad-CAM) has similarity 0 to every map


def class_explanation(logits: torch.Tensor, wrt: torch.Tensor, classes: torch.Tensor, kind: str) -> torch.Tensor:
    """Float32 maps, B x D: row i explains logit ``classes[i]`` of sample i (one backward pass).

    ``wrt`` is the input batch (``input_gradient``, ``gradient_input``) or the last stage's feature
    map (``gradcam``); both must be part of ``logits``' graph, which is kept for the loss.
    """
    select = F.one_hot(classes, logits.shape[1]).to(logits.dtype)
    (grad,) = torch.autograd.grad(logits, wrt, grad_outputs=select, retain_graph=True)
    return _map(grad.float(), wrt.detach().float(), kind)


def _map(grad: torch.Tensor, wrt: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "input_gradient":
        out = grad
    elif kind == "gradient_input":
        out = grad * wrt
    else:  # gradcam: channel weights = spatial mean of the gradient
        out = F.relu((grad.mean(dim=(2, 3), keepdim=True) * wrt).sum(dim=1))
    return out.reshape(out.shape[0], -1)


def map_similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Row-wise similarity of two B x D batches of maps -> B, in [-1, 1]."""
    if kind == "pearson":
        a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def explained_classes(logits: torch.Tensor, targets: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """B x n indices of the other classes to explain: all of them in class order (``top_k`` None),
    or the ``top_k`` highest-scoring ones."""
    b, k = logits.shape
    is_target = F.one_hot(targets, k).bool()
    if top_k is None:
        return torch.arange(k, device=logits.device).expand(b, k)[~is_target].view(b, k - 1)
    return logits.detach().float().masked_fill(is_target, float("-inf")).topk(top_k, dim=1).indices


def similarity_target(similarities: torch.Tensor, others: torch.Tensor, targets: torch.Tensor, num_classes: int,
                      temperature: float) -> torch.Tensor:
    """``softmax(s / temperature)`` over all classes: ``s`` = 1 for the ground truth, the given
    similarities for the explained classes ``others``, -1 for classes not explained."""
    s = similarities.new_full((similarities.shape[0], num_classes), -1.0)
    s.scatter_(1, others, similarities)
    s.scatter_(1, targets.unsqueeze(1), 1.0)
    return F.softmax(s / temperature, dim=1)


@register_method
class Introspective(DistillMethod):
    name = "introspective"
    paper = ("Gu, Wu, Tresp, ACCV 2020: Introspective Learning by Distilling Knowledge from Online "
             "Self-explanation (reconstruction; no teacher)")
    reads = Reads(teacher=False, logits=True, targets=True, input_grads=True)

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.25,
        student_temperature: float = 1.0,
        explanation: str = "input_gradient",
        similarity: str = "cosine",
        top_k: Optional[int] = None,
    ):
        super().__init__()
        if explanation not in EXPLANATIONS:
            raise ValueError(f"introspective: explanation must be one of {', '.join(EXPLANATIONS)}, "
                             f"got {explanation!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"introspective: similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
        if not (temperature > 0 and student_temperature > 0):
            raise ValueError(f"introspective: temperature and student_temperature must be > 0, got {temperature} and "
                             f"{student_temperature}")
        if weight < 0:
            raise ValueError(f"introspective: weight must be >= 0, got {weight}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"introspective: top_k must be a positive integer or null (all classes), got {top_k!r}")
        self.weight, self.temperature = float(weight), float(temperature)
        self.student_temperature = float(student_temperature)
        self.explanation, self.similarity, self.top_k = explanation, similarity, top_k
        if explanation == "gradcam":  # differentiates w.r.t. the last stage's map, not the inputs
            self.reads = Reads(teacher=False, student_features="post", logits=True, targets=True)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        num_classes = probe.student_logits.shape[1]
        if self.top_k is not None and self.top_k > num_classes - 1:
            raise ValueError(f"introspective: top_k={self.top_k} but {probe.student_name} has {num_classes} classes: "
                             f"use at most {num_classes - 1}, or null to explain all of them")
        if self.explanation == "gradcam":
            stage = probe.student_features[-2] if len(probe.student_features) > 1 else None
            if stage is None or stage.dim() != 4:
                raise IncompatiblePairError(
                    f"introspective: gradcam needs a stage feature map (N x C x H x W) of {probe.student_name}: give "
                    "its FeatureSpec a stage, or use explanation=input_gradient")

    def target(self, step: Step) -> torch.Tensor:
        """The soft target q (B x classes, float32, no graph) from this step's explanations."""
        logits, targets = step.student_logits, step.targets
        if targets is None:
            raise ValueError("introspective explains the ground-truth class: the batch needs labels")
        if not logits.requires_grad:
            raise ValueError("introspective computes gradients of the logits: call it with autograd enabled "
                             "(not under torch.no_grad or torch.inference_mode)")
        wrt = step.student_features[-2] if self.explanation == "gradcam" else step.inputs["image"]
        with float32(logits):
            others = explained_classes(logits, targets, self.top_k)
            reference = class_explanation(logits, wrt, targets, self.explanation)
            # one class per sample at a time: memory stays at two maps per sample
            sims = []
            for j in range(others.shape[1]):
                maps = class_explanation(logits, wrt, others[:, j], self.explanation)
                sims.append(map_similarity(reference, maps, self.similarity))
            return similarity_target(torch.stack(sims, dim=1), others, targets, logits.shape[1], self.temperature)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        if self.weight == 0:  # plain cross-entropy: no explanation passes to pay for
            return {"introspective": step.student_logits.new_zeros((), dtype=torch.float32)}
        q = self.target(step)
        t = self.student_temperature
        with float32(q):
            log_p = F.log_softmax(step.student_logits.float() / t, dim=1)
            kl = F.kl_div(log_p, q, reduction="batchmean") * t**2
        return {"introspective": self.weight * kl}
