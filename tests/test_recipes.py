"""Recipes and the loop's step rule: optimiser groups with gradient routing, teachers that read
another input or precomputed outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reviewkd as rk
from reviewkd.config import SolverConfig
from reviewkd.engine.loop import group_optimiser, step_groups
from reviewkd.methods import DistillMethod, Reads, Step, register_method
from reviewkd.recipes import Group, PrecomputedTeacher


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value))


def _groups(w_a, w_b, order):
    solver = SolverConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    made = {"a": group_optimiser(Group("a", [w_a]), solver), "b": group_optimiser(Group("b", [w_b]), solver)}
    return [made[name] for name in order]


def _toy_losses(w_a, w_b, detach: bool):
    """y_a = w_a x, y_b = w_b y_a; loss_a = (y_a - 3)^2 (group a), loss_b = (y_b - 1)^2 (group b)."""
    x = torch.tensor(2.0)
    y_a = w_a * x
    y_b = w_b * (y_a.detach() if detach else y_a)
    return {"a": {"fit": (y_a - 3) ** 2}, "b": {"fit": (y_b - 1) ** 2}}


def test_a_group_receives_the_gradients_of_the_groups_after_it_and_not_of_those_before():
    # w_a = 0.5, w_b = 1.5, x = 2: y_a = 1, y_b = 1.5
    # d loss_a / d w_a = 2 (y_a - 3) x = -8;  d loss_b / d w_a = 2 (y_b - 1) w_b x = 3;  d loss_b / d w_b = 2 (y_b - 1) y_a = 1
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    # order (a, b): a's gradients are zeroed before a's pass, b's pass then adds its part -> a gets two losses
    w_a, w_b = _scalar(0.5), _scalar(1.5)
    step_groups(_groups(w_a, w_b, "ab"), _toy_losses(w_a, w_b, detach=False), scaler)
    assert w_a.item() == pytest.approx(0.5 - 0.1 * (-8 + 3))
    assert w_b.item() == pytest.approx(1.5 - 0.1 * 1)

    # order (b, a): a's gradients are zeroed after b's pass -> a gets its own loss only
    w_a, w_b = _scalar(0.5), _scalar(1.5)
    step_groups(_groups(w_a, w_b, "ba"), _toy_losses(w_a, w_b, detach=False), scaler)
    assert w_a.item() == pytest.approx(0.5 - 0.1 * (-8))
    assert w_b.item() == pytest.approx(1.5 - 0.1 * 1)

    # detached inputs (sequential updates, as online distillation): no gradient crosses groups
    w_a, w_b = _scalar(0.5), _scalar(1.5)
    step_groups(_groups(w_a, w_b, "ab"), _toy_losses(w_a, w_b, detach=True), scaler)
    assert w_a.item() == pytest.approx(0.5 - 0.1 * (-8))
    assert w_b.item() == pytest.approx(1.5 - 0.1 * 1)


def test_group_clipping_and_constant_schedules():
    w = _scalar(0.0)
    solver = SolverConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
    g = group_optimiser(Group("g", [w], lr=0.5, schedule="constant", clip=2.0), solver, lr_factor=lambda it: 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_groups([g], {"g": {"l": 10.0 * w}}, scaler)  # gradient 10, clipped to norm 2, lr 0.5 (constant)
    assert w.item() == pytest.approx(-1.0)
    assert g.optimizer.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------------------- teachers
@register_method
class _MaskedFeatureMatch(DistillMethod):
    """Test-only: MSE between the student's pooled feature and the teacher's, on samples the
    teacher has (``teacher_mask``)."""

    name = "_test_masked_match"
    paper = "test"
    reads = Reads(student_features="post", teacher_features="post", logits=False, index=True)

    def forward(self, step: Step) -> dict:
        s, t = step.student_features[-1].flatten(1), step.teacher_features[-1].flatten(1)
        mask = step.teacher_mask if step.teacher_mask is not None else torch.ones(len(s), dtype=torch.bool)
        self.last_mask, self.last_student, self.last_teacher = mask, s.detach(), t
        return {"match": ((s - t) ** 2).mean(dim=1)[mask].sum() / mask.sum().clamp(min=1)}


def test_precomputed_teacher_from_a_folder_masks_missing_entries(tmp_path):
    student = rk.create_model("resnet8", 10)  # pooled feature: 64 channels
    keys = [f"video_{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    stored = {k: rng.standard_normal(64).astype(np.float32) for k in keys if k != "video_3"}
    for key, value in stored.items():
        np.save(tmp_path / f"{key}.npy", value)
    teacher = PrecomputedTeacher(tmp_path, keys)
    assert teacher.missing == 1 and teacher.present.tolist() == [True, True, True, False, True, True]
    assert torch.equal(teacher.values[3], torch.zeros(64))
    assert torch.equal(teacher.values[4], torch.from_numpy(stored["video_4"]))

    d = rk.Distiller(student, teacher, "_test_masked_match")
    x = torch.randn(3, 3, 32, 32)
    index = torch.tensor([4, 3, 0])
    _, losses = d(x, torch.tensor([0, 1, 2]), index=index)
    m = d.method
    assert m.last_mask.tolist() == [True, False, True]
    # the teacher's rows are the stored vectors of the batch's dataset indices (zeros where missing)
    assert torch.equal(m.last_teacher[0], torch.from_numpy(stored["video_4"]))
    assert torch.equal(m.last_teacher[1], torch.zeros(64))
    assert torch.equal(m.last_teacher[2], torch.from_numpy(stored["video_0"]))
    s = m.last_student.double()
    t = torch.from_numpy(np.stack([stored["video_4"], stored["video_0"]])).double()
    expected = ((s[[0, 2]] - t) ** 2).mean(dim=1).mean()
    assert losses["match"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(FileNotFoundError, match="none of the 2"):
        PrecomputedTeacher(tmp_path / "..", ["a", "b"])
    with pytest.raises(ValueError, match="dataset indices"):
        teacher.lookup(None)


def test_teacher_reads_another_input_of_the_batch():
    student, teacher = rk.create_model("resnet8", 10), rk.create_model("resnet14", 10)
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    d = rk.Distiller(student, teacher, "kd", teacher_input="frame", teacher_input_size=(3, 24, 24))
    assert seen == [(2, 3, 24, 24)]  # the probe gave the teacher its own input size
    x, frame = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 24, 24)
    _, losses = d(x, torch.arange(4), inputs={"frame": frame})
    assert seen[-1] == (4, 3, 24, 24) and torch.isfinite(losses["kd"])
    with pytest.raises(KeyError, match="frame"):
        d(x, torch.arange(4))
