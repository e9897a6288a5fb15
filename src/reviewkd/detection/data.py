"""COCO-format detection data: images folder + instances json, read with pycocotools.

Training samples get the standard detection augmentation: resize so the shorter side is a size
drawn from ``min_sizes`` (the longer side capped at ``max_size``), then a horizontal flip with
probability ``flip_prob`` that moves boxes and masks with the image. Evaluation samples keep their
original size (the detector's transform resizes them and maps detections back). Batches are what
torchvision detectors take: a list of CHW float images in [0, 1] and a list of target dicts
(``boxes`` x1y1x2y2, ``labels``, ``masks`` for Mask R-CNN, ``image_id``).

Training order is a function of (seed, iteration): an endless sequence of seeded permutations,
split across processes, whose augmentation draws are seeded per (seed, pass, image). A run resumed
at iteration ``i`` therefore sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..batch import Batch


def quiet_coco(annotation_file: str | os.PathLike):
    """pycocotools.COCO without its progress prints."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ------------------------------------------------------------------------------------ transforms
def resize(image: torch.Tensor, target: dict, short: int, max_size: int) -> tuple[torch.Tensor, dict]:
    """Scale so the shorter side is ``short`` unless the longer side would pass ``max_size``."""
    h, w = image.shape[-2:]
    scale = min(short / min(h, w), max_size / max(h, w))
    new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (new_h, new_w) == (h, w):
        return image, target
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    target = dict(target)
    sx, sy = new_w / w, new_h / h
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
    if "masks" in target and target["masks"].numel():
        target["masks"] = F.interpolate(target["masks"][None].float(), size=(new_h, new_w), mode="nearest")[0].to(torch.uint8)
    elif "masks" in target:
        target["masks"] = target["masks"].new_zeros((0, new_h, new_w))
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    return image, target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror left-right; boxes become (W - x2, y1, W - x1, y2), masks are mirrored too."""
    w = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


# -------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class TrainAugment:
    min_sizes: tuple[int, ...] = (800,)
    max_size: int = 1333
    flip_prob: float = 0.5


class CocoDetection(Dataset):
    """Items are ``(image, target)``; a training item is fetched by ``(index, (seed, pass))`` so its
    augmentation draws are reproducible, an evaluation item by its index.

    ``labels``: ``"contiguous"`` maps the sorted category ids to 1..K (K + 1 classes with the
    background); ``"category_id"`` keeps the ids themselves (max id + 1 classes: 91 for COCO,
    the label space of torchvision's COCO detectors).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        *,
        train: bool,
        masks: bool = False,
        labels: str = "contiguous",
        augment: TrainAugment | None = None,
        subset: int | None = None,
    ):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images folder not found: {self.images_dir}")
        self.coco = quiet_coco(annotation_file)
        self.train, self.masks, self.augment = train, masks, augment
        cat_ids = sorted(self.coco.getCatIds())
        if labels == "contiguous":
            self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        elif labels == "category_id":
            self.cat_to_label = {c: c for c in cat_ids}
        else:
            raise ValueError(f"labels must be 'contiguous' or 'category_id', got {labels!r}")
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.num_classes = max(self.cat_to_label.values(), default=0) + 1
        self.class_names = {self.cat_to_label[c["id"]]: c["name"] for c in self.coco.loadCats(cat_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:  # images without a usable object teach nothing to the box heads (as detectron2)
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids[:subset] if subset else ids

    @staticmethod
    def _usable(ann: dict) -> bool:
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[torch.Tensor, dict]:
        """The image (3 x H x W float in [0, 1]) and its target at the original size."""
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.images_dir / info["file_name"]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)[keep],
            "image_id": int(image_id),
        }
        if self.masks:
            masks = [torch.from_numpy(self.coco.annToMask(a)) for a, k in zip(anns, keep.tolist()) if k]
            target["masks"] = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        return image, target

    def __getitem__(self, key):
        index, aug_key = key if isinstance(key, tuple) else (key, None)
        image, target = self.load(index)
        if self.train and self.augment is not None and aug_key is not None:
            rng = np.random.default_rng([*aug_key, index])
            short = int(self.augment.min_sizes[rng.integers(len(self.augment.min_sizes))])
            image, target = resize(image, target, short, self.augment.max_size)
            if rng.random() < self.augment.flip_prob:
                image, target = hflip(image, target)
        return image, target


