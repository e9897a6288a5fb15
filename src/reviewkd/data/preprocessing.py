"""The evaluation preprocessing of each dataset, written down as data so that exports carry it and
inference on image files repeats it exactly.

A spec is a JSON-able dict; its steps run in this order:

- ``color``: ``"L"`` (grey) or ``"RGB"``: how a decoded image is converted (PIL ``convert``; a grey
  image given to a colour model has its value repeated, a colour one given to a grey model becomes
  its luma);
- ``resize``: ``null``, ``{"size": [H, W]}`` (exactly that size) or ``{"shorter_side": S}`` (aspect
  kept), bilinear, as torchvision's ``Resize`` on PIL images; an image already at the size is left
  as it is;
- ``center_crop``: ``null`` or ``[H, W]``;
- ``pad_to``: ``null`` or ``[H, W]``: zero pixels around the image, centred (top ``(H - h) // 2``),
  added before normalisation, so a padded pixel is 0 on the 0..255 scale;
- ``channels``: channels the model reads (a grey image is repeated to 3);
- ``mean`` / ``std``: on the 0..1 scale, one value or one per channel: ``(pixel / 255 - mean) / std``;
- ``batch``: ``"stack"`` (one N x C x H x W tensor) or ``"list"`` (one C x H x W tensor per image,
  for detectors, which resize and normalise inside the model: ``inside_model`` says how).

Training sets that hold images at one size (Fashion-MNIST 28 x 28, CIFAR 32 x 32) are never resized
in training; an image of another size given at inference is resized to it first (``resize`` records
that size), which is a choice of the inference path, not part of the training pipeline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .augment import DATASET_STATS, BatchAugment
from .regression import IMAGE_EXTENSIONS, PIXEL_MEAN, PIXEL_STD

# (H, W) of the images the in-memory datasets store (their loaders return them at this size).
NATIVE_SIZE = {"fashion_mnist": (28, 28), "cifar10": (32, 32), "cifar100": (32, 32)}
GREY_DATASETS = ("fashion_mnist",)
COLORS = ("L", "RGB")


def eval_preprocessing(cfg) -> Optional[dict]:
    """The spec of the images a classification or regression run evaluated on, from its config
    (the same choices ``build_datasets`` / ``build_regression_data`` make); None for data whose
    preprocessing is not known here (nothing is guessed)."""
    from . import _train_augment  # the in-memory datasets' augmentation, whose evaluation half we record

    d = cfg.data
    if d.name in NATIVE_SIZE:
        augment = _train_augment(d.name, False, False, getattr(d, "normalisation", None)).evaluation()
        return _spec("L" if d.name in GREY_DATASETS else "RGB", {"size": list(NATIVE_SIZE[d.name])}, None,
                     _pair(augment.pad_to), augment.channels or 3, augment.mean, augment.std)
    if d.name == "imagefolder":  # imagenet_transforms(False, ...): Resize(shorter side) + CenterCrop
        mean, std = DATASET_STATS["imagefolder"]
        shorter = round(d.image_size * 256 / 224)  # build_datasets' default resize_size
        return _spec("RGB", {"shorter_side": shorter}, [d.image_size, d.image_size], None, 3, mean, std)
    if d.name == "regression":  # load_images: convert, bilinear resize to image_size x image_size
        channels = cfg.regression.channels
        mean, std = getattr(d, "normalisation", None) or (PIXEL_MEAN, PIXEL_STD)
        return _spec("L" if channels == 1 else "RGB", {"size": [d.image_size, d.image_size]}, None, None, channels,
                     mean, std)
    return None


def detector_preprocessing(mean: Sequence[float], std: Sequence[float], min_size: int, max_size: int) -> dict:
    """Detectors read a list of RGB images scaled to 0..1 and resize and normalise them inside."""
    spec = _spec("RGB", None, None, None, 3, (0.0,), (1.0,), batch="list")
    spec["inside_model"] = {"resize": {"min_size": min_size, "max_size": max_size},
                            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return spec


def _spec(color, resize, center_crop, pad_to, channels, mean, std, batch="stack") -> dict:
    return {"color": color, "resize": resize, "center_crop": center_crop, "pad_to": pad_to, "channels": channels,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "batch": batch}


def _pair(size) -> Optional[list[int]]:
    if size is None:
        return None
    return [size, size] if isinstance(size, int) else [int(s) for s in size]


# --------------------------------------------------------------------------- applying a spec
ImageLike = Union[str, os.PathLike, Image.Image]


def open_image(path: Union[str, os.PathLike], decode: bool = True) -> Image.Image:
    """The decoded image at ``path`` (``decode=False``: only its header read, a cheap check);
    one-line errors for a missing file or one that is no image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            return image
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image that can be decoded ({type(exc).__name__}); "
                         f"give PNG or JPEG files") from None


def expand_folders(paths: Sequence[Union[str, os.PathLike]], suffixes: Sequence[str], kind: str) -> list[Path]:
    """Files as given, and the files with one of ``suffixes`` (sorted) anywhere below folders;
    missing paths and folders without such files are refused (``kind``: "image", "video")."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not inside:
                raise FileNotFoundError(f"folder {p} holds no {kind} files ({', '.join(suffixes)})")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{kind} not found: {p}")
    return found


def find_images(paths: Sequence[Union[str, os.PathLike]]) -> list[Path]:
    """Files as given, and the image files (by extension, sorted) anywhere below folders; every
    file's header is read, so a file that is no image is refused before any model runs."""
    found = expand_folders(paths, IMAGE_EXTENSIONS, "image")
    for f in found:
        open_image(f, decode=False)
    return found


class ImagePreprocessor:
    """Applies a spec (see the module doc) to decoded images or image files."""

    def __init__(self, spec: Optional[dict]):
        if spec is None:
            raise ValueError("this model's metadata records no image preprocessing (its data are not images "
                             "reviewkd knows how to prepare): call the model on prepared tensors")
        missing = [k for k in ("color", "resize", "center_crop", "pad_to", "channels", "mean", "std", "batch")
                   if k not in spec]
        if missing or spec["color"] not in COLORS:
            raise ValueError(f"preprocessing spec lacks {missing or 'a valid color'}: re-export the model "
                             f"with `reviewkd export`")
        self.spec = spec
        # The data pipeline's own normalisation (padding of raw pixels, channel repeat, scaling).
        self.normalise = BatchAugment(mean=spec["mean"], std=spec["std"], pad_to=_tuple(spec["pad_to"]),
                                      channels=spec["channels"], train=False)

    def pixels(self, image: ImageLike) -> torch.Tensor:
        """uint8 C x H x W after colour conversion, resize and crop."""
        from torchvision.transforms import functional as TF

        image = open_image(image) if not isinstance(image, Image.Image) else image
        image = image.convert(self.spec["color"])
        resize = self.spec["resize"]
        if resize is not None:
            if "size" in resize:
                height, width = resize["size"]
                if (image.height, image.width) != (height, width):
                    image = TF.resize(image, [height, width])
            else:
                image = TF.resize(image, resize["shorter_side"])
        if self.spec["center_crop"] is not None:
            image = TF.center_crop(image, list(self.spec["center_crop"]))
        array = np.asarray(image, dtype=np.uint8)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def __call__(self, images: Sequence[ImageLike]) -> Union[torch.Tensor, list[torch.Tensor]]:
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        pixels = [self.pixels(im) for im in images]
        if self.spec["batch"] == "list":
            return [self.normalise(p[None])[0] for p in pixels]
        return self.normalise(torch.stack(pixels))


def _tuple(size) -> Optional[tuple[int, int]]:
    return None if size is None else (int(size[0]), int(size[1]))
