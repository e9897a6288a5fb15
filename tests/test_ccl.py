"""CCL (video student, audio / image teachers): every loss term against a hand computation, the
composition formula, masked audio, the gradient routing of the reference (the student gets the
gradient of its own loss only, each composition module that of its loss plus the student's), the
per-group optimisers and schedules, and the cross-modal baselines."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reviewkd.batch import Batch
from reviewkd.config import SolverConfig
from reviewkd.engine.loop import group_optimiser, step_groups
from reviewkd.engine.schedule import RunSchedule
from reviewkd.features import FeatureSpec, Tap
from reviewkd.methods import create_method, describe_method
from reviewkd.methods.ccl import Composition, masked_cross_entropy, multiclass_contrastive, symmetric_contrastive, \
    symmetric_kl
from reviewkd.recipes.crossmodal import CrossModalDistillation

torch.set_num_threads(1)
EPS = 1e-10


# =============================================================================== hand computations
def h_mc(f, g, y, tau):
    """L_mc with one Python loop per anchor and per item (floats only)."""
    f = [[a / math.sqrt(sum(b * b for b in row)) for a in row] for row in f.tolist()]
    g = [[a / math.sqrt(sum(b * b for b in row)) for a in row] for row in g.tolist()]
    y, n = y.tolist(), len(f)
    total = 0.0
    for j in range(n):
        s = [sum(a * b for a, b in zip(f[j], g[k])) / tau for k in range(n)]
        e = [math.exp(x) for x in s]
        p = [x / sum(e) for x in e]
        pos = [k for k in range(n) if y[k] == y[j]]  # k == j included
        neg = [k for k in range(n) if y[k] != y[j]]
        term = -sum(math.log(p[k] + EPS) for k in pos) / len(pos)
        if neg:
            term -= sum(math.log(1 - p[k] + EPS) for k in neg) / len(neg)
        total += term
    return total / n


def t_mc(f, g, y, tau):
    """L_mc per anchor with torch operations (differentiable), for the gradient checks."""
    f, g = F.normalize(f.float(), dim=1), F.normalize(g.float(), dim=1)
    terms = []
    for j in range(len(f)):
        p = torch.softmax(torch.stack([f[j] @ g[k] for k in range(len(g))]) / tau, dim=0)
        pos = [k for k in range(len(g)) if y[k] == y[j]]
        neg = [k for k in range(len(g)) if y[k] != y[j]]
        term = -torch.stack([torch.log(p[k] + EPS) for k in pos]).mean()
        if neg:
            term = term - torch.stack([torch.log(1 - p[k] + EPS) for k in neg]).mean()
        terms.append(term)
    return torch.stack(terms).mean()


def t_sym(f, g, y, tau):
    return t_mc(f, g, y, tau) + t_mc(g, f, y, tau)


def h_jsd(z1, z2):
    """0.5 mean_j sum_k [p log(p/q + eps) + q log(q/p + eps)] with Python floats."""
    out = 0.0
    for a, b in zip(z1.tolist(), z2.tolist()):
        p = [math.exp(x) / sum(math.exp(v) for v in a) for x in a]
        q = [math.exp(x) / sum(math.exp(v) for v in b) for x in b]
        out += sum(pi * math.log(pi / qi + EPS) + qi * math.log(qi / pi + EPS) for pi, qi in zip(p, q))
    return 0.5 * out / len(z1)


def t_jsd(z1, z2):
    p, q = z1.float().softmax(1), z2.float().softmax(1)
    return 0.5 * ((p * torch.log(p / q + EPS)).sum(1) + (q * torch.log(q / p + EPS)).sum(1)).mean()


def t_composition(module, t, v):
    """c = t + W [t / |t| ; v / |v|] + b and U c, written out."""
    cat = torch.cat([t / t.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)], dim=1)
    c = t + cat @ module.residual.weight.T + module.residual.bias
    return c @ module.classifier.weight.T + module.classifier.bias, c


# =============================================================================== the loss terms
def test_contrastive_matches_a_per_anchor_loop():
    g = torch.Generator().manual_seed(0)
    f, h = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 0, 3, 3, 2])
    for tau in (0.5, 0.1, 1.0):
        assert multiclass_contrastive(f, h, y, tau).item() == pytest.approx(h_mc(f, h, y, tau), rel=1e-5)
    assert symmetric_contrastive(f, h, y, 0.5).item() == pytest.approx(h_mc(f, h, y, 0.5) + h_mc(h, f, y, 0.5),
                                                                       rel=1e-5)


def test_the_paired_item_is_a_positive():
    """All labels distinct: the only positive of anchor j is k = j (the same clip across modalities)."""
    g = torch.Generator().manual_seed(1)
    f, h, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.arange(5)
    p = torch.softmax(F.normalize(f, dim=1) @ F.normalize(h, dim=1).T / 0.5, dim=1)
    off = ~torch.eye(5, dtype=torch.bool)
    expected = (-torch.log(p.diagonal() + EPS) - (torch.log(1 - p + EPS) * off).sum(1) / 4).mean()
    assert multiclass_contrastive(f, h, y, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    # and without the diagonal as a positive the anchors of unique classes would have none at all
    assert h_mc(f, h, y, 0.5) == pytest.approx(expected.item(), rel=1e-5)


def test_masked_rows_and_columns_leave_the_loss():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(8, 5, generator=g, requires_grad=True)
    h = torch.randn(8, 5, generator=g)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    loss = multiclass_contrastive(f, h, y, 0.5, mask)
    assert loss.item() == pytest.approx(h_mc(f[mask], h[mask], y[mask], 0.5), rel=1e-5)
    loss.backward()
    assert torch.all(f.grad[~mask] == 0) and torch.all(f.grad[mask].abs().sum(1) > 0)
    # the same holds for the symmetric KL and the composition's cross-entropy
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    assert symmetric_kl(z1, z2, mask).item() == pytest.approx(h_jsd(z1[mask], z2[mask]), rel=1e-5)
    assert masked_cross_entropy(z1, y, mask).item() == pytest.approx(F.cross_entropy(z1[mask], y[mask]).item(), rel=1e-6)


def test_a_row_without_negatives_drops_its_negative_term():
    g = torch.Generator().manual_seed(3)
    f, h = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.zeros(4, dtype=torch.long)  # one class: no negatives anywhere
    p = torch.softmax(F.normalize(f, dim=1) @ F.normalize(h, dim=1).T / 0.5, dim=1)
    expected = (-torch.log(p + EPS).mean(1)).mean()
    loss = multiclass_contrastive(f, h, y, 0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(h_mc(f, h, y, 0.5), rel=1e-5)


def test_no_sample_left_gives_zero_with_zero_gradients():
    f = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    none = torch.zeros(4, dtype=torch.bool)
    total = (multiclass_contrastive(f, f.detach() + 1, torch.arange(4), 0.5, none) + symmetric_kl(z, z.detach() * 2, none)
             + masked_cross_entropy(z, torch.arange(4), none))
    assert total.item() == 0.0
    total.backward()  # connected: the gradients exist and are zero (processes stay in step)
    assert torch.all(f.grad == 0) and torch.all(z.grad == 0)


def test_symmetric_kl_is_half_the_jeffreys_divergence():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    assert symmetric_kl(z1, z2).item() == pytest.approx(h_jsd(z1, z2), rel=1e-6)
    assert symmetric_kl(z1, z2).item() == pytest.approx(symmetric_kl(z2, z1).item(), rel=1e-7)
    assert abs(symmetric_kl(z1, z1).item()) < 1e-8  # only the epsilon's trace is left
    # it is 0.5 (KL(p||q) + KL(q||p)), not Jensen-Shannon
    p, q = z1.softmax(1), z2.softmax(1)
    jeffreys = ((p * (p / q).log()).sum(1) + (q * (q / p).log()).sum(1)).mean()
    assert symmetric_kl(z1, z2).item() == pytest.approx(0.5 * jeffreys.item(), rel=1e-5)
    # gradients reach both sides
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    symmetric_kl(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_composition_formula():
    torch.manual_seed(5)
    module = Composition(6, 6, 4)
    t, v = torch.relu(torch.randn(3, 6)) + 0.1, torch.randn(3, 6)
    logits, c = module(t, v)
    want_logits, want_c = t_composition(module, t, v)
    assert torch.allclose(c, want_c, atol=1e-6) and torch.allclose(logits, want_logits, atol=1e-6)
    assert module.residual.in_features == 12 and module.residual.out_features == 6  # W: [t^; v^] -> teacher space
    # the residual is added to the raw teacher feature: scaling t changes c by the scaled t
    c2 = module(2 * t, v)[1]
    assert torch.allclose(c2 - c, t, atol=1e-5)


def test_method_options_and_description():
    m = create_method("ccl")
    assert (m.mode, m.audio_temperature, m.image_temperature, m.loss_weight) == ("audio", 0.5, 0.1, 0.5)
    assert m.student_weight() == 1.0
    ai = create_method("ccl", mode="audio_image", image_teacher={"name": "resnet20", "config": "x.yaml"})
    assert ai.student_weight() == 0.5
    text = describe_method("ccl")
    assert "Compositional" in text and "mode = 'audio'" in text and "tasks: video" in text
    with pytest.raises(ValueError, match="method.options.mode"):
        create_method("ccl", mode="video")
    with pytest.raises(ValueError, match="image_teacher"):
        create_method("ccl", mode="image")
    with pytest.raises(ValueError, match="remove method.options.image_teacher"):
        create_method("ccl", image_teacher={"name": "resnet20"})
    with pytest.raises(ValueError, match="audio_temperature"):
        create_method("ccl", audio_temperature=0)


# =============================================================================== tiny networks
class Video(nn.Module):
    """N x 3 x T x H x W -> logits; its pooled feature is the classifier's input."""

    def __init__(self, classes=4, dim=8):
        super().__init__()
        self.conv = nn.Conv3d(3, dim, 3, padding=1)
        self.bn = nn.BatchNorm3d(dim)
        self.fc = nn.Linear(dim, classes)
        self.feature_spec = FeatureSpec((), Tap("fc", "input"))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3, 4)))


