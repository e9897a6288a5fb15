"""FFSD and DML (online distillation without a teacher): every loss term against a hand computation,
the parameters each loss reaches, the authors' update order, the reduction to DML, the zoo's
DenseNet-40 and GoogLeNet, the shipped recipes, a CLI run that resumes exactly, the leader-only
export, and two processes that keep every network identical."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reviewkd.engine.loop import TIMING_KEYS
from reviewkd import Distiller, FeatureSpec
from reviewkd.batch import Batch
from reviewkd.cli import main
from reviewkd.config import SolverConfig, load_config
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import group_optimiser, step_groups
from reviewkd.features import FeatureTaps
from reviewkd.methods import create_method, list_methods
from reviewkd.methods.online import (attention, attention_distance, attention_shift, diversity_loss, diversity_target,
                                     mutual_loss, normalised_distance, warmup_factor)
from reviewkd.models import create_model
from reviewkd.recipes import OnlineDistillation
from reviewkd.recipes.online import online_taps
from reviewkd.recipes.online_modules import FusionModule, SelfDistillationDecoder, TransFusion

torch.set_num_threads(1)


# =============================================================================== hand computations
def h_softmax(z, t=1.0):
    z = z.double() / t
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def h_ce(z, y):
    return -h_softmax(z)[torch.arange(len(y)), y].log().mean()


def h_kl(student, teacher, t):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean."""
    p, q = h_softmax(teacher, t), h_softmax(student, t)
    return t * t * (p * (p.log() - q.log())).sum(dim=1).mean()


def h_att(f):
    return (f.double() ** 2).mean(dim=1)  # N x H x W


def h_unit(v):
    v = v.double().flatten(1)
    return v / (v ** 2).sum(dim=1, keepdim=True).sqrt()


def h_d(x, y):
    return ((h_unit(x) - h_unit(y)) ** 2).mean()


def h_target(a):
    """(target, unit map, norm) of an attention map, by sorting."""
    flat = a.double().flatten(1)
    n = (flat ** 2).sum(dim=1, keepdim=True).sqrt()
    u = flat / n
    k = flat.shape[1] // 3
    tau = u.sort(dim=1).values[:, k - 1:k]
    return torch.where(u > tau, n - u, torch.where(u < tau, u, n / 2)), u, n


def h_shift(f):
    t, u, n = h_target(h_att(f))
    return f.double() + ((t - u) * n / f.shape[1]).view(f.shape[0], 1, *f.shape[2:])


def h_warm(epoch0, warmup=5):
    e = epoch0 + 1
    return math.exp(-5 * (1 - e / warmup) ** 2) if e <= warmup else 1.0


def h_decode(decoder, x):
    """The blocks applied one after another, outputs listed shallowest (last block) first."""
    outs, h = [], x
    for block in decoder.blocks:
        h = block(h)
        outs.append(h)
    return outs[::-1]


