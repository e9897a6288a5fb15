"""Where the videos of a file-based clip set are: a UCF101 tree with its split lists, or a folder
tree ``root/train/<class>/<video>``, ``root/test/<class>/<video>``.

UCF101: ``<root>/frames/<Class>/<v_Class_gXX_cYY>/`` (frame images) or
``<root>/videos/<Class>/<v_Class_gXX_cYY>.avi`` (read with PyAV), the lists ``trainlist0S.txt`` /
``testlist0S.txt`` of split S in ``<root>/ucfTrainTestlist`` (or ``video.splits``). With
``video.audio_features`` (the authors' folder of ``<video name>.npy`` files) only the classes that
have at least one feature file are kept: UCF51 for split 1, as the reference builds its lists. Class
indices follow the sorted class names that are kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoEntry

LAYOUT = ("expected <root>/frames/<Class>/<video>/ (frame images) or <root>/videos/<Class>/<video>.avi, and "
          "<root>/ucfTrainTestlist/trainlist01.txt / testlist01.txt")


def _class_of(name: str) -> str:
    """``v_ApplyEyeMakeup_g08_c01`` -> ``ApplyEyeMakeup``."""
    stem = name[2:] if name.startswith("v_") else name
    return stem.rsplit("_g", 1)[0]


def audio_classes(folder: Path) -> set[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"video.audio_features {folder} is not a folder (one <video name>.npy per video)")
    classes = {_class_of(p.stem) for p in folder.rglob("*.npy")}
    if not classes:
        raise FileNotFoundError(f"video.audio_features {folder} holds no .npy files")
    return classes


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"UCF101 split list {path} not found: {LAYOUT}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _locate(root: Path, item: str) -> Path:
    """``Class/v_name.avi`` of a split list -> the frames folder, else the video file."""
    cls, file = item.split("/")[-2:]
    stem = Path(file).stem
    frames = root / "frames" / cls / stem
    if frames.is_dir():
        return frames
    video = root / "videos" / cls / file
    if video.is_file():
        return video
    raise FileNotFoundError(f"UCF101 video {item} not found as {frames}/ nor {video}: {LAYOUT}")


def ucf101_entries(root: str, split: int = 1, splits: Optional[str] = None,
                   audio_features: Optional[str] = None) -> tuple[list[VideoEntry], list[VideoEntry], list[str]]:
    """(train entries, test entries, class names) of split ``split``."""
    root_path = Path(root)
    lists = Path(splits) if splits else root_path / "ucfTrainTestlist"
    train = _read_list(lists / f"trainlist0{split}.txt")
    test = _read_list(lists / f"testlist0{split}.txt")
    classes = sorted({item.split("/")[-2] for item in train + test})
    if audio_features:
        heard = audio_classes(Path(audio_features))
        classes = [c for c in classes if c in heard]
    index = {c: i for i, c in enumerate(classes)}

    def entries(items):
        return [VideoEntry(_locate(root_path, it), index[it.split("/")[-2]], Path(it).stem) for it in items
                if it.split("/")[-2] in index]

    return entries(train), entries(test), classes


def folder_entries(root: str) -> tuple[list[VideoEntry], list[VideoEntry], list[str]]:
    """``root/train/<class>/<video>`` and ``root/test/<class>/<video>``; a video is a folder of
    frame images or a video file."""
    root_path = Path(root)
    layout = f"expected {root_path}/train/<class>/<video folder or file> and {root_path}/test/<class>/..."
    for split in ("train", "test"):
        if not (root_path / split).is_dir():
            raise FileNotFoundError(f"video folder {root_path / split} not found: {layout}")
    classes = sorted(p.name for p in (root_path / "train").iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root_path / 'train'} has no class folders: {layout}")

    def entries(split):
        out = []
        for i, c in enumerate(classes):
            folder = root_path / split / c
            for p in sorted(folder.iterdir()) if folder.is_dir() else []:
                is_video = (p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())) or \
                    p.suffix.lower() in VIDEO_SUFFIXES
                if is_video:
                    out.append(VideoEntry(p, i, p.stem if p.is_file() else p.name))
        if not out:
            raise FileNotFoundError(f"{root_path / split} holds no videos: {layout}")
        return out

    return entries("train"), entries("test"), classes