class Image(nn.Module):
    """N x C x H x W -> logits, pooled post-ReLU embedding of ``dim``."""

    def __init__(self, channels=3, classes=4, dim=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)
        self.fc = nn.Linear(dim, classes)
        self.feature_spec = FeatureSpec((), Tap("fc", "input"))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make_batch(seed=0, n=8, classes=4, no_audio=()):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(n, 1, 6, 5, generator=g)
    present = torch.ones(n, dtype=torch.bool)
    present[list(no_audio)] = False
    inputs = {"video": torch.randn(n, 3, 4, 6, 6, generator=g), "audio": audio, "audio_present": present}
    return Batch(inputs, torch.arange(n) % classes, torch.arange(n))


def make_recipe(method="ccl", seed=0, **options):
    torch.manual_seed(seed)
    return CrossModalDistillation(Video(), method, audio=Image(channels=1), image=Image(),
                                  num_classes=4, **options)


def optimisers(recipe, solver=None, schedule=None):
    solver = solver or SolverConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    factor = schedule.lr_factor if schedule else None
    return [group_optimiser(g, solver, factor) for g in recipe.groups(None)]


def take_step(recipe, batch, opts, seed=7):
    recipe.train()
    recipe.enter_stage(recipe.stages()[0])
    torch.manual_seed(seed)  # the image teacher's frame index
    out = recipe.train_step(batch, recipe.stages()[0], 0.0)
    step_groups(opts, out.losses, torch.amp.GradScaler("cpu", enabled=False))
    return out


