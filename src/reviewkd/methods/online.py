"""Online distillation: networks of one architecture trained together, without a pretrained teacher.

* ``dml`` -- Zhang, Xiang, Hospedales, Lu, CVPR 2018, "Deep Mutual Learning": ``peers`` networks,
  each trained with ``CE(z_i, y) + T^2 / (m - 1) * sum_{j != i} KL(softmax(z_j / T) || softmax(z_i / T))``,
  the other networks' logits detached, KL summed over classes and averaged over the batch. The
  paper has no temperature (``temperature = 1``, the default). Its Algorithm 1 updates the networks
  one after another and recomputes the predictions after each update; here, as in FFSD's code, every
  network's loss comes from the same forward pass of all of them (one forward per step), and each
  network is stepped by its own optimiser. The first network is the one deployed.
* ``ffsd`` -- Li, Lin, Wang, Wu, Tian, Shao, Ji, TNNLS 2022, "Distilling a Powerful Student Model via
  Online Knowledge Distillation", as the authors' code (SJLeo/FFSD) computes it: ``peers`` common
  students learn from each other with the DML term at ``T = 2``; a diversity term pushes the
  attention of student i away from student i-1's; self-distillation decoders (transposed
  convolutions, Adam) map deep maps back to the shallow taps; a fusion module on the common
  students' detached deepest maps teaches a *leader* of the same architecture, the one network
  deployed. The terms below; the recipe (:class:`reviewkd.recipes.OnlineDistillation`) owns the
  networks, the fusion module, the decoders, the optimiser of each and the update order.

These methods train several networks, so they are not losses added to one student: a config naming
them (``method: {name: ffsd}``) builds :class:`~reviewkd.recipes.OnlineDistillation`, and a
:class:`~reviewkd.recipes.Distiller` refuses them. The classes hold the options and compute the
loss terms.

FFSD's terms, with ``A(F)`` the channel mean of ``F^2`` (N x 1 x H x W) and ``d(x, y)`` the mean
over batch and elements of ``(x/||x|| - y/||y||)^2``, each sample flattened and L2-normalised; the
warm-up factor ``w(e) = exp(-5 (1 - e/5)^2)`` for ``e <= 5``, else 1, with epochs ``e`` counted from 1
as the authors' loop does (0.041, 0.165, 0.449, 0.819, 1 over the first five epochs):

* common student i: its DML term, and for ``i >= 1`` ``lambda_div w (D_div + L_sd)``:
  ``D_div = mean_p (A_i^ / ||A_i|| - t_p)^2`` with ``a`` = A of student i-1's deepest map (detached),
  ``n = ||a||``, ``a^ = a / n``, ``tau`` = the ``floor(HW/3)``-th smallest entry of ``a^`` and the
  target ``t_p = n - a^_p`` above ``tau``, ``a^_p`` below it, ``n/2`` at it (the code's
  ``(n/2 - a^) sign(a^ - tau) + n/2``: ``a^`` is unit-norm while ``n`` is not, a mix of scales kept as
  the code has it, hence ``lambda_div = 1e-5``); ``L_sd = sum_{k<K} d(A(F_i^k), A(G_i^k))`` with
  ``G_i`` decoder i run in eval mode on student i-1's deepest map shifted by ``(t - a^) n / C``
  on every channel. Decoder i is trained on student i's own maps but used on student i-1's shifted
  one; student 0 has no decoder and neither term. The self-distillation term is weighted by
  ``lambda_div``, not ``lambda_sd``.
* fusion module: ``CE(z_f, y) + T^2 KL(softmax(zbar / T) || softmax(z_f / T))``, ``zbar`` the mean of
  the common students' logits (detached).
* leader: ``CE(z_L, y) + T^2 KL(softmax(z_f / T) || softmax(z_L / T)) + lambda_f w [d(A(F_L^K), A(F_f))
  + d(A(H_L), A(cat_i F_i^K)) + sum_{k<K} d(A(F_L^k), A(G_L^k(F_f)))]``, ``F_f`` the fused map, ``H_L``
  the leader's trans-fusion output, every right-hand side detached, ``G_L`` in eval mode.
* each decoder (train mode, its own Adam step): ``lambda_sd w sum_{k<K} [d(G^k(F^K), F^k) +
  d(A(G^k(F^K)), A(F^k))]`` on its network's maps (detached): raw-feature plus attention distance.

Defaults are the released CIFAR-100 / ImageNet settings: 2 common students, T = 2, lambda_div 1e-5,
lambda_fusion 10, lambda_sd 1000, 5 warm-up epochs, decoders with Adam at lr 1e-3 (decayed by the
run's schedule), the fusion module's weight decay 1e-5; the decoders and the leader use the run's
weight decay unless set (the code gives the decoders the students' 1e-4; the leader's value is an
option of the code whose default is not in it, and the students' 1e-4 is taken).
Losses are computed in float32 under bf16 / fp16 autocast.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import float32
from .at import attention_map
from .base import DistillMethod, Reads, RunContext, Step, register_method
from .kd import kd_loss


# ----------------------------------------------------------------------------- the terms
def attention(feature: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x 1 x H x W: the channel mean of the squared map (float32)."""
    return feature.float().pow(2).mean(dim=1, keepdim=True)


