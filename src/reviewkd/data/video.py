"""Clips for the video task: where they come from (the embedded set in memory, UCF101 or a folder
tree of videos read by worker processes) and their batched augmentation on the training device.

Every loader yields :class:`~reviewkd.batch.Batch` es with ``inputs["video"]`` (float N x 3 x T x
H x W, normalised), ``inputs["audio"]`` (a log-mel N x 1 x M x F or a vector N x D; zeros where a
video has no audio), ``inputs["audio_present"]`` (bool N), ``inputs["image"]`` (what the trained
network consumes: the clip, the audio, or one frame; see ``modality``), int64 ``targets`` and
``meta["labels"]`` (the clip labels) / ``meta["audio_targets"]`` (the class heard, where known).
With ``modality: audio`` the targets are the audio targets where known.

Training (``train=True``): a random temporal crop of T consecutive frames (stride 1; a video
shorter than T is looped), one random-resized crop per clip (area fraction ``crop_scale``, aspect
``crop_ratio``, up to ten draws as torchvision's ``RandomResizedCrop``, else the central crop of
the whole frame; continuous boxes, resampled with ``roi_align``, which averages several samples
per output pixel when it shrinks) to ``size`` x ``size``, and a horizontal flip with probability
0.5 per clip. Evaluation: items are videos; each gives ``eval_clips`` clips starting at evenly
spaced frames (``round(linspace(0, F - T, K))``), with the central square of the frame resized to
``size`` (the reference's short-side resize + centre crop); evaluation batches hold K clips per
video, video after video (``meta["clips"]`` = K). :class:`VideoPreprocessor` prepares video files
for inference the same way.

Randomness is drawn from ``(seed, epoch, ...)`` per batch (spatial, on the device) and per video
(temporal crop of file-based sets, in the workers), so a resumed run sees the same batches.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.ops import roi_align

from ..batch import Batch
from .imagefolder import ShardSampler
from .loader import derive_seed
from .preprocessing import expand_folders

_ORDER, _AUGMENT, _TEMPORAL = 0, 1, 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg")


# ----------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class ClipAugment:
    """Spatial part of the clip pipeline, batched (see the module docstring)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def boxes(self, n: int, height: int, width: int, train: bool, generator=None, device="cpu") -> torch.Tensor:
        """n x 4 crop boxes (x1, y1, x2, y2) in pixel-edge coordinates."""
        if not train:
            side = min(height, width)
            x1, y1 = (width - side) / 2, (height - side) / 2
            return torch.tensor([[x1, y1, x1 + side, y1 + side]], device=device).expand(n, 4)
        tries = 10
        area = height * width * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0])
                                 * torch.rand(n, tries, generator=generator, device=device, dtype=torch.float64))
        low, high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(low + (high - low) * torch.rand(n, tries, generator=generator, device=device,
                                                          dtype=torch.float64))
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (w <= width) & (h <= height)
        first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((n,), -1, device=device))
        pick = first.clamp(min=0)[:, None]
        w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
        # no draw fits: the whole frame, its aspect clamped into crop_ratio, centred
        aspect = min(max(width / height, self.crop_ratio[0]), self.crop_ratio[1])
        fw, fh = (width, width / aspect) if width / height < self.crop_ratio[0] else (height * aspect, height)
        fw, fh = min(fw, width), min(fh, height)
        ok = first >= 0
        w, h = torch.where(ok, w, torch.full_like(w, fw)), torch.where(ok, h, torch.full_like(h, fh))
        x1 = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (width - w)
        y1 = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (height - h)
        x1 = torch.where(ok, x1, (width - w) / 2)
        y1 = torch.where(ok, y1, (height - h) / 2)
        return torch.stack([x1, y1, x1 + w, y1 + h], 1).float()

    def __call__(self, clips: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        """float N x 3 x T x H x W on the 0..255 scale -> normalised N x 3 x T x size x size."""
        n, c, t, height, width = clips.shape
        device = clips.device
        boxes = self.boxes(n, height, width, train, generator, device)
        rois = torch.cat([torch.arange(n, device=device, dtype=boxes.dtype)[:, None], boxes], 1)
        out = roi_align(clips.reshape(n, c * t, height, width), rois, (self.size, self.size), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True).reshape(n, c, t, self.size, self.size)
        if train and self.flip:
            flipped = torch.rand(n, generator=generator, device=device) < 0.5
            out = torch.where(flipped[:, None, None, None, None], out.flip(-1), out)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1, 1) * 255.0
        return ((out - mean) / std).contiguous()