def reference_losses(recipe, batch, mode, seed=7, weight=0.5):
    """L_v and each L_c written out from the formulas, on the non-detached graph (the reference's)."""
    torch.manual_seed(seed)
    x, y = batch.inputs["video"], batch.targets
    feats = {}
    hook = recipe.student.fc.register_forward_pre_hook(lambda m, a: feats.__setitem__("v", a[0]))
    z_v = recipe.student(x)
    hook.remove()
    v = feats["v"]
    w = weight if mode == "audio_image" else 1.0
    l_v, l_c = F.cross_entropy(z_v, y), {}
    teachers = []
    if mode in ("audio", "audio_image"):
        keep = batch.inputs["audio_present"]
        t_net = recipe.audio_teacher
        grab = {}
        h = t_net.fc.register_forward_pre_hook(lambda m, a: grab.__setitem__("t", a[0]))
        with torch.no_grad():
            t_net(batch.inputs["audio"])
        h.remove()
        keep = keep & (grab["t"].sum(1) != 0)
        teachers.append(("audio", grab["t"], keep, 0.5))
    if mode in ("image", "audio_image"):
        frame = int(torch.randint(x.shape[2], ()))
        grab = {}
        h = recipe.image_teacher.fc.register_forward_pre_hook(lambda m, a: grab.__setitem__("t", a[0]))
        with torch.no_grad():
            recipe.image_teacher(x[:, :, frame])
        h.remove()
        teachers.append(("image", grab["t"], torch.ones(len(y), dtype=torch.bool), 0.1))
    for modality, t, keep, tau in teachers:
        module = recipe.heads[f"composition_{modality}"]
        z_c, c = t_composition(module, t[keep], v[keep])
        yk, vk, zk, tk = y[keep], v[keep], z_v[keep], t[keep]
        jsd = t_jsd(zk, z_c)
        l_v = l_v + w * (t_sym(vk, c, yk, tau) + t_sym(vk, tk, yk, tau) + jsd)
        l_c[modality] = F.cross_entropy(z_c, yk) + t_sym(vk, c, yk, tau) + t_sym(c, tk, yk, tau) + jsd
    return l_v, l_c


