"""An embedded audio-visual set built on the user's machine from real material: clips in which a
Fashion-MNIST item moves, scales and rotates across the frames, paired with the spoken name of
its class synthesised by ``espeak-ng``, as log-mel spectrograms.

Video: each clip takes one Fashion-MNIST image (train clips from its training split, test clips
from its test split: the split is Fashion-MNIST's own) and draws a smooth trajectory: the centre
follows a quadratic Bezier curve between two random points through a random control point, the
scale and the rotation move linearly between two random values. Frames are rendered in grey with
bilinear sampling (``affine_grid`` / ``grid_sample``); each clip has a random item colour and a
dark random background colour, applied when the clips are loaded (``colours``).

Audio: for every class and split, a pool of ``utterances`` utterances of the class name by
``espeak-ng --stdout`` with a random voice (language x variant), speed and pitch (train and test
pools drawn apart); each clip takes one utterance of its spoken class with a random gain, a random
offset inside a fixed window and white noise at a random level, then a log-mel spectrogram
(:func:`log_mel`). A rate ``mismatch`` of the clips, picked from the seed (exactly
``round(mismatch * n)`` clips per split), carries the name of another class drawn uniformly from
the other nine; ``audio_targets`` holds the class actually spoken.

Everything is drawn from ``seed``; the set is written once as a compressed ``.npz`` with a json of
its settings into ``<root>/<settings hash>/`` (root: ``data.root``, else
``~/.cache/reviewkd/av_fashion_mnist``) and read from there afterwards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .fashion_mnist import load_fashion_mnist

FORMAT = 1
# the spoken names of Fashion-MNIST's classes
SPOKEN = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SAMPLE_RATE = 22050  # espeak-ng's output rate
WINDOW_SECONDS = 1.2
N_FFT, HOP, N_MELS = 1024, 441, 40  # 46 ms windows every 20 ms; 40 mel bands up to 8 kHz
F_MAX = 8000.0


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed."""


@dataclass(frozen=True)
class Settings:
    train: int = 6000
    test: int = 2000
    frames: int = 12
    size: int = 32
    mismatch: float = 0.0
    seed: int = 0
    utterances: int = 24
    format: int = FORMAT

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "reviewkd" / "av_fashion_mnist"


def dataset_path(settings: Settings, root: Optional[str | os.PathLike] = None) -> Path:
    return Path(root or default_root()) / settings.key() / "av_fashion_mnist.npz"


