"""Helpers shared by several methods, kept in one place so their behaviour cannot drift apart."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import IncompatiblePairError, Step
from .kd import kd_loss


def float32(x: torch.Tensor):
    """A context with autocast off on ``x``'s device: losses are computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def match_spatial(a: torch.Tensor, b: torch.Tensor, to: str = "smaller") -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool two N x C x H x W maps to one height and width.

    ``to="smaller"`` (AT, NST, VID, FT, FSP, feature_mse): whichever map is larger is pooled, per
    dimension, to the smaller size. ``to="first"`` (OFD, whose reference code, mdistiller, does so):
    ``b`` is pooled to ``a``'s size, even when ``b`` is the smaller one.
    """
    if to == "first":
        size = tuple(a.shape[-2:])
    elif to == "smaller":
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    else:
        raise ValueError(f"match_spatial: to must be 'smaller' or 'first', got {to!r}")
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


# ------------------------------------------------------------------ stage checks, with a fix to suggest


def choose_stages(n_student: int, n_teacher: int) -> str:
    """The fix for unequal stage counts: keep the deepest stages of the side that has more."""
    if min(n_student, n_teacher) == 0:  # no selection helps when one side has no stage at all
        return "give the network without stages at least one stage in its FeatureSpec"
    if n_teacher > n_student:
        hint = f"teacher_stages={list(range(n_teacher - n_student + 1, n_teacher + 1))}"
    else:
        hint = f"student_stages={list(range(n_student - n_teacher + 1, n_student + 1))}"
    return f"choose stages, e.g. {hint} (1-based, shallow to deep)"


def require_stage_maps(probe: Step, method: str) -> None:
    """Both networks must declare a stage besides the pooled feature (the last entry)."""
    bare = [name for name, f in ((probe.student_name, probe.student_features),
                                 (probe.teacher_name, probe.teacher_features)) if len(f) < 2]
    if bare:
        raise IncompatiblePairError(
            f"{method} compares stage feature maps, but {' and '.join(bare)} "
            f"{'declares' if len(bare) == 1 else 'declare'} no stage besides the pooled feature: "
            "give its FeatureSpec at least one stage"
        )


def require_equal_stage_counts(probe: Step, method: str) -> int:
    """The number of stages both sides have, for methods that pair stages one to one."""
    ns, nt = len(probe.student_features) - 1, len(probe.teacher_features) - 1
    if ns != nt:
        raise IncompatiblePairError(
            f"{method} pairs stages one to one, but {probe.student_name} has {ns} stages and "
            f"{probe.teacher_name} has {nt} (not counting the pooled feature): {choose_stages(ns, nt)}"
        )
    return ns


# ------------------------------------------------------------------ connectors


def resize_conv(s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]) -> nn.Module | None:
    """The benchmark's (RepDistiller ``ConvReg``) conv from a student C x H x W map to the teacher's.

    3x3 stride 2 when the student map is twice the teacher's, 4x4 stride-2 transposed when it is
    half, otherwise a "valid" conv of kernel (1 + Hs - Ht) x (1 + Ws - Wt) (1x1 for equal sizes);
    None when the student map is smaller by another factor (each method says what to do then).
    """
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if (hs, ws) == (2 * ht, 2 * wt):
        return nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    if (2 * hs, 2 * ws) == (ht, wt):
        return nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    if hs >= ht and ws >= wt:
        return nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    return None


# ------------------------------------------------------------------ optional KD term


class OptionalKD:
    """Mixin for methods whose recipe may add Hinton's KD on the logits (``kd_weight > 0``)."""

    def init_kd(self, kd_weight: float, temperature: float) -> None:
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        # logits are read (and provided) only when the KD term is on
        self.reads = replace(self.reads, logits=self.kd_weight > 0)

    def add_kd(self, losses: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature)
        return losses