# =============================================================================== the routing
@pytest.mark.parametrize("mode", ["audio", "image", "audio_image"])
def test_gradient_routing(mode):
    """After one step through the loop's rule: the student's gradient is grad L_v alone, each
    composition module's is grad (L_c + L_v); the teachers get none."""
    image = {"name": "tiny"} if mode != "audio" else None
    recipe = make_recipe("ccl", mode=mode, image_teacher=image)
    batch = make_batch(no_audio=(2, 5))
    twin = copy.deepcopy(recipe)  # the same weights before the step
    opts = optimisers(recipe)
    out = take_step(recipe, batch, opts)
    assert [o.group.name for o in opts] == [g for g in ("composition_audio", "composition_image", "student")
                                            if g == "student" or g.split("_")[1] in mode]
    twin.train()
    twin.enter_stage(twin.stages()[0])
    l_v, l_c = reference_losses(twin, batch, mode)
    # the recipe's loss values are the formulas'
    student_total = sum(out.losses["student"].values())
    assert student_total.item() == pytest.approx(l_v.item(), rel=1e-4)
    student_params = list(twin.student.parameters())
    want = torch.autograd.grad(l_v, student_params, retain_graph=True)
    for p, g in zip(recipe.student.parameters(), want):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    for modality, loss in l_c.items():
        assert sum(out.losses[f"composition_{modality}"].values()).item() == pytest.approx(loss.item(), rel=1e-4)
        params = list(twin.heads[f"composition_{modality}"].parameters())
        want = torch.autograd.grad(loss + l_v, params, retain_graph=True)
        own = torch.autograd.grad(loss, params, retain_graph=True)
        for p, g, o in zip(recipe.heads[f"composition_{modality}"].parameters(), want, own):
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
            assert not torch.allclose(p.grad, o, atol=1e-6, rtol=1e-4)  # L_v's share is there
    for teacher in (recipe.audio_teacher, recipe.image_teacher):
        if teacher is not None:
            assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
            assert not teacher.training


def test_masked_samples_leave_the_audio_terms_of_the_recipe():
    """A sample without audio changes only the student's cross-entropy, not the audio terms."""
    recipe = make_recipe("ccl", mode="audio")
    batch = make_batch(no_audio=(3,))
    recipe.train()
    recipe.enter_stage(recipe.stages()[0])
    out = recipe.train_step(batch, recipe.stages()[0], 0.0)
    other = make_batch(no_audio=(3,))
    other.inputs["audio"][3] = torch.randn(1, 6, 5) * 10  # what a sample without audio holds does not matter
    again = recipe.train_step(other, recipe.stages()[0], 0.0)
    for group in ("student", "composition_audio"):
        for key in out.losses[group]:
            assert out.losses[group][key].item() == pytest.approx(again.losses[group][key].item(), rel=1e-6)


