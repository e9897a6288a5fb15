"""Feature-based methods (FitNet, AT, SP, CC, RKD, PKT, NST): losses against hand computations from
the papers' formulas, gradient flow on zoo pairs, and a few training steps on real images."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from reviewkd import Distiller, create_model
from reviewkd.methods import IncompatiblePairError, Step, create_method

FEATURE_METHODS = ["fitnet", "at", "sp", "cc", "rkd", "pkt", "nst"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small CPU workloads: one intra-op thread avoids spin-waiting when the 2 cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _probe(student_feats, teacher_feats):
    n = student_feats[0].shape[0]
    return Step(student_logits=torch.zeros(n, 10), teacher_logits=torch.zeros(n, 10),
                student_features=student_feats, teacher_features=teacher_feats)


def _method(name, s_feats, t_feats, **options):
    method = create_method(name, **options)
    method.setup(_probe(s_feats, t_feats))
    return method


def _block_mean(x, factor):
    # average pooling by an integer factor, written out as a mean over equal blocks
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --------------------------------------------------------------------------------------------------
# losses against hand computations


def test_fitnet_loss_is_weighted_mse_of_regressed_student():
    torch.manual_seed(0)
    s = [torch.randn(3, 4, 8, 8), torch.randn(3, 5, 4, 4), torch.randn(3, 5, 1, 1)]
    t = [torch.randn(3, 6, 8, 8), torch.randn(3, 7, 4, 4), torch.randn(3, 7, 1, 1)]
    method = _method("fitnet", s, t)  # hint_stage=2 -> the 4x4 stage, weight 100
    out = method(_probe(s, t))["fitnet"]
    r = method.regressor(s[1])
    assert r.shape == t[1].shape
    assert (r >= 0).all()  # conv -> BN -> ReLU
    total = sum((float(a) - float(b)) ** 2 for a, b in zip(r.detach().flatten(), t[1].flatten()))
    assert math.isclose(out.item(), 100 * total / r.numel(), rel_tol=1e-5)


@pytest.mark.parametrize(
    "s_hw, t_hw, kind, kernel",
    [(16, 8, "Conv2d", (3, 3)), (8, 16, "ConvTranspose2d", (4, 4)), (8, 8, "Conv2d", (1, 1)),
     (10, 8, "Conv2d", (3, 3))],
)
def test_fitnet_regressor_follows_spatial_sizes(s_hw, t_hw, kind, kernel):
    s = [torch.randn(2, 3, s_hw, s_hw), torch.randn(2, 3, 1, 1)]
    t = [torch.randn(2, 5, t_hw, t_hw), torch.randn(2, 5, 1, 1)]
    method = _method("fitnet", s, t, hint_stage=1)
    conv = method.regressor.conv
    assert type(conv).__name__ == kind and tuple(conv.kernel_size) == kernel
    assert method.regressor(s[0]).shape == t[0].shape


def test_fitnet_refuses_unmatched_pairs():
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)]
    t = [torch.randn(2, 5, 16, 16), torch.randn(2, 5, 1, 1)]
    with pytest.raises(IncompatiblePairError, match="hint_stage"):
        _method("fitnet", s, t, hint_stage=1)
    with pytest.raises(IncompatiblePairError, match="hint_stage in 1..1"):
        _method("fitnet", s, t, hint_stage=2)


def test_at_loss_by_hand_with_pooling():
    torch.manual_seed(1)
    # stage 1: student 8x8 vs teacher 4x4 (student pooled); stage 2: same 2x2 sizes, other channels
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 1, 1)]
    t = [torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2), torch.randn(2, 6, 1, 1)]
    got = _method("at", s, t)(_probe(s, t))["at"]

    def attention(f):  # one sample: C x H x W -> normalised list of channel means of squares
        c = f.shape[0]
        q = [sum(float(f[k, i, j]) ** 2 for k in range(c)) / c for i in range(f.shape[1]) for j in range(f.shape[2])]
        n = _norm(q)
        return [v / n for v in q]

    expected = 0.0
    for f_s, f_t in [(_block_mean(s[0], 2), t[0]), (s[1], t[1])]:
        sq = [(a - b) ** 2 for i in range(2) for a, b in zip(attention(f_s[i]), attention(f_t[i]))]
        expected += sum(sq) / len(sq)
    assert math.isclose(got.item(), 1000 * expected, rel_tol=1e-5)


def test_sp_loss_by_hand():
    torch.manual_seed(2)
    s = [torch.randn(3, 2, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 1, 1)]
    t = [torch.randn(3, 2, 4, 4), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 1, 1)]
    got = _method("sp", s, t)(_probe(s, t))["sp"]

    def gram_rows(f):  # last stage, flattened per sample; row-normalised Gram matrix
        flat = [f[i].flatten().tolist() for i in range(f.shape[0])]
        rows = [[_dot(a, b) for b in flat] for a in flat]
        return [[v / _norm(r) for v in r] for r in rows]

    g_s, g_t = gram_rows(s[1]), gram_rows(t[1])
    b = 3
    expected = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    assert math.isclose(got.item(), 3000 * expected, rel_tol=1e-5)


def _cc_expected(z_s, z_t, gamma, order):
    def corr(z):
        rows = [r.tolist() for r in z]
        unit = [[v / _norm(r) for v in r] for r in rows]
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * _dot(a, b) ** p
                     for p in range(order + 1)) for b in unit] for a in unit]

    c_s, c_t = corr(z_s), corr(z_t)
    b = len(c_s)
    return sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_cc_loss_by_hand_without_embedding():
    torch.manual_seed(3)
    s = [torch.randn(4, 2, 2, 2), torch.randn(4, 5, 1, 1)]
    t = [torch.randn(4, 2, 2, 2), torch.randn(4, 7, 1, 1)]
    got = _method("cc", s, t, form="kernel", embed_dim=None, gamma=0.4, order=2)(_probe(s, t))["cc"]
    expected = _cc_expected(s[-1].flatten(1), t[-1].flatten(1), 0.4, 2)
    assert math.isclose(got.item(), 100 * expected, rel_tol=1e-5)


def test_cc_loss_by_hand_with_embedding():
    torch.manual_seed(4)
    s = [torch.randn(4, 2, 2, 2), torch.randn(4, 5, 1, 1)]
    t = [torch.randn(4, 2, 2, 2), torch.randn(4, 7, 1, 1)]
    method = _method("cc", s, t, form="kernel", weight=2.0, gamma=0.3, order=3)
    assert method.embed_s.in_features == 5 and method.embed_t.in_features == 7
    assert method.embed_s.out_features == method.embed_t.out_features == 128
    got = method(_probe(s, t))["cc"]
    with torch.no_grad():
        z_s = s[-1].flatten(1) @ method.embed_s.weight.t() + method.embed_s.bias
        z_t = t[-1].flatten(1) @ method.embed_t.weight.t() + method.embed_t.bias
    assert math.isclose(got.item(), 2.0 * _cc_expected(z_s, z_t, 0.3, 3), rel_tol=1e-4)


def test_cc_optional_instance_congruence_is_kd():
    from reviewkd.methods.kd import kd_loss

    s = [torch.randn(4, 2, 2, 2), torch.randn(4, 5, 1, 1)]
    t = [torch.randn(4, 2, 2, 2), torch.randn(4, 7, 1, 1)]
    step = _probe(s, t)
    step.student_logits, step.teacher_logits = torch.randn(4, 10), torch.randn(4, 10)
    assert "kd" not in _method("cc", s, t)(step)
    out = _method("cc", s, t, kd_weight=0.5)(step)
    torch.testing.assert_close(out["kd"], 0.5 * kd_loss(step.student_logits, step.teacher_logits, 4.0))


def test_cc_expansion_tends_to_gaussian_rbf():
    from reviewkd.methods.cc import rbf_correlation

    torch.manual_seed(5)
    z = torch.randn(5, 8, dtype=torch.float64)
    u = F.normalize(z, dim=1)
    exact = torch.exp(-0.4 * torch.cdist(u, u).pow(2))
    torch.testing.assert_close(rbf_correlation(z, 0.4, 25), exact)
    assert (rbf_correlation(z, 0.4, 2) - exact).abs().max() > 1e-4  # order 2 is an approximation


def test_rkd_losses_by_hand():
    torch.manual_seed(6)
    b = 4
    s = [torch.randn(b, 2, 2, 2), torch.randn(b, 3, 1, 1)]
    t = [torch.randn(b, 2, 2, 2), torch.randn(b, 5, 1, 1)]
    out = _method("rkd", s, t)(_probe(s, t))
    xs, xt = s[-1].flatten(1).tolist(), t[-1].flatten(1).tolist()

    def sub(a, b):
        return [x - y for x, y in zip(a, b)]

    def distances(x):
        d = [[_norm(sub(x[i], x[j])) if i != j else 0.0 for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in r] for r in d]

    def angles(x):  # cosine at vertex i between x_j - x_i and x_k - x_i; 0 for degenerate triplets
        a = {}
        for i, j, k in itertools.product(range(b), repeat=3):
            if j == i or k == i:
                a[i, j, k] = 0.0
            else:
                u, v = sub(x[j], x[i]), sub(x[k], x[i])
                a[i, j, k] = _dot(u, v) / (_norm(u) * _norm(v))
        return a

    d_s, d_t = distances(xs), distances(xt)
    loss_d = sum(_huber(d_s[i][j] - d_t[i][j]) for i in range(b) for j in range(b)) / b**2
    a_s, a_t = angles(xs), angles(xt)
    loss_a = sum(_huber(a_s[key] - a_t[key]) for key in a_s) / b**3
    assert math.isclose(out["rkd_distance"].item(), 25 * loss_d, rel_tol=1e-4)
    assert math.isclose(out["rkd_angle"].item(), 50 * loss_a, rel_tol=1e-4)


def test_rkd_huber_branch_for_large_differences():
    # one far-away teacher sample gives normalised-distance differences above 1 (linear Huber branch)
    xs, xt = [0.0, 1.0, 2.0, 3.0], [0.0, 0.01, 0.02, 10.0]
    s = [torch.zeros(4, 1, 1, 1), torch.tensor(xs).reshape(4, 1, 1, 1)]
    t = [torch.zeros(4, 1, 1, 1), torch.tensor(xt).reshape(4, 1, 1, 1)]
    out = _method("rkd", s, t, angle_weight=0.0)(_probe(s, t))

    def normalised(x):
        d = [[abs(a - b) for b in x] for a in x]
        mu = sum(map(sum, d)) / 12  # mean over the 12 off-diagonal entries
        return [[v / mu for v in r] for r in d]

    diffs = [a - b for ra, rb in zip(normalised(xs), normalised(xt)) for a, b in zip(ra, rb)]
    assert max(abs(v) for v in diffs) > 1
    expected = sum(_huber(v) for v in diffs) / 16
    assert math.isclose(out["rkd_distance"].item(), 25 * expected, rel_tol=1e-5)
    assert out["rkd_angle"].item() == 0.0


def test_pkt_loss_by_hand():
    torch.manual_seed(7)
    b, eps = 4, 1e-7
    s = [torch.randn(b, 2, 2, 2), torch.randn(b, 3, 1, 1)]
    t = [torch.randn(b, 2, 2, 2), torch.randn(b, 6, 1, 1)]
    got = _method("pkt", s, t)(_probe(s, t))["pkt"]

    def conditional(x):
        unit = [[v / (_norm(r) + eps) for v in r] for r in x]
        k = [[(_dot(a, c) + 1) / 2 for c in unit] for a in unit]
        return [[v / sum(r) for v in r] for r in k]

    p_s, p_t = conditional(s[-1].flatten(1).tolist()), conditional(t[-1].flatten(1).tolist())
    expected = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
                   for i in range(b) for j in range(b)) / b**2
    assert math.isclose(got.item(), 30000 * expected, rel_tol=1e-4)


def test_nst_loss_by_hand_with_pooling():
    torch.manual_seed(8)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2), torch.randn(2, 2, 1, 1)]
    t = [torch.randn(2, 4, 2, 2), torch.randn(2, 5, 2, 2), torch.randn(2, 5, 1, 1)]
    got = _method("nst", s, t)(_probe(s, t))["nst"]

    def maps(f):  # one sample: unit-norm flattened channel maps
        return [[v / _norm(ch) for v in ch] for ch in (f[c].flatten().tolist() for c in range(f.shape[0]))]

    def mean_k(xs, ys):
        return sum(_dot(x, y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

    expected = 0.0
    for f_s, f_t in [(_block_mean(s[0], 2), t[0]), (s[1], t[1])]:
        per_sample = []
        for i in range(2):
            ms, mt = maps(f_s[i]), maps(f_t[i])
            per_sample.append(mean_k(mt, mt) + mean_k(ms, ms) - 2 * mean_k(ms, mt))
        expected += sum(per_sample) / 2
    assert math.isclose(got.item(), 50 * expected, rel_tol=1e-4)
    same = _method("nst", t, t)(_probe(t, t))["nst"]
    assert abs(same.item()) < 1e-4  # MMD of a distribution with itself


@pytest.mark.parametrize("name", ["at", "nst", "sp"])
def test_map_methods_refuse_networks_without_stages(name):
    s, t = [torch.randn(2, 3, 1, 1)], [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 1, 1)]
    with pytest.raises(IncompatiblePairError, match="no stage"):
        _method(name, s, t)


def test_defaults_are_the_benchmark_recipe():
    expected = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "rkd": 1.0, "pkt": 30000.0, "nst": 50.0}
    for name, weight in expected.items():
        method = create_method(name)
        assert method.weight == weight and method.ce_weight == 1.0
        assert method.reads.student_features == method.reads.teacher_features == "post"
    assert create_method("fitnet").hint_stage == 2
    assert create_method("at").p == 2.0
    rkd = create_method("rkd")
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    cc = create_method("cc")
    assert (cc.gamma, cc.order, cc.embed_dim) == (0.4, 2, 128)


# --------------------------------------------------------------------------------------------------
# zoo pairs: connectors, gradient flow, bf16 autocast

SAME_FAMILY, CROSS_FAMILY, SIZES = ("resnet32x4", "resnet8x4"), ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2")
# Methods with connectors (fitnet's regressor, cc's embeddings) run on every pair, the map-based ones
# (at, nst) on the pairs whose stage sizes differ, the rest on one pair each (keeps the file fast).
GRAD_CASES = (
    [("fitnet", p) for p in (SAME_FAMILY, CROSS_FAMILY, SIZES, ("ResNet50", "MobileNetV2"))]
    + [("cc", p) for p in (SAME_FAMILY, CROSS_FAMILY, SIZES)]
    + [("at", CROSS_FAMILY), ("at", SIZES), ("nst", CROSS_FAMILY), ("nst", SIZES)]
    + [("sp", SAME_FAMILY), ("rkd", CROSS_FAMILY), ("pkt", SIZES)]
    + [("at", ("resnet32x4", "vgg8"))]  # 3 teacher stages, 4 student stages: paired from the shallow end
)


@pytest.mark.parametrize("name, pair", GRAD_CASES, ids=[f"{m}-{t}-{s}" for m, (t, s) in GRAD_CASES])
def test_gradients_reach_student_and_connectors_not_teacher(name, pair):
    teacher_name, student_name = pair
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10)
    student = create_model(student_name, num_classes=10)
    distiller = Distiller(student, teacher, name)
    distiller.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = distiller(x, y)
    method_loss = sum(v for k, v in losses.items() if k != "ce")
    assert torch.isfinite(method_loss) and method_loss.item() > 0
    method_loss.backward()  # the method's losses alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    connectors = list(distiller.method.parameters())
    assert bool(connectors) == (name in ("fitnet", "cc"))
    for p in connectors:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_bf16_autocast_gives_float32_losses(name):
    torch.manual_seed(0)
    distiller = Distiller(create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10), name)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = distiller(x, y)
    for key, value in losses.items():
        if key != "ce":
            assert value.dtype == torch.float32 and torch.isfinite(value)
    sum(losses.values()).backward()


# --------------------------------------------------------------------------------------------------
# a few SGD steps on real Fashion-MNIST images


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_sgd_steps_lower_the_total_loss(name, fashion_batch):
    images, labels = fashion_batch
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10).eval()
    student = create_model("resnet8", num_classes=10)
    distiller = Distiller(student, teacher, name)
    distiller.train()
    opt = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.02, momentum=0.9)
    totals, method_terms = [], []
    for _ in range(6):
        _, losses = distiller(images, labels)
        total = sum(losses.values())
        totals.append(total.item())
        method_terms.append(sum(v.item() for k, v in losses.items() if k != "ce"))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(math.isfinite(v) for v in totals)
    # the total (CE included) goes down, and the method's own terms clearly so
    assert totals[-1] < 0.97 * totals[0], totals
    assert method_terms[-1] < 0.8 * method_terms[0], method_terms
