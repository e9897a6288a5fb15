"""cGAN-KD components against hand computations: the density-ratio loss (formula and a 1-D toy with a
known ratio), the rejection sampler, the teacher filter and label adjuster, the GAN pieces (shapes,
hinge losses, DiffAugment, EMA, the D/G schedule through the engine's step rule, CcGAN's rules), and
tiny engine runs of the cgan and dre tasks that resume exactly."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from reviewkd.batch import Batch
from reviewkd.cgankd.dre import RatioMLP, SparseAutoencoder, density_ratio_loss, load_density_ratio, sparse_autoencoder_loss
from reviewkd.cgankd.filtering import TeacherFilter, adjust_labels, teacher_function
from reviewkd.cgankd.gan import (Discriminator, Generator, diff_augment, ema_update, generate, hinge_d_loss,
                                 hinge_g_loss, load_generator, soft_vicinity_weights, to_uint8, vicinity_parameters)
from reviewkd.cgankd.sampling import RejectionSampler
from reviewkd.cgankd.training import GanRecipe
from reviewkd.config import CganConfig, load_config
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import Run, group_optimiser, step_groups
from reviewkd.recipes.base import Group


# ------------------------------------------------------------------------------ density ratio
def test_density_ratio_loss_matches_the_formula():
    r_fake, r_real = torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0])
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    softplus = lambda t: math.log(1 + math.exp(t))  # noqa: E731
    fake = ((sig(0.5) * 0.5 - softplus(0.5)) + (sig(2.0) * 2.0 - softplus(2.0))) / 2
    real = (sig(1.0) + sig(3.0)) / 2
    expected = fake - real + 0.01 * ((0.5 + 2.0) / 2 - 1) ** 2
    assert density_ratio_loss(r_fake, r_real, 0.01).item() == pytest.approx(expected, rel=1e-6)
    assert density_ratio_loss(r_fake, r_real, 0.0).item() == pytest.approx(fake - real, rel=1e-6)


def test_density_ratio_loss_recovers_a_known_ratio_on_a_1d_toy():
    # real N(0, 1), fake N(0.5, 1): p_real / p_fake = exp(-x^2/2 + (x - 0.5)^2/2) = exp(-x/2 + 1/8)
    torch.manual_seed(0)
    # the reference's output layer (Linear -> ReLU), its bias started at 1 (r = 1 where nothing is known yet)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1), nn.ReLU())
    nn.init.constant_(net[2].bias, 1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        real, fake = torch.randn(1024, 1), torch.randn(1024, 1) + 0.5
        loss = density_ratio_loss(net(fake).view(-1), net(real).view(-1), 0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grid = torch.linspace(-2, 2, 41).view(-1, 1)
    with torch.no_grad():
        estimate = net(grid).view(-1)
    truth = torch.exp(-grid.view(-1) / 2 + 1 / 8)
    corr = torch.corrcoef(torch.stack([estimate, truth]))[0, 1].item()
    assert corr > 0.97
    assert (estimate / truth).median().item() == pytest.approx(1.0, abs=0.25)  # the scale, not just the shape
    assert (estimate - truth).abs().mean().item() < 0.3


def test_ratio_mlp_is_nonnegative_and_conditional():
    mlp = RatioMLP(12, 3, widths=(16, 16, 8, 8, 8)).eval()
    out = mlp(torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == (5,) and (out >= 0).all()
    assert mlp.net[0].in_features == 12 + 3  # Embedding(C, C) concatenated with the feature
    with pytest.raises(ValueError, match="multiples of 8"):
        RatioMLP(12, 3, widths=(10, 8, 8, 8, 8))


def test_sparse_autoencoder_shapes_and_loss_weights():
    ae = SparseAutoencoder((1, 8, 8), width=4)
    x, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3)
    recon, h, pred = ae(x)
    assert recon.shape == x.shape and h.shape == (3, 64) and pred.shape == (3,)
    parts = sparse_autoencoder_loss(x, recon, h, pred, y)
    assert parts["sparsity"].item() == pytest.approx(1e-3 * h.abs().mean().item(), rel=1e-5)
    assert parts["regression"].item() == pytest.approx(((pred - y) ** 2).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------------- sampling
class _UniformGenerator(nn.Module):
    """One-pixel 'images' whose value is uniform on (-1, 1) (Phi(z) mapped), whatever the label."""

    z_dim = 1

    def forward(self, z, labels):
        return (torch.special.ndtr(z) * 2 - 1).view(-1, 1, 1, 1)


def test_rejection_sampler_accepts_at_rate_mean_ratio_over_m():
    # r = image + 1 ~ U(0, 2): E[r] = 1, M -> 2, so the acceptance rate is ~1/2 = E[r]/M
    ratio = lambda images, labels: images.view(-1) + 1  # noqa: E731
    sampler = RejectionSampler(_UniformGenerator(), ratio, burn_in=2000, batch_size=500)
    images, stats = sampler.sample(3, 4000, seed=1)
    assert images.dtype == torch.uint8 and images.shape == (4000, 1, 1, 1)
    assert stats["M"] == pytest.approx(2.0, abs=0.01)
    assert stats["acceptance_rate"] == pytest.approx(1.0 / stats["M"], abs=0.03)
    # accepted images follow p_real = r * p_fake: density ~ (x + 1) / 2 on (-1, 1): mean 1/3
    values = images.float().view(-1) / 127.5 - 1
    assert values.mean().item() == pytest.approx(1 / 3, abs=0.03)


class _SequenceGenerator(nn.Module):
    """Images whose values are given per call (a list of tensors), to script the ratios."""

    z_dim = 1

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def forward(self, z, labels):
        return self.values.pop(0)[:len(z)].view(-1, 1, 1, 1)


def test_rejection_sampler_running_max_grows_before_judging_a_batch():
    # burn-in: max ratio 1; then a batch of 999 ratios 0.6 and one 3.0: M becomes 3 first, so the
    # 0.6s are accepted with probability 0.2 (0.6 if M were still 1)
    burn = torch.tensor([1.0])
    batch = torch.cat([torch.full((999,), 0.6), torch.tensor([3.0])])
    gen = _SequenceGenerator([burn] + [batch] * 50)
    sampler = RejectionSampler(gen, lambda images, labels: images.view(-1), burn_in=1, batch_size=1000)
    _, stats = sampler.sample(0, 2000, seed=0)
    assert stats["M_burn_in"] == 1.0 and stats["M"] == 3.0
    assert stats["acceptance_rate"] == pytest.approx((999 * 0.2 + 1) / 1000, abs=0.02)



def test_rejection_sampler_reports_progress_while_a_label_is_slow():
    # ratio 1 on one image in 100 and 0 elsewhere: about 1 % accepted; a report after every batch
    ratio = lambda images, labels: (images.view(-1) > 0.98).float()  # noqa: E731
    lines = []
    sampler = RejectionSampler(_UniformGenerator(), ratio, burn_in=1000, batch_size=100)
    images, stats = sampler.sample(2, 5, seed=0, report=lines.append, report_seconds=0.0)
    assert len(images) == 5 and len(lines) == stats["drawn"] // 100
    last = lines[-1]
    assert last.startswith("label 2: 5/5 accepted of ") and f"of {stats['drawn']} drawn" in last
    quiet = []
    sampler.sample(2, 5, seed=0, report=quiet.append, report_seconds=3600.0)
    assert quiet == []

# -------------------------------------------------------------------------------- filtering
def _quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) quantile, by hand."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _ce_teacher(images: torch.Tensor) -> torch.Tensor:
    """Logits (v, 0, 0) with v = the image's first pixel / 25: CE w.r.t. class 0 falls with v,
    w.r.t. classes 1 and 2 rises with it."""
    v = images.float().flatten(1)[:, 0] / 25
    return torch.stack([v, torch.zeros_like(v), torch.zeros_like(v)], dim=1)


def test_filter_per_class_keeps_rho_and_drops_exactly_the_highest_ce():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (600, 1, 2, 2), generator=g, dtype=torch.uint8)
    labels = torch.arange(600) % 3
    filt = TeacherFilter(_ce_teacher, rho=0.7, scope="per_class", kind="ce").fit(images, labels)
    keep = filt.keep(images, labels)
    logits = _ce_teacher(images)
    ce = [-(torch.log_softmax(logits[i], 0)[labels[i]]).item() for i in range(600)]
    for c in range(3):
        members = [i for i in range(600) if labels[i] == c]
        cut = _quantile([ce[i] for i in members], 0.7)
        assert filt.cutoffs[c] == pytest.approx(cut, rel=1e-9)
        expected = {i for i in members if ce[i] < cut}
        assert {i for i in members if keep[i]} == expected
        assert len(expected) / len(members) == pytest.approx(0.7, abs=0.05)
        assert min(ce[i] for i in members if not keep[i]) >= max(ce[i] for i in expected)


def test_filter_global_abs_error_for_regression():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (500, 1, 1, 1), generator=g, dtype=torch.uint8)
    labels = torch.rand(500, generator=g)
    teacher = lambda x: x.float().view(-1) / 255  # noqa: E731  (predictions on the [0, 1] label scale)
    filt = TeacherFilter(teacher, rho=0.5, scope="global", kind="abs_error").fit(images, labels)
    errors = [abs(images[i].item() / 255 - labels[i].item()) for i in range(500)]
    cut = _quantile(errors, 0.5)
    assert filt.cutoff == pytest.approx(cut, rel=1e-6)
    keep = filt.keep(images, labels)
    assert {i for i in range(500) if keep[i]} == {i for i in range(500) if errors[i] < cut - 1e-7 or
                                                 (errors[i] < cut and abs(errors[i] - cut) > 1e-6)}
    assert keep.float().mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="per-class"):
        TeacherFilter(teacher, scope="per_class", kind="abs_error")


def test_adjuster_hard_argmax_and_clipped_prediction():
    images = torch.tensor([0, 10, 200], dtype=torch.uint8).view(3, 1, 1, 1)
    logits = lambda x: torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 1.0], [0.0, 0.0, 0.5]])  # noqa: E731
    assert adjust_labels(logits, images, "ce").tolist() == [1, 0, 2]
    preds = lambda x: torch.tensor([-0.2, 0.4, 1.3])  # noqa: E731
    assert adjust_labels(preds, images, "abs_error").tolist() == pytest.approx([0.0, 0.4, 1.0])


def test_filter_takes_the_adjusted_label_from_the_pass_that_scored_the_image():
    # the released filter reads CE and argmax off one pass through the (augmenting) transform
    images = torch.tensor([[[[10, 200]]], [[[200, 10]]], [[[90, 100]]]], dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0])
    teacher = lambda x: torch.stack([x.float()[:, 0, 0, 0], x.float()[:, 0, 0, 1]], dim=1) / 50  # noqa: E731
    flip = lambda x: x.flip(-1)  # noqa: E731  (a deterministic stand-in for crop + flip)
    filt = TeacherFilter(teacher, rho=1.0, scope="global", kind="ce", augment=flip)
    filt.cutoff = float("inf")
    keep, adjusted = filt.judge(images, labels)
    assert keep.all()
    assert adjusted.tolist() == teacher(flip(images)).argmax(1).tolist() == [0, 1, 0]
    assert adjust_labels(teacher, images, "ce").tolist() == [1, 0, 1]  # the un-augmented view disagrees
    ce = torch.nn.functional.cross_entropy(teacher(flip(images)), labels, reduction="none")
    assert ce[2] > ce[0] == pytest.approx(ce[1])
    filt.cutoff = ce[2].item()  # strictly below: the two confident images stay, the unsure one goes
    assert filt.judge(images, labels)[0].tolist() == [True, True, False]


# ------------------------------------------------------------------------------------- GAN
@pytest.mark.parametrize("arch,shape,classes", [("small", (1, 28, 28), 10), ("small", (3, 32, 32), None),
                                                ("biggan32", (3, 32, 32), 100)])
def test_generator_and_discriminator_shapes(arch, shape, classes):
    G = Generator(shape, classes, arch, width=8)
    D = Discriminator(shape, classes, arch, width=8)
    labels = torch.tensor([0, 1, 2]) if classes else torch.tensor([0.0, 0.5, 1.0])
    x = G(torch.randn(3, G.z_dim), labels)
    assert x.shape == (3, *shape) and x.abs().max() <= 1
    assert D(x, labels).shape == (3,)
    assert G.z_dim == (128 if arch == "biggan32" else 64)


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    w_r, w_f = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 0.2])
    assert hinge_d_loss(real, fake, w_r, w_f).item() == pytest.approx(0.25 / 3 + 1.5 / 3)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean([-2, 0, 1.5])


def test_diff_augment_shapes_ranges_and_identity():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    assert diff_augment(x, "") is x
    for policy in ("color", "translation", "cutout", "color,translation,cutout"):
        assert diff_augment(x, policy).shape == x.shape
    # translation and cutout only move or zero pixels: every output value is 0 or one of the image's
    moved = diff_augment(x, "translation,cutout")
    for i in range(16):
        values = set(x[i].flatten().tolist()) | {0.0}
        assert set(moved[i].flatten().tolist()) <= values
    # cutout zeroes at most a 16 x 16 square (ratio 0.5 of 32) per image, and some pixels
    ones = torch.ones(64, 1, 32, 32)
    zeros = (diff_augment(ones, "cutout") == 0).sum(dim=(1, 2, 3))
    assert (zeros <= 256).all() and (zeros > 0).all() and (zeros == 256).any()
    # translation shifts by at most 4 = 0.125 x 32 pixels: a one-pixel image's pixel moves <= 4
    dot = torch.zeros(64, 1, 32, 32)
    dot[:, :, 16, 16] = 1
    where = diff_augment(dot, "translation").flatten(1).argmax(1)
    assert ((where // 32 - 16).abs() <= 4).all() and ((where % 32 - 16).abs() <= 4).all()
    # colour: brightness +-0.5, saturation x[0,2], contrast x[0.5,1.5]: bounded, differentiable
    y = x.clone().requires_grad_(True)
    out = diff_augment(y, "color")
    out.sum().backward()
    assert y.grad is not None and out.abs().max() < 10
    with pytest.raises(ValueError, match="policy"):
        diff_augment(x, "zoom")


def test_ema_update_formula():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    bn_a, bn_b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    target, source = nn.Sequential(a, bn_a), nn.Sequential(b, bn_b)
    bn_b.running_mean.fill_(4.0)
    bn_b.num_batches_tracked.fill_(7)
    before = a.weight.detach().clone()
    ema_update(target, source, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    assert torch.allclose(bn_a.running_mean, torch.full((2,), 0.4))  # buffers too (BigGAN's EMA)
    assert bn_a.num_batches_tracked.item() == 7
    ema_update(target, source, 0.0)
    assert torch.equal(a.weight, b.weight)


def test_vicinity_rules_by_hand():
    labels = torch.tensor([0.0, 0.1, 0.3, 0.35, 1.0, 0.1])
    kappa, nu, sigma = vicinity_parameters(labels, kappa_arg=2)
    assert kappa == pytest.approx(2 * 0.65)  # the largest gap between distinct labels: 0.35 -> 1.0
    assert nu == pytest.approx(1 / 1.3 ** 2)
    values = labels.tolist()
    assert sigma == pytest.approx(1.06 * statistics.pstdev(values) * len(values) ** (-1 / 5), rel=1e-6)
    w = soft_vicinity_weights(torch.tensor([0.2, 0.5]), torch.tensor([0.3, 0.5]), nu)
    assert w.tolist() == pytest.approx([math.exp(-nu * 0.01), 1.0], rel=1e-6)


def _tiny_batch(n=8, classes=3):
    return Batch({"image": torch.rand(n, 1, 8, 8) * 2 - 1}, torch.arange(n) % classes, torch.arange(n))


def test_four_d_steps_per_g_step_through_the_step_rule_and_ema_start():
    torch.manual_seed(0)
    opts = CganConfig(arch="small", width=4, z_dim=8, ema_start=2, ema_decay=0.5)
    G, D = Generator((1, 8, 8), 3, "small", 4, 8), Discriminator((1, 8, 8), 3, "small", 4)
    recipe = GanRecipe(G, D, opts)
    stage = recipe.stages()[0]
    groups = [group_optimiser(g, load_config(None).solver) for g in recipe.groups(stage)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g_changes, d_changes, ema_equal_g = [], [], []
    for it in range(9):
        g0 = [p.detach().clone() for p in G.parameters()]
        d0 = [p.detach().clone() for p in D.parameters()]
        out = recipe.train_step(_tiny_batch(), stage, 0.0)
        step_groups(groups, out.losses, scaler, None, out.idle)
        recipe.after_step(stage)
        g_changes.append(any(not torch.equal(a, b) for a, b in zip(g0, G.parameters())))
        d_changes.append(any(not torch.equal(a, b) for a, b in zip(d0, D.parameters())))
        ema_equal_g.append(all(torch.equal(a, b) for a, b in zip(recipe.ema.state_dict().values(),
                                                               G.state_dict().values())))
    # G steps after every 4 D steps: iterations 4 and 8; D steps every iteration
    assert g_changes == [i in (4, 8) for i in range(9)]
    assert all(d_changes)
    assert (recipe.d_steps_done, recipe.g_steps_done) == (9, 2)
    assert groups[0].optimizer.state[next(iter(G.parameters()))]["step"].item() == 2
    # the EMA copies G until G step 2 (< ema_start), then averages (decay 0.5)
    assert ema_equal_g[4] and not ema_equal_g[8]


def test_idle_group_is_untouched_by_the_step_rule():
    w_a, w_b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    solver = load_config(None).solver
    groups = [group_optimiser(Group("a", [w_a], lr=0.1, optimizer="sgd"), solver),
              group_optimiser(Group("b", [w_b], lr=0.1, optimizer="sgd"), solver)]
    w_a.grad = torch.full((2,), 5.0)  # left from elsewhere: an idle group's gradient is not zeroed either
    losses = {"a": {"l": (w_a * w_b).sum()}, "b": {"l": (w_b ** 2).sum()}}
    step_groups(groups, losses, torch.amp.GradScaler("cpu", enabled=False), None, idle=("a",))
    assert torch.equal(w_a.detach(), torch.ones(2)) and torch.equal(w_a.grad, torch.full((2,), 5.0))
    assert not torch.equal(w_b.detach(), torch.ones(2))
    assert groups[0].scheduler.last_epoch == groups[1].scheduler.last_epoch == 1


def test_generate_and_to_uint8():
    G = Generator((1, 8, 8), 3, "small", 4, 8).eval()
    a = generate(G, torch.tensor([0, 1, 2, 0]), batch_size=3, seed=5)
    b = generate(G, torch.tensor([0, 1, 2, 0]), batch_size=3, seed=5)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    # released: (x * 0.5 + 0.5) * 255 truncated by astype(uint8); 0.999 -> 254.87 -> 254
    assert to_uint8(torch.tensor([-1.0, 0.0, 0.999, 1.0, 2.0, -0.999])).tolist() == [0, 127, 254, 255, 255, 0]


# ------------------------------------------------------------------------------ engine runs
def _cfg(tmp_path, name, task, extra):
    return load_config(None, [f"task={task}", f"name={name}", f"output_dir={tmp_path}", "data.name=fashion_mnist",
                              "data.subset=96", "data.batch_size=32", "data.eval_batch_size=96",
                              "runtime.precision=fp32", "runtime.device=cpu", "runtime.log_every_seconds=0",
                              "solver.epochs=2", *extra])


def _same_checkpoints(a, b, parts):
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert (ca["stage_iteration"], ca["best_score"]) == (cb["stage_iteration"], cb["best_score"])
        for part in parts:
            for key, value in ca[part].items():
                assert torch.equal(value, cb[part][key]), f"{name} {part}.{key}"


GAN_OPTIONS = ["cgan.width=4", "cgan.z_dim=8", "cgan.ema_start=1", "cgan.ema_decay=0.5", "solver.schedule=constant"]


@pytest.mark.slow
def test_cgan_and_dre_runs_resume_exactly(tmp_path):
    cfg = _cfg(tmp_path, "gan", "cgan", GAN_OPTIONS)
    Run(cfg, progress=False).fit()
    Run(_cfg(tmp_path, "gan_killed", "cgan", GAN_OPTIONS), progress=False, stop_after=1).fit()
    Run(_cfg(tmp_path, "gan_killed", "cgan", GAN_OPTIONS), resume=True, progress=False).fit()
    _same_checkpoints(tmp_path / "gan", tmp_path / "gan_killed", ("student", "generator", "discriminator",
                                                                  "gan_counters"))
    ckpt = load_checkpoint(tmp_path / "gan" / "last.pt")
    assert int(ckpt["gan_counters"]["d_steps"]) == 6 and int(ckpt["gan_counters"]["g_steps"]) == 1
    generator = load_generator(tmp_path / "gan" / "best.pt")
    assert (generator.num_classes, generator.image_shape, generator.training) == (10, (1, 28, 28), False)

    extractor = load_config(None, ["model.name=dre_extractor_small", "name=ext", f"output_dir={tmp_path}",
                                   "data.subset=64", "data.batch_size=32", "solver.epochs=1",
                                   "runtime.precision=fp32", "runtime.device=cpu"])
    Run(extractor, progress=False).fit()
    # a trained classifier as a filter teacher: uint8 images at the data's size, its own preprocessing
    teacher = teacher_function(tmp_path / "ext" / "best.pt")
    logits = teacher(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    dre = [f"dre.generator={tmp_path / 'gan' / 'best.pt'}", f"dre.extractor={tmp_path / 'ext' / 'best.pt'}",
           "dre.widths=[16,16,8,8,8]", "dre.eval_samples=32", "solver.lr=1e-4", "solver.weight_decay=1e-4"]
    Run(_cfg(tmp_path, "dre", "dre", dre), progress=False).fit()
    Run(_cfg(tmp_path, "dre_killed", "dre", dre), progress=False, stop_after=1).fit()
    Run(_cfg(tmp_path, "dre_killed", "dre", dre), resume=True, progress=False).fit()
    _same_checkpoints(tmp_path / "dre", tmp_path / "dre_killed", ("student",))
    ratio = load_density_ratio(tmp_path / "dre" / "best.pt")
    r = ratio(generate(generator, torch.arange(4), seed=0), torch.arange(4))
    assert r.shape == (4,) and (r >= 0).all() and not ratio.training


def test_dre_refuses_missing_inputs_in_one_line(tmp_path):
    from reviewkd.config import ConfigError

    with pytest.raises(ConfigError, match="dre.generator"):
        Run(_cfg(tmp_path, "d", "dre", []), progress=False)
    with pytest.raises(ConfigError, match="not found"):
        Run(_cfg(tmp_path, "d", "dre", [f"dre.generator={tmp_path}/no.pt", f"dre.extractor={tmp_path}/no.pt"]),
            progress=False)


def test_ccgan_draws_real_neighbours_within_the_soft_vicinity():
    torch.manual_seed(0)
    labels = torch.linspace(0, 1, 21)  # gaps 0.05: kappa 0.1, nu 100
    images = torch.randint(0, 256, (21, 1, 8, 8), dtype=torch.uint8)
    G, D = Generator((1, 8, 8), None, "small", 4, 8), Discriminator((1, 8, 8), None, "small", 4)
    recipe = GanRecipe(G, D, CganConfig(width=4, z_dim=8), images, labels)
    assert recipe.nu == pytest.approx(100.0)
    assert recipe.radius == pytest.approx(math.sqrt(-math.log(1e-3) / 100.0))
    targets, reals, real_labels = recipe._vicinal_reals(256, "cpu")
    assert ((real_labels - targets).abs() <= recipe.radius + 1e-6).all()
    # targets are not clipped (the released CcGAN: clip_label=False), but each has a real neighbour
    assert (targets >= -recipe.radius - 1e-6).all() and (targets <= 1 + recipe.radius + 1e-6).all()
    index = ((real_labels[:, None] - labels[None, :]).abs() < 1e-6).float().argmax(1)
    assert torch.equal(reals, images[index].float() / 127.5 - 1)
    out = recipe.train_step(Batch({"image": torch.zeros(16, 1, 8, 8)}, torch.zeros(16), torch.arange(16)),
                            recipe.stages()[0], 0.0)
    assert out.idle == ("generator",) and out.losses["discriminator"]["hinge"].requires_grad


def test_regression_chain_ccgan_autoencoder_dre_runs(tmp_path):
    """CcGAN, the sparse autoencoder and the density ratio on a tiny synthetic regression set."""
    base = ["data.name=regression", f"data.root={tmp_path}/discs", "data.image_size=16", "regression.channels=1",
            "regression.synthetic={n: 128}", "data.batch_size=32", "data.eval_batch_size=64", f"output_dir={tmp_path}",
            "runtime.precision=fp32", "runtime.device=cpu", "solver.epochs=1"]
    Run(load_config(None, ["task=cgan", "name=g", "cgan.width=4", "cgan.z_dim=8", "solver.schedule=constant", *base]),
        progress=False).fit()
    Run(load_config(None, ["task=dre_autoencoder", "name=ae", "dre.autoencoder_width=4", "solver.lr=0.01", *base]),
        progress=False).fit()
    Run(load_config(None, ["task=dre", "name=dre", f"dre.generator={tmp_path}/g/best.pt", "dre.flip=false",
                           f"dre.extractor={tmp_path}/ae/best.pt", "dre.widths=[16,8,8,8,8]", "dre.eval_samples=32",
                           "solver.lr=1e-4", *base]), progress=False).fit()
    generator, ratio = load_generator(tmp_path / "g" / "best.pt"), load_density_ratio(tmp_path / "dre" / "best.pt")
    assert generator.num_classes is None and generator.image_shape == (1, 16, 16)
    labels = torch.tensor([0.1, 0.5, 0.9])
    r = ratio(generate(generator, labels, seed=0), labels)
    assert r.shape == (3,) and (r >= 0).all()
    assert load_checkpoint(tmp_path / "g" / "best.pt")["label_range"] is not None


# ------------------------------------------------------------- audit against the released code
def test_abs_error_filter_clips_the_prediction_to_the_label_scale_first():
    """UTKFace/generate_synthetic_data.py: labels_pred = clip(pred, 0, 1), then |pred - label|."""
    from reviewkd.cgankd.filtering import filter_scores

    images = torch.zeros(4, 1, 1, 1, dtype=torch.uint8)
    preds = lambda x: torch.tensor([-0.2, 0.4, 1.3, 0.9])  # noqa: E731
    labels = torch.tensor([0.1, 0.6, 0.95, 0.0])
    # by hand: clipped predictions 0, 0.4, 1, 0.9 -> errors 0.1, 0.2, 0.05, 0.9 (unclipped: 0.3, 0.2, 0.35, 0.9)
    assert filter_scores(preds, images, labels, "abs_error").tolist() == pytest.approx([0.1, 0.2, 0.05, 0.9])
    filt = TeacherFilter(preds, rho=0.5, scope="global", kind="abs_error").fit(images, labels)
    assert filt.cutoff == pytest.approx(0.15)  # sorted 0.05, 0.1, 0.2, 0.9: position 1.5 -> 0.15
    assert filt.keep(images, labels).tolist() == [True, False, True, False]  # strictly below


def test_ccgan_fake_labels_are_uniform_on_the_vicinity_cut_to_the_unit_interval():
    """UTKFace/train_ccgan.py: fake label ~ U(max(0, y - r), min(1, y + r)), r = sqrt(-log(1e-3) / nu);
    a clamp of y + U(-r, r) would instead put mass on exactly 0 and 1."""
    torch.manual_seed(0)
    labels = torch.linspace(0, 1, 21)  # nu 100, r = sqrt(log(1000) / 100)
    images = torch.randint(0, 256, (21, 1, 8, 8), dtype=torch.uint8)
    G, D = Generator((1, 8, 8), None, "small", 4, 8), Discriminator((1, 8, 8), None, "small", 4)
    recipe = GanRecipe(G, D, CganConfig(width=4, z_dim=8), images, labels)
    r = math.sqrt(math.log(1000) / 100)
    seen = {}
    g_forward, d_forward = G.forward, D.forward
    G.forward = lambda z, y: (seen.setdefault("fake", y.clone()), g_forward(z, y))[1]
    D.forward = lambda x, y: (seen.setdefault("target", y.clone()), d_forward(x, y))[1]
    n = 4000
    recipe.train_step(Batch({"image": torch.zeros(n, 1, 8, 8)}, torch.zeros(n), torch.arange(n)),
                      recipe.stages()[0], 0.0)
    fake, target = seen["fake"].double(), seen["target"].double()
    low, high = (target - r).clamp(min=0), (target + r).clamp(max=1)
    assert ((fake >= low - 1e-6) & (fake <= high + 1e-6)).all()
    assert not ((fake == 0) | (fake == 1)).any()
    u = (fake - low) / (high - low)
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)  # U(0, 1): mean 1/2, variance 1/12
    assert u.var().item() == pytest.approx(1 / 12, abs=0.01)
    assert (target < 0).any()  # targets are not clipped


def test_released_recipe_constants():
    """The settings of the released scripts: UTKFace/scripts/run_gene_data.sh + UTKFace/opts.py (CcGAN Adam
    lr 1e-4, betas (0.5, 0.999), z 256, no EMA; burn-in 100, batches of 500, 2000 fakes per label; DRE
    Adam wd 1e-4; sparse AE SGD momentum 0.9 wd 1e-4) and CIFAR-100 train_cnn (SGD momentum 0.9, no
    Nesterov) for the DRE extractor."""
    from reviewkd.cgankd.pipeline import Pipeline

    cfg = load_config("cgankd/utkface_final", ["output_dir=/tmp/reviewkd_audit_unused"])
    p = Pipeline(cfg, say=lambda line: None)
    gan, dre, ae = (p.stage_config(s) for s in ("gan", "dre", "dre_extractor"))
    assert (gan.cgan.lr_g, gan.cgan.lr_d, tuple(gan.cgan.betas), gan.cgan.z_dim) == (1e-4, 1e-4, (0.5, 0.999), 256)
    assert gan.cgan.ema_decay == 0.0 and gan.cgan.d_steps == 4 and gan.data.batch_size == 512
    assert (cfg.cgankd.sampler_burn_in, cfg.cgankd.sample_batch, cfg.cgankd.pool_per_class) == (100, 500, 2000)
    assert cfg.cgankd.rho == 0.7 and cfg.cgankd.num_fake == 60000
    assert dre.solver.weight_decay == 1e-4 and tuple(dre.dre.betas) == (0.5, 0.999) and dre.dre.penalty == 0.01
    assert (ae.solver.momentum, ae.solver.nesterov, ae.solver.weight_decay) == (0.9, False, 1e-4)
    cfg = load_config("cgankd/cifar100_final", ["output_dir=/tmp/reviewkd_audit_unused"])
    ext = Pipeline(cfg, say=lambda line: None).stage_config("dre_extractor")
    assert (ext.solver.momentum, ext.solver.nesterov, ext.solver.weight_decay, ext.solver.lr) == (0.9, False, 1e-4, 0.1)
    cfg = load_config("cgankd/cifar100_v1", ["output_dir=/tmp/reviewkd_audit_unused"])
    assert Pipeline(cfg, say=lambda line: None).stage_config("dre_extractor").model.name == "dre_extractor_densenet121"


def test_v1_densenet121_extractor_feature_is_linear_bn_relu_of_the_pooled_trunk():
    from reviewkd.models.registry import create_model

    net = create_model("dre_extractor_densenet121", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feature = net.extract(x)
    assert feature.shape == (2, 3072) and (feature >= 0).all()
    # by hand: the trunk's final BN-ReLU map (4 x 4), averaged, then Linear -> BN (eval) -> ReLU
    t = net.trunk
    h = t.trans3(t.dense3(t.trans2(t.dense2(t.trans1(t.dense1(t.conv1(x)))))))
    pooled = torch.relu(t.bn(t.dense4(h))).mean(dim=(2, 3))
    assert pooled.shape == (2, 1024)
    lin, bn = net.to_feature[0], net.to_feature[1]
    z = (pooled @ lin.weight.t() + lin.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(feature, torch.relu(z), atol=1e-5)
    assert torch.allclose(net(x), feature @ net.head.weight.t() + net.head.bias, atol=1e-5)


def test_generator_batchnorm_eps_is_recorded_and_old_checkpoints_keep_theirs(tmp_path):
    from reviewkd.cgankd.gan import BN_EPS

    G = Generator((1, 8, 8), 3, "small", 4, 8)
    assert BN_EPS == 1e-5 and G.config()["bn_eps"] == 1e-5  # BigGAN-PyTorch's BN_eps
    assert {m.eps for m in G.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
    config = {k: v for k, v in G.config().items() if k != "bn_eps"}  # written before eps was recorded
    torch.save({"generator_config": config, "student": G.state_dict()}, tmp_path / "old.pt")
    old = load_generator(tmp_path / "old.pt")
    assert {m.eps for m in old.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-4}
    torch.save({"generator_config": G.config(), "student": G.state_dict()}, tmp_path / "new.pt")
    assert {m.eps for m in load_generator(tmp_path / "new.pt").modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