# =============================================================================== tiny networks
class TinyNet(nn.Module):
    """Three stages (16x16 -> 8x8 -> 4x4 for a 16x16 input) that remember their outputs."""

    def __init__(self, classes: int = 5, last_stride: int = 2):
        super().__init__()
        block = lambda a, b, s: nn.Sequential(nn.Conv2d(a, b, 3, s, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())  # noqa: E731
        self.s1, self.s2, self.s3 = block(3, 4, 1), block(4, 6, 2), block(6, 8, last_stride)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        self.feature_spec = FeatureSpec.from_names(post=["s1", "s2", "s3"], pooled="pool")

    def forward(self, x):
        f1 = self.s1(x)
        f2 = self.s2(f1)
        f3 = self.s3(f2)
        self.maps = [f1, f2, f3]
        return self.fc(torch.flatten(self.pool(f3), 1))


OPTIONS = dict(temperature=3.0, diversity_weight=0.5, fusion_weight=2.0, self_distillation_weight=3.0)


def tiny_ffsd(peers: int = 3, seed: int = 0, **options) -> OnlineDistillation:
    torch.manual_seed(seed)
    recipe = OnlineDistillation(TinyNet(), "ffsd", make_network=TinyNet, input_size=(3, 16, 16), peers=peers,
                                **{**OPTIONS, **options})
    with torch.no_grad():  # decoders' running statistics unlike a batch's: eval mode must differ from train mode
        for module in [*recipe.decoders.modules(), *recipe.leader_decoder.modules()]:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return recipe.train()


def tiny_batch(n: int = 6, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch({"image": torch.randn(n, 3, 16, 16, generator=g)}, torch.randint(0, 5, (n,), generator=g))


def expected_losses(ref: OnlineDistillation, batch: Batch, epoch: float, o: dict) -> dict[str, dict[str, float]]:
    """Every term of one step, by hand, from ``ref`` (a copy of the recipe taken before the step)."""
    x, y, t = batch.image, batch.targets, o["temperature"]
    w = h_warm(epoch)
    z_leader = ref.leader(x)
    f_leader = ref.leader.maps
    hint = ref.trans_fusion(f_leader[-1])
    zs, fs = [], []
    for peer in ref.peers:
        zs.append(peer(x))
        fs.append(peer.maps)
    cat = torch.cat([f[-1] for f in fs], dim=1)
    fused = ref.fusion.fuse(cat)
    z_fusion = ref.fusion.classifier(fused.mean(dim=(2, 3)))
    m = len(zs)
    out = {}
    for i in range(m):
        terms = {"ce": h_ce(zs[i], y), "dml": sum(h_kl(zs[i], zs[j], t) for j in range(m) if j != i) / (m - 1)}
        if i > 0:
            prev = fs[i - 1][-1]
            ta, _, _ = h_target(h_att(prev))
            terms["diversity"] = o["diversity_weight"] * w * ((h_unit(h_att(fs[i][-1])) - ta) ** 2).mean()
            ref.decoders[i - 1].eval()
            g = h_decode(ref.decoders[i - 1], h_shift(prev).float())
            terms["self_distillation"] = o["diversity_weight"] * w * sum(h_d(h_att(fs[i][k]), h_att(g[k])) for k in range(2))
        out[f"peer{i}"] = terms
    mean_logits = sum(z.double() for z in zs) / m
    out["fusion"] = {"ce": h_ce(z_fusion, y), "kd": h_kl(z_fusion, mean_logits, t)}
    ref.leader_decoder.eval()
    g = h_decode(ref.leader_decoder, fused)
    wf = o["fusion_weight"] * w
    out["leader"] = {"ce": h_ce(z_leader, y), "kd": h_kl(z_leader, z_fusion, t),
                     "fusion": wf * h_d(h_att(f_leader[-1]), h_att(fused)),
                     "trans_fusion": wf * h_d(h_att(hint), h_att(cat)),
                     "self_distillation": wf * sum(h_d(h_att(f_leader[k]), h_att(g[k])) for k in range(2))}
    ws = o["self_distillation_weight"] * w
    for name, decoder, maps in [*((f"decoder{i}", ref.decoders[i - 1], fs[i]) for i in range(1, m)),
                                ("decoder_leader", ref.leader_decoder, f_leader)]:
        decoder.train()
        g = h_decode(decoder, maps[-1])
        out[name] = {"feature": ws * sum(h_d(g[k], maps[k]) for k in range(2)),
                     "attention": ws * sum(h_d(h_att(g[k]), h_att(maps[k])) for k in range(2))}
    return {group: {k: float(v.detach()) for k, v in terms.items()} for group, terms in out.items()}


# =============================================================================== the terms, one by one
def test_normalised_distance_and_attention_by_hand():
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    # x^ = (0.6, 0.8), y^ = (1, 0): ((0.6 - 1)^2 + 0.8^2) / 2 = 0.4
    assert normalised_distance(x, y).item() == pytest.approx(0.4)
    a = torch.randn(3, 2, 4, 4)
    b = torch.randn(3, 5, 4, 4)
    assert normalised_distance(a, a).item() == pytest.approx(0.0, abs=1e-12)
    c = torch.randn(3, 2, 4, 4)
    assert normalised_distance(7.5 * a, c).item() == pytest.approx(normalised_distance(a, c).item(), rel=1e-6)
    assert normalised_distance(a, c).item() == pytest.approx(h_d(a, c).item(), rel=1e-6)
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # 1 x 2 x 1 x 2: A = ((1 + 9) / 2, (4 + 0) / 2) = (5, 2)
    assert attention(f).flatten().tolist() == [5.0, 2.0]
    assert attention(f).shape == (1, 1, 1, 2)
    # attention distance compares the spatial maps only: any channel count
    assert attention_distance(a, b).item() == pytest.approx(h_d(h_att(a), h_att(b)).item(), rel=1e-6)


def test_diversity_target_inverts_the_top_two_thirds_and_gives_ties_half_the_norm():
    v = torch.tensor([4.0, 1.0, 3.0, 2.0, 3.0, 9.0, 5.0, 6.0, 7.0]).view(1, 1, 3, 3)
    n = math.sqrt(sum(e * e for e in v.flatten().tolist()))  # sqrt(230)
    target, unit, norm = diversity_target(v)
    assert norm.item() == pytest.approx(n)
    # threshold: the floor(9/3) = 3rd smallest normalised value = 3/n, held by two positions
    expected = []
    for e in v.flatten().tolist():
        u = e / n
        expected.append(u if e < 3 else n / 2 if e == 3 else n - u)
    assert target.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert unit.flatten().tolist() == pytest.approx([e / n for e in v.flatten().tolist()], rel=1e-6)
    # the loss: mean over positions of (x^ - t)^2
    cur = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    cu = [e / math.sqrt(285.0) for e in range(1, 10)]
    assert diversity_loss(cur, v).item() == pytest.approx(sum((a - b) ** 2 for a, b in zip(cu, expected)) / 9, rel=1e-6)
    # 8x8 maps: the 21st smallest is the threshold: 20 positions keep a^, one gets n/2, 43 are inverted.
    # The code's form (n/2 - a^) sign(a^ - tau) + n/2 gives a^ up to float32 rounding at n's scale.
    big = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float().view(1, 1, 8, 8) + 1
    t, u, n = diversity_target(big)
    ht, hu, hn = h_target(big)
    assert [int((ht == hu).sum()), int((ht == hn / 2).sum())] == [20, 1]
    torch.testing.assert_close(t.double(), ht, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="at least 3 positions"):
        diversity_target(torch.ones(1, 1, 1, 2))


def test_attention_shift_adds_one_offset_to_every_channel():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, 3, 3, 3, generator=g)
    shifted = attention_shift(f)
    offset = shifted - f
    assert torch.allclose(offset[:, 0], offset[:, 1]) and torch.allclose(offset[:, 0], offset[:, 2])
    torch.testing.assert_close(shifted.double(), h_shift(f), rtol=1e-5, atol=1e-6)
    assert not shifted.requires_grad


def test_warmup_multipliers_of_the_first_epochs():
    got = [warmup_factor(e, 5) for e in range(7)]  # the loop's epochs 0..6 are the code's 1..7
    assert got == pytest.approx([0.0408, 0.1653, 0.4493, 0.8187, 1.0, 1.0, 1.0], abs=1e-4)
    assert got[:4] == pytest.approx([math.exp(-3.2), math.exp(-1.8), math.exp(-0.8), math.exp(-0.2)])
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(0, 1) == 1.0


def test_mutual_term_averages_the_kl_to_the_other_networks():
    z = [torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]),
         torch.tensor([[-1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])]

    def kl(s, t, temp):  # with math only
        total = 0.0
        for row_s, row_t in zip(s.tolist(), t.tolist()):
            ps = [math.exp(v / temp) for v in row_s]
            pt = [math.exp(v / temp) for v in row_t]
            ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        return temp * temp * total / len(s)

    for i in range(3):
        expected = sum(kl(z[i], z[j], 2.0) for j in range(3) if j != i) / 2
        assert mutual_loss(z, i, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_modules_shapes_and_initialisation():
    fusion = FusionModule(channels=8, peers=3, num_classes=5)
    logits, fused = fusion(torch.randn(2, 24, 4, 4))
    assert logits.shape == (2, 5) and fused.shape == (2, 8, 4, 4)
    depthwise, pointwise = fusion.fuse[0], fusion.fuse[3]
    assert depthwise.groups == 24 and depthwise.weight.shape == (24, 1, 3, 3) and pointwise.weight.shape == (8, 24, 1, 1)
    assert depthwise.bias is None and pointwise.bias is None
    big = FusionModule(channels=256, peers=2, num_classes=5)  # He-normal: std sqrt(2 / (k*k*out))
    assert big.fuse[3].weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert big.fuse[0].weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.05)
    head = TransFusion(8, 3)
    assert head(torch.randn(2, 8, 4, 4)).shape == (2, 24, 4, 4) and head[0].groups == 8
    decoder = SelfDistillationDecoder([4, 6, 8])
    outs = decoder(torch.randn(2, 8, 4, 4))
    assert [tuple(o.shape) for o in outs] == [(2, 4, 16, 16), (2, 6, 8, 8)]  # output k has tap k's shape
    convt = decoder.blocks[0][0]
    assert isinstance(convt, nn.ConvTranspose2d) and convt.bias is None
    assert (convt.kernel_size, convt.stride, convt.padding, convt.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))