def test_composition_schedule_and_optimiser():
    """Compositions: SGD lr 0.001, momentum 0.9, no Nesterov, wd 5e-4, constant across the student's
    milestones; the student follows the run's solver and schedule."""
    recipe = make_recipe("ccl", mode="audio_image", image_teacher={"name": "tiny"})
    schedule = RunSchedule(unit=2, length=4, kind="multistep", milestones=(1, 3), gamma=0.1)
    opts = {o.group.name: o for o in optimisers(recipe, schedule=schedule)}
    for name in ("composition_audio", "composition_image"):
        group = opts[name].optimizer.param_groups[0]
        assert isinstance(opts[name].optimizer, torch.optim.SGD)
        assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-3, 0.9, False, 5e-4)
    student = opts["student"].optimizer.param_groups[0]
    assert (student["lr"], student["nesterov"], student["weight_decay"]) == (0.1, True, 1e-4)
    seen = []
    for _ in range(7):
        for o in opts.values():
            o.optimizer.step()  # no gradients: nothing moves, only the order PyTorch expects
            o.scheduler.step()
        seen.append({k: o.optimizer.param_groups[0]["lr"] for k, o in opts.items()})
    assert [round(s["student"], 6) for s in seen] == [0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001]
    assert all(s["composition_audio"] == s["composition_image"] == 1e-3 for s in seen)


# =============================================================================== baselines
def test_kd_baseline_is_hinton_kd_from_the_audio_logits():
    recipe = make_recipe("kd")
    assert recipe.ce_weight == 0.1 and not recipe.heads
    batch = make_batch(no_audio=(1,))
    recipe.train()
    recipe.enter_stage(recipe.stages()[0])
    out = recipe.train_step(batch, recipe.stages()[0], 0.0)
    with torch.no_grad():
        z_t = recipe.audio_teacher(batch.inputs["audio"])
    z_v = recipe.student(batch.inputs["video"])
    keep = batch.inputs["audio_present"]
    p_t, log_s = F.softmax(z_t[keep] / 4, 1), F.log_softmax(z_v[keep] / 4, 1)
    want = 0.9 * 16 * (p_t * (p_t.log() - log_s)).sum(1).mean()
    assert out.losses["student"]["kd"].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    assert out.losses["student"]["ce"].item() == pytest.approx(0.1 * F.cross_entropy(z_v, batch.targets).item(), rel=1e-5)


def test_kd_and_fitnet_take_a_teacher_of_another_feature_size():
    for method in ("kd", "fitnet"):
        recipe = CrossModalDistillation(Video(), method, audio=Image(1, dim=5), num_classes=4)
        out = recipe.train_step(make_batch(), recipe.stages()[0], 0.0)
        assert all(torch.isfinite(v) for v in out.losses["student"].values()), method


def test_fitnet_baseline_hints_the_pooled_feature():
    recipe = make_recipe("fitnet", weight=2.0)
    hint = recipe.heads["hint"]
    assert isinstance(hint, nn.Linear) and (hint.in_features, hint.out_features) == (8, 8)
    assert [g.name for g in recipe.groups(None)] == ["student"]
    assert any(p is hint.weight for p in recipe.groups(None)[0].params)  # trained with the student
    batch = make_batch(no_audio=(0, 4))
    recipe.train()
    out = recipe.train_step(batch, recipe.stages()[0], 0.0)
    grab = {}
    h1 = recipe.student.fc.register_forward_pre_hook(lambda m, a: grab.__setitem__("v", a[0]))
    h2 = recipe.audio_teacher.fc.register_forward_pre_hook(lambda m, a: grab.__setitem__("t", a[0]))
    recipe.student(batch.inputs["video"])
    with torch.no_grad():
        recipe.audio_teacher(batch.inputs["audio"])
    h1.remove(), h2.remove()
    keep = batch.inputs["audio_present"]
    want = 2.0 * F.mse_loss(hint(grab["v"][keep]), grab["t"][keep])
    assert out.losses["student"]["fitnet"].item() == pytest.approx(want.item(), rel=1e-5)


