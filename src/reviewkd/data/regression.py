"""Image regression data (one float target per image): sources, split, target scaling, loaders.

Sources (``build_regression_data`` takes exactly one):

* an image folder (``root``) whose file names carry the target, UTKFace style
  ``age_gender_race_date.jpg.chip.jpg``: the target is the number before the first ``_``
  (``26_0_1_20170116174525125.jpg.chip.jpg`` -> 26.0). Other files are skipped and counted
  (``RegressionData.skipped``); hidden files are ignored;
* a CSV file with a header (``csv``): a column of image paths, relative to the CSV's folder,
  and a column of numeric targets (``file_column`` / ``target_column``);
* in-memory tensors (``tensors``): uint8 images N x C x H x W and N targets.

Every image is decoded with PIL, converted to RGB (``channels=3``) or grey (``channels=1``),
resized to ``image_size`` x ``image_size`` without keeping the aspect ratio (UTKFace crops are
square already) and stacked into one uint8 tensor that ``TensorLoader`` serves and augments on
the training device. In-memory images of another size are resized the same way.

Split rule: a folder ``root`` holding ``train/`` and ``test/`` folders, a ``csv`` folder holding
``train.csv`` and ``test.csv``, or ``tensors=((train_images, train_targets), (test_images,
test_targets))`` is used as given. Any other (single) source is split by a random permutation
drawn from ``split_seed`` alone: the first ``round(test_fraction * N)`` samples of it form the
test set, the rest the training set (both kept in source order). The split does not follow
``seed``, so that runs with different training seeds (a teacher and its students, say) share
one test set and no test image is ever trained on.

Targets: the model trains on targets normalised with the TRAINING targets' statistics
(``TargetScaler``); ``scaler.denormalise`` brings predictions back to the original unit for
MAE / RMSE.
"""
from __future__ import annotations

import csv as csv_module
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import BatchAugment
from .loader import TensorLoader, derive_seed