# =============================================================================== one step of the recipe
def test_every_loss_of_a_step_matches_a_hand_computation():
    recipe = tiny_ffsd()
    ref = copy.deepcopy(recipe)
    batch = tiny_batch()
    out = recipe.train_step(batch, recipe.stages()[0], epoch=1.0)
    expected = expected_losses(ref, batch, 1.0, {**OPTIONS})
    assert set(out.losses) == set(expected) == {"peer0", "peer1", "peer2", "fusion", "leader", "decoder1", "decoder2",
                                                "decoder_leader"}
    for group, terms in expected.items():
        assert set(out.losses[group]) == set(terms), group
        for name, value in terms.items():
            assert out.losses[group][name].item() == pytest.approx(value, rel=1e-4, abs=1e-9), f"{group}.{name}"
    torch.testing.assert_close(out.outputs, ref.leader(batch.image).detach())  # the leader's logits
    # the decoders' targets are taken in eval mode and do not move their BatchNorm statistics; their
    # own training pass does, once
    batchnorms = [m for m in recipe.leader_decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_batches_tracked.item() for m in batchnorms] == [1, 1]


def _parameter_names(recipe: OnlineDistillation) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in recipe.named_parameters()}
    return {g.name: {ids[id(p)] for p in g.params} for g in recipe.groups(None)}