class Features(nn.Module):
    """A teacher whose input is its feature (precomputed): no classifier, no feature_spec."""

    def forward(self, x):
        return x


def test_precomputed_teacher():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="kd needs the audio teacher's logits"):
        CrossModalDistillation(Video(), "kd", audio=Features(), num_classes=4)
    recipe = CrossModalDistillation(Video(), "ccl", audio=Features(), num_classes=4)
    batch = make_batch()
    batch.inputs["audio"] = torch.relu(torch.randn(8, 8))
    batch.inputs["audio"][6] = 0  # a missing .npy file: zeros, masked by its sum
    recipe.train()
    out = recipe.train_step(batch, recipe.stages()[0], 0.0)
    assert all(torch.isfinite(v) for terms in out.losses.values() for v in terms.values())
    batch.inputs["audio"] = torch.randn(8, 5)
    with pytest.raises(ValueError, match="5-d"):
        recipe.train_step(batch, recipe.stages()[0], 0.0)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="not available for a video student"):
        CrossModalDistillation(Video(), "reviewkd", audio=Image(1), num_classes=4)
    with pytest.raises(ValueError, match="needs the audio teacher"):
        CrossModalDistillation(Video(), "fitnet", num_classes=4)
    with pytest.raises(ValueError, match="hint_stage"):
        CrossModalDistillation(Video(), "fitnet", audio=Image(1), num_classes=4, hint_stage=2)
    with pytest.raises(ValueError, match="same size"):
        CrossModalDistillation(Video(), "ccl", audio=Image(1, dim=5), num_classes=4)


def test_checkpoint_state_holds_student_and_heads():
    recipe = make_recipe("ccl", mode="audio_image", image_teacher={"name": "tiny"})
    state = recipe.trained_state()
    assert set(state) == {"student", "heads"}
    assert any(k.startswith("composition_audio.") for k in state["heads"])
    assert not any("teacher" in k for k in state["heads"]) and "conv.weight" in state["student"]
    other = make_recipe("ccl", seed=1, mode="audio_image", image_teacher={"name": "tiny"})
    other.load_trained_state(copy.deepcopy(state))
    for a, b in zip(recipe.heads.parameters(), other.heads.parameters()):
        assert torch.equal(a, b)


# =============================================================================== end to end (embedded set)
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from reviewkd.cli import main  # noqa: E402
from reviewkd.engine.checkpoint import load_checkpoint  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "av_fashion_mnist"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


TINY_DATA = ["video.embedded.train=48", "video.embedded.test=24", "video.embedded.utterances=2", "data.batch_size=16",
             "data.eval_batch_size=48", "solver.epochs=1"]


