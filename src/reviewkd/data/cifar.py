"""CIFAR-10 / CIFAR-100 from the "python version" archives, packed or extracted (no download)."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DEFAULT_ROOT = "data"
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    title: str
    archive: str
    folder: str
    batches: dict[str, tuple[str, ...]]
    label_key: bytes
    meta: str
    names_key: bytes


_LAYOUTS = {
    "cifar100": _Layout(
        "CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
        {"train": ("train",), "test": ("test",)}, b"fine_labels", "meta", b"fine_label_names",
    ),
    "cifar10": _Layout(
        "CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        b"labels", "batches.meta", b"label_names",
    ),
}

# The batches hold only dicts, lists, bytes, ints and numpy arrays: refuse every other global.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")
        return super().find_class(module, name)


def _unpickle(f) -> dict:
    # encoding="bytes": the files were written by Python 2, their str keys come back as bytes.
    return _BatchUnpickler(f, encoding="bytes").load()


def default_root() -> str:
    return os.environ.get("REVIEWKD_CIFAR", DEFAULT_ROOT)


def _layout(name: str) -> _Layout:
    if name not in _LAYOUTS:
        raise ValueError(f"name must be one of {sorted(_LAYOUTS)}, got {name!r}")
    return _LAYOUTS[name]


class _Source:
    """Reads member files of the dataset from an extracted folder or straight from the archive."""

    def __init__(self, root: Path, layout: _Layout):
        self.folder: Optional[Path] = None
        self.archive: Optional[Path] = None
        needed = layout.batches["test"][0]
        for folder in (root / layout.folder, root):
            if (folder / needed).is_file():
                self.folder = folder
                return
        for archive in (root / layout.archive, root):
            if archive.is_file() and tarfile.is_tarfile(archive):
                self.archive = archive
                return
        raise FileNotFoundError(
            f"{layout.title} not found in {root}: put {layout.archive} (from {URL}) or its extracted "
            f"folder {layout.folder}/ there"
        )

    def read(self, layout: _Layout, names: tuple[str, ...]) -> list[dict]:
        if self.folder is not None:
            out = []
            for name in names:
                path = self.folder / name
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: re-extract {layout.archive}")
                with open(path, "rb") as f:
                    out.append(_unpickle(f))
            return out
        wanted = {f"{layout.folder}/{name}": name for name in names}
        found: dict[str, dict] = {}
        with tarfile.open(self.archive, "r:*") as tar:
            for member in tar:  # one pass in archive order: no seeking back in the gzip stream
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = _unpickle(io.BytesIO(tar.extractfile(member).read()))
        missing = [name for name in names if name not in found]
        if missing:
            raise FileNotFoundError(f"{self.archive} lacks {', '.join(missing)}: the download is incomplete")
        return [found[name] for name in names]


def load_cifar(
    root: str | os.PathLike | None = None, name: str = "cifar100", split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(images uint8 N x 3 x 32 x 32, labels int64 N)``.

    ``root`` is the folder holding ``cifar-100-python.tar.gz`` / ``cifar-10-python.tar.gz`` or
    the extracted folder, or the extracted folder (or archive) itself.
    """
    layout = _layout(name)
    if split not in layout.batches:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    batches = _Source(Path(root or default_root()), layout).read(layout, layout.batches[split])
    images, labels = [], []
    for batch in batches:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        # Each row is 3072 bytes: the 32 x 32 red plane, then green, then blue (row-major).
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
    image_tensor = torch.from_numpy(np.concatenate(images))
    label_tensor = torch.from_numpy(np.concatenate(labels))
    if len(image_tensor) != len(label_tensor):
        raise ValueError(f"{layout.title} {split}: {len(image_tensor)} images but {len(label_tensor)} labels")
    return image_tensor, label_tensor


def cifar_class_names(root: str | os.PathLike | None = None, name: str = "cifar100") -> tuple[str, ...]:
    """Class names from the dataset's meta file, in label order."""
    layout = _layout(name)
    (meta,) = _Source(Path(root or default_root()), layout).read(layout, (layout.meta,))
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key])
