"""Training the cGAN-KD components as ordinary runs: ``task: cgan`` (the conditional GAN; class
labels on Fashion-MNIST / CIFAR, continuous labels on ``data.name: regression``) and ``task: dre``
(the conditional density-ratio model on a trained generator and feature extractor).

Data: the training set's uint8 images at their stored size (Fashion-MNIST 1 x 28 x 28, CIFAR
3 x 32 x 32, regression images at ``data.image_size``) scaled to [-1, 1]; ``data.subset`` and
``data.labelled_fraction`` select as for classification. Regression labels are mapped to [0, 1] by
the min and max of the training targets (``meta["label_range"]``). An epoch is one pass over the
real training images (one D step, or one DRE step, per batch); a regression DRE epoch draws as many
real images, each by a distinct label picked uniformly and then an image carrying it (as released).

Evaluation (cheap): cgan: the RMSE between per-label mean images of generated and real test images
(labels binned in tenths when continuous), on ``cgan.eval_samples`` images from a fixed seed; it
only monitors, as GAN scores do not select checkpoints well: best.pt is always the latest
evaluation. dre: the density-ratio loss, the mean ratio on real test images and on fakes (fixed
seed; the penalty pulls the latter to 1); the lowest loss picks best.pt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError
from ..data import _load_tensors, labelled_indices, subset_indices
from ..data.augment import BatchAugment
from ..data.loader import TensorLoader
from ..methods import RunContext
from .base import TaskData
from .classification import ClassificationTask

_SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
_TO_UNIT = dict(mean=(0.5,), std=(0.5,))  # x / 255 -> [-1, 1]


def real_training_data(cfg, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, Optional[list[float]]]:
    """(uint8 images, labels: int64 classes or float [0, 1], label range of the training targets or None)."""
    d = cfg.data
    if d.name == "regression":
        from ..data.regression import build_regression_data, make_synthetic

        r = cfg.regression
        if r.synthetic is not None and d.root is not None and not Path(d.root).is_dir():
            make_synthetic(d.root, d.image_size, r.synthetic)  # as the regression task does
        b = build_regression_data(d.root, csv=r.csv, file_column=r.file_column, target_column=r.target_column,
                                  image_size=d.image_size, channels=r.channels, batch_size=2, device="cpu",
                                  seed=cfg.seed, subset=d.subset, augment=False, test_fraction=r.test_fraction,
                                  normalise="none")
        # the generator's [0, 1]: y / max with `regression.normalise: max` (CcGAN's convention), else min-max
        low, high = (0.0 if r.normalise == "max" else b.train_targets.min().item()), b.train_targets.max().item()
        loader = b.train if split == "train" else b.test
        labels = ((loader.labels.double() - low) / max(high - low, 1e-12)).float()
        return loader.images.cpu(), labels, [low, high]
    if d.name not in _SHAPES:
        raise ConfigError(f"task {cfg.task} reads fashion_mnist, cifar10, cifar100 or regression data, got {d.name}")
    images, labels = _load_tensors(d.name, d.root, split)
    if split == "train" and getattr(d, "labelled_fraction", None) is not None:
        keep = labelled_indices(labels, d.labelled_fraction, d.labelled_seed)
        images, labels = images[keep], labels[keep]
    if d.subset is not None:
        keep = subset_indices(labels, d.subset, cfg.seed)
        images, labels = images[keep], labels[keep]
    return images, labels, None


class _GenerativeTask(ClassificationTask):
    """What the two tasks share: the data at the generator's scale, no training metrics, no export."""

    export_formats: tuple[str, ...] = ()

    def num_outputs(self, cfg) -> int:
        return 1 if cfg.data.name == "regression" else _CLASSES.get(cfg.data.name, 0)

    def num_classes(self, cfg) -> Optional[int]:
        return None if cfg.data.name == "regression" else _CLASSES[cfg.data.name]

    def probe_size(self, cfg) -> tuple[int, ...]:
        if cfg.data.name == "regression":
            return (cfg.regression.channels, cfg.data.image_size, cfg.data.image_size)
        if cfg.data.name not in _SHAPES:
            raise ConfigError(f"task {cfg.task} reads fashion_mnist, cifar10, cifar100 or regression data, "
                              f"got {cfg.data.name}")
        return _SHAPES[cfg.data.name]

    def check_config(self, cfg) -> None:
        self.probe_size(cfg)
        if cfg.data.val_split:
            raise ConfigError(f"data.val_split is not used by task {cfg.task}: remove it")

    def _loaders(self, cfg, device, flip: bool, rank: int, world_size: int, label_uniform: bool = False,
                 crop_padding: int = 0):
        images, labels, label_range = real_training_data(cfg, "train")
        test_images, test_labels, _ = real_training_data(cfg, "test")
        common = dict(seed=cfg.seed, device=device, rank=rank, world_size=world_size)
        train = TensorLoader(images, labels, cfg.data.batch_size, shuffle=True, drop_last=True,
                             augment=BatchAugment(flip=flip, crop_padding=crop_padding, train=flip or crop_padding > 0,
                                                  **_TO_UNIT), label_uniform=label_uniform,
                             **common)
        test = TensorLoader(test_images, test_labels, cfg.data.eval_batch_size, shuffle=False, drop_last=False,
                            augment=BatchAugment(train=False, **_TO_UNIT), even_shards=False, **common)
        if len(train) == 0:
            raise ConfigError(f"{len(images)} training images make no batch of data.batch_size={cfg.data.batch_size}: "
                              "lower the batch size")
        self._real = (images, labels)
        context = RunContext(num_samples=len(images), train_targets=labels.clone(),
                             num_classes=self.num_classes(cfg) or 1, epochs=cfg.solver.epochs)
        meta = {"num_classes": self.num_classes(cfg), "input_size": list(images.shape[1:]), "label_range": label_range}
        return TaskData(train, test, len(train), tuple(images.shape[1:]), self.num_outputs(cfg), context, meta,
                        num_train=len(images))

    def train_stats(self, outputs, batch) -> dict[str, torch.Tensor]:
        return {}

    def train_metrics(self, sums, count) -> dict[str, float]:
        return {}

    def describe_train(self, row: dict) -> str:
        return ""

    def rebuild(self, meta: dict, cfg, export: bool = True) -> nn.Module:
        raise ValueError(f"a {self.name} run is not exported as a model: load it with reviewkd.cgankd "
                         f"({'load_generator' if self.name == 'cgan' else 'load_density_ratio'})")


