"""Conditional GANs whose samples carry the teacher's knowledge (cGAN-KD stage 1).

Classification: a BigGAN-style class-conditional GAN (``arch: biggan32``: 4x4 -> 32x32 in three
residual up-blocks of width 4*ch, no self-attention) and a smaller one for 28-32 px grey images
(``arch: small``: two up-blocks). Both: generator with class-conditional BatchNorm whose gains and
biases come from its own (non-shared) class embeddings, discriminator with residual down-blocks and
a projection head, spectral norm on every weight of both, N(0, 0.02) init, hinge loss,
DiffAugment (colour, translation, cutout) on real and fake images before D.

Continuous labels in [0, 1] (CcGAN): the same networks with the label fed through a small learned
embedding MLP (y -> 128-d) instead of a class table: the conditional BatchNorm and the projection
read that vector. The reference pretrains a separate embedding network (images -> y, then y -> h);
learning the MLP jointly is a simpler equivalent with the same role. Soft vicinity (SVDL): see
``vicinity_parameters`` and ``recipe.CGANRecipe``.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

BN_EPS = 1e-5  # BigGAN-PyTorch's BN_eps default (the released scripts keep it); torch's default too

# ----------------------------------------------------------------------------- spectral norm


class _SpectralNorm(nn.Module):
    """W / sigma(W), sigma from one power iteration per forward pass (as BigGAN: the iteration also
    runs in eval mode from the stored ``u``, so an averaged ``u`` is renormalised, not trusted);
    ``u`` is stored only in training mode."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-8):
        super().__init__()
        rows = weight.shape[0]
        self.eps = eps
        self.register_buffer("u", F.normalize(torch.randn(rows), dim=0, eps=eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1)
        with torch.no_grad():
            v = F.normalize(matrix.t() @ self.u, dim=0, eps=self.eps)
            u = F.normalize(matrix @ v, dim=0, eps=self.eps)
            if self.training:
                self.u.copy_(u)
        sigma = torch.dot(u, matrix @ v)
        return weight / sigma


def spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    parametrize.register_parametrization(module, name, _SpectralNorm(getattr(module, name).detach()))
    return module


def sn_conv(cin: int, cout: int, k: int = 3) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, padding=k // 2))


def sn_linear(cin: int, cout: int, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Linear(cin, cout, bias=bias))


def init_n02(model: nn.Module) -> None:
    """BigGAN's ``N02`` init: every conv / linear / embedding weight from N(0, 0.02)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            weight = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            with torch.no_grad():
                weight.normal_(0.0, 0.02)


# ---------------------------------------------------------------------------- conditioning


class LabelEmbedding(nn.Module):
    """A label -> vector map: a class table (``num_classes``) or, for continuous labels in
    [0, 1] (``num_classes`` None), a learned MLP 1 -> dim -> dim."""

    def __init__(self, num_classes: Optional[int], dim: int, spectral: bool = False):
        super().__init__()
        self.num_classes = num_classes
        if num_classes is not None:
            table = nn.Embedding(num_classes, dim)
            self.net = spectral_norm(table) if spectral else table
        else:
            lin = sn_linear if spectral else nn.Linear
            self.net = nn.Sequential(lin(1, dim), nn.ReLU(), lin(dim, dim))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.num_classes is not None:
            return self.net(labels.long())
        return self.net(labels.float().view(-1, 1))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain 1 + g(y) and bias b(y) per channel, where g and b
    read the label through this layer's own embedding (BigGAN without a shared embedding)."""

    def __init__(self, channels: int, num_classes: Optional[int], embed_dim: int = 128, eps: float = BN_EPS):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=eps, momentum=0.1)
        dim = channels if num_classes is not None else embed_dim
        self.gain_embed = LabelEmbedding(num_classes, dim)
        self.bias_embed = LabelEmbedding(num_classes, dim)
        if num_classes is None:  # continuous: the MLP's output mapped to the channels
            self.gain_embed = nn.Sequential(self.gain_embed, nn.Linear(dim, channels))
            self.bias_embed = nn.Sequential(self.bias_embed, nn.Linear(dim, channels))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain_embed(labels)
        bias = self.bias_embed(labels)
        return self.bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


# ------------------------------------------------------------------------------- networks