def collate(items) -> Batch:
    return Batch({"images": [item[0] for item in items]}, [item[1] for item in items])


# ------------------------------------------------------------------------------------- samplers
class TrainBatches:
    """Endless per-process batches of ``(index, (seed, pass))`` from iteration ``start``.

    Pass ``p`` is a permutation seeded by (seed, p); process ``rank`` takes every ``world``-th
    element; incomplete batches at the end of a pass are dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self.per_pass = (num_samples // world) // batch_size
        if self.per_pass < 1:
            raise ValueError(f"{num_samples} training images cannot fill one batch of {batch_size} per process "
                             f"on {world} process(es): lower data.batch_size or add images")

    def indices(self, pass_index: int) -> list[int]:
        if getattr(self, "_cached", (None,))[0] != pass_index:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
            self._cached = (pass_index, torch.randperm(self.n, generator=g)[self.rank::self.world].tolist())
        return self._cached[1]

    def __iter__(self) -> Iterator[list]:
        it = self.start
        while True:
            p, b = divmod(it, self.per_pass)
            mine = self.indices(p)[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, (self.seed, p)) for i in mine]
            it += 1


class EvalBatches:
    """Every image once, in order; process ``rank`` takes every ``world``-th one."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1):
        self.mine = list(range(rank, num_samples, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.mine) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self.mine), self.batch_size):
            yield self.mine[i:i + self.batch_size]


@dataclass
class DetectionData:
    train_set: CocoDetection
    val_set: CocoDetection
    batch_size: int  # per process
    eval_batch_size: int
    seed: int
    rank: int
    world: int
    workers: int

    @property
    def num_classes(self) -> int:
        return self.val_set.num_classes

    @property
    def passes_per_iter(self) -> float:
        return 1.0 / TrainBatches(len(self.train_set), self.batch_size, self.seed, self.rank, self.world).per_pass

    def train_loader(self, start_iter: int = 0) -> DataLoader:
        sampler = TrainBatches(len(self.train_set), self.batch_size, self.seed, self.rank, self.world, start_iter)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate, num_workers=self.workers,
                          persistent_workers=False)

    def val_loader(self) -> DataLoader:
        return val_loader(self.val_set, self.eval_batch_size, self.workers, self.rank, self.world)


def resolve(root: str | None, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def _ensure_data(cfg) -> None:
    if cfg.data.name == "shapes":
        from .shapes import ensure_shapes

        ensure_shapes(cfg.data.root or "data/shapes", **cfg.detection.shapes)


def build_val_set(cfg, *, masks: bool) -> CocoDetection:
    """The evaluation set of a detection config alone (no training annotations read)."""
    _ensure_data(cfg)
    det = cfg.detection
    return CocoDetection(resolve(cfg.data.root, det.val_images), resolve(cfg.data.root, det.val_annotations),
                         train=False, masks=masks, labels=det.labels, subset=cfg.data.subset)


def val_loader(dataset: CocoDetection, batch_size: int, workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    return DataLoader(dataset, batch_sampler=EvalBatches(len(dataset), batch_size, rank, world), collate_fn=collate,
                      num_workers=workers)


def build_detection_data(cfg, *, masks: bool, rank: int = 0, world: int = 1) -> DetectionData:
    """Datasets and loaders of a detection config (``data`` + ``detection`` sections)."""
    d, det = cfg.data, cfg.detection
    _ensure_data(cfg)
    root = d.root
    if d.batch_size % world:
        raise ValueError(f"data.batch_size={d.batch_size} is the global batch: it must divide by the "
                         f"{world} processes")
    aug = TrainAugment(tuple(det.min_size_train), det.max_size_train, det.flip_prob if d.augment else 0.0)
    train = CocoDetection(resolve(root, det.train_images), resolve(root, det.train_annotations), train=True,
                          masks=masks, labels=det.labels, augment=aug, subset=d.subset)
    val = build_val_set(cfg, masks=masks)
    if train.cat_to_label != val.cat_to_label:
        raise ValueError("train and val annotation files have different categories")
    return DetectionData(train, val, d.batch_size // world, d.eval_batch_size, cfg.seed, rank, world, d.workers)