def normalised_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over batch and elements of ``(x^ - y^)^2``, each sample flattened and L2-normalised."""
    with float32(x):
        x, y = F.normalize(x.float().flatten(1), dim=1), F.normalize(y.float().flatten(1), dim=1)
        return (x - y).pow(2).mean()


def attention_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``normalised_distance(A(x), A(y))``: only the spatial maps count, not the channel counts."""
    with float32(x):
        return (attention_map(x.float()) - attention_map(y.float())).pow(2).mean()


def diversity_target(previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target t, normalised map a^, norm n) of a N x 1 x H x W attention map, each N x HW (n: N x 1).

    The ``floor(HW/3)``-th smallest entry of ``a^`` is the threshold; entries above it become
    ``n - a^``, entries below keep ``a^``, entries equal to it get ``n/2``."""
    flat = previous.float().flatten(1)
    positions = flat.shape[1] // 3
    if positions < 1:
        raise ValueError(f"FFSD's diversity target needs a deepest map of at least 3 positions, got {flat.shape[1]}")
    norm = flat.norm(dim=1, keepdim=True)
    unit = F.normalize(flat, dim=1)
    threshold = unit.kthvalue(positions, dim=1, keepdim=True).values
    target = (norm / 2 - unit) * torch.sign(unit - threshold) + norm / 2
    return target, unit, norm


def diversity_loss(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``D_div`` between two attention maps (N x 1 x H x W); ``previous`` is treated as a constant."""
    with float32(current):
        target, _, _ = diversity_target(previous.detach())
        return (F.normalize(current.float().flatten(1), dim=1) - target).pow(2).mean()


def attention_shift(feature: torch.Tensor) -> torch.Tensor:
    """The deepest map of the previous student with its attention moved toward the diversity
    target: ``F + (t - a^) n / C``, the same offset on every channel (float32, no gradient)."""
    feature = feature.detach().float()
    target, unit, norm = diversity_target(attention(feature))
    offset = (target - unit) * norm / feature.shape[1]
    return feature + offset.view(feature.shape[0], 1, *feature.shape[2:])


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """``exp(-5 (1 - e / E)^2)`` for ``e = epoch + 1 <= E`` (the loop counts epochs from 0, the
    authors' code from 1), else 1."""
    e = float(epoch) + 1.0
    if warmup_epochs <= 0 or e > warmup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - e / warmup_epochs) ** 2)


def mutual_loss(logits: Sequence[torch.Tensor], i: int, temperature: float) -> torch.Tensor:
    """DML's term of network i: ``T^2 KL(p_j || p_i)`` averaged over the other networks j (detached)."""
    others = [z for j, z in enumerate(logits) if j != i]
    return sum(kd_loss(logits[i], z.detach(), temperature) for z in others) / len(others)


# ----------------------------------------------------------------------------- the methods
def _number(name: str, method: str, value, low: float, *, strict: bool = False, integer: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if strict else value >= low) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{method}: {name} must be {kind} {'>' if strict else '>='} {low:g}, got {value!r} "
                         f"(method.options.{name})")
    return int(value) if integer else float(value)


