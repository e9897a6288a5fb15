"""Datasets and loaders for training: ``build_datasets(name, root, ...)`` is the entry point."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Protocol

import torch
from torch.utils.data import Subset

from .augment import DATASET_STATS, BatchAugment
from .cifar import cifar_class_names, load_cifar
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import load_fashion_mnist
from .imagefolder import ImageFolderLoader, imagenet_transforms, load_image_folder
from .loader import TensorLoader, derive_seed

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


class BatchLoader(Protocol):
    """What the trainer iterates: ``(images, labels, indices)`` batches on the training device."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    name: str
    train: BatchLoader
    test: BatchLoader
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) of the model input
    num_samples: int  # training samples (after ``subset``); indices in train batches are below it
    train_targets: torch.Tensor  # int64 labels of the training samples, CPU
    class_names: Optional[tuple[str, ...]] = None
    val: Optional[BatchLoader] = None  # held out of the training set (``val_split``) for model selection


def subset_indices(
    labels: torch.Tensor, n: int, seed: int = 0, mode: Literal["balanced", "first"] = "balanced"
) -> torch.Tensor:
    """Sorted indices of ``n`` samples: the first ``n``, or a seeded random pick spread evenly over
    the classes (round-robin over classes in random order, so rare classes run out first)."""
    total = len(labels)
    n = min(n, total)
    if mode == "first":
        return torch.arange(n)
    if mode != "balanced":
        raise ValueError(f"subset mode must be 'balanced' or 'first', got {mode!r}")
    generator = torch.Generator().manual_seed(derive_seed(seed, 2))
    shuffled = torch.randperm(total, generator=generator)
    shuffled_labels = labels[shuffled]
    # Rank of each shuffled sample among the samples of its class.
    by_class = torch.sort(shuffled_labels, stable=True).indices
    sorted_labels = shuffled_labels[by_class]
    group_start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = torch.empty(total, dtype=torch.int64)
    rank_in_class[by_class] = torch.arange(total) - group_start
    order = torch.sort(rank_in_class, stable=True).indices  # ties keep the random order
    return torch.sort(shuffled[order[:n]]).values


# The validation split does not follow the run's seed: teachers and students trained with other
# seeds hold out the same samples, so none of them selects its model on images another trained on.
VAL_SPLIT_SEED = 1_000_003