def test_each_loss_reaches_only_its_own_network_or_module():
    recipe = tiny_ffsd()
    out = recipe.train_step(tiny_batch(), recipe.stages()[0], epoch=2.0)
    names = dict(recipe.named_parameters())
    owned = _parameter_names(recipe)
    assert set().union(*owned.values()) == set(names)  # every parameter trains in exactly one group
    assert sum(len(v) for v in owned.values()) == len(names)
    assert {n.split(".")[0] for n in owned["leader"]} == {"leader", "trans_fusion"}
    for group, terms in out.losses.items():
        grads = torch.autograd.grad(sum(terms.values()), list(names.values()), retain_graph=True, allow_unused=True)
        reached = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        assert reached == owned[group], group


def test_one_step_of_the_loop_is_the_authors_sequential_procedure():
    """The loop's step (all losses from one forward pass, then one backward and step per group) against
    the reference procedure written out: each common student stepped in turn, then the fusion module,
    the leader, and last the decoders on the networks' pre-update maps; two steps (momentum, Adam)."""
    recipe, solver = tiny_ffsd(), SolverConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ref = copy.deepcopy(recipe)
    groups = [group_optimiser(g, solver) for g in recipe.groups(None)]
    decays = {g.group.name: g.optimizer.param_groups[0]["weight_decay"] for g in groups}
    assert decays["fusion"] == 1e-5 and decays["leader"] == 1e-4 and decays["decoder1"] == 1e-4
    assert [g.optimizer.param_groups[0]["lr"] for g in groups if g.group.name.startswith("decoder")] == [1e-3] * 3
    assert all(isinstance(g.optimizer, torch.optim.Adam) == g.group.name.startswith("decoder") for g in groups)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    sgd = lambda params, wd=1e-4: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)  # noqa: E731
    opt_peers = [sgd(p.parameters()) for p in ref.peers]
    opt_fusion = sgd(ref.fusion.parameters(), 1e-5)
    opt_leader = sgd([*ref.leader.parameters(), *ref.trans_fusion.parameters()])
    decoders = [*ref.decoders, ref.leader_decoder]
    opt_decoders = [torch.optim.Adam(d.parameters(), lr=1e-3, weight_decay=1e-4) for d in decoders]
    o, t = OPTIONS, OPTIONS["temperature"]

    for step, epoch in enumerate([0.0, 3.0]):
        batch = tiny_batch(seed=10 + step)
        x, y, w = batch.image, batch.targets, h_warm(epoch)
        # the loop
        step_groups(groups, recipe.train_step(batch, recipe.stages()[0], epoch).losses, scaler)
        # the reference: 1. forward everything
        z_leader = ref.leader(x)
        f_leader = ref.leader.maps
        hint = ref.trans_fusion(f_leader[-1])
        zs, fs = zip(*[(p(x), p.maps) for p in ref.peers])
        cat = torch.cat([f[-1].detach() for f in fs], dim=1)
        z_fusion, fused = ref.fusion(cat)
        # 2. each common student, stepped in turn
        for i, opt in enumerate(opt_peers):
            loss = h_ce(zs[i], y) + sum(h_kl(zs[i], zs[j].detach(), t) for j in range(3) if j != i) / 2
            if i > 0:
                prev = fs[i - 1][-1].detach()
                ta, _, _ = h_target(h_att(prev))
                ref.decoders[i - 1].eval()
                with torch.no_grad():
                    g = h_decode(ref.decoders[i - 1], h_shift(prev).float())
                ref.decoders[i - 1].train()
                loss = loss + o["diversity_weight"] * w * (((h_unit(h_att(fs[i][-1])) - ta) ** 2).mean()
                                                           + sum(h_d(h_att(fs[i][k]), h_att(g[k])) for k in range(2)))
            opt.zero_grad()
            loss.backward(retain_graph=True)
            opt.step()
        # 3. the fusion module
        mean_logits = sum(z.detach().double() for z in zs) / 3
        opt_fusion.zero_grad()
        (h_ce(z_fusion, y) + h_kl(z_fusion, mean_logits, t)).backward(retain_graph=True)
        opt_fusion.step()
        # 4. the leader
        ref.leader_decoder.eval()
        with torch.no_grad():
            g = h_decode(ref.leader_decoder, fused.detach())
        ref.leader_decoder.train()
        wf = o["fusion_weight"] * w
        loss = h_ce(z_leader, y) + h_kl(z_leader, z_fusion.detach(), t) + wf * (
            h_d(h_att(f_leader[-1]), h_att(fused.detach())) + h_d(h_att(hint), h_att(cat))
            + sum(h_d(h_att(f_leader[k]), h_att(g[k])) for k in range(2)))
        opt_leader.zero_grad()
        loss.backward()
        opt_leader.step()
        # 5. the decoders, on the pre-update maps
        ws = o["self_distillation_weight"] * w
        for decoder, opt, maps in zip(decoders, opt_decoders, [*fs[1:], f_leader]):
            maps = [f.detach() for f in maps]
            g = h_decode(decoder, maps[-1])
            loss = ws * sum(h_d(g[k], maps[k]) + h_d(h_att(g[k]), h_att(maps[k])) for k in range(2))
            opt.zero_grad()
            loss.backward()
            opt.step()

    got, want = recipe.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_ffsd_without_its_own_terms_is_dml():
    """With the diversity, fusion and decoder weights at 0, the common students' losses and gradients
    are DML's, exactly, on the same networks and inputs."""
    ffsd = tiny_ffsd(peers=2, diversity_weight=0.0, fusion_weight=0.0, self_distillation_weight=0.0)
    dml = OnlineDistillation(copy.deepcopy(ffsd.peers[0]), "dml", others=[copy.deepcopy(ffsd.peers[1])],
                             temperature=OPTIONS["temperature"]).train()
    batch = tiny_batch()
    a = ffsd.train_step(batch, ffsd.stages()[0], epoch=4.0).losses
    b = dml.train_step(batch, dml.stages()[0], epoch=4.0).losses
    assert set(b) == {"peer0", "peer1"} and [g.name for g in dml.groups(None)] == ["peer0", "peer1"]
    for i in range(2):
        loss_a, loss_b = sum(a[f"peer{i}"].values()), sum(b[f"peer{i}"].values())
        assert torch.equal(loss_a, loss_b)
        ga = torch.autograd.grad(loss_a, list(ffsd.peers[i].parameters()), retain_graph=True)
        gb = torch.autograd.grad(loss_b, list(dml.peers[i].parameters()), retain_graph=True)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert dml.deployable() is dml.peers[0] and ffsd.deployable() is ffsd.leader


