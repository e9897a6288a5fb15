"""Conditional density-ratio rejection sampling (cGAN-KD stage 2c, cDR-RS).

Per label: a burn-in of ``burn_in`` generated images sets M = their largest ratio; then batches of
``batch_size`` are generated, M <- max(M, the batch's largest ratio) (before the batch is judged,
as the reference does), and each image is accepted when u <= r / M with u ~ U(0, 1). M only grows,
so the acceptance probability of later images can fall. A weak density-ratio model can make one label
take very long: ``report`` gets a line every ``report_seconds`` while a label is being sampled.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .gan import to_uint8


class RejectionSampler:
    """``generator(z, labels)`` -> images in [-1, 1] (with ``z_dim``), ``ratio(images, labels)`` -> r >= 0."""

    def __init__(self, generator, ratio: Callable, burn_in: int = 5000, batch_size: int = 600,
                 device: Optional[torch.device | str] = None):
        if burn_in < 1 or batch_size < 1:
            raise ValueError(f"burn_in and batch_size must be positive, got {burn_in} and {batch_size}")
        self.generator, self.ratio = generator, ratio
        self.burn_in, self.batch_size = burn_in, batch_size
        self.device = torch.device(device) if device is not None else _device_of(generator)

    @torch.inference_mode()
    def _draw(self, label, count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` images of ``label`` (on the CPU, in [-1, 1]) and their ratios."""
        images, ratios = [], []
        for start in range(0, count, self.batch_size):
            n = min(self.batch_size, count - start)
            z = torch.randn(n, self.generator.z_dim, generator=rng).to(self.device)
            labels = torch.full((n,), float(label) if self._continuous(label) else int(label),
                                dtype=torch.float32 if self._continuous(label) else torch.long, device=self.device)
            x = self.generator(z, labels)
            images.append(x.float().cpu())
            ratios.append(self.ratio(x, labels).float().view(-1).cpu())
        return torch.cat(images), torch.cat(ratios)

    def _continuous(self, label) -> bool:
        """Continuous labels: a generator without classes, or a float label."""
        return getattr(self.generator, "num_classes", 0) is None or isinstance(label, float) or (
            torch.is_tensor(label) and label.is_floating_point())

    def sample(self, label, n: int, seed: int = 0, report: Optional[Callable[[str], None]] = None,
               report_seconds: float = 60.0) -> tuple[torch.Tensor, dict]:
        """``n`` accepted images of ``label`` as uint8 N x C x H x W, and statistics: ``drawn``
        (after the burn-in), ``accepted`` (before keeping the first n), ``acceptance_rate``,
        ``M_burn_in`` and the final ``M``."""
        rng = torch.Generator().manual_seed(seed)
        last_report = time.monotonic()
        _, burn = self._draw(label, self.burn_in, rng)
        m = m_burn_in = burn.max().item()
        kept, got, drawn, accepted = [], 0, 0, 0
        while got < n:
            images, r = self._draw(label, self.batch_size, rng)
            m = max(m, r.max().item())
            u = torch.rand(len(r), generator=rng)
            accept = u <= r / m if m > 0 else torch.zeros(len(r), dtype=torch.bool)
            drawn += len(r)
            accepted += int(accept.sum())
            if accept.any():
                kept.append(images[accept])
                got += int(accept.sum())
            if report is not None and time.monotonic() - last_report >= report_seconds:
                last_report = time.monotonic()
                report(f"label {label}: {min(got, n)}/{n} accepted of {drawn} drawn "
                       f"(rate {accepted / drawn:.4f}, M {m:.4g})")
            if drawn > 1000 * max(n, self.batch_size) and got == 0:
                raise RuntimeError(f"rejection sampling accepted nothing for label {label} in {drawn} draws (M={m}): "
                                   "the density-ratio model gives ~0 everywhere; retrain it")
        images = torch.cat(kept)[:n]
        stats = {"drawn": drawn, "accepted": accepted, "acceptance_rate": accepted / max(drawn, 1),
                 "M_burn_in": m_burn_in, "M": m}
        return to_uint8(images), stats


def _device_of(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
