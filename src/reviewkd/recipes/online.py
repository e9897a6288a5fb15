"""OnlineDistillation: networks of one architecture trained together, without a pretrained teacher.

The recipe of the online methods (``dml``, ``ffsd``; their options and loss terms are in
:mod:`reviewkd.methods.online`). ``network`` is the network deployed (FFSD's leader, DML's first
network); the others come from ``make_network()`` (or ``others``), so each starts from its own
initialisation.

Optimiser groups, in the order of the loop's backward passes (one per network or module, each with
its own optimiser, as the authors' code has): ``peer0 .. peer{m-1}`` (the common students), then for
FFSD ``fusion`` (the solver's SGD with weight decay 1e-5), ``leader`` (the leader and its trans-fusion
head), ``decoder1 .. decoder{m-1}`` and ``decoder_leader`` (Adam at ``decoder_lr``, decayed by the
run's schedule). Every loss sees the other networks' tensors detached, so each group's loss reaches
only its own parameters, and computing every loss from one forward pass before any step is the
authors' per-iteration procedure: the networks forward once; each common student, then the fusion
module, then the leader is stepped on losses computed before any update; the decoders are trained
last, on the networks' pre-update maps. The decoders' outputs used as targets (eval mode, their
BatchNorm running statistics) are computed before their own training pass of the step (train mode),
so the targets come from the decoders as they were before this step, as in the code.

FFSD's taps: the outputs of every stage but the deepest (``feature_spec`` post taps), then the input
of the pooling module, the deepest map as the classifier sees it. For the authors' networks these
are their taps: ResNets ``layer1..3`` (``layer1..4`` on ImageNet), wide ResNets ``layer1, layer2``
and the final ReLU after the last BN, DenseNet-40 ``dense1, dense2`` and the final ReLU, GoogLeNet
``b3, e4, b5``. The taps must halve in size from one to the next (the decoders double it).

Only the deployed network is evaluated for the run's score, saved as the student (``best.pt``,
``eval``, ``export`` give it alone) and exported; ``extra_metrics`` adds at each evaluation every
common student's top-1 (``peer{i}_test_top1``), their mean (``peers_mean_...``, the code's "Average
Acc"), the ensemble of their averaged logits (``ensemble_...``) and, for FFSD, the fusion module's
(``fusion_...``). The code's "Ensemble Acc" counts a sample when any student is right (an oracle);
the ensemble here averages logits. Checkpoints hold every network and module (``student``: the
deployed one, ``online``: the rest), so ``--resume`` continues exactly.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..batch import Batch
from ..features import FeatureSpec, FeatureTaps, Stage as TapStage, Tap, feature_spec_of
from ..methods import create_method
from ..methods.online import FFSD, OnlineMethod, attention_shift
from .base import Group, Recipe, Stage, StepOutput
from .online_modules import FusionModule, SelfDistillationDecoder, TransFusion


def online_taps(model: nn.Module, spec: Optional[FeatureSpec] = None) -> FeatureTaps:
    """Taps giving ``(logits, [stage 1 .. K-1 outputs, the pooling module's input, pooled])``."""
    spec = spec or feature_spec_of(model)
    deepest = Tap(spec.pooled.module, "input")
    stages = (*spec.stages[:-1], TapStage(post=deepest, pre=deepest))
    return FeatureTaps(model, FeatureSpec(stages, spec.pooled), "post")


class _Ensemble(nn.Module):
    """Evaluation only: the mean of the networks' logits."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x).float() for n in self.networks]).mean(dim=0)


class _FusionClassifier(nn.Module):
    """Evaluation only: images -> the fusion module's logits on the common students' deepest maps."""

    def __init__(self, recipe: "OnlineDistillation"):
        super().__init__()
        self.peers, self.fusion, self._taps = nn.ModuleList(recipe.peers), recipe.fusion, recipe._peer_taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = [taps(x)[1][-2] for taps in self._taps]  # the entry before the pooled one
        return self.fusion(torch.cat(deepest, dim=1))[0]


class OnlineDistillation(Recipe):
    """Networks of one architecture trained together (see the module docstring).

    ``network`` is the one deployed; ``make_network()`` builds each other one (or pass them as
    ``others``); ``method``: "ffsd" or "dml" (or an instance), ``method_options`` go to it
    (``peers``, ``temperature``, ...); ``input_size`` is the probe's; ``spec`` names the networks'
    stages where they declare no ``feature_spec``::

        make = lambda: rk.create_model("resnet32", num_classes=100)
        recipe = OnlineDistillation(make(), "ffsd", make_network=make)   # a leader and 2 common students
    """

    task = "classification"

    def __init__(self, network: nn.Module, method: str | OnlineMethod = "ffsd", *,
                 make_network: Optional[Callable[[], nn.Module]] = None, others: Optional[Sequence[nn.Module]] = None,
                 input_size: Sequence[int] = (3, 32, 32), spec: Optional[FeatureSpec] = None, **method_options):
        super().__init__()
        if method_options and not isinstance(method, str):
            raise ValueError("pass method options to the method object itself, not to OnlineDistillation")
        self.method = create_method(method, **method_options) if isinstance(method, str) else method
        if not isinstance(self.method, OnlineMethod):
            raise ValueError(f"method {self.method.name!r} distils one student from a teacher: use Distiller, "
                             "not OnlineDistillation")
        self.has_leader = isinstance(self.method, FFSD)
        count = self.method.peers - (0 if self.has_leader else 1)
        if others is None:
            if make_network is None:
                raise ValueError(f"{self.method.name} needs {count} more network(s): pass make_network= or others=")
            others = [make_network() for _ in range(count)]
        if len(others) != count:
            raise ValueError(f"{self.method.name} with peers={self.method.peers} needs {count} other network(s), "
                             f"got {len(others)}")
        self.input_size = tuple(int(v) for v in input_size)
        # runtime.sync_bn converts the deployed network: every other network and module follows it
        sync = any(isinstance(m, nn.SyncBatchNorm) for m in network.modules())
        if sync:
            others = [nn.SyncBatchNorm.convert_sync_batchnorm(o) for o in others]
        if self.has_leader:
            self.leader = network
            self.peers = nn.ModuleList(others)
            self._build_ffsd(spec)
            if sync:
                for module in (self.fusion, self.trans_fusion, self.decoders, self.leader_decoder):
                    nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place: their roots are not BatchNorms
        else:
            self.peers = nn.ModuleList([network, *others])

    # ------------------------------------------------------------------ set-up
    def _build_ffsd(self, spec: Optional[FeatureSpec]) -> None:
        self._leader_taps = online_taps(self.leader, spec)
        self._peer_taps = [online_taps(p, spec) for p in self.peers]
        shapes, num_classes = self._probe()
        channels = shapes[-1][0]
        m = len(self.peers)
        self.fusion = FusionModule(channels, m, num_classes)
        self.trans_fusion = TransFusion(channels, m)
        self.decoders = nn.ModuleList(SelfDistillationDecoder([s[0] for s in shapes]) for _ in range(m - 1))
        self.leader_decoder = SelfDistillationDecoder([s[0] for s in shapes])
        self.tap_shapes = shapes

    @torch.no_grad()
    def _probe(self) -> tuple[list[tuple[int, ...]], int]:
        """(C, H, W) of each tap and the number of classes, from one eval-mode pass of every network
        on zeros (nothing drawn from the RNG, no BatchNorm statistics moved)."""
        x = torch.zeros(2, *self.input_size, device=next(self.leader.parameters()).device)
        found = []
        for who, taps in [("the leader", self._leader_taps), *((f"peer {i}", t) for i, t in enumerate(self._peer_taps))]:
            was = taps.model.training
            taps.model.eval()
            try:
                logits, feats = taps(x)
            except RuntimeError as exc:
                raise ValueError(f"ffsd: probe forward of {who} with input_size={self.input_size} failed: "
                                 f"{str(exc).splitlines()[0]}") from None
            finally:
                taps.model.train(was)
            found.append(([tuple(f.shape[1:]) for f in feats[:-1]], logits.shape[1]))
        (shapes, num_classes), name = found[0], getattr(self.leader, "model_name", type(self.leader).__name__)
        for i, other in enumerate(found[1:]):
            if other != found[0]:
                raise ValueError(f"ffsd: all networks must share one architecture; peer {i} has taps {other[0]} and "
                                 f"{other[1]} outputs, the leader {shapes} and {num_classes}")
        if len(shapes) < 2:
            raise ValueError(f"ffsd needs at least one stage besides the deepest map; {name} has taps {shapes}")
        sizes = [s[1:] for s in shapes]
        if any(a != (2 * b[0], 2 * b[1]) for a, b in zip(sizes[:-1], sizes[1:])):
            raise ValueError(f"ffsd's decoders double the spatial size from tap to tap, but {name}'s taps are "
                             f"{shapes} at input size {self.input_size}: pass a FeatureSpec whose stages halve the size")
        if sizes[-1][0] * sizes[-1][1] < 3:
            raise ValueError(f"ffsd's diversity target needs a deepest map of at least 3 positions; {name}'s is "
                             f"{sizes[-1][0]}x{sizes[-1][1]} at input size {self.input_size}: use larger inputs")
        return shapes, num_classes

    # ------------------------------------------------------------------- step
    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        x, y = batch.inputs["image"], batch.targets
        if not self.has_leader:
            logits = [p(x) for p in self.peers]
            losses = {f"peer{i}": terms for i, terms in enumerate(self.method.mutual_losses(logits, y))}
            return StepOutput(logits[0].detach(), losses)
        m = self.method
        leader_logits, leader_maps = self._forward(self._leader_taps, x)
        hint = self.trans_fusion(leader_maps[-1])
        peer_logits, peer_maps = zip(*(self._forward(taps, x) for taps in self._peer_taps))
        fusion_input = torch.cat([maps[-1].detach() for maps in peer_maps], dim=1)
        fusion_logits, fused = self.fusion(fusion_input)

        losses: dict[str, dict[str, torch.Tensor]] = {}
        for i, terms in enumerate(m.mutual_losses(peer_logits, y)):
            if i > 0:
                previous = peer_maps[i - 1][-1].detach()
                decoded = self._targets(self.decoders[i - 1], attention_shift(previous))
                terms.update(m.diversity_losses(peer_maps[i], previous, decoded, epoch))
            losses[f"peer{i}"] = terms
        losses["fusion"] = m.fusion_losses(fusion_logits, peer_logits, y)
        decoded = self._targets(self.leader_decoder, fused.detach())
        losses["leader"] = m.leader_losses(leader_logits, leader_maps, hint, fusion_logits, fused, fusion_input,
                                           decoded, y, epoch)
        # the decoders train after their targets above were taken (their BatchNorm statistics move now)
        for i, decoder in enumerate(self.decoders, start=1):
            losses[f"decoder{i}"] = m.decoder_losses(decoder(peer_maps[i][-1].detach()), peer_maps[i], epoch)
        losses["decoder_leader"] = m.decoder_losses(self.leader_decoder(leader_maps[-1].detach()), leader_maps, epoch)
        return StepOutput(leader_logits.detach(), losses)

    @staticmethod
    def _forward(taps: FeatureTaps, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, feats = taps(x)
        return logits, feats[:-1]  # the pooled entry is not used

    @staticmethod
    @torch.no_grad()
    def _targets(decoder: SelfDistillationDecoder, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's outputs in eval mode (running statistics, nothing updated), as constants."""
        was = decoder.training
        decoder.eval()
        try:
            return decoder(x)
        finally:
            decoder.train(was)

    # ----------------------------------------------------------------- recipe
    def stages(self) -> list[Stage]:
        return [Stage("train", tuple(g.name for g in self.groups(None)))]

    def groups(self, stage: Optional[Stage]) -> list[Group]:
        groups = [Group(f"peer{i}", list(p.parameters())) for i, p in enumerate(self.peers)]
        if not self.has_leader:
            return groups
        m = self.method
        decay = lambda value: {} if value is None else {"weight_decay": value}  # noqa: E731  (None: the solver's)
        groups.append(Group("fusion", list(self.fusion.parameters()), options=decay(m.fusion_weight_decay)))
        groups.append(Group("leader", [*self.leader.parameters(), *self.trans_fusion.parameters()],
                            options=decay(m.leader_weight_decay)))
        decoders = [(f"decoder{i}", d) for i, d in enumerate(self.decoders, start=1)]
        for name, decoder in decoders + [("decoder_leader", self.leader_decoder)]:
            groups.append(Group(name, list(decoder.parameters()), lr=m.decoder_lr, optimizer="adam",
                                options=decay(m.decoder_weight_decay)))
        return groups

    def deployable(self) -> nn.Module:
        return self.leader if self.has_leader else self.peers[0]

    def _deployed_prefix(self) -> str:
        return "leader." if self.has_leader else "peers.0."

    def trained_state(self) -> dict[str, dict]:
        """``student``: the deployed network; ``online``: every other network and module."""
        prefix = self._deployed_prefix()
        rest = {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}
        return {"student": self.deployable().state_dict(), "online": rest}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        prefix = self._deployed_prefix()
        self.load_state_dict({**{prefix + k: v for k, v in state["student"].items()}, **state["online"]})

    def extra_metrics(self, evaluate) -> dict[str, float]:
        def top1(who: str, model: nn.Module) -> dict[str, float]:
            model.train(self.training)  # evaluate() restores this mode afterwards
            return {f"{who}_{k}": v for k, v in evaluate(model).items() if k.endswith("_top1")}

        out: dict[str, float] = {}
        for i, peer in enumerate(self.peers):
            out.update(top1(f"peer{i}", peer))
        for key in [k for k in out if k.startswith("peer0_")]:
            metric = key.removeprefix("peer0_")
            out[f"peers_mean_{metric}"] = sum(out[f"peer{i}_{metric}"] for i in range(len(self.peers))) / len(self.peers)
        out.update(top1("ensemble", _Ensemble(self.peers)))
        if self.has_leader:
            out.update(top1("fusion", _FusionClassifier(self)))
        return out

    def notes(self, epochs: Optional[float]) -> list[str]:
        warmup = getattr(self.method, "warmup_epochs", 0)
        if epochs is not None and epochs < warmup:
            return [f"note: this run ({epochs:g} epochs) is shorter than ffsd's warm-up ({warmup:g} epochs): its "
                    "weights never reach full strength (set method.options.warmup_epochs to change it)"]
        return []

    def describe(self) -> list[str]:
        n = sum(p.numel() for p in self.deployable().parameters())
        name = getattr(self.deployable(), "model_name", type(self.deployable()).__name__)
        if not self.has_leader:
            return [f"# method dml: {len(self.peers)} {name} networks ({n:,} parameters each) learn from each other at "
                    f"T={self.method.temperature:g}; the first is deployed"]
        own = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        lines = [f"# method ffsd: a {name} leader (deployed, {n:,} parameters) and {len(self.peers)} common students, "
                 f"T={self.method.temperature:g}",
                 f"fusion module {own(self.fusion):,} parameters, leader's trans-fusion head {own(self.trans_fusion):,}, "
                 f"{len(self.decoders) + 1} decoders of {own(self.leader_decoder):,}"]
        lines += [f"tap {k + 1}: {shape}" for k, shape in enumerate(self.tap_shapes)]
        lines.append("optimiser groups (backward order): " + ", ".join(g.name for g in self.groups(None)))
        return lines


def build_online_recipe(cfg, network: nn.Module, make_network: Callable[[], nn.Module], input_size) -> OnlineDistillation:
    """The recipe of a config whose method is an online one (``method: {name: ffsd}``)."""
    m = cfg.method
    for key in ("ce_weight", "student_stages", "teacher_stages"):
        if getattr(m, key) is not None:
            raise ValueError(f"method {m.name!r} does not use method.{key}: remove it (its options go to method.options)")
    return OnlineDistillation(network, m.name, make_network=make_network, input_size=input_size, **m.options)