PathLike = Union[str, os.PathLike]
TensorPair = tuple[torch.Tensor, torch.Tensor]
ScalerKind = Literal["standard", "minmax", "max", "none"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pixels are scaled to -1..1 (mean 0.5 / std 0.5 per channel), as in the cGAN-KD UTKFace recipe:
# face datasets have no agreed per-channel statistics, and this keeps the input symmetric.
PIXEL_MEAN, PIXEL_STD = (0.5,), (0.5,)
_TARGET_PREFIX = re.compile(r"^([+-]?\d+(?:\.\d+)?)_")
# Random streams of derive_seed, distinct from TensorLoader's (0, 1) and subset_indices' (2).
_SPLIT_STREAM, _SUBSET_STREAM = 3, 4


# ----------------------------------------------------------------------------- target scaling


@dataclass(frozen=True)
class TargetScaler:
    """``normalise(t) = (t - a) / b``; ``denormalise(y) = y * b + a``.

    ``kind``: ``"standard"`` (a = mean, b = POPULATION std, ddof=0, of the training targets),
    ``"minmax"`` (a = min, b = max - min: training targets map to 0..1), ``"max"`` (a = 0, b = max:
    targets divided by the largest, the cGAN-KD / CcGAN regression convention) or ``"none"`` (a=0, b=1).
    """

    kind: ScalerKind
    a: float
    b: float

    def __post_init__(self) -> None:
        if self.kind not in ("standard", "minmax", "max", "none"):
            raise ValueError(f"target scaler kind must be 'standard', 'minmax', 'max' or 'none', got {self.kind!r}")
        object.__setattr__(self, "a", float(self.a))
        object.__setattr__(self, "b", float(self.b))
        if not (math.isfinite(self.a) and math.isfinite(self.b) and self.b > 0):
            raise ValueError(f"target scaler needs a finite a and a positive b, got a={self.a}, b={self.b}")

    @classmethod
    def fit(cls, targets: torch.Tensor, kind: ScalerKind = "standard") -> "TargetScaler":
        """The scaler of ``kind`` for ``targets`` (statistics in float64)."""
        t = torch.as_tensor(targets).detach().to("cpu", torch.float64).flatten()
        if kind == "none":
            return cls("none", 0.0, 1.0)
        if len(t) == 0:
            raise ValueError("cannot fit a target scaler on no targets")
        if kind == "standard":
            a, b = t.mean().item(), t.std(correction=0).item()
        elif kind == "minmax":
            a, b = t.min().item(), (t.max() - t.min()).item()
        elif kind == "max":
            a, b = 0.0, t.max().item()
            if b <= 0:
                raise ValueError(f"normalise: max needs positive targets, the largest is {b}; use minmax or standard")
        else:
            raise ValueError(f"normalise must be 'standard', 'minmax', 'max' or 'none', got {kind!r}")
        # Constant targets (a tiny subset, say): only shift them, rather than divide by zero.
        return cls(kind, a, b if b > 0 else 1.0)

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.a) / self.b

    def denormalise(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.b + self.a

    def to_dict(self) -> dict[str, Union[str, float]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TargetScaler":
        return cls(values["kind"], values["a"], values["b"])


# ----------------------------------------------------------------------------- sources


def parse_utkface_target(name: str) -> Optional[float]:
    """The number before the first ``_`` of an image file name, or None when there is none."""
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return None
    match = _TARGET_PREFIX.match(name)
    return float(match.group(1)) if match else None


def scan_utkface_folder(folder: PathLike) -> tuple[list[Path], torch.Tensor, int]:
    """(image paths sorted by name, float64 targets, number of skipped files) of ``folder`` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    paths, targets, skipped = [], [], 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        target = parse_utkface_target(path.name)
        if target is None:
            skipped += 1
        else:
            paths.append(path)
            targets.append(target)
    if not paths:
        raise ValueError(
            f"{folder}: no image file named '<number>_...' (expected UTKFace names such as "
            f"26_0_1_20170116174525125.jpg.chip.jpg, target = number before the first '_'); {skipped} files skipped"
        )
    return paths, torch.tensor(targets, dtype=torch.float64), skipped


def read_target_csv(
    path: PathLike, file_column: str = "file", target_column: str = "target"
) -> tuple[list[Path], torch.Tensor]:
    """(image paths, float64 targets) from a CSV with a header; paths are relative to the CSV's folder.

    Errors are one line naming the CSV, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} not found")
    paths, targets = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        reader = csv_module.DictReader(f)
        columns = reader.fieldnames or []
        for column in (file_column, target_column):
            if column not in columns:
                raise ValueError(f"{path}: line 1: no column {column!r} in the header (columns: {', '.join(columns)})")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            name, value = row[file_column], row[target_column]
            try:
                target = float(value)
            except (TypeError, ValueError):
                target = math.nan
            if not math.isfinite(target):
                raise ValueError(f"{where}: target {value!r} in column {target_column!r} is not a finite number")
            if not name:
                raise ValueError(f"{where}: empty {file_column!r} cell")
            image = path.parent / name
            if not image.is_file():
                raise FileNotFoundError(f"{where}: image file {name!r} not found (looked for {image})")
            paths.append(image)
            targets.append(target)
    if not paths:
        raise ValueError(f"{path}: the CSV has a header but no rows")
    return paths, torch.tensor(targets, dtype=torch.float64)


def load_images(paths: Sequence[PathLike], image_size: int = 64, channels: int = 3) -> torch.Tensor:
    """uint8 N x C x S x S: each image decoded, converted to RGB / grey and resized to S x S."""
    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(paths[i]) as image:
                image = image.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(image).reshape(image_size, image_size, channels)
        except OSError as exc:
            raise ValueError(f"{paths[i]}: cannot decode the image ({exc})") from None

    # PIL releases the GIL while decoding and resizing, so threads decode a large folder faster.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _check_tensors(pair: TensorPair, image_size: int, channels: int) -> TensorPair:
    images, targets = pair
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"tensors: images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    targets = torch.as_tensor(targets).to("cpu", torch.float64).flatten()
    if len(targets) != len(images):
        raise ValueError(f"tensors: {len(images)} images but {len(targets)} targets")
    if not torch.isfinite(targets).all():
        raise ValueError("tensors: targets must be finite numbers")
    if images.shape[1] != channels:
        raise ValueError(f"tensors: images have {images.shape[1]} channels but channels={channels}")
    images = images.cpu()
    if images.shape[2:] != (image_size, image_size):
        resized = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        images = resized.round_().clamp_(0, 255).to(torch.uint8)
    return images, targets


# ----------------------------------------------------------------------------- split and subset


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, test) indices of ``n`` samples: test = the first ``round(test_fraction * n)``
    entries of a permutation drawn from ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(f"cannot split {n} samples with test_fraction={test_fraction}: a part would be empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _SPLIT_STREAM)))
    return torch.sort(order[n_test:]).values, torch.sort(order[:n_test]).values


def _subset(pair: TensorPair, n: int, seed: int, part: int) -> TensorPair:
    # The first n of a seeded permutation, kept in source order; no balancing: targets are continuous.
    generator = torch.Generator().manual_seed(derive_seed(seed, _SUBSET_STREAM, part))
    keep = torch.sort(torch.randperm(len(pair[1]), generator=generator)[:n]).values
    return pair[0][keep], pair[1][keep]


def _read_source(
    root: Optional[PathLike], tensors: Optional[Sequence], csv: Optional[PathLike], file_column: str,
    target_column: str, image_size: int, channels: int,
) -> tuple[list[TensorPair], int]:
    """([whole source] or [train, test]) as (uint8 images, float64 targets), and the skipped-file count."""
    if sum(x is not None for x in (tensors, csv)) + (root is not None and csv is None) != 1:
        raise ValueError("give exactly one data source: root (an image folder), csv (with an optional root) or tensors")
    if tensors is not None:
        pairs = [tensors] if torch.is_tensor(tensors[0]) else list(tensors)
        return [_check_tensors(pair, image_size, channels) for pair in pairs], 0
    if csv is not None:
        csv = Path(root or "") / csv  # a relative csv is relative to root
        files = [csv / "train.csv", csv / "test.csv"] if csv.is_dir() else [csv]
        parts = [read_target_csv(f, file_column, target_column) for f in files]
        return [(load_images(paths, image_size, channels), targets) for paths, targets in parts], 0
    root = Path(root)
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise FileNotFoundError(f"{root} has a {'train' if has_train else 'test'}/ folder but no "
                                f"{'test' if has_train else 'train'}/ folder; give both or neither")
    folders = [root / "train", root / "test"] if has_train else [root]
    scans = [scan_utkface_folder(folder) for folder in folders]
    pairs = [(load_images(paths, image_size, channels), targets) for paths, targets, _ in scans]
    return pairs, sum(skipped for _, _, skipped in scans)


# ----------------------------------------------------------------------------- entry point


@dataclass
class RegressionData:
    train: TensorLoader  # targets: normalised float32
    test: TensorLoader  # targets: normalised float32 (same scaler), every sample once across ranks
    input_size: tuple[int, int, int]  # (C, H, W) of the model input
    num_samples: int  # training samples (after ``subset``); indices in train batches are below it
    train_targets: torch.Tensor  # float32 training targets in the ORIGINAL unit, CPU
    scaler: TargetScaler
    num_outputs: int = 1
    name: str = "regression"
    skipped: int = 0  # files of an image folder whose names carried no target


def build_regression_data(
    root: Optional[PathLike] = None,
    *,
    tensors: Optional[Union[TensorPair, tuple[TensorPair, TensorPair]]] = None,
    csv: Optional[PathLike] = None,
    file_column: str = "file",
    target_column: str = "target",
    image_size: int = 64,
    channels: int = 3,
    batch_size: int = 128,
    eval_batch_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    subset: Optional[int] = None,
    augment: bool = True,
    drop_last: bool = False,
    channels_last: bool = False,
    test_fraction: float = 0.2,
    normalise: ScalerKind = "standard",
    split_seed: int = 0,
    generated: Optional[TensorPair] = None,
    normalisation: Optional[tuple[Sequence[float], Sequence[float]]] = None,
) -> RegressionData:
    """Train and test loaders for an image regression task (sources and split: see the module doc).

    ``batch_size`` / ``eval_batch_size`` are global batches, split across ``world_size`` processes.
    ``subset`` keeps the first ``subset`` samples of a permutation drawn from ``seed``, separately
    for train and test. Training augmentation is a horizontal flip only: the random crop with
    padding of the CIFAR recipes shifts a face off its alignment. Pixels are normalised with mean
    0.5 / std 0.5 per channel, or with ``normalisation`` (mean, std) where given. ``generated``
    (uint8 images, targets in the original unit) is appended to the training set after the split;
    the target scaler is fitted on the real training targets alone, so that a model trained on the
    real data and fine-tuned on real + generated data reads its outputs in one scale.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of samples, got {subset}")
    pairs, skipped = _read_source(root, tensors, csv, file_column, target_column, image_size, channels)
    if len(pairs) == 1:
        images, targets = pairs[0]
        train_keep, test_keep = split_indices(len(targets), test_fraction, split_seed)
        pairs = [(images[train_keep], targets[train_keep]), (images[test_keep], targets[test_keep])]
    elif len(pairs) != 2:
        raise ValueError("tensors must be (images, targets) or ((train images, targets), (test images, targets))")
    train_pair, test_pair = pairs
    if subset is not None:
        train_pair, test_pair = _subset(train_pair, subset, seed, 0), _subset(test_pair, subset, seed, 1)

    scaler = TargetScaler.fit(train_pair[1], normalise)
    if generated is not None:
        extra = _check_tensors(generated, image_size, channels)
        train_pair = (torch.cat([train_pair[0], extra[0]]), torch.cat([train_pair[1], extra[1]]))
    mean, std = normalisation if normalisation is not None else (PIXEL_MEAN, PIXEL_STD)
    train_augment = BatchAugment(flip=True, mean=tuple(mean), std=tuple(std), train=augment, channels_last=channels_last)
    distributed = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    train = TensorLoader(
        train_pair[0], scaler.normalise(train_pair[1]).float(), batch_size, shuffle=True, drop_last=drop_last,
        augment=train_augment, **distributed,
    )
    test = TensorLoader(
        test_pair[0], scaler.normalise(test_pair[1]).float(), eval_batch_size or batch_size, shuffle=False,
        drop_last=False, augment=train_augment.evaluation(), even_shards=False, **distributed,
    )
    return RegressionData(
        train=train,
        test=test,
        input_size=train_augment.output_size(tuple(train_pair[0].shape[1:])),
        num_samples=len(train_pair[1]),
        train_targets=train_pair[1].float(),
        scaler=scaler,
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- synthetic data


def make_synthetic_regression(out_dir: PathLike, n: int = 256, image_size: int = 64, seed: int = 0) -> Path:
    """Writes ``n`` PNGs named ``{target}_0_0_{i:06d}.png`` (UTKFace style) into ``out_dir``.

    Target: an integer 1..90 ("age"). Each image is a dark noisy background (every channel < 80)
    with one bright disc (every channel >= 160) at a random integer centre, fully inside the
    image, whose radius grows linearly with the target from 8% to 40% of ``image_size``; so the
    count of bright pixels grows with the target and a small CNN can learn it."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 for the disc to fit, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:image_size, :image_size]
    for i in range(n):
        target = int(rng.integers(1, 91))
        radius = image_size * (0.08 + 0.32 * (target - 1) / 89)
        margin = math.ceil(radius)
        cy, cx = rng.integers(margin, image_size - margin, size=2)  # the whole disc lies inside
        image = rng.integers(0, 80, size=(image_size, image_size, 3), dtype=np.uint8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] = rng.integers(160, 256, size=3, dtype=np.uint8)  # one colour per disc
        Image.fromarray(image).save(out / f"{target}_0_0_{i:06d}.png")
    return out


ROTATED_CANVAS = 32  # Fashion-MNIST's 28 x 28 items centred on a 32 x 32 canvas before rotation


def make_rotated_fashion_mnist(
    out_dir: PathLike, n_train: int = 10000, n_test: int = 2000, max_angle: float = 90.0, seed: int = 0,
    fashion_mnist_root: Optional[PathLike] = None,
) -> Path:
    """The rotated-angle regression set (in the spirit of RC-49: objects at a continuous angle).

    Items: ``n_train`` Fashion-MNIST training items and ``n_test`` test items (the first of a
    permutation of each split drawn from ``seed``), so no item is in both parts. Each item is
    centred on a 32 x 32 black canvas and rotated counter-clockwise (PIL ``Image.rotate``,
    bilinear, black fill; corners of the largest items may leave the canvas) by an angle drawn
    uniformly from [0, ``max_angle``) degrees from ``seed`` and rounded to 0.01; the target is that
    angle in degrees. Written as grey PNGs ``<angle>_<class>_<index>.png`` (the UTKFace naming the
    folder reader parses) into ``train/`` and ``test/``: a fixed split. Train without flips: a
    mirrored image of angle a shows angle -a. Written into a temporary folder renamed at the end,
    so an interrupted run never leaves a partial set."""
    from .fashion_mnist import load_fashion_mnist

    if not 0 < max_angle <= 180:
        raise ValueError(f"max_angle must be in (0, 180] degrees, got {max_angle}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    rng = np.random.default_rng(seed)
    pad = (ROTATED_CANVAS - 28) // 2
    for part, split, n in (("train", "train", n_train), ("test", "test", n_test)):
        images, labels = load_fashion_mnist(fashion_mnist_root, split)
        if not 0 < n <= len(labels):
            raise ValueError(f"n_{part} must be in 1..{len(labels)}, got {n}")
        pick = np.sort(rng.permutation(len(labels))[:n])
        angles = np.minimum(np.round(rng.uniform(0.0, max_angle, size=n), 2), round(max_angle - 0.01, 2))
        (tmp / part).mkdir(parents=True)
        for i, (index, angle) in enumerate(zip(pick.tolist(), angles.tolist())):
            canvas = np.zeros((ROTATED_CANVAS, ROTATED_CANVAS), dtype=np.uint8)
            canvas[pad:pad + 28, pad:pad + 28] = images[index, 0].numpy()
            rotated = Image.fromarray(canvas).rotate(angle, resample=Image.Resampling.BILINEAR)
            rotated.save(tmp / part / f"{angle:.2f}_{int(labels[index])}_{i:06d}.png")
    (tmp / "dataset.txt").write_text(f"rotated Fashion-MNIST: {n_train} train / {n_test} test items, angles uniform in "
                                     f"[0, {max_angle}) degrees, seed {seed}\n")
    os.replace(tmp, out)
    return out


SYNTHETIC_KINDS = ("discs", "rotated_fashion_mnist")


def make_synthetic(out_dir: PathLike, image_size: int, options: dict) -> Path:
    """``regression.synthetic``: ``{kind: discs, ...}`` (the default: ``make_synthetic_regression``)
    or ``{kind: rotated_fashion_mnist, ...}`` (``make_rotated_fashion_mnist``), other keys passed on."""
    options = dict(options)
    kind = options.pop("kind", "discs")
    if kind == "rotated_fashion_mnist":
        return make_rotated_fashion_mnist(out_dir, **options)
    if kind != "discs":
        raise ValueError(f"regression.synthetic.kind must be one of {', '.join(SYNTHETIC_KINDS)}, got {kind!r}")
    return make_synthetic_regression(out_dir, image_size=image_size, **options)


__all__ = [
    "IMAGE_EXTENSIONS", "RegressionData", "TargetScaler", "build_regression_data", "load_images",
    "make_rotated_fashion_mnist", "make_synthetic", "make_synthetic_regression", "parse_utkface_target", "read_target_csv", "scan_utkface_folder",
    "split_indices",
]
