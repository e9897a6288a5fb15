"""Kim, Park, Kwak, NeurIPS 2018: "Paraphrasing Complex Network: Network Compression via Factor Transfer".

A paraphraser (a small convolutional autoencoder) is first trained to reconstruct the teacher's
last stage feature; its encoder output is the teacher "factor". A translator on the student's last
stage feature produces the student factor, and the loss is the L1 distance between the two
factors after L2 normalisation::

    loss = mean | F_s / ||F_s||_2 - F_t / ||F_t||_2 |

Features: post-activation output of the deepest stage of each network (not the pooled feature).
The factors may differ in size: the larger one is average-pooled to the smaller (benchmark).

Variants of the factor vector (``full_factor``):

* ``False`` (default), the CIFAR-100 benchmark (RepDistiller/CRD): the factor is first reduced to
  a spatial map, the channel mean of its squares, then flattened and normalised. Its published
  numbers and its weight 200 come from this form.
* ``True``, the paper and the authors' released code: the whole C x H x W factor is flattened and
  normalised.

Modules, as in the benchmark: paraphraser with rate ``k = rate = 0.5`` (factor channels =
int(k * teacher channels)), encoder three 3x3 convolutions (C -> C -> kC -> kC) and decoder three
3x3 transposed convolutions back (kC -> kC -> C -> C), each followed by LeakyReLU(0.1), no
BatchNorm; translator three 3x3 convolutions (student C -> student C -> kC -> kC), each followed by
BatchNorm and LeakyReLU(0.1).

Two stages, following the benchmark code:

1. Pre-training (``pretrain_epochs=30``): only the paraphraser, on the mean squared reconstruction
   error of the teacher feature (the paper's L2 reconstruction loss; the authors' code uses L1),
   with a fresh SGD (momentum 0.9, weight decay 5e-4) at a constant learning rate of 0.01 (the
   benchmark's value for ResNet/WRN students; MobileNet/ShuffleNet students run at 0.01 anyway;
   VGG and ResNet50 students would get the base 0.05): ``Pretraining.lr = 0.01``. The student takes no
   part and stays in eval mode (``student_train=False``).
2. Distillation epochs: CE (weight 1.0) + ``weight`` x factor loss, ``weight=200`` (benchmark
   ``-b 200``; the authors' CIFAR-10 code uses 500 with the full factor). The paraphraser is frozen: the teacher factor is
   computed without gradients, so only the translator trains with the student.

No batch-level statistics besides the translator's BatchNorm (per-rank under DistributedDataParallel).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ._common import match_spatial
from .base import DistillMethod, IncompatiblePairError, Pretraining, Reads, RunContext, Step, register_method


def _conv_act(cin: int, cout: int, transposed: bool = False, bn: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(cin, cout, kernel_size=3, stride=1, padding=1)
    return [conv] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Convolutional autoencoder of the teacher feature; ``encoder`` gives the teacher factor."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*_conv_act(c, c), *_conv_act(c, k), *_conv_act(k, k))
        self.decoder = nn.Sequential(
            *_conv_act(k, k, transposed=True), *_conv_act(k, c, transposed=True), *_conv_act(c, c, transposed=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Maps the student feature to a factor with the paraphraser's number of channels."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*_conv_act(c, c, bn=True), *_conv_act(c, k, bn=True), *_conv_act(k, k, bn=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def normalised_factor(factor: torch.Tensor, full: bool = False) -> torch.Tensor:
    """N x D unit vectors: the flattened factor (``full``) or its channel mean of squares (benchmark)."""
    f = factor.float()
    v = f.flatten(1) if full else f.pow(2).mean(dim=1).flatten(1)
    return F.normalize(v, p=2, dim=1)


def factor_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, full: bool = False) -> torch.Tensor:
    """Mean absolute difference of the normalised factors (float32)."""
    factor_s, factor_t = match_spatial(factor_s, factor_t)
    return (normalised_factor(factor_s, full) - normalised_factor(factor_t, full)).abs().mean()


@register_method
class FT(DistillMethod):
    name = "ft"
    paper = "Kim, Park, Kwak, NeurIPS 2018: Paraphrasing Complex Network: Network Compression via Factor Transfer"
    reads = Reads(student_features="post", teacher_features="post", logits=False, tasks=('classification', 'regression'))
    # Pre-training optimiser: constant learning rate 0.01 (benchmark), SGD momentum 0.9, wd 5e-4.

    def __init__(self, weight: float = 200.0, rate: float = 0.5, full_factor: bool = False, pretrain_epochs: int = 30):
        super().__init__()
        self.weight, self.rate, self.full_factor = float(weight), float(rate), bool(full_factor)
        self.pretraining = Pretraining(int(pretrain_epochs), lr=0.01, student_train=False) if pretrain_epochs > 0 else None
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def setup(self, probe: Step, context: RunContext = RunContext()) -> None:
        cs, ct = probe.student_features[-2].shape[1], probe.teacher_features[-2].shape[1]
        k = int(ct * self.rate)
        if k < 1:
            raise IncompatiblePairError(
                f"FT's factor would have int({ct} * rate={self.rate}) = 0 channels for {probe.teacher_name}: "
                "raise rate (the paper and benchmark use 0.5)"
            )
        self.paraphraser = Paraphraser(ct, k)
        self.translator = Translator(cs, k)

    def pretrain_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def pretrain_losses(self, step: Step) -> dict[str, torch.Tensor]:
        target = step.teacher_features[-2]
        rec = self.paraphraser(target)
        return {"ft_paraphraser": F.mse_loss(rec.float(), target.float())}

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # the paraphraser is frozen after its pre-training
            factor_t = self.paraphraser.encoder(step.teacher_features[-2])
        factor_s = self.translator(step.student_features[-2])
        return {"ft": self.weight * factor_loss(factor_s, factor_t, self.full_factor)}