class CganTask(_GenerativeTask):
    name = "cgan"
    score_key, score_label, higher_is_better = "test_mean_image_rmse", "mean-image RMSE", False
    curve_scores = {"test_mean_image_rmse": "test mean-image RMSE"}

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        from ..cgankd.gan import Generator

        c = cfg.cgan
        return Generator(self.probe_size(cfg), self.num_classes(cfg), c.arch, c.width, c.z_dim)

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        from ..cgankd.gan import Discriminator
        from ..cgankd.training import GanRecipe

        c = cfg.cgan
        D = Discriminator(self.probe_size(cfg), self.num_classes(cfg), c.arch, c.width)
        images, labels = getattr(self, "_real", (None, None))
        if student.num_classes is None and images is None:  # the architecture probe: stand-in data
            images = torch.zeros(2, *self.probe_size(cfg), dtype=torch.uint8)
            labels = torch.tensor([0.0, 1.0])
        return GanRecipe(student, D, c, images, labels)

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        real = cfg.cgan.real_augment
        data = self._loaders(cfg, device, flip=real != "none", rank=rank, world_size=world_size,
                             crop_padding=4 if real == "crop_flip" else 0)
        data.meta["generator_config"] = self.build_model("", cfg, 0).config()
        return data

    def better(self, score: float, best: Optional[float]) -> bool:
        return True  # best.pt = the latest evaluation (see the module docstring)

    @torch.inference_mode()
    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        from ..cgankd.gan import generate

        images, labels = data.test.images, data.test.labels
        n = min(len(labels), 500)
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n].to(labels.device)
        real, lab = images[pick].float() / 127.5 - 1, labels[pick]
        was = model.training
        model.eval()
        fake = generate(model, lab.cpu(), batch_size=250, seed=0, device=device).to(real.device)
        model.train(was)
        groups = (lab * 10).clamp(max=9).long() if lab.is_floating_point() else lab.long()
        errors = []
        for g in groups.unique():
            m = groups == g
            errors.append((fake[m].mean(0) - real[m].mean(0)).pow(2).mean())
        return {"test_mean_image_rmse": torch.stack(errors).mean().sqrt().item()}

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        return f"mean-image RMSE {m['test_mean_image_rmse']:.4f}"