def test_synchronised_batchnorm_reaches_every_network_and_module():
    torch.manual_seed(0)
    leader = nn.SyncBatchNorm.convert_sync_batchnorm(TinyNet())  # what runtime.sync_bn does to the student
    recipe = OnlineDistillation(leader, "ffsd", make_network=TinyNet, input_size=(3, 16, 16))
    kinds = {type(m) for m in recipe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    plain = tiny_ffsd(peers=2)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())


def test_trained_state_round_trip_and_extra_metrics():
    recipe = tiny_ffsd(peers=2)
    state = recipe.trained_state()
    assert state["student"].keys() == recipe.leader.state_dict().keys()
    assert not any(k.startswith("leader.") for k in state["online"])
    assert {k.split(".")[0] for k in state["online"]} == {"peers", "fusion", "trans_fusion", "decoders", "leader_decoder"}
    other = tiny_ffsd(peers=2, seed=5)
    other.load_trained_state(copy.deepcopy(state))
    for key, value in recipe.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key

    batch = tiny_batch(n=8)
    calls = []

    def evaluate(model):  # top-1 of the model on one batch, as the task's evaluate reports it
        calls.append(type(model).__name__)
        model.eval()
        with torch.no_grad():
            hit = (model(batch.image).argmax(dim=1) == batch.targets).double().mean().item() * 100
        return {"test_top1": hit, "test_top5": 100.0, "test_loss": 0.0}

    metrics = recipe.extra_metrics(evaluate)
    assert set(metrics) == {"peer0_test_top1", "peer1_test_top1", "peers_mean_test_top1", "ensemble_test_top1",
                            "fusion_test_top1"}
    assert metrics["peers_mean_test_top1"] == pytest.approx((metrics["peer0_test_top1"] + metrics["peer1_test_top1"]) / 2)
    recipe.eval()
    with torch.no_grad():
        mean_logits = (recipe.peers[0](batch.image) + recipe.peers[1](batch.image)) / 2
        fusion_logits = recipe.fusion(torch.cat([p.maps[-1] for p in recipe.peers], dim=1))[0]
    assert metrics["ensemble_test_top1"] == pytest.approx(
        (mean_logits.argmax(1) == batch.targets).double().mean().item() * 100)
    assert metrics["fusion_test_top1"] == pytest.approx(
        (fusion_logits.argmax(1) == batch.targets).double().mean().item() * 100)


