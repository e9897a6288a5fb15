"""Zhou, Wang, Chen, Chen, Wang, Wang, Bu, ICCV 2021: "Distilling Holistic Knowledge with Graph
Neural Networks" (HKD), as the authors' code computes it (wyc-ruiker/HKD ``distiller_zoo/GNN.py``).

Features: the globally pooled feature of each network (the last entry of the feature list) and both
networks' logits. Per side, in float32:

* individual knowledge: ``z = l2_normalize(Linear(d -> feat_dim)(f))`` (``embed_s``, ``embed_t``;
  both trained, the teacher itself frozen);
* relational knowledge: a k-NN graph over the batch built from the side's own softmax predictions
  (temperature 1, detached): cosine distance ``1 - p_i.p_j / max(|p_i||p_j|, 1e-7)`` with the
  diagonal set to -1, so that each node's ``knn = 8`` nearest include itself; edges run neighbour ->
  centre, so every node has in-degree ``knn``;
* holistic knowledge: one graph convolution (DGL's ``TAGConv`` with one hop, written here in plain
  PyTorch on the dense adjacency) ``g = l2_normalize(W [z ; D^-1/2 A D^-1/2 z] + b)`` with D the
  in-degrees, i.e. the mean of the ``knn`` neighbours' embeddings (self included); W is
  Xavier-normal with ReLU gain, b PyTorch's default (``gnn_s``, ``gnn_t``).

Two memory banks over the training set, ``memory_s`` (student) and ``memory_t`` (teacher), come
from :class:`~reviewkd.methods.memory.ContrastMemory` (shared with CRD). Each sample gets ``nce_k``
negatives drawn from the other classes (the positive is not among them), the same for all four
terms. With ``l(x) = cross-entropy of x / tau with the positive at index 0``:

* l1 = l([<M_t[i], z_s> ; <M_s[n], z_s> for each negative n]),
* l2 = l([<M_s[i], z_t> ; <M_t[n], z_t>]),
* l3 = l([<m_t, g_s> ; <M_s[n], g_s>]) with m_t = l2_normalize(0.75 M_t[i] + 0.25 g_t), detached,
* l4 = l([<m_s, g_t> ; <M_t[n], g_t>]) with m_s = l2_normalize(0.75 M_s[i] + 0.25 g_s), detached,

and the loss ``weight * (mean l1 + mean l2 + mean l3 + mean l4)``. The details the reference code
fixes and a re-implementation easily gets wrong:

* an anchor's negatives come from its *own* network's bank, its positive from the *other*
  network's bank (unlike CRD, where both come from the other side's);
* the graph terms' positives are smoothed mixes of the other bank and the other network's current
  graph embedding, normalised and detached; their negatives are raw bank rows;
* after the loss is built, the banks move with the *individual* (pre-graph) embeddings:
  ``M[i] <- l2_normalize(0.9 M[i] + 0.1 z_i)`` (``memory_momentum``); banks start unnormalised;
* **small batches**: with fewer than ``knn`` samples the graph terms are skipped *and the banks
  are not updated* (only l1 + l2 count);
* the teacher-side terms (l2, l4) train ``embed_t`` and ``gnn_t`` only; they shape the memory the
  student is contrasted against. Gradients reach neither the teacher nor the logits (the graphs
  are built from detached predictions);
* L2 normalisation has no epsilon (see :func:`~reviewkd.methods.memory.l2_normalize`).

Defaults = the released CIFAR-100 recipe (``--distill hkd --mode hkd -a 0 -b 3``): ``weight = 3``,
cross-entropy weight 1, ``feat_dim = 128``, ``nce_k = 16384``, ``tau = 0.07``, ``knn = 8``,
``memory_momentum = 0.9``, ``smoothing = 0.75`` (all hard-coded there but feat_dim and K). "HKD+KD"
is ``kd_weight = 1`` (``-a 1``): Hinton's KD at ``temperature`` 4 (sum-KL x T^2 / batch).

Where the reference is silent or cannot apply, chosen here:

* ``nce_k`` is not clipped to the data set (as the reference): a class with fewer than ``nce_k``
  other-class samples draws its negatives with replacement;
* negatives are drawn per batch on the device from the torch RNG (the reference draws them per
  sample in its data loader's workers);
* the banks are updated in training mode only (the reference calls the loss only in training);
* under torchrun each process builds its graphs from its own batch and applies the small-batch
  rule to it (all processes get equal batches, so they agree), while the banks are updated with
  every process's batch gathered, so they stay identical on all ranks;
* a teacher without logits (precomputed features) is refused: its graph needs them.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ._common import OptionalKD, float32
from .base import DistillMethod, IncompatiblePairError, Reads, RunContext, Step, register_method
from .memory import ContrastMemory, l2_normalize

_COS_EPS = 1e-7  # the reference's clamp of the cosine's denominator


def knn_graph(logits: torch.Tensor, k: int) -> torch.Tensor:
    """B x B adjacency of the k-NN graph of softmax predictions: row i has ones at its k nearest
    nodes (itself first), i.e. ``A[i, j] = 1`` for an edge j -> i. No gradient flows through it."""
    p = F.softmax(logits.detach().float(), dim=1)
    norms = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    distance = 1 - (p @ p.T) / (norms @ norms.T).clamp(min=_COS_EPS)
    eye = torch.eye(p.shape[0], device=p.device, dtype=p.dtype)
    distance = distance * (1 - eye) - eye  # self at -1: always among the nearest
    nearest = distance.topk(k, dim=1, largest=False).indices
    return torch.zeros_like(distance).scatter_(1, nearest, 1.0)


def normalized_aggregate(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One hop of TAGConv: ``D^-1/2 A D^-1/2 x`` with D the in-degrees (row sums, at least 1),
    applied to sources as well as centres, as DGL does."""
    scale = adjacency.sum(dim=1).clamp(min=1).rsqrt().unsqueeze(1)
    return scale * (adjacency @ (scale * x))