class DreTask(_GenerativeTask):
    name = "dre"
    score_key, score_label, higher_is_better = "test_dre_loss", "DRE loss", False
    curve_scores = {"test_dre_loss": "test DRE loss"}

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        d = cfg.dre
        if d is None or d.generator is None or d.extractor is None:
            raise ConfigError("task: dre needs dre.generator (best.pt of a task: cgan run) and dre.extractor (best.pt "
                              "of a dre_extractor_small / dre_extractor_resnet34 classification run)")
        for key in ("generator", "extractor"):
            if not Path(getattr(d, key)).is_file():
                raise ConfigError(f"dre.{key}: {getattr(d, key)} not found; train it first")

    def _ratio_config(self, cfg) -> dict:
        from ..cgankd.dre import load_extractor

        _, info = load_extractor(cfg.dre.extractor)
        return {"extractor": info, "num_classes": self.num_classes(cfg), "widths": list(cfg.dre.widths)}

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        from ..cgankd.dre import build_density_ratio, load_extractor

        model = build_density_ratio(self._ratio_config(cfg))
        extractor, _ = load_extractor(cfg.dre.extractor)
        model.extractor.load_state_dict(extractor.state_dict())
        return model

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        from ..cgankd.gan import load_generator
        from ..cgankd.training import DreRecipe

        generator = load_generator(cfg.dre.generator)
        if generator.num_classes != self.num_classes(cfg) or tuple(generator.image_shape) != self.probe_size(cfg):
            raise ConfigError(f"dre.generator {cfg.dre.generator} makes {generator.image_shape} images for "
                              f"{generator.num_classes} classes, the data are {self.probe_size(cfg)} with "
                              f"{self.num_classes(cfg)}: give the generator trained on these data")
        return DreRecipe(student, generator, cfg.dre.penalty, cfg.dre.betas)

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        from ..cgankd.gan import load_generator

        # regression (released train_cdre): each real draw picks a distinct label uniformly, then an image of it
        data = self._loaders(cfg, device, flip=cfg.dre.flip, rank=rank, world_size=world_size,
                             label_uniform=self.num_classes(cfg) is None)
        data.meta["ratio_config"] = self._ratio_config(cfg)
        data.generator = load_generator(cfg.dre.generator, device)
        data.eval_samples = cfg.dre.eval_samples
        return data

    @torch.inference_mode()
    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        from ..cgankd.dre import density_ratio_loss
        from ..cgankd.gan import generate

        was = model.training
        model.eval()
        r_real, labels = [], []
        for batch in data.test:
            r_real.append(model(batch.image, batch.targets).float())
            labels.append(batch.targets)
        r_real, labels = torch.cat(r_real), torch.cat(labels)
        fake_labels = labels[:data.eval_samples]
        fakes = generate(data.generator, fake_labels.cpu(), batch_size=250, seed=0, device=device)
        r_fake = torch.cat([model(fakes[i:i + 250].to(device), fake_labels[i:i + 250])
                            for i in range(0, len(fakes), 250)]).float()
        model.train(was)
        return {"test_dre_loss": density_ratio_loss(r_fake, r_real, 0.0).item(),
                "test_ratio_real": r_real.mean().item(), "test_ratio_fake": r_fake.mean().item()}

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        return (f"DRE loss {m['test_dre_loss']:.4f} (mean ratio: real {m['test_ratio_real']:.3f}, "
                f"fake {m['test_ratio_fake']:.3f})")


class AutoencoderTask(_GenerativeTask):
    """``task: dre_autoencoder``: the regression DRE feature extractor, the sparse autoencoder with a
    regression branch (``cgankd.dre.SparseAutoencoder``) on the real images in [-1, 1] and their
    labels in [0, 1]; the solver's optimiser and schedule (the reference: SGD lr 0.01, x0.1 every 50
    of 200 epochs); real images flipped unless ``dre.flip: false``, drawn label-uniformly as for the
    DRE. Evaluation: reconstruction MSE and the label MAE on [0, 1] of the test images; the MAE picks
    best.pt."""

    name = "dre_autoencoder"
    score_key, score_label, higher_is_better = "test_label_mae", "label MAE", False
    curve_scores = {"test_label_mae": "test label MAE", "test_reconstruction": "test reconstruction MSE"}

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if cfg.data.name != "regression":
            raise ConfigError("task: dre_autoencoder is the regression extractor: data.name must be regression (for "
                              "classification train dre_extractor_small / dre_extractor_resnet34)")

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        from ..cgankd.dre import SparseAutoencoder

        width = cfg.dre.autoencoder_width if cfg.dre is not None else 32
        return SparseAutoencoder(self.probe_size(cfg), width)

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        from ..cgankd.training import AutoencoderRecipe

        d = cfg.dre
        return AutoencoderRecipe(student, d.sparsity if d else 1e-3, d.regression_weight if d else 1.0)

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        # as released (train_sparseAE): real images flipped at random, each drawn by a distinct label picked uniformly
        data = self._loaders(cfg, device, flip=cfg.dre.flip if cfg.dre is not None else True, rank=rank,
                             world_size=world_size, label_uniform=True)
        data.meta["autoencoder_config"] = {"image_shape": list(self.probe_size(cfg)),
                                           "width": cfg.dre.autoencoder_width if cfg.dre is not None else 32}
        return data

    @torch.inference_mode()
    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        was = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in data.test:
            recon, _, predicted = model(batch.image)
            sums += torch.tensor([(recon - batch.image).pow(2).mean(dim=(1, 2, 3)).sum().item(),
                                  (predicted - batch.targets).abs().sum().item(), len(batch.targets)], dtype=torch.float64)
        model.train(was)
        return {"test_reconstruction": (sums[0] / sums[2]).item(), "test_label_mae": (sums[1] / sums[2]).item()}

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        return f"label MAE {m['test_label_mae']:.4f} (reconstruction MSE {m['test_reconstruction']:.4f})"
