"""Conditional density-ratio estimation for rejection sampling (cGAN-KD stages 2a-2b).

* The feature extractor (classification): a classifier whose penultimate layer, the "feature",
  has C*H*W units (3072 at 3 x 32 x 32, as the reference's ResNet34_extract): trunk -> pooled ->
  Linear -> feature; head BN-ReLU-Dropout(0.5)-1024-BN-ReLU-Dropout-256-BN-ReLU-Dropout-classes.
  Trained as an ordinary classification run (zoo names ``dre_extractor_resnet34`` and the small
  ``dre_extractor_small`` on a resnet8 trunk); ``.extract(x)`` returns the feature. v1 used
  ``dre_extractor_densenet121``: a DenseNet-121 trunk whose feature is Linear-BN-ReLU, then one Linear.
* The sparse autoencoder with a regression branch (regression): its bottleneck (C*H*W units) is
  the feature; loss = reconstruction MSE + 1e-3 x mean |h| + 1 x MSE of the predicted label.
* The conditional ratio model MLP5: [label embedding, feature] -> 2048-1024-512-256-128 (each
  Linear-GroupNorm(8)-ReLU-Dropout(0.5)) -> Linear -> 1 -> ReLU, so r >= 0. Class labels go through
  ``nn.Embedding(C, C)``; a continuous label in [0, 1] is appended as one input (a simpler stand-in
  for the reference's learned label embedding).
* ``density_ratio_loss``: the softplus Bregman divergence with the normalisation penalty.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cifar.resnet import BasicBlock, ResNet
from ..models.registry import create_model, register_model

MLP_WIDTHS = (2048, 1024, 512, 256, 128)
SMALL_MLP_WIDTHS = (512, 256, 128, 64, 32)


# ----------------------------------------------------------------------------- extractors


class ExtractorClassifier(nn.Module):
    """A CIFAR-style ResNet trunk (its head unused), Linear to ``feature_dim`` (the feature), and
    the reference's three-layer classifier head on it."""

    def __init__(self, trunk: ResNet, num_classes: int, feature_dim: int = 3 * 32 * 32):
        super().__init__()
        self.trunk = trunk
        trunk_dim = getattr(trunk, trunk._head_name).in_features
        delattr(trunk, trunk._head_name)
        self.feature_dim = feature_dim
        self.to_feature = nn.Linear(trunk_dim, feature_dim)
        layers: list[nn.Module] = []
        for cin, cout in ((feature_dim, 1024), (1024, 256), (256, num_classes)):
            layers += [nn.BatchNorm1d(cin), nn.ReLU(), nn.Dropout(0.5), nn.Linear(cin, cout)]
        self.head = nn.Sequential(*layers)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.relu(t.bn1(t.conv1(x)))
        for name in t._stage_names:
            x = getattr(t, name)(x)
        return self.to_feature(torch.flatten(t.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extract(x))


@register_model("dre_extractor_resnet34")
def dre_extractor_resnet34(num_classes: int = 100, **kw) -> nn.Module:
    """ResNet-34 (64-512 planes, 32x32 input: 4x4 before the pool) -> 3072-d feature."""
    trunk = ResNet(BasicBlock, 64, (64, 128, 256, 512), (3, 4, 6, 3), num_classes=1, shortcut_name="shortcut",
                   head_name="linear")
    return ExtractorClassifier(trunk, num_classes, **kw)


@register_model("dre_extractor_small")
def dre_extractor_small(num_classes: int = 10, **kw) -> nn.Module:
    """The zoo's resnet8 trunk (16-64 planes) -> 3072-d feature: minutes on a CPU."""
    trunk = create_model("resnet8", num_classes=1)
    return ExtractorClassifier(trunk, num_classes, **kw)


class DenseNetExtractor(nn.Module):
    """v1's DenseNet121_extract: the DenseNet-BC trunk -> BN-ReLU -> 4x4 average pool -> Linear to
    ``feature_dim`` -> BatchNorm1d -> ReLU (the feature, post-activation) -> Linear -> classes."""

    def __init__(self, num_classes: int, feature_dim: int = 3 * 32 * 32):
        super().__init__()
        from ..models.cifar.densenet import densenet121

        self.trunk = densenet121(num_classes=1)
        width = self.trunk.linear.in_features
        del self.trunk.linear
        self.feature_dim = feature_dim
        self.to_feature = nn.Sequential(nn.Linear(width, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_feature(self.trunk.pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extract(x))


@register_model("dre_extractor_densenet121")
def dre_extractor_densenet121(num_classes: int = 100, **kw) -> nn.Module:
    """DenseNet-121 (growth 32, 32x32 input: 4x4 before the pool) -> 3072-d post-ReLU feature (v1)."""
    return DenseNetExtractor(num_classes, **kw)


class SparseAutoencoder(nn.Module):
    """Conv encoder -> bottleneck h (``C*H*W`` units, ReLU) -> conv decoder (tanh, [-1, 1]), and a
    regression branch h -> 128 -> 1 (ReLU) predicting the label in [0, 1]. ``extract`` gives h."""

    def __init__(self, image_shape: Sequence[int], width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the sparse autoencoder needs sides divisible by 4, got {h}x{w}")
        self.image_shape, self.small = (c, h, w), (2 * width, h // 4, w // 4)
        self.feature_dim = c * h * w
        self.encoder = nn.Sequential(
            nn.Conv2d(c, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), self.feature_dim), nn.ReLU())
        self.decoder_in = nn.Linear(self.feature_dim, 2 * width * (h // 4) * (w // 4))
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width), nn.ReLU(), nn.ConvTranspose2d(width, c, 4, 2, 1), nn.Tanh())
        self.regressor = nn.Sequential(nn.Linear(self.feature_dim, 128), nn.ReLU(), nn.Linear(128, 1), nn.ReLU())

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, bottleneck, predicted label)"""
        h = self.encoder(x)
        recon = self.decoder(self.decoder_in(h).view(len(x), *self.small))
        return recon, h, self.regressor(h).view(-1)


def sparse_autoencoder_loss(x, recon, h, predicted, labels, sparsity: float = 1e-3,
                            regression: float = 1.0) -> dict[str, torch.Tensor]:
    """Reconstruction MSE + ``sparsity`` x mean |h| + ``regression`` x label MSE (reference weights)."""
    return {"reconstruction": F.mse_loss(recon, x), "sparsity": sparsity * h.abs().mean(),
            "regression": regression * F.mse_loss(predicted, labels.float())}


# ------------------------------------------------------------------------------ the ratio


class RatioMLP(nn.Module):
    """MLP5: r(feature | label) >= 0 (see the module docstring)."""

    def __init__(self, feature_dim: int, num_classes: Optional[int], widths: Sequence[int] = MLP_WIDTHS,
                 dropout: float = 0.5):
        super().__init__()
        if any(w % 8 for w in widths):
            raise ValueError(f"MLP widths must be multiples of 8 (GroupNorm with 8 groups), got {list(widths)}")
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes, num_classes) if num_classes is not None else None
        layers: list[nn.Module] = []
        cin = feature_dim + (num_classes if num_classes is not None else 1)
        for w in widths:
            layers += [nn.Linear(cin, w), nn.GroupNorm(8, w), nn.ReLU(), nn.Dropout(dropout)]
            cin = w
        layers += [nn.Linear(cin, 1), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.label_embedding is not None:
            y = self.label_embedding(labels.long())
        else:
            y = labels.float().view(-1, 1)
        return self.net(torch.cat([y, features.float()], dim=1)).view(-1)


def density_ratio_loss(r_fake: torch.Tensor, r_real: torch.Tensor, penalty: float = 0.01) -> torch.Tensor:
    """Softplus Bregman loss of cDRE-F-cSP:
    mean_fake(sigmoid(r) r - softplus(r)) - mean_real(sigmoid(r)) + penalty (mean_fake(r) - 1)^2."""
    fake = (torch.sigmoid(r_fake) * r_fake - F.softplus(r_fake)).mean()
    real = torch.sigmoid(r_real).mean()
    return fake - real + penalty * (r_fake.mean() - 1) ** 2


def fit_to(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Images in [-1, 1] to the extractor's input shape: padded with -1 (black, as the real images
    are zero-padded as pixels) to the side and grey repeated to its channels."""
    c, h, w = shape
    dh, dw = h - images.shape[2], w - images.shape[3]
    if dh < 0 or dw < 0:
        raise ValueError(f"images of {images.shape[2]}x{images.shape[3]} are larger than the extractor's {h}x{w}")
    if dh or dw:
        images = F.pad(images, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=-1.0)
    if images.shape[1] != c:
        images = images.expand(-1, c, -1, -1)
    return images


class DensityRatio(nn.Module):
    """ratio(images in [-1, 1], labels) -> r >= 0: the frozen extractor's feature, then the MLP."""

    def __init__(self, extractor: nn.Module, mlp: RatioMLP, extractor_input: Sequence[int]):
        super().__init__()
        self.extractor, self.mlp = extractor, mlp
        self.extractor_input = tuple(int(s) for s in extractor_input)
        for p in self.extractor.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DensityRatio":
        super().train(mode)
        self.extractor.eval()  # always frozen: BatchNorm statistics and dropout of its trained state
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor.extract(fit_to(images, self.extractor_input)).float()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(images), labels)


def load_extractor(path: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    """The extractor of a classification run checkpoint (best.pt) whose model has ``.extract``, or of
    a ``dre_autoencoder`` run; returns (model in eval mode, {"name", "num_classes", "input_size", ...})."""
    from ..engine.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DRE feature extractor not found: {path}; train it first (a classification run of "
                                "model dre_extractor_small / dre_extractor_resnet34)")
    ckpt = load_checkpoint(path)
    if "autoencoder_config" in ckpt:  # a task: dre_autoencoder run (regression)
        config = ckpt["autoencoder_config"]
        model = SparseAutoencoder(config["image_shape"], config["width"])
        model.load_state_dict(ckpt["student"])
        info = {"name": "sparse_autoencoder", "autoencoder": config, "num_classes": None,
                "input_size": list(config["image_shape"])}
        return model.to(device).eval(), info
    model = create_model(ckpt["model_name"], num_classes=ckpt["num_classes"])
    if not hasattr(model, "extract"):
        raise ValueError(f"{path} holds a {ckpt['model_name']}, which has no feature to extract: train "
                         "dre_extractor_small or dre_extractor_resnet34")
    model.load_state_dict(ckpt["student"])
    info = {"name": ckpt["model_name"], "num_classes": ckpt["num_classes"], "input_size": list(ckpt["input_size"])}
    return model.to(device).eval(), info


def build_density_ratio(config: dict, device="cpu") -> DensityRatio:
    """A ratio model without trained weights from its saved ``config`` (see the dre task)."""
    e = config["extractor"]
    if e["name"] == "sparse_autoencoder":
        extractor = SparseAutoencoder(e["autoencoder"]["image_shape"], e["autoencoder"]["width"])
    else:
        extractor = create_model(e["name"], num_classes=e["num_classes"])
    mlp = RatioMLP(extractor.feature_dim, config["num_classes"], config["widths"])
    return DensityRatio(extractor, mlp, config["extractor"]["input_size"]).to(device)


def load_density_ratio(path: str | Path, device="cpu") -> DensityRatio:
    """The ratio model of a ``dre`` run checkpoint, in eval mode: ``ratio(images, labels) -> r``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"density-ratio checkpoint not found: {path}; train it first (task: dre)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "ratio_config" not in state:
        raise ValueError(f"{path} is not a density-ratio checkpoint: give the best.pt / last.pt of a task: dre run")
    model = build_density_ratio(state["ratio_config"])
    model.load_state_dict(state["student"])
    return model.to(device).eval()
