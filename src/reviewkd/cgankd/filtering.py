"""The teacher's filter and label adjustment (cGAN-KD stages 3-4).

Filter: each generated image gets a score, the teacher's cross-entropy with respect to the label it
was generated for (classification, ``kind="ce"``) or the teacher's absolute error against that label
(regression, ``kind="abs_error"``). The cut-off is the ``rho``-quantile (linear interpolation, as
numpy's default) of burn-in scores: per class (the final classification version: ``scope=
"per_class"``) or over all samples at once (v1 and regression: ``scope="global"``). Kept: scores
strictly below the cut-off, so about ``rho`` of the images survive. Adjustment (after filtering):
the teacher's hard argmax, or its prediction clipped to [0, 1]; ``TeacherFilter.judge`` takes it
from the same teacher pass as the score, as the released filter does (with the final version's
augmented pass, the argmax of that cropped / flipped view).

A teacher here is a callable: uint8 images N x C x H x W -> logits (classification) or predictions
on the generator's label scale [0, 1] (regression); ``teacher_function`` makes one from a trained
checkpoint with its own evaluation preprocessing.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

Kind = Literal["ce", "abs_error"]


def teacher_function(path, device="cpu", batch_size: int = 500,
                     label_range: Optional[tuple[float, float]] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A classification / regression run checkpoint as uint8 images -> outputs, with the input
    preprocessing its evaluation used (padding, grey -> RGB, mean / std). Regression: predictions in
    the original unit, or mapped to [0, 1] by ``label_range`` = (min, max) of the training targets."""
    from ..data.augment import BatchAugment
    from ..predict import load_student

    loaded = load_student(path)
    spec = loaded.meta["preprocessing"]
    prepare = BatchAugment(mean=tuple(spec["mean"]), std=tuple(spec["std"]), train=False, channels=spec["channels"],
                           pad_to=tuple(spec["pad_to"]) if spec.get("pad_to") else None)
    model = loaded.model.to(device).eval()
    regression = loaded.task == "regression"
    if regression:
        from ..data.regression import TargetScaler

        scaler = TargetScaler.from_dict(loaded.meta["target_scaler"])

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, len(images), batch_size):
            out = model(prepare(images[start:start + batch_size].to(device))).float()
            if regression:
                out = scaler.denormalise(out.view(-1))
                if label_range is not None:
                    out = (out - label_range[0]) / (label_range[1] - label_range[0])
            outs.append(out.cpu())
        return torch.cat(outs)

    return run


def filter_scores(teacher: Callable, images: torch.Tensor, labels: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Per image: CE of the teacher's logits w.r.t. ``labels``, or |prediction - label| with the
    prediction first clipped to the label scale [0, 1] (as the released regression filter does)."""
    return _scores(teacher(images), labels, kind)


def _scores(outputs: torch.Tensor, labels: torch.Tensor, kind: Kind) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(outputs.float(), labels.long(), reduction="none")
    if kind == "abs_error":
        return (outputs.float().view(-1).clamp(0.0, 1.0) - labels.float()).abs()
    raise ValueError(f"filter kind must be 'ce' or 'abs_error', got {kind!r}")


def _adjusted(outputs: torch.Tensor, kind: Kind) -> torch.Tensor:
    if kind == "ce":
        return outputs.argmax(dim=1).long()
    if kind == "abs_error":
        return outputs.float().view(-1).clamp(0.0, 1.0)
    raise ValueError(f"kind must be 'ce' or 'abs_error', got {kind!r}")


class TeacherFilter:
    """Cut-offs from burn-in samples (``fit``), then ``keep`` masks; see the module docstring."""

    def __init__(self, teacher: Callable, rho: float = 0.9, scope: Literal["per_class", "global"] = "per_class",
                 kind: Kind = "ce", burn_in: int = 1000, augment: Optional[Callable] = None):
        if not 0 < rho <= 1:
            raise ValueError(f"filter rho must be in (0, 1], got {rho}")
        if scope not in ("per_class", "global"):
            raise ValueError(f"filter scope must be 'per_class' or 'global', got {scope!r}")
        if scope == "per_class" and kind != "ce":
            raise ValueError("a per-class cut-off needs class labels (kind 'ce'); regression filters globally")
        self.teacher, self.rho, self.scope, self.kind, self.burn_in = teacher, rho, scope, kind, burn_in
        self.augment = augment  # e.g. the teacher's training transform (the final version's quirk)
        self.cutoff: Optional[float] = None
        self.cutoffs: dict[int, float] = {}

    def _outputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.augment(images) if self.augment is not None else images)

    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _scores(self._outputs(images), labels, self.kind)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> "TeacherFilter":
        """Cut-off(s) from burn-in images: the rho-quantile of their scores, per class or global."""
        scores = self.scores(images, labels)
        if self.scope == "global":
            self.cutoff = torch.quantile(scores.double(), self.rho).item()
        else:
            for c in labels.long().unique().tolist():
                self.cutoffs[c] = torch.quantile(scores[labels.long() == c].double(), self.rho).item()
        return self

    def keep(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the images whose score is strictly below their cut-off."""
        return self.judge(images, labels)[0]

    def judge(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep mask, the teacher's adjusted labels) from one teacher pass, as the released filter
        takes both the CE and the argmax from the same (possibly augmented) outputs."""
        if self.scope == "global" and self.cutoff is None:
            raise RuntimeError("call fit() on burn-in samples before keep()")
        missing = set() if self.scope == "global" else set(labels.long().unique().tolist()) - set(self.cutoffs)
        if missing:
            raise RuntimeError(f"no cut-off for class(es) {sorted(missing)}: fit() on burn-in samples of them first")
        outputs = self._outputs(images)
        scores = _scores(outputs, labels, self.kind).double()
        if self.scope == "global":
            cut = torch.tensor(self.cutoff, dtype=torch.float64)
        else:
            cut = torch.tensor([self.cutoffs[c] for c in labels.long().tolist()], dtype=torch.float64)
        return scores < cut, _adjusted(outputs, self.kind)

    def collect(self, sampler, label: int, n: int, seed: int = 0, chunk: int = 2500) -> tuple[torch.Tensor, dict]:
        """The final version's per-class loop: ``burn_in`` sampled images of ``label`` set its cut-off,
        then chunks are sampled and filtered until ``n`` are kept. Returns (uint8 images, stats)."""
        burn, burn_stats = sampler.sample(label, self.burn_in, seed=seed)
        labels = lambda k: torch.full((k,), label, dtype=torch.long)  # noqa: E731
        self.fit(burn, labels(len(burn)))
        kept, got, seen, round_ = [], 0, 0, 1
        while got < n:
            images, _ = sampler.sample(label, chunk, seed=seed + round_)
            mask = self.keep(images, labels(len(images)))
            kept.append(images[mask])
            got, seen, round_ = got + int(mask.sum()), seen + len(images), round_ + 1
        stats = {"cutoff": self.cutoffs[label], "seen": seen, "kept": got, "kept_fraction": got / max(seen, 1),
                 "burn_in_acceptance_rate": burn_stats["acceptance_rate"]}
        return torch.cat(kept)[:n], stats


@torch.inference_mode()
def adjust_labels(teacher: Callable, images: torch.Tensor, kind: Kind = "ce") -> torch.Tensor:
    """The teacher's hard label (argmax, int64) or its prediction clipped to [0, 1] (float)."""
    return _adjusted(teacher(images), kind)