# ----------------------------------------------------------------------------- audio
def mel_filterbank(n_fft: int = N_FFT, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float = F_MAX) -> torch.Tensor:
    """(n_fft // 2 + 1) x n_mels triangular filters, equally spaced on the HTK mel scale
    (mel = 2595 log10(1 + f / 700)), each peaking at 1."""
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(wave: torch.Tensor, filters: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Waves (... x samples) -> log mel power (... x n_mels x frames): a Hann-windowed STFT
    (``N_FFT``, hop ``HOP``, centred with reflection padding), power, the mel filters, log(x + eps)."""
    filters = mel_filterbank() if filters is None else filters
    shape = wave.shape[:-1]
    spec = torch.stft(wave.reshape(-1, wave.shape[-1]), N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device),
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # B x freq x frames
    mel = torch.einsum("bft,fm->bmt", power, filters.to(wave.device))
    return torch.log(mel + eps).reshape(*shape, *mel.shape[-2:])


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance as float32 samples at ``SAMPLE_RATE`` in -1..1."""
    try:
        wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                             check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise EspeakMissingError("espeak-ng is not installed: apt-get install espeak-ng (the av_fashion_mnist "
                                 "set speaks its class names with it)") from None
    # the header of a streamed WAV announces no length: the samples follow the "data" chunk id
    start = wav.find(b"data") + 8
    return np.frombuffer(wav[start:len(wav) - (len(wav) - start) % 2], dtype="<i2").astype(np.float32) / 32768.0


def check_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise EspeakMissingError("espeak-ng is not installed: apt-get install espeak-ng (the av_fashion_mnist set "
                                 "speaks its class names with it)")


def _utterance_pool(rng: np.random.Generator, count: int) -> list[list[np.ndarray]]:
    """``count`` utterances per class with random voices, speeds and pitches."""
    pool = []
    for name in SPOKEN:
        said = []
        for _ in range(count):
            voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
            said.append(espeak(name, voice, int(rng.integers(120, 211)), int(rng.integers(20, 81))))
        pool.append(said)
    return pool


def _mix(pool: list[list[np.ndarray]], spoken: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Clip audio (N x window samples): a random utterance of each clip's spoken class, gain,
    offset and white noise drawn per clip."""
    window = int(WINDOW_SECONDS * SAMPLE_RATE)
    out = np.zeros((len(spoken), window), dtype=np.float32)
    for i, c in enumerate(spoken):
        wave = pool[c][rng.integers(len(pool[c]))][:window]
        wave = wave / max(float(np.abs(wave).max()), 1e-3) * rng.uniform(0.3, 1.0)
        offset = int(rng.integers(0, window - len(wave) + 1))
        out[i, offset:offset + len(wave)] = wave
        out[i] += rng.normal(0.0, rng.uniform(0.002, 0.05), window).astype(np.float32)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- video
def render_clips(images: torch.Tensor, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 N x 1 x 28 x 28 images -> uint8 grey clips N x frames x size x size along smooth random
    trajectories (see the module docstring)."""
    n = len(images)
    u = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    t = torch.linspace(0, 1, frames, dtype=torch.float64)[None, :, None]  # 1 x T x 1
    # centre positions in the normalised canvas (-1..1): start, control point, end
    p0, p1, p2 = (u(n, 1, 2) * 1.0 - 0.5, u(n, 1, 2) * 1.2 - 0.6, u(n, 1, 2) * 1.0 - 0.5)
    centre = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # N x T x 2
    s0, s1 = 0.55 + 0.35 * u(n, 1), 0.55 + 0.35 * u(n, 1)  # item size / canvas size at the ends
    a0, a1 = (u(n, 1) - 0.5) * math.pi / 2, (u(n, 1) - 0.5) * math.pi / 2  # rotation, up to +-45 degrees
    scale, angle = s0 + (s1 - s0) * t[..., 0], a0 + (a1 - a0) * t[..., 0]  # N x T
    # grid_sample maps output coordinates to input ones: the inverse of "rotate, scale, move"
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # N x T x 2 x 2
    shift = -(theta @ centre[..., None])[..., 0]
    affine = torch.cat([theta, shift[..., None]], -1).reshape(n * frames, 2, 3).float()
    grid = F.affine_grid(affine, (n * frames, 1, size, size), align_corners=False)
    source = images.float().repeat_interleave(frames, 0)
    clips = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return clips.round().clamp(0, 255).to(torch.uint8).reshape(n, frames, size, size)


def _split(settings: Settings, split: str, count: int, rng: np.random.Generator, generator: torch.Generator,
           fashion_root) -> dict[str, np.ndarray]:
    images, labels = load_fashion_mnist(fashion_root, split)
    pick = torch.from_numpy(rng.choice(len(images), size=count, replace=False))
    images, labels = images[pick], labels[pick]
    video = render_clips(images, settings.frames, settings.size, generator)
    item = rng.integers(110, 256, size=(count, 3))  # a clearly visible item colour
    background = rng.integers(0, 60, size=(count, 3))
    spoken = labels.numpy().copy()
    mismatched = rng.permutation(count)[:round(settings.mismatch * count)]
    spoken[mismatched] = (spoken[mismatched] + rng.integers(1, len(SPOKEN), size=len(mismatched))) % len(SPOKEN)
    audio = log_mel(_mix(_utterance_pool(rng, settings.utterances), spoken, rng))
    return {f"{split}_video": video.numpy(), f"{split}_colours": np.stack([item, background], 1).astype(np.uint8),
            f"{split}_labels": labels.numpy(), f"{split}_audio_targets": spoken.astype(np.int64),
            f"{split}_audio": audio.numpy().astype(np.float16), f"{split}_source_index": pick.numpy()}


def generate(settings: Settings, path: Path, fashion_root=None) -> Path:
    """Write the set for ``settings`` to ``path`` (atomically) with ``settings.json`` beside it."""
    check_espeak()
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    arrays = {}
    for split, count in (("train", settings.train), ("test", settings.test)):
        arrays.update(_split(settings, split, count, rng, generator, fashion_root))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    (path.parent / "settings.json").write_text(json.dumps(asdict(settings), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load(settings: Settings, root=None, fashion_root=None) -> dict[str, torch.Tensor]:
    """The set (generated first when missing): ``{split}_video`` (uint8 N x T x H x W grey),
    ``{split}_colours`` (uint8 N x 2 x 3: item, background), ``{split}_labels``,
    ``{split}_audio_targets`` (int64), ``{split}_audio`` (float32 N x 1 x mels x frames)."""
    path = dataset_path(settings, root)
    if not path.is_file():
        generate(settings, path, fashion_root)
    with np.load(path) as data:
        out = {k: torch.from_numpy(data[k]) for k in data.files}
    for split in ("train", "test"):
        out[f"{split}_audio"] = out[f"{split}_audio"].float().unsqueeze(1)
    return out