def clip_starts(num_frames: int, frames: int, clips: int) -> list[int]:
    """First frames of ``clips`` evenly spaced clips of ``frames`` frames in a video of
    ``num_frames`` (all 0 when the video is not longer than a clip)."""
    last = max(num_frames - frames, 0)
    return [int(round(v)) for v in np.linspace(0, last, clips)]


def clip_indices(num_frames: int, start: int, frames: int) -> list[int]:
    """Frame indices of a clip: consecutive from ``start``, looping over the video when it is short."""
    return [(start + i) % num_frames if start + i >= num_frames else start + i for i in range(frames)]


def select_input(inputs: dict, modality: str, train: bool, generator=None) -> torch.Tensor:
    """What a network of ``modality`` consumes: the clip, the audio, or one frame of the clip (a
    random one, the same for the whole batch, in training; the middle one in evaluation)."""
    if modality == "video":
        return inputs["video"]
    if modality == "audio":
        return inputs["audio"]
    video = inputs["video"]
    frames = video.shape[2]
    if not train:
        return video[:, :, frames // 2].contiguous()
    t = torch.randint(frames, (1,), generator=generator, device=video.device)  # stays on the device: no host sync
    return video.index_select(2, t).squeeze(2).contiguous()


# ----------------------------------------------------------------------------- in memory
@dataclass
class ClipSet:
    """Clips held in memory: uint8 ``video`` N x C x F x H x W (C = 1: grey, tinted per clip by
    ``colours`` N x 2 x 3 = item, background), ``audio`` float N x ..., ``audio_present`` bool N,
    ``labels`` int64 N, ``audio_targets`` int64 N or None."""

    video: torch.Tensor
    labels: torch.Tensor
    audio: torch.Tensor
    audio_present: torch.Tensor
    audio_targets: Optional[torch.Tensor] = None
    colours: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ClipSet":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return ClipSet(*(move(getattr(self, k)) for k in ("video", "labels", "audio", "audio_present",
                                                            "audio_targets", "colours")))


def _colourise(video: torch.Tensor, colours: Optional[torch.Tensor]) -> torch.Tensor:
    """uint8 N x C x T x H x W -> float 0..255 RGB: grey clips blend background and item colour."""
    if colours is None:
        return video.float()
    alpha = video.float() / 255.0  # N x 1 x T x H x W
    item, background = (colours[:, i].float().view(-1, 3, 1, 1, 1) for i in (0, 1))
    return background + (item - background) * alpha


