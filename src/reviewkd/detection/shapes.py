"""A small COCO-format detection / instance-segmentation dataset of rendered shapes.

Each image (a random, usually non-square size, e.g. 128..192 px a side) has a textured, noisy
background (a smooth random colour field, stripes, pixel noise) and a few non-overlapping filled
shapes of four classes: ellipse, triangle, rectangle (rotated) and star. Every shape is drawn from
the same polygon that its annotation stores, so boxes and polygon masks are exact. The output is
what COCO tools expect::

    OUT/train/000001.png ...            OUT/val/000001.png ...
    OUT/annotations/instances_train.json OUT/annotations/instances_val.json

Everything is a function of ``seed``: the same call writes the same files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ellipse", "triangle", "rectangle", "star")


def _polygon(kind: str, cx: float, cy: float, size: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N x 2) of a shape of the given kind whose extent is about ``size`` pixels."""
    angle = rng.uniform(0, 2 * math.pi)
    r = size / 2
    if kind == "ellipse":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        aspect = rng.uniform(0.55, 1.0)
        pts = np.stack([r * np.cos(t), aspect * r * np.sin(t)], 1)
    elif kind == "triangle":
        t = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif kind == "rectangle":
        aspect = rng.uniform(0.45, 0.9)
        w, h = r, r * aspect
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif kind == "star":
        t = np.linspace(0, 2 * math.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field with stripes, as float32 H x W x 3 in [0, 255]."""
    grid = rng.uniform(40, 215, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    field += rng.uniform(5, 25) * stripes[..., None]
    return field


def _render(h: int, w: int, max_objects: int, rng: np.random.Generator):
    image = _background(h, w, rng)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    objects, boxes = [], []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(wanted * 20):
        if len(objects) == wanted:
            break
        kind_id = int(rng.integers(len(CLASSES)))
        size = float(rng.uniform(14, 0.55 * min(h, w)))
        margin = size / 2 + 2
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        poly = _polygon(CLASSES[kind_id], cx, cy, size, rng)
        poly[:, 0] = poly[:, 0].clip(0, w - 1)
        poly[:, 1] = poly[:, 1].clip(0, h - 1)
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        # no overlaps (a 3-pixel gap), so every polygon is exactly its visible mask
        if any(x0 - 3 < bx1 and bx0 < x1 + 3 and y0 - 3 < by1 and by0 < y1 + 3 for bx0, by0, bx1, by1 in boxes):
            continue
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.polygon([tuple(p) for p in poly.tolist()], fill=colour)
        boxes.append((x0, y0, x1, y1))
        objects.append((kind_id, poly))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(4, 14), size=(h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def _split(root: Path, split: str, count: int, sizes: tuple[int, int], max_objects: int, seed: int) -> Path:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        pixels, objects = _render(h, w, max_objects, rng)
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(folder / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for kind_id, poly in objects:
            flat = [round(float(v), 2) for v in poly.reshape(-1)]
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": kind_id + 1,
                "segmentation": [flat], "area": float(mask_utils.area(rle)),
                "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"rendered shapes ({split}), seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    ann_path = root / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(coco))
    return ann_path


def make_shapes(
    out: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    min_size: int = 128,
    max_size: int = 192,
    max_objects: int = 4,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the dataset under ``out``; returns the paths of the two splits' folders and jsons."""
    if not 16 <= min_size <= max_size:
        raise ValueError(f"image sizes must satisfy 16 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(out)
    return {
        "train_images": root / "train",
        "train_annotations": _split(root, "train", num_train, (min_size, max_size), max_objects, seed),
        "val_images": root / "val",
        "val_annotations": _split(root, "val", num_val, (min_size, max_size), max_objects, seed),
    }


def ensure_shapes(out: str | Path, **kwargs) -> Path:
    """Generate the dataset once: reuse ``out`` when both annotation files exist."""
    root = Path(out)
    if not all((root / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")):
        make_shapes(root, **kwargs)
    return root
