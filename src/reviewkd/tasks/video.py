"""Video classification (``task: video``): clips in, per-video top-1 out.

The data (``data.name``): ``av_fashion_mnist`` (the embedded audio-visual set, generated on first
use), ``ucf101`` (a UCF101 tree, its split lists, and the authors' audio-feature folder: UCF51 is
the classes present there) and ``video_folder`` (``root/train|test/<class>/<video>``); see
``reviewkd.data.video`` for batches and augmentation. ``video.modality`` says what the trained
network consumes: the clip (the student), the audio (the audio teacher, trained on the class it
hears) or one frame (an image teacher).

Evaluation averages the softmax over ``video.eval_clips`` evenly spaced clips of each video and
counts top-1 (top-5 where there are at least 5 classes) per video; every video is seen once across
the processes of a torchrun job and the counts are summed, so the score is exact there too. Models
of another modality (a teacher evaluated in the student's run) are fed their own input, named by
their ``input_modality`` attribute (set by ``build_teacher``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import collectives
from ..batch import Batch
from ..config import ConfigError
from ..data import av_fashion_mnist as av
from ..data.video import (ClipAugment, ClipSet, FileClipDataset, FileClipLoader, MemoryClipLoader, av_module,
                          select_input)
from ..engine.runtime import autocast
from ..methods import RunContext
from ..models import create_model, load_weights, model_family
from ..recipes.distill import Distiller
from .base import TaskData
from .classification import ClassificationTask

AUDIO_FAMILIES = ("audio", "audio_vector")
MEL_SIZE = (1, av.N_MELS, 1 + int(av.WINDOW_SECONDS * av.SAMPLE_RATE) // av.HOP)


class AudioInputTeacher(nn.Identity):
    """The ``precomputed`` teacher: the audio input (a precomputed feature vector) is the
    teacher's feature; it has no logits."""

    input_modality = "audio"
    model_name = "precomputed"


def input_modality(name: str) -> str:
    """What a network of this name consumes: audio models the audio, video models clips, every
    other (image) model one frame."""
    if name == "precomputed":
        return "audio"
    family = model_family(name)
    return "audio" if family in AUDIO_FAMILIES else "video" if family == "video" else "frame"


def embedded_settings(cfg) -> av.Settings:
    v = cfg.video
    e = v.embedded
    return av.Settings(train=e.train, test=e.test, frames=v.frames + e.extra_frames, size=v.size, mismatch=v.mismatch,
                       seed=e.seed, utterances=e.utterances)


@torch.inference_mode()
def video_stats(model: nn.Module, loader, modality: str, device, precision: str) -> torch.Tensor:
    """[top-1 hits, top-5 hits, summed cross-entropy of the averaged softmax, videos, top-1 hits
    against the clip labels] on this process's shard."""
    stats = torch.zeros(5, device=device, dtype=torch.float64)
    for batch in loader:
        x = select_input(batch.inputs, modality, train=False)
        with autocast(device, precision):
            logits = model(x)
        n = len(batch.targets)
        probs = logits.float().softmax(1).view(n, -1, logits.shape[1]).mean(1)  # per video
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hit = top == batch.targets[:, None]
        nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), batch.targets, reduction="sum")
        label_hit = top[:, 0] == batch.meta["labels"]
        stats += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), nll, torch.tensor(n, device=device),
                              label_hit.sum()]).double()
    return stats