class OnlineMethod(DistillMethod):
    """Options and loss terms of a method that trains several networks together (the recipe:
    :class:`reviewkd.recipes.OnlineDistillation`)."""

    reads = Reads(teacher=False, logits=True, targets=True)

    def __init__(self, peers: int = 2, temperature: float = 1.0):
        super().__init__()
        self.peers = _number("peers", self.name, peers, 2, integer=True)
        self.temperature = _number("temperature", self.name, temperature, 0, strict=True)

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        raise self._not_a_distiller()

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        raise self._not_a_distiller()

    def _not_a_distiller(self) -> ValueError:
        return ValueError(f"method {self.name!r} trains {self.peers} networks together and cannot distil one student: "
                          "use reviewkd.recipes.OnlineDistillation, or method: {name: " + self.name + "} in a config")

    def mutual_losses(self, logits: Sequence[torch.Tensor], targets: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per common network: its cross-entropy and DML term."""
        return [{"ce": F.cross_entropy(z.float(), targets), "dml": mutual_loss(logits, i, self.temperature)}
                for i, z in enumerate(logits)]


@register_method
class DML(OnlineMethod):
    """Deep mutual learning: ``peers`` networks, each with cross-entropy plus the mean KL to the
    others' (detached) predictions; the first network is deployed."""

    name = "dml"
    paper = "Zhang, Xiang, Hospedales, Lu, CVPR 2018: Deep Mutual Learning (online, no teacher)"


@register_method
class FFSD(OnlineMethod):
    """FFSD: common students with DML, diversity and self-distillation terms; a fusion module on
    their deepest maps teaches a leader of the same architecture, the network deployed."""

    name = "ffsd"
    paper = ("Li, Lin, Wang, Wu, Tian, Shao, Ji, TNNLS 2022: Distilling a Powerful Student Model via Online "
             "Knowledge Distillation (online, no teacher; the leader is deployed)")
    reads = Reads(teacher=False, student_features="post", logits=True, targets=True)

    def __init__(self, peers: int = 2, temperature: float = 2.0, diversity_weight: float = 1e-5,
                 fusion_weight: float = 10.0, self_distillation_weight: float = 1000.0, warmup_epochs: float = 5,
                 decoder_lr: float = 1e-3, decoder_weight_decay: Optional[float] = None,
                 fusion_weight_decay: Optional[float] = 1e-5, leader_weight_decay: Optional[float] = None):
        super().__init__(peers, temperature)
        self.diversity_weight = _number("diversity_weight", self.name, diversity_weight, 0)
        self.fusion_weight = _number("fusion_weight", self.name, fusion_weight, 0)
        self.self_distillation_weight = _number("self_distillation_weight", self.name, self_distillation_weight, 0)
        self.warmup_epochs = _number("warmup_epochs", self.name, warmup_epochs, 0)
        self.decoder_lr = _number("decoder_lr", self.name, decoder_lr, 0, strict=True)
        # None: the run's solver.weight_decay
        self.decoder_weight_decay, self.fusion_weight_decay, self.leader_weight_decay = (
            None if v is None else _number(k, self.name, v, 0) for k, v in (
                ("decoder_weight_decay", decoder_weight_decay), ("fusion_weight_decay", fusion_weight_decay),
                ("leader_weight_decay", leader_weight_decay)))

    def ramp(self, epoch: float) -> float:
        return warmup_factor(epoch, self.warmup_epochs)

    def diversity_losses(self, maps: Sequence[torch.Tensor], previous: torch.Tensor, decoded: Sequence[torch.Tensor],
                         epoch: float) -> dict[str, torch.Tensor]:
        """Common student i >= 1: ``maps`` its taps (shallow -> deepest), ``previous`` student i-1's
        deepest map, ``decoded`` its decoder's eval-mode outputs on the shifted ``previous``."""
        w = self.diversity_weight * self.ramp(epoch)
        return {"diversity": w * diversity_loss(attention(maps[-1]), attention(previous)),
                "self_distillation": w * sum(attention_distance(f, g.detach()) for f, g in zip(maps[:-1], decoded))}

    def fusion_losses(self, fusion_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
                      targets: torch.Tensor) -> dict[str, torch.Tensor]:
        ensemble = torch.stack([z.detach().float() for z in peer_logits]).mean(dim=0)
        return {"ce": F.cross_entropy(fusion_logits.float(), targets), "kd": kd_loss(fusion_logits, ensemble, self.temperature)}

    def leader_losses(self, logits: torch.Tensor, maps: Sequence[torch.Tensor], hint: torch.Tensor,
                      fusion_logits: torch.Tensor, fused: torch.Tensor, fusion_input: torch.Tensor,
                      decoded: Sequence[torch.Tensor], targets: torch.Tensor, epoch: float) -> dict[str, torch.Tensor]:
        """``hint``: the leader's trans-fusion output; ``fused``: the fusion module's map;
        ``fusion_input``: the common students' concatenated deepest maps; ``decoded``: the
        leader's decoder's eval-mode outputs on ``fused``."""
        w = self.fusion_weight * self.ramp(epoch)
        return {"ce": F.cross_entropy(logits.float(), targets),
                "kd": kd_loss(logits, fusion_logits.detach(), self.temperature),
                "fusion": w * attention_distance(maps[-1], fused.detach()),
                "trans_fusion": w * attention_distance(hint, fusion_input.detach()),
                "self_distillation": w * sum(attention_distance(f, g.detach()) for f, g in zip(maps[:-1], decoded))}

    def decoder_losses(self, decoded: Sequence[torch.Tensor], maps: Sequence[torch.Tensor],
                       epoch: float) -> dict[str, torch.Tensor]:
        """A decoder's own loss: its train-mode outputs on its network's deepest map vs the shallow maps."""
        w = self.self_distillation_weight * self.ramp(epoch)
        pairs = list(zip(decoded, (f.detach() for f in maps[:-1])))
        return {"feature": w * sum(normalised_distance(g, f) for g, f in pairs),
                "attention": w * sum(attention_distance(g, f) for g, f in pairs)}