def tiny_overrides(root: Path, stem: str, *more: str) -> list[str]:
    """A few dozen clips, one epoch of a handful of steps, in fp32 (exact comparisons); the teachers
    trained first get the same data (a teacher's config receives only where to run from the student)."""
    from reviewkd.config import load_config

    cfg, teachers = load_config(CONFIGS / f"{stem}.yaml"), []
    if cfg.teacher is not None:  # the recipe's own teacher overrides (its model), then the tiny data
        teachers.append(f"teacher.overrides=[{','.join([*cfg.teacher.overrides, *TINY_DATA])}]")
    image = cfg.method.options.get("image_teacher")
    if image:
        teachers.append(f"method.options.image_teacher.overrides=[{','.join([*image.get('overrides', []), *TINY_DATA])}]")
    return [f"output_dir={root / 'runs'}", f"data.root={root / 'data'}", *TINY_DATA, "runtime.precision=fp32",
            *teachers, *more]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`reviewkd train` of the audio + image CCL recipe: both teachers are trained first from their configs."""
    root = tmp_path_factory.mktemp("ccl")
    args = tiny_overrides(root, "ccl_audio_image", "solver.epochs=2")
    assert main(["train", str(CONFIGS / "ccl_audio_image.yaml"), *args, "--no-progress"]) == 0
    return root


@needs_espeak
def test_train_runs_teachers_first_then_the_student(trained):
    runs = trained / "runs"
    for teacher in ("avfm_audio_teacher", "avfm_frame_teacher"):
        assert load_checkpoint(runs / teacher / "last.pt")["done"], teacher
    ckpt = load_checkpoint(runs / "avfm_ccl_audio_image" / "last.pt")
    assert ckpt["done"] and ckpt["method_name"] == "ccl" and ckpt["epoch"] == 2
    assert {k.split(".")[0] for k in ckpt["heads"]} == {"composition_audio", "composition_image"}
    assert set(ckpt["optimizers"]) == {"composition_audio", "composition_image", "student"}
    row = ckpt["history"][-1]
    for key in ("loss_student_ce", "loss_student_contrast_audio", "loss_student_jsd_image",
                "loss_composition_audio_contrast", "loss_composition_image_ce"):
        assert math.isfinite(row[key]), key
    assert 0.0 <= ckpt["metrics"]["test_top1"] <= 100.0
    # the composition optimisers kept their constant LR
    assert ckpt["optimizers"]["composition_audio"]["param_groups"][0]["lr"] == 0.05


@needs_espeak
def test_resume_is_exact(trained):
    root = trained
    args = ["train", str(CONFIGS / "ccl_audio_image.yaml"),
            *tiny_overrides(root, "ccl_audio_image", "solver.epochs=2", "name=resumed"), "--no-progress"]
    assert main([*args, "--stop-after", "1"]) == 0
    assert main([*args, "--resume"]) == 0
    a = load_checkpoint(root / "runs" / "avfm_ccl_audio_image" / "last.pt")
    b = load_checkpoint(root / "runs" / "resumed" / "last.pt")
    for part in ("student", "heads"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for group in a["optimizers"]:
        for sa, sb in zip(a["optimizers"][group]["state"].values(), b["optimizers"][group]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), group
    assert a["metrics"] == b["metrics"]


@needs_espeak
def test_export_holds_the_video_student_only(trained):
    from reviewkd.export import export_student

    run = trained / "runs" / "avfm_ccl_audio_image"
    results = export_student(run / "best.pt", trained / "export", ["pt"])
    exported = torch.load(results["pt"]["path"], weights_only=True)["model"]
    ckpt = load_checkpoint(run / "best.pt")
    assert exported.keys() == ckpt["student"].keys()
    assert not any("composition" in k or "teacher" in k for k in exported)


@needs_espeak
def test_single_teacher_recipes_and_baselines_train(trained):
    """The other embedded recipes run from the teachers trained above (no teacher retrained)."""
    for stem in ("ccl_audio", "ccl_image", "kd_audio", "fitnet_audio"):
        assert main(["train", str(CONFIGS / f"{stem}.yaml"), *tiny_overrides(trained, stem), "--no-progress"]) == 0, stem
        ckpt = load_checkpoint(trained / "runs" / f"avfm_{stem}" / "last.pt")
        assert ckpt["done"] and all(math.isfinite(v) for k, v in ckpt["history"][-1].items() if k.startswith("loss_"))
    heads = load_checkpoint(trained / "runs" / "avfm_fitnet_audio" / "last.pt")["heads"]
    assert set(heads) == {"hint.weight", "hint.bias"}


@pytest.mark.slow
@needs_espeak
def test_torchrun_two_processes(trained):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reviewkd",
           "train", str(CONFIGS / "ccl_audio_image.yaml"), *tiny_overrides(trained, "ccl_audio_image", "name=ddp"),
           "--no-progress"]
    result = subprocess.run(cmd, cwd=trained, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(trained / "runs" / "ddp" / "last.pt")
    assert ckpt["done"] and math.isfinite(ckpt["history"][-1]["loss_total"])
    assert result.stdout.count("best top-1") <= 1  # only rank 0 reports


def test_missing_image_teacher_weights_name_the_option(tmp_path, capsys):
    """Refused in the cheap checks, in one line that names the option to set."""
    rc = main(["train", str(CONFIGS / "ccl_image.yaml"), f"output_dir={tmp_path}", "--dry-run",
               "method.options.image_teacher.config=null",
               "method.options.image_teacher.checkpoint=/nonexistent/resnet34-b627a593.pth"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "weights file not found: /nonexistent/resnet34-b627a593.pth" in err
    assert "method.options.image_teacher.checkpoint" in err
    assert not (tmp_path / "avfm_ccl_image").exists()