# =============================================================================== user errors
def test_user_errors_are_one_line_and_early():
    with pytest.raises(ValueError, match=r"peers must be an integer >= 2, got 1 \(method.options.peers\)"):
        create_method("ffsd", peers=1)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        create_method("dml", temperature=0)
    with pytest.raises(ValueError, match="has no option"):
        create_method("ffsd", lambda_div=1.0)
    with pytest.raises(ValueError, match="cannot distil one student"):
        Distiller(create_model("resnet8", 10), None, "ffsd")
    with pytest.raises(ValueError, match="distils one student from a teacher"):
        OnlineDistillation(TinyNet(), "kd", make_network=TinyNet)
    with pytest.raises(ValueError, match="needs 2 more network"):
        OnlineDistillation(TinyNet(), "ffsd", input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="share one architecture"):
        OnlineDistillation(TinyNet(), "ffsd", others=[TinyNet(), TinyNet(7)], input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="at least 3 positions"):
        OnlineDistillation(TinyNet(), "ffsd", make_network=TinyNet, input_size=(3, 4, 4))
    with pytest.raises(ValueError, match="double the spatial size"):
        OnlineDistillation(TinyNet(last_stride=1), "ffsd", make_network=lambda: TinyNet(last_stride=1),
                           input_size=(3, 16, 16))


def test_cli_lists_and_describes_the_online_methods():
    assert {"ffsd", "dml"} <= set(list_methods())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["methods"]) == 0
        assert main(["methods", "ffsd"]) == 0
    text = out.getvalue()
    assert "Deep Mutual Learning" in text and "Online Knowledge Distillation" in text
    assert "no teacher" in text and "self_distillation_weight = 1000.0" in text and "decoder_lr = 0.001" in text


# =============================================================================== the zoo
def _densenet40_parameters(classes: int) -> int:
    total, width = 3 * 24 * 9, 24  # stem
    for block in range(3):
        for _ in range(12):
            total += 2 * width + width * 12 * 9  # BN + 3x3 conv to 12 channels
            width += 12
        if block < 2:
            total += 2 * width + width * width  # transition: BN + 1x1 conv
    return total + 2 * width + width * classes + classes  # final BN + classifier


