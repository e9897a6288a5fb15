"""Recipes that train the cGAN-KD components in the one engine: the conditional GAN (``GanRecipe``)
and the conditional density-ratio model (``DreRecipe``); the tasks are ``tasks/cgan.py``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..batch import Batch
from ..recipes.base import Group, Recipe, Stage, StepOutput
from .dre import DensityRatio, density_ratio_loss
from .gan import (Discriminator, Generator, diff_augment, ema_update, from_uint8, generator_copy, hinge_d_loss,
                  hinge_g_loss, soft_vicinity_weights, vicinity_parameters)


class GanRecipe(Recipe):
    """Hinge-loss conditional GAN with DiffAugment, ``d_steps`` D steps per G step and an EMA
    generator (the deployable: evaluated, saved as the student, used downstream).

    One engine iteration is one D step on the iteration's real batch. After every ``d_steps`` D
    steps the next iteration also makes the G step, computed before that iteration's D step (the
    groups run generator first, so D's gradients are zeroed after G's backward pass and D receives
    only its own loss): the G step sees D after all ``d_steps`` updates, as in BigGAN; the D step of
    the same iteration sees the generator before that G update (BigGAN's would see it after: one
    G update of staleness in one of ``d_steps`` D steps). In the other iterations the generator sits
    out (``StepOutput.idle``) and logs -mean D(fake) of the D step's fakes as its loss value.
    Fake labels are drawn uniformly over the classes (BigGAN); D steps use fakes made without
    gradient in training mode (the generator's BatchNorm statistics update, as BigGAN's).
    The EMA: after each G step t (counted from 1), ema <- d ema + (1 - d) G with d = 0 while
    t < ``ema_start`` and ``ema_decay`` after, over the whole state (BigGAN).

    Continuous labels (CcGAN, soft vicinity): per D step, target labels y = (a distinct training label
    drawn uniformly) + N(0, sigma^2) noise, not clipped (the released UTKFace run: clip_label=False);
    each real image is drawn among the training images whose label lies where the weight
    exp(-nu (y' - y)^2) exceeds ``weight_threshold`` (the target's noise is redrawn while none does);
    fake labels uniformly in that interval intersected with [0, 1], U(max(0, y - r), min(1, y + r));
    both terms of the hinge loss weighted by those weights, D conditioned on y. The
    G step draws targets the same way. The loader's real batch then only sets the batch size and
    the epoch length (the real images are drawn from the training set held here).
    """

    def __init__(self, generator: Generator, discriminator: Discriminator, options,
                 real_images: Optional[torch.Tensor] = None, real_labels: Optional[torch.Tensor] = None):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.ema = generator_copy(generator)
        self.options = options
        self.continuous = generator.num_classes is None
        self.d_steps_done, self.g_steps_done = 0, 0
        self._g_turn = False
        if self.continuous:
            if real_images is None or real_labels is None:
                raise ValueError("a continuous-label GAN needs the training images and labels")
            kappa, nu, sigma = vicinity_parameters(real_labels, options.kappa_arg)
            self.kappa, self.nu, self.sigma = kappa, nu, sigma
            self.radius = math.sqrt(-math.log(options.weight_threshold) / nu)
            self.register_buffer("real_images", real_images, persistent=False)
            self.register_buffer("real_labels", real_labels.float(), persistent=False)
            self.register_buffer("unique_labels", torch.unique(real_labels.float()), persistent=False)

    # ------------------------------------------------------------------ structure
    def stages(self) -> list[Stage]:
        return [Stage("gan", ("generator", "discriminator"))]

    def groups(self, stage: Stage) -> list[Group]:
        o = self.options
        adam = lambda params, lr: dict(params=list(params), lr=lr, schedule="constant", optimizer="adam",  # noqa: E731
                                       options={"betas": tuple(o.betas), "weight_decay": 0.0})
        return [Group("generator", **adam(self.generator.parameters(), o.lr_g)),
                Group("discriminator", **adam(self.discriminator.parameters(), o.lr_d))]

    def deployable(self) -> nn.Module:
        return self.ema

    def enter_stage(self, stage: Stage) -> None:
        self.ema.eval()

    def trained_state(self) -> dict[str, dict]:
        return {"student": self.ema.state_dict(), "generator": self.generator.state_dict(),
                "discriminator": self.discriminator.state_dict(),
                "gan_counters": {"d_steps": torch.tensor(self.d_steps_done), "g_steps": torch.tensor(self.g_steps_done)}}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        self.ema.load_state_dict(state["student"])
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_steps_done = int(state["gan_counters"]["d_steps"])
        self.g_steps_done = int(state["gan_counters"]["g_steps"])

    def describe(self) -> list[str]:
        o = self.options
        lines = [f"# GAN: {self.generator.arch}, z {self.generator.z_dim}, {o.d_steps} D steps per G step, "
                 f"DiffAugment '{o.diffaug}', EMA {o.ema_decay} from G step {o.ema_start}"]
        if self.continuous:
            lines.append(f"# CcGAN soft vicinity: kappa {self.kappa:.4g}, nu {self.nu:.4g}, sigma {self.sigma:.4g}")
        return lines

    # ---------------------------------------------------------------- training
    def _labels(self, n: int, device) -> torch.Tensor:
        return torch.randint(0, self.generator.num_classes, (n,), device=device)

    def _targets(self, n: int, device) -> torch.Tensor:
        """CcGAN target labels: a distinct training label plus noise (not clipped, as the reference)."""
        base = self.unique_labels[torch.randint(0, len(self.unique_labels), (n,), device=device)]
        return base + torch.randn(n, device=device) * self.sigma

    def _vicinal_reals(self, n: int, device):
        """(targets, real images in [-1, 1], their labels): one neighbour of each target."""
        base = self.unique_labels[torch.randint(0, len(self.unique_labels), (n,), device=device)]
        noise = torch.randn(n, device=device) * self.sigma
        for _ in range(100):  # redraw the noise of targets without a real neighbour (the reference's loop)
            targets = base + noise
            near = (self.real_labels[None, :] - targets[:, None]).abs() <= self.radius
            lonely = ~near.any(dim=1)
            if not bool(lonely.any()):
                break
            noise = torch.where(lonely, torch.randn(n, device=device) * self.sigma, noise)
        else:  # give up on the noise of the last few: the label itself has itself as a neighbour
            targets = torch.where(lonely, base, targets)
            near = (self.real_labels[None, :] - targets[:, None]).abs() <= self.radius
        index = torch.multinomial(near.float(), 1).view(-1)
        return targets, from_uint8(self.real_images[index]), self.real_labels[index]

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        o, G, D = self.options, self.generator, self.discriminator
        aug = lambda x: diff_augment(x, o.diffaug)  # noqa: E731
        real, n = batch.image, len(batch.image)
        device = real.device
        z = torch.randn(n, G.z_dim, device=device)
        if self.continuous:
            targets, real, real_labels = self._vicinal_reals(n, device)
            low = (targets - self.radius).clamp(min=0.0)  # U(max(0, y - r), min(1, y + r)), the reference's
            high = (targets + self.radius).clamp(max=1.0)
            fake_labels = low + (high - low) * torch.rand(n, device=device)
            with torch.no_grad():
                fake = G(z, fake_labels)
            real_scores, fake_scores = D(aug(real), targets), D(aug(fake), targets)
            d_loss = hinge_d_loss(real_scores, fake_scores, soft_vicinity_weights(real_labels, targets, self.nu),
                                  soft_vicinity_weights(fake_labels, targets, self.nu))
        else:
            fake_labels = self._labels(n, device)
            with torch.no_grad():
                fake = G(z, fake_labels)
            real_scores, fake_scores = D(aug(real), batch.targets), D(aug(fake), fake_labels)
            d_loss = hinge_d_loss(real_scores, fake_scores)
        self._g_turn = self.d_steps_done > 0 and self.d_steps_done % o.d_steps == 0
        idle: tuple[str, ...] = ("generator",)
        g_loss = hinge_g_loss(fake_scores.detach())  # logged only, unless this is a G step
        if self._g_turn:
            labels = self._targets(n, device) if self.continuous else self._labels(n, device)
            g_loss = hinge_g_loss(D(aug(G(torch.randn(n, G.z_dim, device=device), labels)), labels))
            idle = ()
        return StepOutput(None, {"generator": {"hinge": g_loss}, "discriminator": {"hinge": d_loss}}, idle=idle)

    def after_step(self, stage: Stage) -> None:
        self.d_steps_done += 1
        if self._g_turn:
            self.g_steps_done += 1
            o = self.options
            ema_update(self.ema, self.generator, 0.0 if self.g_steps_done < o.ema_start else o.ema_decay)
            self._g_turn = False


class DreRecipe(Recipe):
    """The ratio MLP on a frozen extractor and a frozen (EMA) generator: each batch's fakes are drawn
    with the real batch's labels; loss ``density_ratio_loss`` (Adam with ``betas``, the solver's LR,
    schedule and weight decay)."""

    def __init__(self, ratio: DensityRatio, generator: Generator, penalty: float, betas):
        super().__init__()
        self.ratio, self.generator, self.penalty, self.betas = ratio, generator, penalty, tuple(betas)
        for p in self.generator.parameters():
            p.requires_grad_(False)

    def stages(self) -> list[Stage]:
        return [Stage("dre", ("ratio",))]

    def groups(self, stage: Stage) -> list[Group]:
        return [Group("ratio", list(self.ratio.mlp.parameters()), optimizer="adam", options={"betas": self.betas})]

    def deployable(self) -> nn.Module:
        return self.ratio

    def enter_stage(self, stage: Stage) -> None:
        self.generator.eval()
        self.ratio.train()

    def trained_state(self) -> dict[str, dict]:
        return {"student": self.ratio.state_dict()}

    def load_trained_state(self, state: dict[str, dict]) -> None:
        self.ratio.load_state_dict(state["student"])

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        labels = batch.targets
        with torch.no_grad():
            fake = self.generator(torch.randn(len(labels), self.generator.z_dim, device=labels.device), labels)
        r_real, r_fake = self.ratio(batch.image, labels), self.ratio(fake, labels)
        return StepOutput(None, {"ratio": {"bregman": density_ratio_loss(r_fake, r_real, self.penalty)}})


class AutoencoderRecipe(Recipe):
    """The sparse autoencoder with its regression branch: reconstruction MSE + sparsity x mean |h|
    + regression x label MSE, one group with the solver's optimiser."""

    def __init__(self, autoencoder: nn.Module, sparsity: float = 1e-3, regression: float = 1.0):
        super().__init__()
        self.autoencoder, self.sparsity, self.regression = autoencoder, sparsity, regression

    def stages(self) -> list[Stage]:
        return [Stage("autoencoder", ("autoencoder",))]

    def groups(self, stage: Stage) -> list[Group]:
        return [Group("autoencoder", list(self.autoencoder.parameters()))]

    def deployable(self) -> nn.Module:
        return self.autoencoder

    def train_step(self, batch: Batch, stage: Stage, epoch: float) -> StepOutput:
        from .dre import sparse_autoencoder_loss

        recon, h, predicted = self.autoencoder(batch.image)
        return StepOutput(None, {"autoencoder": sparse_autoencoder_loss(
            batch.image, recon, h, predicted, batch.targets, self.sparsity, self.regression)})