def split_validation(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): ``fraction`` of the samples, spread evenly over the
    classes, drawn with a fixed seed; both sorted, disjoint, covering every sample."""
    n_val = max(1, round(fraction * len(labels)))
    if n_val >= len(labels):
        raise ValueError(f"data.val_split={fraction} leaves no training sample out of {len(labels)}")
    val = subset_indices(labels, n_val, VAL_SPLIT_SEED)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


# Which training labels the scarce-label setting keeps does not follow the run's seed either: the
# teacher, the NOKD student and every cGAN-KD stage of one setting see the same labelled images.
LABELLED_SEED = 2_000_003


def labelled_indices(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of the labelled part of a training set (the scarce-label setting): from each
    class c, ``round(fraction * n_c)`` samples (at least one), the first of a permutation drawn from
    ``seed`` alone, so the class proportions are kept (on a balanced set: equal counts)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(derive_seed(LABELLED_SEED, seed))
    order = torch.randperm(len(labels), generator=generator)
    keep = []
    for c in torch.unique(labels).tolist():
        of_class = order[labels[order] == c]
        keep.append(of_class[:max(1, round(fraction * len(of_class)))])
    return torch.sort(torch.cat(keep)).values


def _load_tensors(name: str, root, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split)
    return load_cifar(root, name, split)


def _class_names(name: str, root) -> Optional[tuple[str, ...]]:
    if name == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    try:
        return cifar_class_names(root, name)
    except FileNotFoundError:  # the meta file is optional for training
        return None


def _train_augment(name: str, augment: bool, channels_last: bool, normalisation=None) -> BatchAugment:
    """``normalisation``: (mean, std) in place of the dataset's statistics (e.g. recomputed on real +
    generated images)."""
    options = dict(crop_padding=4, flip=True, train=augment, channels_last=channels_last)
    if name == "fashion_mnist":  # 28 x 28 grey -> the 32 x 32 RGB input of the CIFAR models
        options.update(pad_to=32, channels=3)
    if normalisation is not None:
        return BatchAugment(mean=tuple(normalisation[0]), std=tuple(normalisation[1]), **options)
    return BatchAugment.for_dataset(name, **options)


def append_generated(images: torch.Tensor, labels: torch.Tensor, generated, num_classes: Optional[int] = None):
    """The training tensors with generated ``(uint8 images, labels)`` appended after them (so the
    real samples keep their indices); a one-line error when they do not fit the real images."""
    extra_images, extra_labels = generated
    if extra_images.dtype != torch.uint8 or tuple(extra_images.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"generated images are {extra_images.dtype} {tuple(extra_images.shape[1:])}, the real "
                         f"training images uint8 {tuple(images.shape[1:])}: generate them at the data's size")
    extra_labels = torch.as_tensor(extra_labels).to(labels.dtype)
    if num_classes is not None and len(extra_labels) and not 0 <= int(extra_labels.min()) <= int(extra_labels.max()) < num_classes:
        raise ValueError(f"generated labels lie outside 0..{num_classes - 1}")
    return torch.cat([images, extra_images]), torch.cat([labels, extra_labels])


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    subset: Optional[int] = None,
    subset_mode: Literal["balanced", "first"] = "balanced",
    val_split: Optional[float] = None,
    augment: bool = True,
    drop_last: bool = False,
    channels_last: bool = False,
    workers: int = 4,
    image_size: int = 224,
    resize_size: Optional[int] = None,
    labelled_fraction: Optional[float] = None,
    labelled_seed: int = 0,
    generated: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    normalisation: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None,
) -> DataBundle:
    """Train and test loaders for ``name`` (one of ``DATASETS``).

    ``batch_size`` / ``eval_batch_size`` are global batches, split across ``world_size`` processes.
    ``root=None`` means the dataset's default location (Fashion-MNIST: the Debian package's
    folder or $REVIEWKD_FASHION_MNIST; CIFAR: $REVIEWKD_CIFAR or ./data); ``imagefolder`` needs one.
    ``subset`` keeps ``subset`` training and ``subset`` test samples (see ``subset_indices``).
    ``val_split`` holds that fraction of the (subset) training set out as ``val`` (see
    ``split_validation``); the training loader, ``num_samples`` and ``train_targets`` are the rest.
    ``workers``, ``image_size`` and ``resize_size`` (default ``image_size * 256 / 224``) only
    concern ``imagefolder``; the other datasets live on ``device`` and are augmented there.
    ``labelled_fraction`` keeps that fraction of the training set (``labelled_indices``, drawn from
    ``labelled_seed``, before ``subset``); ``generated`` (uint8 images at the data's stored size,
    labels) is appended to the training set after the validation split; ``normalisation`` (mean,
    std) replaces the dataset's statistics for every split.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    eval_batch_size = eval_batch_size or batch_size
    distributed = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    if name == "imagefolder":
        if labelled_fraction is not None or generated is not None or normalisation is not None:
            raise ValueError("data.labelled_fraction, data.generated and data.mean/std are for the in-memory datasets "
                             "(fashion_mnist, cifar10, cifar100), not imagefolder")
        return _build_image_folder(
            root, batch_size, eval_batch_size, subset, subset_mode, val_split, augment, drop_last, channels_last,
            workers, image_size, resize_size or round(image_size * 256 / 224), distributed,
        )

    train_images, train_labels = _load_tensors(name, root, "train")
    test_images, test_labels = _load_tensors(name, root, "test")
    if labelled_fraction is not None:
        keep = labelled_indices(train_labels, labelled_fraction, labelled_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    if subset is not None:
        keep = subset_indices(train_labels, subset, seed, subset_mode)
        train_images, train_labels = train_images[keep], train_labels[keep]
        keep = subset_indices(test_labels, subset, seed, subset_mode)
        test_images, test_labels = test_images[keep], test_labels[keep]
    val = None
    if val_split is not None:
        keep, held = split_validation(train_labels, val_split)
        val_images, val_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[keep], train_labels[keep]
    if generated is not None:
        train_images, train_labels = append_generated(train_images, train_labels, generated, _NUM_CLASSES[name])
    train_augment = _train_augment(name, augment, channels_last, normalisation)
    train = TensorLoader(
        train_images, train_labels, batch_size, shuffle=True, drop_last=drop_last,
        augment=train_augment, **distributed,
    )
    test = TensorLoader(
        test_images, test_labels, eval_batch_size, shuffle=False, drop_last=False,
        augment=train_augment.evaluation(), even_shards=False, **distributed,
    )
    if val_split is not None:
        val = TensorLoader(val_images, val_labels, eval_batch_size, shuffle=False, drop_last=False,
                           augment=train_augment.evaluation(), even_shards=False, **distributed)
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=_NUM_CLASSES[name],
        input_size=train_augment.output_size(tuple(train_images.shape[1:])),
        num_samples=len(train_labels),
        train_targets=train_labels.clone(),
        class_names=_class_names(name, root),
        val=val,
    )


