"""HKD (holistic KD with a graph layer): each part against a hand computation from the reference's
definitions (k-NN graph, one-hop TAGConv, contrastive loss with the positive first, memory update),
gradient routing, the small-batch rule, the shared memory component, recipes, identical banks
across torchrun processes and exact resume of a CLI run.

Run as a script under torchrun (``python -m torch.distributed.run ... tests/test_hkd.py OUT``),
this file is the worker of the two-process test."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reviewkd.engine.loop import TIMING_KEYS
from reviewkd import Distiller, create_model
from reviewkd.methods import IncompatiblePairError, RunContext, Step, create_method
from reviewkd.methods.hkd import OneHopGraphConv, contrastive_loss, knn_graph, normalized_aggregate
from reviewkd.methods.kd import kd_loss
from reviewkd.methods.memory import l2_normalize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ hand computations


def hand_softmax(row):
    e = [math.exp(float(v)) for v in row]
    return [x / sum(e) for x in e]


def hand_neighbours(logits, k):
    """Each node's k nearest by cosine distance of softmax predictions, itself first (distance -1)."""
    probs = [hand_softmax(row) for row in logits]
    norms = [math.sqrt(sum(x * x for x in p)) for p in probs]
    out = []
    for i, p in enumerate(probs):
        dist = [-1.0 if i == j else 1 - sum(a * b for a, b in zip(p, q)) / (norms[i] * norms[j])
                for j, q in enumerate(probs)]
        out.append(sorted(range(len(probs)), key=lambda j: dist[j])[:k])
    return out


def unit(v):
    return v / torch.sqrt((v * v).sum())


def hand_embed(weight, bias, f):
    return torch.stack([unit(weight @ row + bias) for row in f])


def hand_graph(weight, bias, z, neighbours):
    """One hop with equal in-degrees: W [z_i ; mean of z over i's neighbours] + b, normalised."""
    rows = [unit(weight @ torch.cat([z[i], torch.stack([z[j] for j in nbrs]).mean(0)]) + bias)
            for i, nbrs in enumerate(neighbours)]
    return torch.stack(rows)


def hand_nce(anchor, positive, negative_rows, tau):
    """-log of the softmax probability of the positive (index 0) among [positive, negatives] / tau."""
    scores = torch.stack([anchor @ positive] + [anchor @ r for r in negative_rows]) / tau
    return -(scores[0] - torch.logsumexp(scores, 0))


def hand_hkd_terms(params, f_s, f_t, logits_s, logits_t, mem_s, mem_t, idx, negatives, tau=0.07, knn=8,
                   smoothing=0.75):
    """(mean l1 + mean l3, mean l2 + mean l4, z_s, z_t) from the reference's definitions."""
    z_s = hand_embed(params["embed_s.weight"], params["embed_s.bias"], f_s)
    z_t = hand_embed(params["embed_t.weight"], params["embed_t.bias"], f_t)
    b = len(idx)
    l1 = [hand_nce(z_s[i], mem_t[idx[i]], [mem_s[n] for n in negatives[i]], tau) for i in range(b)]
    l2 = [hand_nce(z_t[i], mem_s[idx[i]], [mem_t[n] for n in negatives[i]], tau) for i in range(b)]
    student_side, teacher_side = torch.stack(l1).mean(), torch.stack(l2).mean()
    if b >= knn:
        nbrs_s, nbrs_t = hand_neighbours(logits_s.tolist(), knn), hand_neighbours(logits_t.tolist(), knn)
        g_s = hand_graph(params["gnn_s.lin.weight"], params["gnn_s.lin.bias"], z_s, nbrs_s)
        g_t = hand_graph(params["gnn_t.lin.weight"], params["gnn_t.lin.bias"], z_t, nbrs_t)
        l3 = [hand_nce(g_s[i], unit(smoothing * mem_t[idx[i]] + (1 - smoothing) * g_t[i]).detach(),
                       [mem_s[n] for n in negatives[i]], tau) for i in range(b)]
        l4 = [hand_nce(g_t[i], unit(smoothing * mem_s[idx[i]] + (1 - smoothing) * g_s[i]).detach(),
                       [mem_t[n] for n in negatives[i]], tau) for i in range(b)]
        student_side, teacher_side = student_side + torch.stack(l3).mean(), teacher_side + torch.stack(l4).mean()
    return student_side, teacher_side, z_s, z_t