def _googlenet_parameters(classes: int) -> int:
    conv = lambda a, b, k: a * b * k * k + b + 2 * b  # noqa: E731  (weight + bias + BN)
    total, width = conv(3, 192, 3), 192
    for n1, r3, n3, r5, n5, pool in [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
                                     (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
                                     (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
                                     (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
                                     (384, 192, 384, 48, 128, 128)]:
        total += conv(width, n1, 1) + conv(width, r3, 1) + conv(r3, n3, 3) + conv(width, r5, 1) + conv(r5, n5, 3) \
            + conv(n5, n5, 3) + conv(width, pool, 1)
        width = n1 + n3 + n5 + pool
    return total + width * classes + classes


@pytest.mark.parametrize("name, stages, count, keys", [
    ("densenet40", [(168, 32), (312, 16), (456, 8)], _densenet40_parameters(100),
     ["dense1.0.bn1.weight", "dense1.0.conv1.weight", "trans1.conv1.weight", "dense3.11.conv1.weight", "bn.weight",
      "fc.weight"]),
    ("googlenet", [(480, 32), (832, 16), (1024, 8)], _googlenet_parameters(100),
     ["pre_layers.0.weight", "inception_b3.branch5x5.6.weight", "inception_e4.branch_pool.1.bias", "linear.weight"]),
])
@torch.no_grad()
def test_ffsd_zoo_models(name, stages, count, keys, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, 100).eval()
    assert sum(p.numel() for p in model.parameters()) == count
    assert set(keys) <= set(model.state_dict())
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    x = torch.randn(2, 3, 32, 32)
    for kind in ("post", "pre"):
        taps = FeatureTaps(model, model.feature_spec, kind)
        out, feats = taps(x)
        taps.remove()
        assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in stages] + [(2, stages[-1][0], 1, 1)]
    assert out.shape == (2, 100) and model(torch.randn(1, 3, 28, 28)).shape == (1, 100)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(1)
    fresh = create_model(name, 100).eval()
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"])
    assert torch.equal(fresh(x), model(x))
    # FFSD's taps: the non-deepest stages, then the input of the pooling (the deepest map after its ReLU)
    t = online_taps(model)
    _, feats = t(x)
    t.remove()
    assert [tuple(f.shape[1:]) for f in feats[:-1]] == [(c, s, s) for c, s in stages]
    assert (feats[-2] >= 0).all()


def test_densenet_ffsd_decoders_use_the_released_channel_lists():
    torch.manual_seed(0)
    recipe = OnlineDistillation(create_model("densenet40", 100), "ffsd", make_network=lambda: create_model("densenet40", 100))
    widths = [(b[0].in_channels, b[0].out_channels) for b in recipe.leader_decoder.blocks]
    assert widths == [(456, 312), (312, 168)]
    assert recipe.fusion.fuse[0].in_channels == 912 and recipe.trans_fusion[3].out_channels == 912


# =============================================================================== shipped recipes
@pytest.mark.parametrize("model", ["resnet20", "resnet32", "resnet56", "wrn_16_2", "wrn_40_2", "densenet40", "googlenet"])
def test_cifar_recipes_are_the_released_settings(model):
    for method in ("ffsd", "dml"):
        cfg = load_config(f"cifar100/online/{model}/{method}")
        s = cfg.solver
        assert (cfg.model.name, cfg.method.name, cfg.data.name, cfg.data.batch_size) == (model, method, "cifar100", 128)
        assert (s.optimizer, s.lr, s.momentum, s.nesterov, s.weight_decay) == ("sgd", 0.1, 0.9, True, 1e-4)
        assert (s.epochs, s.schedule, s.milestones, s.gamma, s.warmup_epochs) == (299, "multistep", [150, 225], 0.1, 0)
        assert cfg.teacher is None and cfg.method.options == ({} if method == "ffsd" else {"temperature": 2.0})
    assert create_method("ffsd").temperature == 2.0


def test_imagenet_and_fashion_recipes():
    for model in ("resnet18", "resnet34"):
        cfg = load_config(f"imagenet/online/{model}/ffsd")
        s = cfg.solver
        assert cfg.model.name == f"imagenet_{model}" and cfg.data.batch_size == 256
        assert (s.lr, s.nesterov, s.weight_decay, s.epochs, s.milestones, s.warmup_epochs) == \
               (0.1, True, 1e-4, 89, [29, 59, 79], 4)
    cfg = load_config("fashion_mnist/resnet20_resnet8/ffsd")
    assert cfg.teacher is None and cfg.method.options == {"warmup_epochs": 1} and cfg.model.name == "resnet8"


# =============================================================================== the command line
TINY = """\
name: {name}
output_dir: {out}
data: {{name: fashion_mnist, subset: 96, batch_size: 32, eval_batch_size: 96}}
model: {{name: resnet8}}
method: {{name: ffsd, options: {{warmup_epochs: 2}}}}
solver: {{lr: 0.05, epochs: 2, schedule: cosine}}
runtime: {{device: cpu, precision: fp32, deterministic: true}}
"""


def _quiet(argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An uninterrupted run, and one stopped after its first epoch then resumed."""
    out = tmp_path_factory.mktemp("ffsd_runs")
    for name in ("once", "resumed"):
        (out / f"{name}.yaml").write_text(TINY.format(name=name, out=out))
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        assert _quiet(["train", out / "once.yaml", "--no-progress"]) == 0
        assert _quiet(["train", out / "resumed.yaml", "--stop-after", "1", "--no-progress"]) == 0
        assert load_checkpoint(out / "resumed" / "last.pt")["epoch"] == 1
        assert _quiet(["train", out / "resumed.yaml", "--resume", "--no-progress"]) == 0
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    return out


@pytest.mark.slow
def test_a_resumed_cli_run_ends_as_the_uninterrupted_one(runs):
    for file in ("last.pt", "best.pt"):
        a, b = load_checkpoint(runs / "once" / file), load_checkpoint(runs / "resumed" / file)
        assert (a["epoch"], a["best_score"], a["method_name"]) == (b["epoch"], b["best_score"], "ffsd")
        for part in ("student", "online"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{file}: {part}.{key}"
        assert set(a["optimizers"]) == {"peer0", "peer1", "fusion", "leader", "decoder1", "decoder_leader"}
        for group, state in a["optimizers"].items():
            for sa, sb in zip(state["state"].values(), b["optimizers"][group]["state"].values()):
                for k in sa:
                    assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"{file}: {group}.{k}"
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
        assert strip(a["history"]) == strip(b["history"])
        assert {"peer0_test_top1", "peer1_test_top1", "fusion_test_top1", "ensemble_test_top1"} <= set(a["metrics"])


@pytest.mark.slow
def test_only_the_leader_is_exported(runs):
    from reviewkd.export import export_student

    ckpt = load_checkpoint(runs / "once" / "best.pt")
    results = export_student(runs / "once" / "best.pt", runs / "export", ["pt", "safetensors"])
    exported = torch.load(results["pt"]["path"], weights_only=True)["model"]
    leader = create_model("resnet8", 10)
    assert exported.keys() == leader.state_dict().keys()  # the bare network: no peer, fusion or head
    for key, value in exported.items():
        assert torch.equal(value, ckpt["student"][key]), key
    leader.load_state_dict(exported)
    x = torch.randn(3, 3, 32, 32)
    ref = OnlineDistillation(create_model("resnet8", 10), "ffsd", make_network=lambda: create_model("resnet8", 10))
    ref.load_trained_state({"student": ckpt["student"], "online": ckpt["online"]})
    with torch.no_grad():
        assert torch.equal(leader.eval()(x), ref.leader.eval()(x))
        assert not torch.equal(leader(x), ref.peers[0].eval()(x))


# =============================================================================== two processes
WORLD = 2


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        recipe = tiny_ffsd(peers=2)
        solver = SolverConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        groups = [group_optimiser(g, solver) for g in recipe.groups(None)]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        first = None
        for step in range(2):
            batch = tiny_batch(n=8, seed=20 + step)
            shard = Batch({"image": batch.image[rank * 4:rank * 4 + 4]}, batch.targets[rank * 4:rank * 4 + 4])
            step_groups(groups, recipe.train_step(shard, recipe.stages()[0], float(step)).losses, scaler)
            if first is None:
                first = {n: p.grad.clone() for n, p in recipe.named_parameters()}
        params = {n: p.detach().clone() for n, p in recipe.named_parameters()}
        from reviewkd.collectives import broadcast_state_dicts

        broadcast_state_dicts(recipe.trained_state())  # what the loop does before evaluating and saving
        torch.save({"grads": first, "params": params, "state": recipe.state_dict()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_every_network_identical(tmp_path):
    mp.spawn(_distributed_worker, args=(tempfile.mktemp(dir=tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    # the first step's gradients are the mean of each shard's gradients in one process
    batch = tiny_batch(n=8, seed=20)
    per_shard = []
    for r in range(WORLD):
        recipe = tiny_ffsd(peers=2)
        shard = Batch({"image": batch.image[r * 4:r * 4 + 4]}, batch.targets[r * 4:r * 4 + 4])
        losses = recipe.train_step(shard, recipe.stages()[0], 0.0).losses
        sum(sum(t.values()) for t in losses.values()).backward()  # each loss reaches its own group only
        per_shard.append({n: p.grad for n, p in recipe.named_parameters()})
    for name, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(grad, (per_shard[0][name] + per_shard[1][name]) / 2, rtol=1e-4, atol=1e-6, msg=name)