def _build_image_folder(
    root, batch_size, eval_batch_size, subset, subset_mode, val_split, augment, drop_last, channels_last,
    workers, image_size, resize_size, distributed,
) -> DataBundle:
    if root is None:
        raise FileNotFoundError("the imagefolder dataset needs a root: a folder with train/<class>/ and val/<class>/")
    mean, std = DATASET_STATS["imagefolder"]
    train_set = load_image_folder(root, "train", imagenet_transforms(augment, image_size, resize_size, mean, std))
    test_set = load_image_folder(root, "val", imagenet_transforms(False, image_size, resize_size, mean, std))
    if train_set.classes != test_set.classes:
        raise ValueError(f"{root}: train/ and val/ hold different class folders")
    classes = tuple(train_set.classes)
    train_targets = torch.tensor(train_set.targets, dtype=torch.int64)
    if subset is not None:
        keep = subset_indices(train_targets, subset, distributed["seed"], subset_mode)
        train_set, train_targets = Subset(train_set, keep.tolist()), train_targets[keep]
        test_keep = subset_indices(torch.tensor(test_set.targets), subset, distributed["seed"], subset_mode)
        test_set = Subset(test_set, test_keep.tolist())
    common = dict(num_workers=workers, channels_last=channels_last, **distributed)
    val = None
    if val_split is not None:  # the held-out images get the evaluation transform
        keep, held = split_validation(train_targets, val_split)
        base = train_set.dataset if isinstance(train_set, Subset) else train_set
        positions = train_set.indices if isinstance(train_set, Subset) else list(range(len(train_set)))
        held_out = load_image_folder(root, "train", imagenet_transforms(False, image_size, resize_size, mean, std))
        val = ImageFolderLoader(Subset(held_out, [positions[i] for i in held.tolist()]), eval_batch_size, train=False,
                                **common)
        train_set = Subset(base, [positions[i] for i in keep.tolist()])
        train_targets = train_targets[keep]
    return DataBundle(
        name="imagefolder",
        train=ImageFolderLoader(train_set, batch_size, train=True, drop_last=drop_last, **common),
        test=ImageFolderLoader(test_set, eval_batch_size, train=False, **common),
        num_classes=len(classes),
        input_size=(3, image_size, image_size),
        num_samples=len(train_targets),
        train_targets=train_targets,
        class_names=classes,
        val=val,
    )


__all__ = [
    "DATASETS", "BatchAugment", "BatchLoader", "DataBundle", "ImageFolderLoader", "TensorLoader",
    "append_generated", "build_datasets", "labelled_indices", "load_cifar", "load_fashion_mnist", "split_validation",
    "subset_indices",
]