# ------------------------------------------------------------------------------ set-up helpers


def _probe(ds=6, dt=5, classes=10):
    return Step(student_logits=torch.zeros(2, classes), teacher_logits=torch.zeros(2, classes),
                student_features=[torch.randn(2, ds, 1, 1)], teacher_features=[torch.randn(2, dt, 1, 1)])


def _context(labels):
    labels = torch.as_tensor(labels)
    return RunContext(num_samples=len(labels), train_targets=labels, num_classes=int(labels.max()) + 1)


def _hkd(labels, **options):
    hkd = create_method("hkd", **options)
    hkd.setup(_probe(), _context(labels))
    return hkd


def _labels(n=30, classes=3):
    return [i % classes for i in range(n)]


def _other_class_negatives(labels, idx, k, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in idx.tolist():
        others = [j for j, c in enumerate(labels) if c != labels[i]]
        rows.append([others[int(r)] for r in torch.randint(len(others), (k,), generator=g)])
    return torch.tensor(rows)


def _step(b, idx, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(b, 6, 1, 1, generator=g).requires_grad_(requires_grad)
    f_t = torch.randn(b, 5, 1, 1, generator=g)
    logits_s = (3 * torch.randn(b, 10, generator=g)).requires_grad_(requires_grad)
    logits_t = 3 * torch.randn(b, 10, generator=g)
    return Step(student_logits=logits_s, teacher_logits=logits_t, student_features=[f_s], teacher_features=[f_t],
                index=idx)


# ------------------------------------------------------------------------------ defaults and errors


def test_defaults_are_the_released_recipe_and_banks_are_buffers():
    hkd = _hkd(_labels())
    defaults = (hkd.weight, hkd.feat_dim, hkd.nce_k, hkd.tau, hkd.knn, hkd.memory_momentum, hkd.smoothing,
                hkd.kd_weight, hkd.temperature, hkd.ce_weight)
    assert defaults == (3.0, 128, 16384, 0.07, 8, 0.9, 0.75, 0.0, 4.0, 1.0)
    assert hkd.reads.logits and hkd.reads.index and hkd.reads.student_features == "post"
    assert hkd.k == 16384 and hkd.replacement  # K is not clipped to the 30 samples: drawn with replacement
    state = hkd.state_dict()
    assert state["memory_s"].shape == state["memory_t"].shape == (30, 128)
    assert not {"labels", "order", "class_count"} & set(state)  # sampling tables are rebuilt, not saved
    bound = 1 / math.sqrt(128 / 3)
    assert state["memory_s"].abs().max() <= bound and state["memory_t"].abs().max() <= bound
    assert not torch.allclose(state["memory_s"].norm(dim=1), torch.ones(30))  # unnormalised at the start
    layers = ("embed_s", "embed_t", "gnn_s.lin", "gnn_t.lin")
    assert {n for n, _ in hkd.named_parameters()} == {f"{m}.{p}" for m in layers for p in ("weight", "bias")}


@pytest.mark.parametrize("options, message", [
    ({"tau": 0}, "tau must be a number > 0"),
    ({"knn": 2.5}, "knn must be a positive integer"),
    ({"nce_k": 0}, "nce_k must be a positive integer"),
    ({"memory_momentum": 1.5}, "memory_momentum must be a number in [0, 1]"),
    ({"smoothing": "high"}, "smoothing must be a number in [0, 1]"),
    ({"weight": -1}, "weight must be a number >= 0"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as info:
        create_method("hkd", **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_context_indices_or_teacher_logits_are_explained():
    with pytest.raises(ValueError, match="hkd needs the training set's labels"):
        create_method("hkd").setup(_probe())
    with pytest.raises(ValueError, match="single class"):
        create_method("hkd").setup(_probe(), _context([1, 1, 1]))
    probe = _probe()
    probe.teacher_logits = None
    with pytest.raises(IncompatiblePairError, match="teacher's graph from its logits"):
        create_method("hkd").setup(probe, _context(_labels()))
    step = _step(4, None, 0)
    with pytest.raises(ValueError, match="indices"):
        _hkd(_labels())(step)


# ------------------------------------------------------------------------------ the parts


def test_knn_graph_by_hand():
    torch.manual_seed(1)
    logits = 2 * torch.randn(11, 7)
    for k in (1, 3, 8):
        adjacency = knn_graph(logits, k)
        expected = torch.zeros(11, 11)
        for i, nbrs in enumerate(hand_neighbours(logits.tolist(), k)):
            assert nbrs[0] == i  # self is always the nearest
            expected[i, nbrs] = 1
        assert torch.equal(adjacency, expected), k
        assert torch.equal(adjacency.sum(1), torch.full((11,), float(k)))  # in-degree k everywhere


def test_knn_graph_reads_predictions_not_their_gradient():
    logits = torch.randn(9, 4, requires_grad=True)
    assert not knn_graph(logits, 8).requires_grad


def test_one_hop_aggregation_is_tagconv_on_a_hand_made_graph():
    # edges j -> i (A[i, j] = 1) with unequal in-degrees: 0 <- {0, 1, 2}, 1 <- {0}, 2 <- {}, 3 <- {1, 3}
    adjacency = torch.zeros(4, 4)
    for i, sources in {0: [0, 1, 2], 1: [0], 3: [1, 3]}.items():
        adjacency[i, sources] = 1
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0], [0.0, 1.0]])
    in_degree = [3, 1, 0, 2]
    norm = [1 / math.sqrt(max(d, 1)) for d in in_degree]  # DGL: in-degrees, clamped at 1, on both ends
    expected = torch.zeros(4, 2)
    for i in range(4):
        for j in range(4):
            if adjacency[i, j]:
                expected[i] += norm[i] * norm[j] * x[j]
    assert torch.allclose(normalized_aggregate(adjacency, x), expected, atol=1e-6)

    torch.manual_seed(2)
    conv = OneHopGraphConv(2)
    out = conv(x, adjacency)
    w, b = conv.lin.weight.detach(), conv.lin.bias.detach()
    for i in range(4):
        assert torch.allclose(out[i], unit(w @ torch.cat([x[i], expected[i]]) + b), atol=1e-6)


def test_uniform_in_degree_makes_the_aggregation_a_neighbour_mean():
    torch.manual_seed(3)
    logits, z = torch.randn(10, 5), torch.randn(10, 4)
    neighbours = hand_neighbours(logits.tolist(), 8)
    expected = torch.stack([z[nbrs].mean(0) for nbrs in neighbours])
    assert torch.allclose(normalized_aggregate(knn_graph(logits, 8), z), expected, atol=1e-6)


def test_graph_layer_starts_as_dgl_does():
    torch.manual_seed(4)
    conv = OneHopGraphConv(128)
    w, b = conv.lin.weight, conv.lin.bias
    assert w.shape == (128, 256) and b.shape == (128,)
    xavier_relu_std = math.sqrt(2) * math.sqrt(2 / (256 + 128))
    assert abs(w.std().item() / xavier_relu_std - 1) < 0.03
    assert b.abs().max() <= 1 / math.sqrt(256)  # PyTorch's default bias


def test_l2_normalisation_has_no_epsilon():
    tiny = torch.tensor([[3e-20, 4e-20]])
    assert torch.allclose(l2_normalize(tiny), torch.tensor([[0.6, 0.8]]))
    assert F.normalize(tiny, dim=1).abs().max() < 1e-6  # what an epsilon would do instead


def test_contrastive_loss_has_the_positive_first():
    torch.manual_seed(5)
    anchor, positive, bank = torch.randn(3, 4), torch.randn(3, 4), torch.randn(9, 4)
    negatives = torch.tensor([[0, 5, 5, 8], [1, 2, 3, 4], [8, 7, 6, 0]])
    expected = 0.0
    for i in range(3):
        scores = [float(anchor[i] @ positive[i]) / 0.07] + [float(anchor[i] @ bank[n]) / 0.07 for n in negatives[i]]
        top = max(scores)
        expected += -(scores[0] - top - math.log(sum(math.exp(s - top) for s in scores)))
    assert math.isclose(contrastive_loss(anchor, positive, bank, negatives, 0.07).item(), expected / 3, rel_tol=1e-5)


def test_contrastive_loss_is_log_k_plus_one_when_all_scores_are_equal():
    row = F.normalize(torch.randn(1, 6), dim=1)
    bank = row.repeat(50, 1)
    negatives = torch.randint(50, (4, 31))
    loss = contrastive_loss(row.repeat(4, 1), row.repeat(4, 1), bank, negatives, 0.07)
    assert math.isclose(loss.item(), math.log(32), rel_tol=1e-5)


# ------------------------------------------------------------------------------ negatives (shared with CRD)


@pytest.mark.parametrize("k", [4, 20])
def test_negatives_come_uniformly_from_other_classes_never_the_positive(k):
    torch.manual_seed(6)
    labels = torch.tensor(_labels(12, 3))  # 8 other-class samples per class
    hkd = _hkd(labels.tolist(), nce_k=k)
    assert hkd.k == k and hkd.replacement == (k > 8)
    classes = torch.tensor([0, 1, 2] * 1000)
    neg = hkd.sample_negatives(classes)
    assert neg.shape == (3000, k)
    assert (labels[neg] != classes[:, None]).all()
    if k <= 8:
        assert all(len(set(row.tolist())) == k for row in neg[:50])
    for c in range(3):
        counts = torch.bincount(neg[classes == c].flatten(), minlength=12).float() / 1000
        others = labels != c
        assert torch.allclose(counts[others], torch.full((8,), k / 8), rtol=0.1)


def test_replacement_is_decided_per_class_as_the_reference_sampler_does():
    torch.manual_seed(7)
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 4)  # other-class samples: 8, 14, 14
    hkd = _hkd(labels.tolist(), nce_k=12)
    classes = torch.tensor([0, 1, 2] * 300)
    neg = hkd.sample_negatives(classes)
    assert (labels[neg] != classes[:, None]).all()
    distinct = torch.tensor([len(set(row.tolist())) for row in neg])
    assert (distinct[classes != 0] == 12).all()  # 14 candidates: 12 distinct ones
    assert (distinct[classes == 0] <= 8).all()  # 8 candidates for 12 draws: with replacement


# ------------------------------------------------------------------------------ the loss and the update


def test_loss_and_memory_update_by_hand():
    torch.manual_seed(8)
    labels = _labels(30, 3)
    hkd = _hkd(labels, feat_dim=4, nce_k=5)
    idx = torch.tensor([0, 4, 8, 11, 13, 17, 21, 25, 29])  # 9 samples: the graph terms count
    negatives = _other_class_negatives(labels, idx, 5, seed=9)
    hkd.sample_negatives = lambda classes: negatives
    step = _step(9, idx, seed=10)
    mem_s, mem_t = hkd.memory_s.clone(), hkd.memory_t.clone()
    params = {n: p.detach().clone() for n, p in hkd.named_parameters()}
    f_s, f_t = step.student_features[0].flatten(1), step.teacher_features[0].flatten(1)
    student_side, teacher_side, z_s, z_t = hand_hkd_terms(params, f_s, f_t, step.student_logits, step.teacher_logits,
                                                          mem_s, mem_t, idx.tolist(), negatives.tolist())
    hkd.train()
    out = hkd(step)
    assert set(out) == {"hkd"}
    assert math.isclose(out["hkd"].item(), 3.0 * (student_side + teacher_side).item(), rel_tol=1e-5)
    # after the loss: the batch's rows move 10% towards the individual (pre-graph) embeddings
    for bank, old, z in ((hkd.memory_s, mem_s, z_s), (hkd.memory_t, mem_t, z_t)):
        for i, j in enumerate(idx.tolist()):
            assert torch.allclose(bank[j], unit(0.9 * old[j] + 0.1 * z[i]), atol=1e-6)
        rest = [j for j in range(30) if j not in idx.tolist()]
        assert torch.equal(bank[rest], old[rest])
    hkd.eval()  # no update in eval mode
    before = hkd.memory_s.clone()
    hkd(step)
    assert torch.equal(hkd.memory_s, before)


@pytest.mark.parametrize("batch, graph", [(7, False), (8, True)])
def test_small_batches_skip_the_graph_terms_and_the_update(batch, graph):
    torch.manual_seed(11)
    labels = _labels(30, 3)
    hkd = _hkd(labels, feat_dim=4, nce_k=6)
    idx = torch.arange(batch) * 3 + 1
    negatives = _other_class_negatives(labels, idx, 6, seed=12)
    hkd.sample_negatives = lambda classes: negatives
    step = _step(batch, idx, seed=13)
    mem_s, mem_t = hkd.memory_s.clone(), hkd.memory_t.clone()
    params = {n: p.detach().clone() for n, p in hkd.named_parameters()}
    f_s, f_t = step.student_features[0].flatten(1), step.teacher_features[0].flatten(1)
    student_side, teacher_side, _, _ = hand_hkd_terms(params, f_s, f_t, step.student_logits, step.teacher_logits,
                                                      mem_s, mem_t, idx.tolist(), negatives.tolist())
    hkd.train()
    loss = hkd(step)["hkd"]
    assert math.isclose(loss.item(), 3.0 * (student_side + teacher_side).item(), rel_tol=1e-5)
    assert torch.equal(hkd.memory_s, mem_s) != graph and torch.equal(hkd.memory_t, mem_t) != graph
    loss.backward()
    assert (hkd.gnn_s.lin.weight.grad is not None) == graph and (hkd.gnn_t.lin.weight.grad is not None) == graph


def test_each_side_trains_what_the_reference_gives_it():
    """The student-anchored terms (l1, l3) reach the student features, embed_s and gnn_s; the
    teacher-anchored ones (l2, l4) embed_t and gnn_t; the smoothed positives are constants, and
    no gradient reaches the logits the graphs are built from."""
    torch.manual_seed(14)
    labels = _labels(30, 3)
    hkd = _hkd(labels, feat_dim=4, nce_k=5)
    idx = torch.tensor([1, 2, 6, 7, 9, 15, 20, 22, 26, 28])
    negatives = _other_class_negatives(labels, idx, 5, seed=15)
    hkd.sample_negatives = lambda classes: negatives
    step = _step(10, idx, seed=16, requires_grad=True)
    mem_s, mem_t = hkd.memory_s.clone(), hkd.memory_t.clone()
    hkd.train()
    hkd(step)["hkd"].backward()
    assert step.student_logits.grad is None

    params = {n: p.detach().clone().requires_grad_(True) for n, p in hkd.named_parameters()}
    f_s = step.student_features[0].detach().flatten(1).requires_grad_(True)
    student_side, teacher_side, _, _ = hand_hkd_terms(params, f_s, step.teacher_features[0].flatten(1),
                                                      step.student_logits.detach(), step.teacher_logits,
                                                      mem_s, mem_t, idx.tolist(), negatives.tolist())
    student_names = ["embed_s.weight", "embed_s.bias", "gnn_s.lin.weight", "gnn_s.lin.bias"]
    teacher_names = ["embed_t.weight", "embed_t.bias", "gnn_t.lin.weight", "gnn_t.lin.bias"]
    expected_s = torch.autograd.grad(3.0 * student_side, [params[n] for n in student_names] + [f_s])
    expected_t = torch.autograd.grad(3.0 * teacher_side, [params[n] for n in teacher_names])
    got = dict(hkd.named_parameters())
    for name, g in zip(student_names + teacher_names, expected_s[:-1] + expected_t):
        assert torch.allclose(got[name].grad, g, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(step.student_features[0].grad.flatten(1), expected_s[-1], rtol=1e-4, atol=1e-6)


def test_in_a_distiller_the_teacher_and_the_classifier_get_nothing_from_hkd():
    torch.manual_seed(17)
    labels = _labels(40, 10)
    teacher, student = create_model("resnet14", num_classes=10), create_model("resnet8", num_classes=10)
    d = Distiller(student, teacher, "hkd", context=_context(labels))
    d.train()
    idx = torch.arange(3, 35, 4)  # 8 samples: the graph terms count
    _, losses = d(torch.randn(8, 3, 32, 32), torch.tensor([labels[i] for i in idx]), indices=idx)
    assert set(losses) == {"ce", "hkd"}
    losses["hkd"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.fc.weight.grad is None  # the graphs read detached predictions
    backbone = [p for n, p in student.named_parameters() if not n.startswith("fc.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)
    for name, p in d.method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_kd_option_adds_hinton_kd():
    hkd = _hkd(_labels(), kd_weight=1.0)
    step = _step(4, torch.tensor([0, 1, 2, 3]), seed=18)
    out = hkd(step)
    assert set(out) == {"hkd", "kd"}
    s, t = step.student_logits.detach(), step.teacher_logits
    expected = 0.0
    for i in range(4):  # sum over classes of KL(p_t || p_s) at T = 4, batch mean, times T^2
        p_s, p_t = hand_softmax((s[i] / 4).tolist()), hand_softmax((t[i] / 4).tolist())
        expected += sum(a * math.log(a / b) for a, b in zip(p_t, p_s)) * 16 / 4
    assert math.isclose(out["kd"].item(), expected, rel_tol=1e-5)
    assert math.isclose(out["kd"].item(), kd_loss(s, t, 4.0).item(), rel_tol=1e-6)


def test_a_few_steps_lower_the_loss_on_fashion_mnist(fashion_batch):
    images, labels = fashion_batch
    torch.manual_seed(19)
    teacher, student = create_model("resnet20", num_classes=10), create_model("resnet8", num_classes=10)
    d = Distiller(student, teacher, "hkd", context=_context(labels.tolist()))
    d.train()
    d.method.eval()  # one batch repeated would rewrite the same rows each step: hold the banks (update tested above)
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.05, momentum=0.9)
    idx = torch.arange(len(labels))
    history = []
    for _ in range(6):
        torch.manual_seed(20)  # the same negatives at every step
        _, losses = d(images, labels, indices=idx)
        history.append(losses["hkd"].item())
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.9 * history[0], history


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("pair, lr", [("resnet32x4_resnet8x4", 0.05), ("resnet32x4_ShuffleV2", 0.01),
                                      ("vgg13_MobileNetV2", 0.01), ("ResNet50_vgg8", 0.05),
                                      ("ResNet50_MobileNetV2", 0.01)])
def test_cifar100_recipes_are_the_released_ones(pair, lr):
    from reviewkd.config import load_config

    teacher, student = pair.split("_", 1)
    for recipe, kd_weight in (("hkd", 0.0), ("hkd_kd", 1.0)):
        cfg = load_config(REPO / "configs" / "cifar100" / pair / f"{recipe}.yaml")
        assert (cfg.model.name, cfg.teacher.name, cfg.method.name) == (student, teacher, "hkd")
        assert {**{"kd_weight": 0.0}, **cfg.method.options} == {"weight": 3.0, "kd_weight": kd_weight}
        s = cfg.solver
        assert (cfg.data.batch_size, s.lr, s.momentum, s.nesterov, s.weight_decay, s.epochs, list(s.milestones)) == \
               (64, lr, 0.9, False, 5e-4, 240, [150, 180, 210])


def test_fashion_mnist_recipes_use_the_short_schedule():
    from reviewkd.config import load_config

    folder = REPO / "configs" / "fashion_mnist"
    base = load_config(folder / "_base.yaml")
    for recipe, kd_weight in (("hkd", 0.0), ("hkd_kd", 1.0)):
        cfg = load_config(folder / "resnet20_resnet8" / f"{recipe}.yaml")
        assert (cfg.model.name, cfg.teacher.name, cfg.method.name) == ("resnet8", "resnet20", "hkd")
        assert cfg.method.options.get("kd_weight", 0.0) == kd_weight
        assert cfg.solver == base.solver and cfg.data.batch_size == base.data.batch_size


# ------------------------------------------------------------------------------ torchrun and resume


def _torchrun_worker(out_dir: str) -> None:
    """Each of 2 processes trains on its half of a global batch of 16 (two steps); saves its banks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        labels = torch.arange(48) % 10
        d = Distiller(create_model("resnet8", 10), create_model("resnet14", 10), "hkd",
                      context={"num_samples": 48, "train_targets": labels, "num_classes": 10})
        d.train()
        if rank == 0:
            torch.save(d.method.state_dict(), os.path.join(out_dir, "initial.pt"))
        torch.manual_seed(100 + rank)  # ranks draw different negatives; the banks must not care
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(16, 3, 32, 32, generator=g)
            idx = torch.arange(16) + 16 * step
            shard = slice(8 * rank, 8 * rank + 8)
            _, losses = d(x[shard], labels[idx[shard]], indices=idx[shard])
            sum(losses.values()).backward()
        torch.save(d.method.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh Python processes under torchrun: tens of seconds
def test_banks_stay_identical_on_every_rank_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("memory_s", "memory_t"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        changed = (ranks[0][name] != initial[name]).any(dim=1)
        # both ranks' samples of both steps (0..31) were updated on every rank, the others not
        assert changed[:32].all() and not changed[32:].any(), name
        assert torch.allclose(ranks[0][name][:32].norm(dim=1), torch.ones(32), atol=1e-6)


def test_a_cli_run_stopped_after_an_epoch_resumes_exactly(tmp_path):
    from reviewkd.cli import main
    from reviewkd.engine.checkpoint import load_checkpoint

    torch.manual_seed(21)
    torch.save(create_model("resnet8", num_classes=10).state_dict(), tmp_path / "teacher.pt")  # any fixed teacher
    student = ("data: {name: fashion_mnist, subset: 256, batch_size: 64, eval_batch_size: 256}\n"
               "runtime: {device: cpu, precision: fp32, deterministic: true}\n"
               f"output_dir: {tmp_path}\nmodel: {{name: resnet8}}\nmethod: {{name: hkd, options: {{kd_weight: 1.0}}}}\n"
               f"teacher: {{name: resnet8, checkpoint: {tmp_path / 'teacher.pt'}}}\n"
               "solver: {lr: 0.05, epochs: 2, schedule: cosine}\n")
    (tmp_path / "whole.yaml").write_text(student + "name: whole\n")
    (tmp_path / "split.yaml").write_text(student + "name: split\n")
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        assert main(["train", str(tmp_path / "whole.yaml"), "--no-progress"]) == 0
        assert main(["train", str(tmp_path / "split.yaml"), "--stop-after", "1", "--no-progress"]) == 0
        halfway = load_checkpoint(tmp_path / "split" / "last.pt")
        assert halfway["epoch"] == 1 and {"memory_s", "memory_t"} <= set(halfway["method"])
        assert main(["train", str(tmp_path / "split.yaml"), "--resume", "--no-progress"]) == 0
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    unvisited = (a["method"]["memory_s"].norm(dim=1) - 1).abs() > 1e-5
    assert not unvisited.any()  # every sample was visited: every row is unit-norm now
    for part in ("student", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for sa, sb in zip(a["optimizers"]["main"]["state"].values(), b["optimizers"]["main"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and a["metrics"] == b["metrics"]


if __name__ == "__main__":
    _torchrun_worker(sys.argv[1])
