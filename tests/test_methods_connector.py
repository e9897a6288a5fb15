"""Methods with connectors or a pre-training stage (VID, AB, FT, FSP): losses against hand
computations from the papers' formulas, gradient flow on zoo pairs, the pre-training stage, and a
few training steps on real images."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reviewkd import Distiller, create_model
from reviewkd.methods import IncompatiblePairError, Step, create_method


def _step(student_feats, teacher_feats):
    n = student_feats[0].shape[0]
    return Step(student_logits=torch.zeros(n, 10), teacher_logits=torch.zeros(n, 10),
                student_features=student_feats, teacher_features=teacher_feats)


def _method(name, s_feats, t_feats, **options):
    method = create_method(name, **options)
    method.setup(_step(s_feats, t_feats))
    return method


def _block_mean(x, factor):
    # average pooling by an integer factor, written out as a mean over equal blocks
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def _pooled(n=2, c=5):
    return torch.randn(n, c, 1, 1)


# --------------------------------------------------------------------------------------------------
# VID


def test_vid_nll_by_hand_with_pooling_and_learned_variance():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), _pooled()]
    t = [torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2), _pooled()]
    method = _method("vid", s, t, weight=2.0)
    # variance starts at init_pred_var for every channel
    for ls in method.log_scales:
        torch.testing.assert_close(F.softplus(ls) + 1e-5, torch.full_like(ls, 5.0))
    with torch.no_grad():
        for ls in method.log_scales:
            ls.copy_(torch.randn_like(ls))
    out = method(_step(s, t))["vid"]

    expected = 0.0
    for i, pool in ((0, 2), (1, 1)):
        x = _block_mean(s[i], pool) if pool > 1 else s[i]
        convs = [m.weight[:, :, 0, 0] for m in method.regressors[i] if isinstance(m, nn.Conv2d)]
        assert len(convs) == 3 and all(m.bias is None for m in method.regressors[i] if isinstance(m, nn.Conv2d))
        assert convs[0].shape == (t[i].shape[1], s[i].shape[1])  # mid channels = teacher channels
        h = torch.einsum("oc,nchw->nohw", convs[0], x).clamp(min=0)
        h = torch.einsum("oc,nchw->nohw", convs[1], h).clamp(min=0)
        mu = torch.einsum("oc,nchw->nohw", convs[2], h)
        terms = []
        for idx in torch.cartesian_prod(*[torch.arange(d) for d in mu.shape]):
            n, c, a, b = idx.tolist()
            var = math.log(1 + math.exp(method.log_scales[i][c].item())) + 1e-5
            diff = mu[n, c, a, b].item() - t[i][n, c, a, b].item()
            terms.append(0.5 * (diff * diff / var + math.log(var)))
        expected += sum(terms) / len(terms)
    assert math.isclose(out.item(), 2.0 * expected, rel_tol=1e-5)


def test_vid_needs_equal_stage_counts_and_hints_the_fix():
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), _pooled()]
    t = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), _pooled()]
    with pytest.raises(IncompatiblePairError, match=r"teacher_stages=\[2, 3\]"):
        _method("vid", s, t)


# --------------------------------------------------------------------------------------------------
# AB


def _ab_element(s, t, m):
    if t <= 0 and s > -m:
        return (s + m) ** 2
    if t > 0 and s <= m:
        return (s - m) ** 2
    return 0.0


def test_ab_margin_loss_on_chosen_numbers():
    # one stage: weight 2^0 = 1, batch 1, scale 3/1000
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, -1.0, 1.0, 0.3]).view(1, 7, 1, 1)
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 2.0, 0.0]).view(1, 7, 1, 1)
    # -2 off ok: 0; -0.5 should be off: 0.25; 0.5 should be on: 0.25; 2 on ok: 0; -1 at the margin: 0;
    # 1 on at the margin: (1-1)^2 = 0; 0.3 with t = 0 (counts as off): 1.69
    method = _method("ab", [s, _pooled(1)], [t, _pooled(1)])
    got = method.pretrain_losses(_step([s, _pooled(1)], [t, _pooled(1)]))["ab"]
    assert math.isclose(got.item(), (0.25 + 0.25 + 1.69) * 3 / 1000, rel_tol=1e-5)


def test_ab_loss_by_hand_stage_weights_and_batch():
    torch.manual_seed(0)
    s = [torch.randn(3, 2, 4, 4) * 2, torch.randn(3, 3, 2, 2) * 2, _pooled(3)]
    t = [torch.randn(3, 2, 4, 4), torch.randn(3, 3, 2, 2), _pooled(3)]
    method = _method("ab", s, t, margin=0.7)
    assert all(isinstance(c, nn.Identity) for c in method.connectors)  # shapes already match
    expected = 0.0
    for i, w in ((0, 0.5), (1, 1.0)):  # 2^(i - n + 1) with n = 2
        total = sum(_ab_element(a, b, 0.7) for a, b in zip(s[i].flatten().tolist(), t[i].flatten().tolist()))
        expected += w * total / 3 * 3 / 1000
    got = method.pretrain_losses(_step(s, t))["ab"]
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # distillation epochs: CE only by default, the same loss times ``weight`` otherwise
    assert method(_step(s, t)) == {}
    weighted = _method("ab", s, t, margin=0.7, weight=4.0)(_step(s, t))["ab"]
    assert math.isclose(weighted.item(), 4.0 * expected, rel_tol=1e-5)


@pytest.mark.parametrize("s_hw, t_hw, kind, kernel", [
    (8, 4, nn.Conv2d, (3, 3)), (4, 8, nn.ConvTranspose2d, (4, 4)), (8, 6, nn.Conv2d, (3, 3)),
    (4, 4, nn.Conv2d, (1, 1)),
])
def test_ab_connector_follows_spatial_sizes(s_hw, t_hw, kind, kernel):
    s = [torch.randn(2, 3, s_hw, s_hw), _pooled()]
    t = [torch.randn(2, 5, t_hw, t_hw), _pooled()]
    method = _method("ab", s, t)
    conv, bn = method.connectors[0]
    assert type(conv) is kind and conv.kernel_size == kernel and isinstance(bn, nn.BatchNorm2d)
    assert method.connectors[0](s[0]).shape == t[0].shape


def test_ab_refuses_what_its_connector_cannot_bridge():
    with pytest.raises(IncompatiblePairError, match="student_stages/teacher_stages"):
        _method("ab", [torch.randn(2, 3, 2, 2), _pooled()], [torch.randn(2, 3, 8, 8), _pooled()])
    with pytest.raises(IncompatiblePairError, match=r"student_stages=\[2\]"):
        _method("ab", [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), _pooled()],
                [torch.randn(2, 3, 2, 2), _pooled()])


# --------------------------------------------------------------------------------------------------
# FT


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _ft_by_hand(fs, ft, full):
    # fs is 2x larger spatially than ft: block-average it first
    fs = _block_mean(fs, 2)
    total, count = 0.0, 0
    for n in range(fs.shape[0]):
        if full:
            a, b = fs[n].flatten().tolist(), ft[n].flatten().tolist()
        else:  # channel mean of squares at every position
            a = (fs[n] ** 2).mean(0).flatten().tolist()
            b = (ft[n] ** 2).mean(0).flatten().tolist()
        for x, y in zip(_unit(a), _unit(b)):
            total += abs(x - y)
            count += 1
    return total / count


@pytest.mark.parametrize("full", [False, True])
def test_ft_factor_loss_by_hand(full):
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), _pooled()]
    t = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2).relu(), _pooled()]
    method = _method("ft", s, t, weight=3.0, full_factor=full)
    # paraphraser on the teacher's last stage (6 channels, factor 3), translator on the student's (5)
    enc = [m for m in method.paraphraser.encoder if isinstance(m, nn.Conv2d)]
    dec = [m for m in method.paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    tr = [m for m in method.translator.encoder if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in enc] == [(6, 6), (6, 3), (3, 3)]
    assert [(m.in_channels, m.out_channels) for m in dec] == [(3, 3), (3, 6), (6, 6)]
    assert [(m.in_channels, m.out_channels) for m in tr] == [(5, 5), (5, 3), (3, 3)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in method.translator.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.paraphraser.modules())

    method.eval()
    out = method(_step(s, t))["ft"]
    with torch.no_grad():
        factor_s, factor_t = method.translator(s[1]), method.paraphraser.encoder(t[1])
    assert factor_s.shape == (2, 3, 4, 4) and factor_t.shape == (2, 3, 2, 2)
    assert math.isclose(out.item(), 3.0 * _ft_by_hand(factor_s, factor_t, full), rel_tol=1e-5)

    rec = method.pretrain_losses(_step(s, t))["ft_paraphraser"]
    with torch.no_grad():
        r = method.paraphraser.decoder(factor_t)
    diffs = [(a - b) ** 2 for a, b in zip(r.flatten().tolist(), t[1].flatten().tolist())]
    assert math.isclose(rec.item(), sum(diffs) / len(diffs), rel_tol=1e-5)


# --------------------------------------------------------------------------------------------------
# FSP


def _fsp_by_hand(a, b):
    # G[n][i][j] = sum_{h,w} a[n,i,h,w] b[n,j,h,w] / (H W), the larger map block-averaged first
    if a.shape[-1] > b.shape[-1]:
        a = _block_mean(a, a.shape[-1] // b.shape[-1])
    hw = a.shape[-1] * a.shape[-2]
    return [[[sum(x * y for x, y in zip(a[n, i].flatten().tolist(), b[n, j].flatten().tolist())) / hw
              for j in range(b.shape[1])] for i in range(a.shape[1])] for n in range(a.shape[0])]


def test_fsp_loss_by_hand():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 2, 2, 2), _pooled()]
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 2, 2, 2), _pooled()]
    method = _method("fsp", s, t)
    expected = 0.0
    for i in range(2):
        gs, gt = _fsp_by_hand(s[i], s[i + 1]), _fsp_by_hand(t[i], t[i + 1])
        sq = [(x - y) ** 2 for ms, mt in zip(gs, gt) for rs, rt in zip(ms, mt) for x, y in zip(rs, rt)]
        expected += sum(sq) / len(sq)
    got = method.pretrain_losses(_step(s, t))["fsp"]
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    assert method(_step(s, t)) == {}  # CE only in the distillation epochs by default
    weighted = _method("fsp", s, t, weight=50.0)(_step(s, t))["fsp"]
    assert math.isclose(weighted.item(), 50 * expected, rel_tol=1e-5)


def test_fsp_refuses_unmatched_pairs_with_a_fix():
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), _pooled()]
    with pytest.raises(IncompatiblePairError, match="equal channels.*student_stages/teacher_stages"):
        _method("fsp", s, [torch.randn(2, 3, 4, 4), torch.randn(2, 8, 2, 2), _pooled()])
    with pytest.raises(IncompatiblePairError, match="at least two stages"):
        _method("fsp", [s[0], _pooled()], [s[0], _pooled()])


# --------------------------------------------------------------------------------------------------
# defaults


def test_defaults_are_the_benchmark_recipe():
    vid = create_method("vid")
    assert (vid.weight, vid.init_pred_var, vid.eps, vid.mid_channels) == (1.0, 5.0, 1e-5, None)
    assert vid.pretraining is None and vid.reads.student_features == vid.reads.teacher_features == "post"
    ab = create_method("ab")
    assert (ab.weight, ab.margin) == (0.0, 1.0)
    assert (ab.pretraining.epochs, ab.pretraining.lr, ab.pretraining.student_train) == (30, None, True)
    assert ab.reads.student_features == ab.reads.teacher_features == "pre"
    ft = create_method("ft")
    assert (ft.weight, ft.rate, ft.full_factor, ft.pretraining.epochs) == (200.0, 0.5, False, 30)
    assert (ft.pretraining.lr, ft.pretraining.student_train) == (0.01, False)
    fsp = create_method("fsp")
    assert (fsp.weight, fsp.pretraining.epochs, fsp.pretraining.lr, fsp.pretraining.student_train) == (0.0, 30, None, True)
    assert all(create_method(n).ce_weight == 1.0 for n in ("vid", "ab", "ft", "fsp"))


# --------------------------------------------------------------------------------------------------
# zoo pairs: connectors, gradient flow (main and pre-training stage), bf16 autocast

PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2")]
FSP_PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]


def _pair_distiller(name, teacher_name, student_name, **options):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10)
    student = create_model(student_name, num_classes=10)
    return Distiller(student, teacher, name, **options).train(), student, teacher


def _batch():
    return torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))


def _grads_flow(params):
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("teacher_name, student_name", PAIRS)
@pytest.mark.parametrize("name", ["vid", "ft"])
def test_main_stage_gradients_reach_student_and_connectors_not_teacher(name, teacher_name, student_name):
    distiller, student, teacher = _pair_distiller(name, teacher_name, student_name)
    _, losses = distiller(*_batch())
    loss = losses[name]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    method = distiller.method
    if name == "vid":
        assert len(method.regressors) == len(method.log_scales) == 3 + (teacher_name == "vgg13")
        assert _grads_flow(method.parameters())
    else:  # the translator trains, the pre-trained paraphraser stays frozen
        assert _grads_flow(method.translator.parameters())
        assert all(p.grad is None for p in method.paraphraser.parameters())


@pytest.mark.parametrize("teacher_name, student_name", PAIRS)
@pytest.mark.parametrize("name", ["ab", "ft"])
def test_pretrain_stage_gradients_stay_in_pretrain_parameters(name, teacher_name, student_name):
    distiller, student, teacher = _pair_distiller(name, teacher_name, student_name)
    _, losses = distiller(*_batch(), pretrain=True)
    assert "ce" not in losses
    sum(losses.values()).backward()
    pretrain = {id(p) for p in distiller.pretrain_parameters()}
    method = distiller.method
    for p in list(student.parameters()) + list(method.parameters()):
        assert p.grad is None or id(p) in pretrain
    assert all(p.grad is None for p in teacher.parameters())
    if name == "ab":
        assert _grads_flow(method.connectors.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        if teacher_name == "resnet32x4":  # same widths and sizes: no connector needed
            assert all(isinstance(c, nn.Identity) for c in method.connectors)
    else:
        assert _grads_flow(method.paraphraser.parameters())
        assert all(p.grad is None for p in student.parameters())
        assert all(p.grad is None for p in method.translator.parameters())


@pytest.mark.parametrize("teacher_name, student_name", FSP_PAIRS)
def test_fsp_pretrain_gradients_reach_student_not_teacher(teacher_name, student_name):
    distiller, student, teacher = _pair_distiller("fsp", teacher_name, student_name)
    _, losses = distiller(*_batch(), pretrain=True)
    losses["fsp"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("teacher_name, student_name", [("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2")])
def test_fsp_refuses_cross_family_pairs(teacher_name, student_name):
    with pytest.raises(IncompatiblePairError, match="equal channels"):
        _pair_distiller("fsp", teacher_name, student_name)


def test_stage_selection_fixes_unequal_stage_counts():
    with pytest.raises(IncompatiblePairError, match=r"teacher_stages=\[2, 3, 4\]"):
        _pair_distiller("vid", "vgg13", "resnet8x4")
    distiller, _, _ = _pair_distiller("vid", "vgg13", "resnet8x4", teacher_stages=[2, 3, 4])
    assert len(distiller.method.regressors) == 3


@pytest.mark.parametrize("name, options", [("vid", {}), ("ft", {}), ("ab", {"weight": 1.0}), ("fsp", {"weight": 1.0})])
def test_bf16_autocast_gives_float32_losses(name, options):
    torch.manual_seed(0)
    distiller = Distiller(create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10),
                          name, **options)
    for pretrain in (False, True) if distiller.method.pretraining else (False,):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses = distiller(*_batch(), pretrain=pretrain)
        for key, value in losses.items():
            if key != "ce":
                assert value.dtype == torch.float32 and torch.isfinite(value)
        sum(losses.values()).backward()


# --------------------------------------------------------------------------------------------------
# a few SGD steps on real Fashion-MNIST images


def _fashion_distiller(name):
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10).eval()
    student = create_model("resnet8", num_classes=10)
    return Distiller(student, teacher, name).train()


@pytest.mark.parametrize("name, lr, steps, factor", [("vid", 0.05, 8, 0.98), ("ft", 0.02, 6, 0.9)])
def test_sgd_steps_lower_the_total_loss(name, lr, steps, factor, fashion_batch):
    # VID's negative log-likelihood moves slowly (the regression error is divided by a variance
    # that starts at 5) but steadily: a few percent in 8 steps.
    images, labels = fashion_batch
    distiller = _fashion_distiller(name)
    opt = torch.optim.SGD(list(distiller.trainable_parameters()), lr=lr, momentum=0.9)
    totals = []
    for _ in range(steps):
        _, losses = distiller(images, labels)
        total = sum(losses.values())
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < factor * totals[0], totals


@pytest.mark.parametrize("name", ["ab", "ft", "fsp"])
def test_pretrain_steps_lower_the_loss_and_touch_only_pretrain_parameters(name, fashion_batch):
    images, labels = fashion_batch
    distiller = _fashion_distiller(name)
    if not distiller.method.pretraining.student_train:
        distiller.student.eval()
    params = distiller.pretrain_parameters()
    if name == "ft":
        # The paraphraser (no BatchNorm) reconstructs the large, unnormalised features of a random
        # teacher: plain SGD is touchy there, Adam's step size is not.
        opt = torch.optim.Adam(params, lr=5e-4)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    before = {n: p.detach().clone() for n, p in distiller.named_parameters()}
    totals = []
    for _ in range(6):
        _, losses = distiller(images, labels, pretrain=True)
        total = sum(losses.values())
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < 0.95 * totals[0], totals
    allowed = {id(p) for p in params}
    changed = [n for n, p in distiller.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    named = dict(distiller.named_parameters())
    assert all(id(named[n]) in allowed for n in changed), changed
    assert not any(n.startswith("teacher.") for n in changed)
    if name == "ft":
        assert all(n.startswith("method.paraphraser.") for n in changed)
    else:  # the student's layers train; its classifier gets no gradient from a feature loss
        assert any(n.startswith("student.") for n in changed)
        assert len([n for n in changed if n.startswith("student.")]) < len(list(distiller.student.parameters()))