class GeneratorBlock(nn.Module):
    """cBN-ReLU-up-conv3-cBN-ReLU-conv3, plus up-conv1 on the shortcut."""

    def __init__(self, cin: int, cout: int, num_classes: Optional[int], bn_eps: float = BN_EPS):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(cin, num_classes, eps=bn_eps)
        self.conv1 = sn_conv(cin, cout)
        self.bn2 = ConditionalBatchNorm(cout, num_classes, eps=bn_eps)
        self.conv2 = sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, labels)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DiscriminatorBlock(nn.Module):
    """(ReLU)-conv3-ReLU-conv3-(avgpool), plus conv1-(avgpool) on the shortcut (BigGAN's D block;
    the first block has no leading ReLU)."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool):
        super().__init__()
        self.conv1, self.conv2 = sn_conv(cin, cout), sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, 1) if (cin != cout or downsample) else None
        self.downsample, self.preactivation = downsample, preactivation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.preactivation:
            s = self.shortcut(s) if self.shortcut is not None else s
            s = F.avg_pool2d(s, 2) if self.downsample else s
        else:  # BigGAN's first block pools before its shortcut conv
            s = F.avg_pool2d(s, 2) if self.downsample else s
            s = self.shortcut(s) if self.shortcut is not None else s
        return h + s


# (generator widths from the bottom up, discriminator (width, downsample) per block), as
# multiples of ``width``; the bottom is image_size / 2**(up-blocks).
ARCHS: dict[str, dict] = {
    "biggan32": {"g": (4, 4, 4, 4), "d": ((4, True), (4, True), (4, False), (4, False)), "width": 64, "z_dim": 128},
    "small": {"g": (2, 2, 1), "d": ((1, True), (2, True), (2, False)), "width": 16, "z_dim": 64},
}


def _arch(arch: str) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"unknown GAN arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


class Generator(nn.Module):
    """z (N x z_dim) and labels (class indices, or floats in [0, 1]) -> images in [-1, 1]."""

    def __init__(self, image_shape: Sequence[int], num_classes: Optional[int], arch: str = "small",
                 width: Optional[int] = None, z_dim: Optional[int] = None, bn_eps: float = BN_EPS):
        super().__init__()
        spec = _arch(arch)
        self.arch, self.width, self.bn_eps = arch, width or spec["width"], bn_eps
        self.z_dim, self.num_classes = z_dim or spec["z_dim"], num_classes
        self.image_shape = tuple(int(s) for s in image_shape)
        channels, size = self.image_shape[0], self.image_shape[1]
        ups = len(spec["g"]) - 1
        if size % 2 ** ups or self.image_shape[1] != self.image_shape[2]:
            raise ValueError(f"arch {arch} makes square images whose side is a multiple of {2 ** ups}, got "
                             f"{'x'.join(map(str, self.image_shape[1:]))}")
        self.bottom = size // 2 ** ups
        widths = [m * self.width for m in spec["g"]]
        self.linear = sn_linear(self.z_dim, widths[0] * self.bottom ** 2)
        self.blocks = nn.ModuleList(GeneratorBlock(a, b, num_classes, bn_eps) for a, b in zip(widths[:-1], widths[1:]))
        self.out_bn = nn.BatchNorm2d(widths[-1], eps=bn_eps)
        self.out_conv = sn_conv(widths[-1], channels)
        init_n02(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(len(z), -1, self.bottom, self.bottom)
        for block in self.blocks:
            h = block(h, labels)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))

    def config(self) -> dict:
        """What rebuilding this generator needs (saved beside its weights)."""
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes, "arch": self.arch,
                "width": self.width, "z_dim": self.z_dim, "bn_eps": self.bn_eps}


class Discriminator(nn.Module):
    """images in [-1, 1] and labels -> one score each: linear(sum-pooled h) + <embed(y), h>."""

    def __init__(self, image_shape: Sequence[int], num_classes: Optional[int], arch: str = "small",
                 width: Optional[int] = None):
        super().__init__()
        spec = _arch(arch)
        width = width or spec["width"]
        cin, blocks = image_shape[0], []
        for i, (mult, down) in enumerate(spec["d"]):
            blocks.append(DiscriminatorBlock(cin, mult * width, down, preactivation=i > 0))
            cin = mult * width
        self.blocks = nn.Sequential(*blocks)
        self.linear = sn_linear(cin, 1)
        self.embed = LabelEmbedding(num_classes, cin, spectral=True)
        init_n02(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(images)).sum(dim=(2, 3))
        return self.linear(h).view(-1) + (self.embed(labels) * h).sum(dim=1)


# ---------------------------------------------------------------------------------- losses


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, real_weights=None, fake_weights=None):
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), optionally weighted per sample
    (CcGAN's soft vicinity: the weighted terms are still divided by the batch size)."""
    real, fake = F.relu(1 - real_scores), F.relu(1 + fake_scores)
    if real_weights is not None:
        real, fake = real * real_weights, fake * fake_weights
    return real.mean() + fake.mean()


def hinge_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


# -------------------------------------------------------------------------------- DiffAugment

DIFFAUG_POLICY = "color,translation,cutout"