class OneHopGraphConv(nn.Module):
    """``l2_normalize(lin([x ; D^-1/2 A D^-1/2 x]))``: TAGConv(k=1) followed by L2 normalisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(2 * dim, dim)
        nn.init.xavier_normal_(self.lin.weight, gain=nn.init.calculate_gain("relu"))  # DGL's init

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.lin(torch.cat([x, normalized_aggregate(adjacency, x)], dim=1)))


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, negatives: torch.Tensor,
                     tau: float) -> torch.Tensor:
    """Batch mean of ``-log softmax([<positive_i, a_i> ; <bank[n], a_i> for n in negatives_i] / tau)[0]``."""
    pos = (anchor * positive).sum(dim=1, keepdim=True)
    neg = torch.gather(anchor @ bank.T, 1, negatives)  # one B x N product, read at the negatives
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device))


def _check(name: str, value, ok, rule: str) -> None:
    """A one-line error for an option out of its range (``ok`` is called only on numbers)."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if valid and "integer" in rule:
        valid = float(value).is_integer()
    if not (valid and ok(value)):
        raise ValueError(f"hkd: option {name} must be {rule}, got {value!r}")


@register_method
class HKD(ContrastMemory, OptionalKD, DistillMethod):
    """Holistic KD: contrastive alignment of individual embeddings and of their one-hop aggregation
    over per-network k-NN graphs of the predictions, with CRD-like memory banks."""

    name = "hkd"
    paper = "Zhou et al., ICCV 2021: Distilling Holistic Knowledge with Graph Neural Networks"
    reads = Reads(student_features="post", teacher_features="post", logits=True, index=True,
                  tasks=("classification",))

    def __init__(
        self,
        weight: float = 3.0,
        feat_dim: int = 128,
        nce_k: int = 16384,
        tau: float = 0.07,
        knn: int = 8,
        memory_momentum: float = 0.9,
        smoothing: float = 0.75,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__()
        positive = lambda v: v > 0  # noqa: E731
        fraction = lambda v: 0 <= v <= 1  # noqa: E731
        for option, value, ok, rule in (
            ("weight", weight, lambda v: v >= 0, "a number >= 0"),
            ("feat_dim", feat_dim, positive, "a positive integer"),
            ("nce_k", nce_k, positive, "a positive integer"),
            ("tau", tau, positive, "a number > 0"),
            ("knn", knn, positive, "a positive integer"),
            ("memory_momentum", memory_momentum, fraction, "a number in [0, 1]"),
            ("smoothing", smoothing, fraction, "a number in [0, 1]"),
            ("kd_weight", kd_weight, lambda v: v >= 0, "a number >= 0"),
            ("temperature", temperature, positive, "a number > 0"),
        ):
            _check(option, value, ok, rule)
        self.weight, self.feat_dim, self.nce_k, self.tau = float(weight), int(feat_dim), int(nce_k), float(tau)
        self.knn, self.memory_momentum, self.smoothing = int(knn), float(memory_momentum), float(smoothing)
        self.init_kd(kd_weight, temperature)
        self.reads = replace(self.reads, logits=True)  # the graphs read both networks' logits, KD or not
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
        self.gnn_s: OneHopGraphConv | None = None
        self.gnn_t: OneHopGraphConv | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        if probe.teacher_logits is None:
            raise IncompatiblePairError(
                f"hkd builds the teacher's graph from its logits, but {probe.teacher_name} gives none "
                "(a precomputed teacher of features): use a teacher network or precomputed logits with another method"
            )
        # the reference's order of construction (and of RNG draws): embeddings, graph layers, banks
        self.embed_s = nn.Linear(probe.student_features[-1].shape[1], self.feat_dim)
        self.embed_t = nn.Linear(probe.teacher_features[-1].shape[1], self.feat_dim)
        self.gnn_s = OneHopGraphConv(self.feat_dim)
        self.gnn_t = OneHopGraphConv(self.feat_dim)
        self.init_memory(context, "hkd", self.feat_dim, self.nce_k, ("memory_s", "memory_t"))

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        idx = step.index
        if idx is None:
            raise ValueError("hkd needs the batch's dataset indices: call distiller(images, targets, indices=...)")
        idx = idx.to(self.memory_s.device, torch.long, non_blocking=True)
        f_s = step.student_features[-1].flatten(1)
        f_t = step.teacher_features[-1].flatten(1)
        with float32(f_s):
            z_s = l2_normalize(self.embed_s(f_s.float()))
            z_t = l2_normalize(self.embed_t(f_t.float()))
            negatives = self.sample_negatives(self.labels[idx])
            m_s, m_t = self.memory_s[idx], self.memory_t[idx]
            # individual terms: positive from the other network's bank, negatives from one's own
            loss = (contrastive_loss(z_s, m_t, self.memory_s, negatives, self.tau)
                    + contrastive_loss(z_t, m_s, self.memory_t, negatives, self.tau))
            if z_s.shape[0] >= self.knn:  # the reference skips the graph terms and the update below
                g_s = self.gnn_s(z_s, knn_graph(step.student_logits, self.knn))
                g_t = self.gnn_t(z_t, knn_graph(step.teacher_logits, self.knn))
                with torch.no_grad():  # smoothed positives: the other bank mixed with its current graph embedding
                    smooth_t = l2_normalize(self.smoothing * m_t + (1 - self.smoothing) * g_t)
                    smooth_s = l2_normalize(self.smoothing * m_s + (1 - self.smoothing) * g_s)
                loss = loss + (contrastive_loss(g_s, smooth_t, self.memory_s, negatives, self.tau)
                               + contrastive_loss(g_t, smooth_s, self.memory_t, negatives, self.tau))
                if self.training:
                    self.update_memory(idx, {"memory_s": z_s, "memory_t": z_t}, self.memory_momentum)
        return self.add_kd({"hkd": self.weight * loss}, step)