@dataclass
class _Common:
    augment: ClipAugment
    frames: int
    modality: str
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    train: bool = True
    eval_clips: int = 1
    epoch: int = field(default=0, init=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batch(self, video, labels, audio, present, audio_targets, index, generator, clips: int) -> Batch:
        inputs = {"video": video, "audio": audio, "audio_present": present}
        inputs["image"] = select_input(inputs, self.modality, self.train, generator)
        meta = {"labels": labels, "clips": clips}
        targets = labels
        if audio_targets is not None:
            meta["audio_targets"] = audio_targets
            if self.modality == "audio":
                targets = audio_targets
        return Batch(inputs, targets, index, meta)


class MemoryClipLoader(_Common):
    """Batches over a :class:`ClipSet` on the device. ``batch_size`` is the global batch (training
    shards as ``TensorLoader``: one permutation from (seed, epoch), every world_size-th entry,
    last incomplete batch dropped); evaluation: every video once across ranks, K clips each."""

    def __init__(self, data: ClipSet, **options):
        super().__init__(**options)
        if self.batch_size < self.world_size:
            raise ValueError(f"global batch_size {self.batch_size} is smaller than world_size {self.world_size}")
        self.data = data
        self.local = self.batch_size // self.world_size

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _ORDER))
        order = torch.randperm(n, generator=g)
        return order[:n // self.world_size * self.world_size][self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.local if self.train else math.ceil(n / self.local)

    def __iter__(self) -> Iterator[Batch]:
        d = self.data
        device = d.video.device
        order = self._order().to(device)
        generator = torch.Generator(device=device)
        stored = d.video.shape[2]
        for b in range(len(self)):
            idx = order[b * self.local:(b + 1) * self.local]
            generator.manual_seed(derive_seed(self.seed, self.epoch, _AUGMENT, self.rank, b))
            if self.train:
                starts = torch.randint(max(stored - self.frames, 0) + 1, (len(idx),), generator=generator, device=device)
                clips, per_video = idx, 1
            else:
                starts = torch.tensor(clip_starts(stored, self.frames, self.eval_clips), device=device).repeat(len(idx))
                clips, per_video = idx.repeat_interleave(self.eval_clips), self.eval_clips
            frame = (starts[:, None] + torch.arange(self.frames, device=device)) % stored  # looped when short
            video = d.video[clips[:, None], :, frame].permute(0, 2, 1, 3, 4)  # n x C x T x H x W
            colours = None if d.colours is None else d.colours[clips]
            video = self.augment(_colourise(video, colours), self.train, generator)
            at = None if d.audio_targets is None else d.audio_targets[idx]
            yield self._batch(video, d.labels[idx], d.audio[idx], d.audio_present[idx], at, idx, generator, per_video)


# ----------------------------------------------------------------------------- from files
@dataclass(frozen=True)
class VideoEntry:
    path: Path  # a folder of frame images or a video file
    label: int
    name: str  # the video's name (the stem of its audio-feature file)


def _natural_key(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def av_module():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'reviewkd[video]' (or pip install av), or "
                          "extract the frames into folders") from None
    return av


def _resize(frame: np.ndarray, load_size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = load_size
    image = Image.fromarray(frame)
    return np.asarray(image if image.size == (w, h) else image.resize((w, h), Image.BILINEAR))


def read_frames(path: Path, wanted: Sequence[int] | None, load_size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(uint8 len(wanted) x H x W x 3 frames resized to ``load_size``, the video's frame count);
    ``wanted`` None: only the count."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise FileNotFoundError(f"{path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        if wanted is None:
            return np.zeros((0,)), len(files)
        from PIL import Image

        frames = [_resize(np.asarray(Image.open(files[i]).convert("RGB")), load_size) for i in wanted]
        return np.stack(frames), len(files)
    decoded = decode_video(path)
    if wanted is None:
        return np.zeros((0,)), len(decoded)
    return np.stack([_resize(decoded[i], load_size) for i in wanted]), len(decoded)


def decode_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video file (PyAV), uint8 H x W x 3 RGB."""
    av = av_module()
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not decoded:
        raise ValueError(f"{path} holds no video frames")
    return decoded


def clips_of(decoded: Sequence[np.ndarray], starts: Sequence[int], frames: int, load_size) -> np.ndarray:
    """uint8 K x T x H x W x 3: a clip of ``frames`` frames from each start (looped when the video
    is short), every frame resized to ``load_size``."""
    count = len(decoded)
    return np.stack([np.stack([_resize(decoded[f], load_size) for f in clip_indices(count, s, frames)])
                     for s in starts])


def load_audio_vector(folder: Optional[Path], name: str, dim: int) -> tuple[np.ndarray, bool]:
    """The video's audio feature (``<folder>/<name>.npy`` or ``<folder>/<class>/<name>.npy``);
    a zero vector and False when there is none. A stored all-zero vector counts as missing too,
    as the reference masks samples whose vector sums to zero."""
    if folder is not None:
        for path in (folder / f"{name}.npy", *folder.glob(f"*/{name}.npy")):
            if path.is_file():
                vector = np.load(path).astype(np.float32).reshape(-1)
                if vector.shape != (dim,):
                    raise ValueError(f"{path} holds {vector.size} values, video.audio_dim is {dim}")
                return vector, bool(np.any(vector != 0))
    return np.zeros(dim, dtype=np.float32), False


class FileClipDataset(Dataset):
    """Videos read in worker processes: item ``i`` -> (uint8 K x 3 x T x H x W clips, label,
    audio vector, audio present, i); K = 1 in training (a random start drawn from (seed, epoch, i))."""

    def __init__(self, entries: list[VideoEntry], frames: int, load_size, train: bool, eval_clips: int,
                 audio_folder: Optional[Path], audio_dim: int, seed: int):
        self.entries, self.frames, self.load_size = entries, frames, tuple(load_size)
        self.train, self.eval_clips, self.seed = train, eval_clips, seed
        self.audio_folder, self.audio_dim = audio_folder, audio_dim
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        e = self.entries[i]
        _, count = read_frames(e.path, None, self.load_size) if e.path.is_dir() else (None, None)
        if count is None:  # a video file: decode once, then pick
            clips, count = self._clips_from_file(e.path, i)
        else:
            starts = self._starts(count, i)
            wanted = sorted({f for s in starts for f in clip_indices(count, s, self.frames)})
            frames, _ = read_frames(e.path, wanted, self.load_size)
            where = {f: k for k, f in enumerate(wanted)}
            clips = np.stack([frames[[where[f] for f in clip_indices(count, s, self.frames)]] for s in starts])
        audio, present = load_audio_vector(self.audio_folder, e.name, self.audio_dim)
        video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()  # K x 3 x T x H x W
        return video, e.label, torch.from_numpy(audio), present, i

    def _starts(self, count: int, i: int) -> list[int]:
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, _TEMPORAL, i))
            return [int(rng.integers(0, max(count - self.frames, 0) + 1))]
        return clip_starts(count, self.frames, self.eval_clips)

    def _clips_from_file(self, path: Path, i: int):
        decoded = decode_video(path)
        return clips_of(decoded, self._starts(len(decoded), i), self.frames, self.load_size), len(decoded)


class FileClipLoader(_Common):
    """Batches of a :class:`FileClipDataset` through a DataLoader, augmented on the device."""

    def __init__(self, dataset: FileClipDataset, workers: int, device, drop_last: bool = True, **options):
        super().__init__(**options)
        if self.batch_size < self.world_size:
            raise ValueError(f"global batch_size {self.batch_size} is smaller than world_size {self.world_size}")
        self.dataset, self.device = dataset, torch.device(device)
        if self.train:
            self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                              seed=self.seed, drop_last=True)
        else:
            self.sampler = ShardSampler(len(dataset), self.rank, self.world_size)
        self.loader = DataLoader(dataset, batch_size=self.batch_size // self.world_size, sampler=self.sampler,
                                 num_workers=workers, drop_last=self.train and drop_last,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = int(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator(device=self.device)
        for b, (video, labels, audio, present, index) in enumerate(self.loader):
            generator.manual_seed(derive_seed(self.seed, self.epoch, _AUGMENT, self.rank, b))
            n, k = video.shape[:2]
            video = video.to(self.device, non_blocking=True).flatten(0, 1).float()
            video = self.augment(video, self.train, generator)
            yield self._batch(video, labels.to(self.device), audio.to(self.device), present.to(self.device), None,
                              index.to(self.device), generator, k)


# ----------------------------------------------------------------------------- inference
def is_video_input(path) -> bool:
    """A video file by its suffix, or a folder with one below it."""
    path = Path(path)
    if path.is_dir():
        return any(f.suffix.lower() in VIDEO_SUFFIXES for f in path.rglob("*"))
    return path.suffix.lower() in VIDEO_SUFFIXES


def find_videos(paths: Sequence) -> list[Path]:
    """Video files as given, and those below folders (by suffix, sorted); every file's header is
    read with PyAV, so a file that is no video is refused before any model runs."""
    av = av_module()
    found = expand_folders(paths, VIDEO_SUFFIXES, "video")
    for f in found:
        if f.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{f} is not a video file: give {', '.join(VIDEO_SUFFIXES)} files (images and videos "
                             f"are not mixed)")
        try:
            with av.open(str(f)) as container:
                has_video = bool(container.streams.video)
        except (av.FFmpegError, OSError) as exc:
            raise ValueError(f"{f} is not a video that can be decoded ({type(exc).__name__})") from None
        if not has_video:
            raise ValueError(f"{f} holds no video stream")
    return found


class VideoPreprocessor:
    """Video files -> the clips evaluation scores (``VideoTask.preprocessing`` spec): ``eval_clips``
    evenly spaced clips of ``frames`` frames per video, frames resized to ``load_size``, the central
    square resized to ``size`` and normalised; float (N * K) x 3 x T x size x size, video after video."""

    KEYS = ("frames", "size", "load_size", "mean", "std", "eval_clips")

    def __init__(self, spec: Optional[dict]):
        if not spec or spec.get("input") != "video":
            raise ValueError(f"predict reads video files for networks of clips; this one consumes "
                             f"{(spec or {}).get('input', 'unknown')} input: call the model on prepared tensors")
        missing = [k for k in self.KEYS if k not in spec]
        if missing:
            raise ValueError(f"the video preprocessing lacks {', '.join(missing)}: re-export the model with "
                             f"`reviewkd export`")
        self.frames, self.clips, self.load_size = spec["frames"], spec["eval_clips"], tuple(spec["load_size"])
        self.augment = ClipAugment(spec["size"], tuple(spec["mean"]), tuple(spec["std"]), flip=False)

    def __call__(self, videos: Sequence) -> torch.Tensor:
        clips = []
        for path in map(Path, videos):
            decoded = decode_video(path)
            starts = clip_starts(len(decoded), self.frames, self.clips)
            clips.append(torch.from_numpy(clips_of(decoded, starts, self.frames, self.load_size)))
        video = torch.cat(clips).permute(0, 4, 1, 2, 3).float()  # K x T x H x W x 3 -> K x 3 x T x H x W
        return self.augment(video, train=False)