def diff_augment(x: torch.Tensor, policy: str = DIFFAUG_POLICY, translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """Differentiable augmentation of a batch (Zhao et al. 2020), the same for real and fake
    images, drawn from the global RNG (restored on resume). ``color``: brightness + U(-0.5, 0.5),
    saturation x U(0, 2) around the per-pixel channel mean, contrast x U(0.5, 1.5) around the
    image mean; ``translation``: an integer shift of up to ``translation`` x size per axis with zero
    fill; ``cutout``: one zeroed square of side ``cutout`` x size per image (centre anywhere, the
    square clipped at the border). An empty policy returns ``x``."""
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name == "color":
            x = _color(x)
        elif name == "translation":
            x = _translate(x, translation)
        elif name == "cutout":
            x = _cutout(x, cutout)
        else:
            raise ValueError(f"unknown DiffAugment policy {name!r}; use color, translation, cutout")
    return x


def _color(x: torch.Tensor) -> torch.Tensor:
    n = len(x)
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def _translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # output (i, j) reads input (i - dy, j - dx)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rows, cols = rows.clamp(0, h - 1).expand(n, h, w), cols.clamp(0, w - 1).expand(n, h, w)
    sample = torch.arange(n, device=x.device).view(n, 1, 1)
    out = x.permute(0, 2, 3, 1)[sample, rows, cols].permute(0, 3, 1, 2)
    return out * inside[:, None].to(x.dtype)


def _cutout(x: torch.Tensor, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cut = (rows >= cy - ch // 2) & (rows < cy - ch // 2 + ch) & (cols >= cx - cw // 2) & (cols < cx - cw // 2 + cw)
    return x * (~cut)[:, None].to(x.dtype)


# ------------------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """BigGAN's EMA over the whole state (weights, spectral-norm vectors, BatchNorm statistics):
    t <- decay * t + (1 - decay) * s for floating-point entries, a copy for the others."""
    src = source.state_dict()
    for key, value in target.state_dict().items():
        if value.is_floating_point():
            value.mul_(decay).add_(src[key].to(value.dtype), alpha=1 - decay)
        else:
            value.copy_(src[key])


# ------------------------------------------------------------------------------ CcGAN rules


def vicinity_parameters(labels: torch.Tensor, kappa_arg: float = 2.0) -> tuple[float, float, float]:
    """CcGAN's soft-vicinity settings from the training labels (normalised to [0, 1]):
    kappa = |kappa_arg| x the largest gap between consecutive distinct labels, nu = 1 / kappa^2
    (the weight of a label y' for a target y is exp(-nu (y' - y)^2)), and the noise sigma of the
    target labels by the rule of thumb 1.06 x std x n^(-1/5) (n: all training labels, std with
    numpy's ddof 0). Returns (kappa, nu, sigma)."""
    y = labels.double().flatten()
    unique = torch.unique(y)
    if len(unique) < 2:
        raise ValueError("CcGAN needs at least two distinct training labels")
    kappa = abs(kappa_arg) * (unique[1:] - unique[:-1]).max().item()
    sigma = 1.06 * y.std(unbiased=False).item() * len(y) ** (-1 / 5)
    return kappa, 1.0 / kappa ** 2, sigma


def soft_vicinity_weights(labels: torch.Tensor, targets: torch.Tensor, nu: float) -> torch.Tensor:
    return torch.exp(-nu * (labels.float() - targets.float()) ** 2)


# ------------------------------------------------------------------------- downstream API


def save_generator(generator: Generator, path: str | Path, extra: Optional[dict] = None) -> None:
    torch.save({"generator_config": generator.config(), "student": generator.state_dict(), **(extra or {})}, path)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a ``cgan`` run checkpoint (or a file of ``save_generator``), in eval
    mode, with ``z_dim``, ``num_classes`` (None for continuous labels) and ``image_shape``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator checkpoint not found: {path}; train it first (task: cgan)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "generator_config" not in state:
        raise ValueError(f"{path} is not a GAN checkpoint (no generator_config): give the best.pt / last.pt of a "
                         "task: cgan run")
    # generators saved before bn_eps was recorded were trained with 1e-4
    generator = Generator(**{"bn_eps": 1e-4, **state["generator_config"]})
    generator.load_state_dict(state["student"])  # a run's "student" is its EMA generator
    return generator.to(device).eval()


@torch.inference_mode()
def generate(generator: Generator, labels: torch.Tensor, batch_size: int = 500, seed: Optional[int] = None,
             device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Float images in [-1, 1], one per label (class indices, or floats in [0, 1]), drawn in
    batches from a generator of its own (``seed``: reproducible; None: the global RNG). On CPU."""
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    labels = torch.as_tensor(labels)
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        z = torch.randn(len(chunk), generator.z_dim, generator=gen)
        out.append(generator(z.to(device), chunk.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, *generator.image_shape)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255 as the released code stores fakes: (x * 0.5 + 0.5) * 255 in
    float32, truncated (numpy's astype(uint8)), so 0.0 -> 127 and only 1.0 reaches 255."""
    return ((images.float().clamp(-1, 1) * 0.5 + 0.5) * 255.0).floor().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> floats in [-1, 1] (x / 127.5 - 1), the GAN's and the density ratio's input scale."""
    return images.float() / 127.5 - 1


def generator_copy(generator: Generator) -> Generator:
    """A frozen copy for the EMA weights."""
    ema = copy.deepcopy(generator)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def image_grid(images_uint8: torch.Tensor, rows: int) -> torch.Tensor:
    """N x C x H x W uint8 -> one C x (rows*H) x (cols*W) image (rows filled left to right)."""
    n, c, h, w = images_uint8.shape
    cols = math.ceil(n / rows)
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = images_uint8[i]
    return grid