class VideoTask(ClassificationTask):
    name = "video"
    unavailable_export_formats: dict[str, str] = {}
    dynamic_axes = {0: "batch"}

    # ---------------------------------------------------------------- cheap
    def check_config(self, cfg) -> None:
        v, d = cfg.video, cfg.data
        if cfg.runtime.channels_last and v.modality != "frame":
            raise ConfigError("runtime.channels_last is for images: set runtime.channels_last=false for video / audio "
                              "networks")
        if d.name in ("ucf101", "video_folder") and not d.root:
            raise ConfigError(f"data.name {d.name} needs data.root (the folder of the videos)")
        if d.name == "av_fashion_mnist":
            if v.audio_features:
                raise ConfigError("video.audio_features is for ucf101 / video_folder; av_fashion_mnist has its own audio")
            if not av.dataset_path(embedded_settings(cfg), d.root).is_file():
                try:
                    av.check_espeak()
                except av.EspeakMissingError as exc:
                    raise ConfigError(str(exc)) from None
        elif v.mismatch:
            raise ConfigError("video.mismatch applies to av_fashion_mnist only")
        if d.name in ("ucf101", "video_folder") and v.modality == "audio" and not v.audio_features:
            raise ConfigError("video.modality audio on ucf101 / video_folder reads video.audio_features: give the folder")
        if d.name == "ucf101" and d.root and not any((Path(d.root) / s).is_dir() for s in ("frames",)):
            try:  # video files need PyAV: say so now rather than in a worker
                av_module()
            except ImportError as exc:
                raise ConfigError(str(exc)) from None
        if d.val_split:
            raise ConfigError("data.val_split is not available for task: video (the papers select on the test split)")

    def num_outputs(self, cfg) -> int:
        return len(self._entries(cfg)[2])

    def _entries(self, cfg):
        d, v = cfg.data, cfg.video
        if d.name == "av_fashion_mnist":
            from ..data.fashion_mnist import CLASSES

            return None, None, list(CLASSES)
        from ..data.ucf101 import folder_entries, ucf101_entries

        if d.name == "ucf101":
            return ucf101_entries(d.root, v.split, v.splits, v.audio_features)
        return folder_entries(d.root)

    def probe_size(self, cfg) -> tuple[int, ...]:
        v = cfg.video
        if v.modality == "video":
            return (3, v.frames, v.size, v.size)
        if v.modality == "frame":
            return (3, v.size, v.size)
        return MEL_SIZE if cfg.data.name == "av_fashion_mnist" else (v.audio_dim,)

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        options = {"in_features": cfg.video.audio_dim} if name == "audio_mlp" else {}
        model = create_model(name, num_classes=num_outputs, **options)
        model.input_modality = input_modality(name)
        if model.input_modality != cfg.video.modality:
            raise ConfigError(f"model {name} consumes {model.input_modality} input but video.modality is "
                              f"{cfg.video.modality}: choose a {cfg.video.modality} model or set video.modality")
        return model

    def build_teacher(self, name: str, cfg, num_outputs: int, weights) -> nn.Module:
        if name == "precomputed":
            return AudioInputTeacher()
        options = {"in_features": cfg.video.audio_dim} if name == "audio_mlp" else {}
        model = create_model(name, num_classes=num_outputs, **options)
        model = model if weights is None else load_weights(model, weights)
        model.input_modality = input_modality(name)
        return model

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        if cfg.video.modality == "video":
            try:
                from ..recipes.crossmodal import build_crossmodal_recipe
            except ImportError:
                build_crossmodal_recipe = None
            if build_crossmodal_recipe is not None:
                return build_crossmodal_recipe(cfg, student, teacher, context)
            if cfg.method.name != "vanilla":
                raise ConfigError(f"method {cfg.method.name} on task: video needs the cross-modal recipe "
                                  "(reviewkd.recipes.crossmodal)")
        # a teacher run (or the student alone) is plain classification of the selected input
        options = {**self.recipe_options(cfg), "task": "classification"}
        return Distiller(student, teacher, cfg.method.name, input_size=input_size, context=context, **options)

    # ------------------------------------------------------------ expensive
    def _augment(self, cfg) -> ClipAugment:
        v = cfg.video
        return ClipAugment(v.size, tuple(v.mean), tuple(v.std), tuple(v.crop_scale), tuple(v.crop_ratio),
                           v.flip and cfg.data.augment)

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        d, v = cfg.data, cfg.video
        common = dict(augment=self._augment(cfg), frames=v.frames, modality=v.modality, seed=cfg.seed, rank=rank,
                      world_size=world_size, eval_clips=v.eval_clips)
        if d.name == "av_fashion_mnist":
            train_set, test_set = self._embedded(cfg, device, rank)
            train = MemoryClipLoader(train_set, batch_size=d.batch_size, train=True, **common)
            test = MemoryClipLoader(test_set, batch_size=d.eval_batch_size, train=False, **common)
            targets = train_set.labels.cpu() if v.modality != "audio" else train_set.audio_targets.cpu()
            classes, num_train = list(av.SPOKEN), len(train_set)
        else:
            train_entries, test_entries, classes = self._entries(cfg)
            folder = Path(v.audio_features) if v.audio_features else None
            make = lambda entries, training: FileClipDataset(  # noqa: E731
                entries, v.frames, v.load_size, training, v.eval_clips, folder, v.audio_dim, cfg.seed)
            train = FileClipLoader(make(train_entries, True), d.workers, device, batch_size=d.batch_size, train=True,
                                   **common)
            # evaluation batches hold eval_clips clips per video
            test = FileClipLoader(make(test_entries, False), d.workers, device,
                                  batch_size=max(world_size, d.eval_batch_size // v.eval_clips), train=False, **common)
            targets = torch.tensor([e.label for e in train_entries])
            num_train = len(train_entries)
        if len(train) == 0:
            raise ConfigError(f"data.batch_size {d.batch_size} is larger than the {num_train} training videos")
        n = len(classes)
        context = RunContext(num_samples=num_train, train_targets=targets, num_classes=n, epochs=cfg.solver.epochs)
        input_size = self.probe_size(cfg)
        meta = {"num_classes": n, "input_size": list(input_size), "class_names": classes, "modality": v.modality}
        return TaskData(train, test, len(train), tuple(input_size), n, context, meta, num_train=num_train)

    def _embedded(self, cfg, device, rank: int) -> tuple[ClipSet, ClipSet]:
        settings = embedded_settings(cfg)
        if rank == 0:
            arrays = av.load(settings, cfg.data.root)
        collectives.barrier()  # rank 0 generated the set when it was missing
        if rank != 0:
            arrays = av.load(settings, cfg.data.root)
        sets = []
        for split in ("train", "test"):
            audio = arrays[f"{split}_audio"]
            sets.append(ClipSet(arrays[f"{split}_video"].unsqueeze(1), arrays[f"{split}_labels"], audio,
                                torch.ones(len(audio), dtype=torch.bool), arrays[f"{split}_audio_targets"],
                                arrays[f"{split}_colours"]).to(device))
        return sets[0], sets[1]

    def train_stats(self, outputs, batch: Batch) -> dict[str, torch.Tensor]:
        return {"correct": (outputs.argmax(dim=1) == batch.targets).sum()}

    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        was_training = model.training
        model.eval()
        modality = getattr(model, "input_modality", data.meta.get("modality", "video"))
        stats = video_stats(model, data.test, modality, device, precision)
        c1, c5, loss, n, label_c1 = collectives.sum_over_ranks(stats).tolist()
        model.train(was_training)
        n = max(n, 1.0)
        out = {f"{split}_top1": 100.0 * c1 / n, f"{split}_loss": loss / n}
        if data.num_outputs >= 5:
            out[f"{split}_top5"] = 100.0 * c5 / n
        if modality == "audio":  # a network that hears: also its agreement with the clip labels
            out[f"{split}_label_top1"] = 100.0 * label_c1 / n
        return out

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        top5 = f" (top-5 {m[f'{split}_top5']:.2f}%)" if f"{split}_top5" in m else ""
        return f"{split} top-1 {m[f'{split}_top1']:.2f}% per video{top5}"

    # ---------------------------------------------------------------- export
    def rebuild(self, meta: dict, cfg, export: bool = True) -> nn.Module:
        name = meta["model_name"]
        options = {"in_features": cfg.video.audio_dim} if name == "audio_mlp" else {}
        return create_model(name, num_classes=meta["num_classes"], **options).eval()

    def sample_inputs(self, meta: dict, cfg):
        return torch.randn(2, *meta["input_size"], generator=torch.Generator().manual_seed(0))

    def other_sample_inputs(self, inputs: torch.Tensor, dynamic: dict[str, bool]) -> list[torch.Tensor]:
        if not dynamic.get("batch"):
            return []
        return [torch.randn(3, *inputs.shape[1:], generator=torch.Generator().manual_seed(1))]

    def preprocessing(self, model: nn.Module, meta: dict, cfg):
        v = cfg.video
        kind = meta.get("modality", v.modality)
        if kind == "audio":
            return {"input": "audio", "shape": list(meta["input_size"]),
                    "log_mel": None if cfg.data.name != "av_fashion_mnist" else {
                        "sample_rate": av.SAMPLE_RATE, "n_fft": av.N_FFT, "hop": av.HOP, "n_mels": av.N_MELS,
                        "f_max": av.F_MAX, "seconds": av.WINDOW_SECONDS}}
        # frames read from files are resized to load_size; the embedded set holds them at size x size
        load_size = [v.size, v.size] if cfg.data.name == "av_fashion_mnist" else list(v.load_size)
        return {"input": kind, "layout": "N x 3 x T x H x W" if kind == "video" else "N x 3 x H x W",
                "frames": v.frames if kind == "video" else 1, "size": v.size, "load_size": load_size,
                "resize": "frames to load_size (H, W), bilinear; their central square to size x size",
                "scale": "0..1", "mean": list(v.mean), "std": list(v.std), "eval_clips": v.eval_clips}
