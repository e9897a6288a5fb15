"""The video task: clip sampling and augmentation, per-video evaluation, the UCF101 tree, the
embedded audio-visual set, and `reviewkd train` / eval / export of tiny video and audio runs."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reviewkd.engine.loop import TIMING_KEYS
from reviewkd.config import ConfigError, load_config
from reviewkd.data import av_fashion_mnist as av
from reviewkd.data.ucf101 import ucf101_entries
from reviewkd.data.video import (ClipAugment, ClipSet, FileClipDataset, FileClipLoader, MemoryClipLoader, clip_indices,
                                 clip_starts)
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import Run
from reviewkd.features import feature_spec_of
from reviewkd.models import create_model

ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ----------------------------------------------------------------------------- sampling
def test_evenly_spaced_clip_starts_and_looped_short_videos():
    assert clip_starts(40, 16, 3) == [0, 12, 24]
    assert clip_starts(16, 16, 3) == [0, 0, 0]
    assert clip_starts(10, 16, 1) == [0]
    assert clip_indices(5, 0, 8) == [0, 1, 2, 3, 4, 0, 1, 2]
    assert clip_indices(20, 3, 4) == [3, 4, 5, 6]


def test_random_resized_crop_boxes_stay_in_range():
    aug = ClipAugment(16, MEAN, STD, crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3))
    g = torch.Generator().manual_seed(0)
    boxes = aug.boxes(2000, 24, 32, train=True, generator=g).double()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 32 + 1e-4).all() and (boxes[:, 3] <= 24 + 1e-4).all()
    area = w * h / (24 * 32)
    assert area.min() >= 0.25 - 1e-4 and area.max() <= 1 + 1e-4
    assert (w / h).min() >= 0.75 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert area.std() > 0.1  # really random
    centre = aug.boxes(1, 24, 32, train=False)[0].tolist()
    assert centre == [4.0, 0.0, 28.0, 24.0]  # the central square


def test_clip_augment_shapes_flip_and_exact_evaluation_view():
    clips = torch.randint(0, 256, (6, 3, 4, 16, 16)).float()
    aug = ClipAugment(16, MEAN, STD)
    out = aug(clips, train=False)
    # evaluation at the stored size: the centre square is the whole frame, sampled at its pixel centres
    torch.testing.assert_close(out, (clips / 255 - 0.5) / 0.25, atol=1e-4, rtol=0)
    train = ClipAugment(8, MEAN, STD, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))(clips, True, torch.Generator().manual_seed(1))
    assert train.shape == (6, 3, 4, 8, 8)
    assert train.min() >= -2 - 1e-5 and train.max() <= 2 + 1e-5
    # a full-frame crop: each clip is the downscaled clip, or it mirrored; all frames of a clip alike
    small = ClipAugment(8, MEAN, STD, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))(clips, False)
    flipped = [torch.allclose(t, s.flip(-1), atol=1e-4) for t, s in zip(train, small)]
    kept = [torch.allclose(t, s, atol=1e-4) for t, s in zip(train, small)]
    assert all(a or b for a, b in zip(flipped, kept)) and any(flipped) and any(kept)


def _clip_set(n=6, frames=6, size=8, classes=3) -> ClipSet:
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (n, 3, frames, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ClipSet(video, labels, torch.randn(n, 4, generator=g), torch.ones(n, dtype=torch.bool))


def test_per_video_softmax_average_matches_a_hand_loop():
    from reviewkd.tasks.video import video_stats

    data = _clip_set()
    common = dict(augment=ClipAugment(8, MEAN, STD), frames=4, modality="video", seed=0)
    loader = MemoryClipLoader(data, batch_size=4, train=False, eval_clips=3, **common)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 8 * 8, 3)).eval()
    c1, c5, nll, n, _ = video_stats(model, loader, "video", torch.device("cpu"), "fp32").tolist()
    hits, loss = 0, 0.0
    for v in range(len(data)):  # by hand: 3 clips at frames 0, 1, 2 (6 frames, clips of 4)
        probs = []
        for start in (0, 1, 2):
            clip = data.video[v, :, start:start + 4].float()
            x = (clip / 255 - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)
            with torch.no_grad():
                probs.append(model(x[None]).softmax(1)[0])
        p = torch.stack(probs).mean(0)
        hits += int(p.argmax() == data.labels[v])
        loss -= math.log(float(p[data.labels[v]]))
    assert n == 6 and c1 == hits and c5 == 6
    assert nll == pytest.approx(loss, rel=1e-4)


def test_training_batches_are_sharded_and_reproducible():
    data = _clip_set(n=8)
    common = dict(augment=ClipAugment(8, MEAN, STD), frames=4, modality="frame", seed=3, train=True)
    a = list(MemoryClipLoader(data, batch_size=4, **common))
    b = list(MemoryClipLoader(data, batch_size=4, **common))
    assert len(a) == 2 and a[0].inputs["video"].shape == (4, 3, 4, 8, 8) and a[0].inputs["image"].shape == (4, 3, 8, 8)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.inputs["video"], y.inputs["video"], rtol=0, atol=0)
    ranks = [list(MemoryClipLoader(data, batch_size=4, rank=r, world_size=2, **common)) for r in (0, 1)]
    seen = torch.cat([batch.index for r in ranks for batch in r])
    assert sorted(seen.tolist()) == list(range(8))


# ----------------------------------------------------------------------------- UCF101 tree
def _write_avi(path: Path, frames: int, colour: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            image = np.full((24, 32, 3), colour, dtype=np.uint8)
            image[:, : 2 + i] = 255 - colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    """Three classes: two as frame folders, one as .avi files; audio features for two classes,
    one of their videos without a file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ucf101")
    train, test = [], []
    for c, cls in enumerate(("Apply", "Bowling", "Cutting")):
        for g in (1, 2, 3):
            name = f"v_{cls}_g0{g}_c01"
            item = f"{cls}/{name}.avi"
            (test if g == 1 else train).append(item)
            if cls == "Cutting":
                pytest.importorskip("av")
                _write_avi(root / "videos" / cls / f"{name}.avi", 7, 40 * c)
                continue
            folder = root / "frames" / cls / name
            folder.mkdir(parents=True)
            for f in range(1, 10):
                Image.fromarray(np.full((24, 32, 3), 20 * f + c, dtype=np.uint8)).save(folder / f"image_{f:05d}.jpg",
                                                                                       quality=100)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text("".join(f"{it} {1 + i // 2}\n" for i, it in enumerate(train)))
    (lists / "testlist01.txt").write_text("".join(f"{it}\n" for it in test))
    audio = root / "audio"
    audio.mkdir()
    for cls in ("Apply", "Cutting"):
        for g in (1, 2, 3):
            if (cls, g) != ("Apply", 2):  # this video has no audio
                np.save(audio / f"v_{cls}_g0{g}_c01.npy", np.full(4, g, dtype=np.float32))
    return root


def test_ucf101_tree_splits_ucf51_classes_and_missing_audio(ucf_tree):
    train, test, classes = ucf101_entries(str(ucf_tree), 1, None, str(ucf_tree / "audio"))
    assert classes == ["Apply", "Cutting"]  # Bowling has no audio file: not in the audio subset
    assert [e.name for e in test] == ["v_Apply_g01_c01", "v_Cutting_g01_c01"]
    assert [e.label for e in train] == [0, 0, 1, 1] and train[2].path.suffix == ".avi"
    data = FileClipDataset(train, frames=4, load_size=(24, 32), train=True, eval_clips=1,
                           audio_folder=ucf_tree / "audio", audio_dim=4, seed=0)
    video, label, audio, present, index = data[0]
    assert video.shape == (1, 3, 4, 24, 32) and video.dtype == torch.uint8 and label == 0
    start = (int(video[0, 0, 0, 0, 0]) - 0) // 20 - 1  # frame f has value 20 f (+ class): consecutive frames
    assert [int(v) for v in video[0, 0, :, 0, 0]] == pytest.approx([20 * (start + 1 + k) for k in range(4)], abs=2)
    assert not present and torch.equal(audio, torch.zeros(4))  # v_Apply_g02_c01: no feature file
    assert data[1][3] and torch.equal(data[1][2], torch.full((4,), 3.0))
    clip, label, audio, present, _ = data[2]  # the .avi file of 7 frames
    assert clip.shape == (1, 3, 4, 24, 32) and label == 1 and present and torch.equal(audio, torch.full((4,), 2.0))
    common = dict(augment=ClipAugment(16, MEAN, STD), frames=4, modality="video", seed=0, eval_clips=2)
    loader = FileClipLoader(FileClipDataset(test, 4, (24, 32), False, 2, ucf_tree / "audio", 4, 0), 0, "cpu",
                            batch_size=2, train=False, **common)
    (batch,) = list(loader)
    assert batch.inputs["video"].shape == (4, 3, 4, 16, 16) and batch.meta["clips"] == 2
    assert batch.targets.tolist() == [0, 1] and batch.inputs["audio_present"].tolist() == [True, True]


# ----------------------------------------------------------------------------- embedded set
def test_mel_filterbank_and_log_mel_against_a_hand_computation():
    filters = av.mel_filterbank(n_fft=64, n_mels=4, sample_rate=8000, f_max=4000.0)
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(4000), 6)]
    for k in range(33):
        f = k * 4000 / 32
        for m in range(4):
            lo, c, hi = edges[m:m + 3]
            want = max(0.0, min((f - lo) / (c - lo), (hi - f) / (hi - c)))
            assert float(filters[k, m]) == pytest.approx(want, abs=1e-6)
    t = torch.arange(av.SAMPLE_RATE) / av.SAMPLE_RATE
    spec = av.log_mel(torch.sin(2 * math.pi * 1000 * t))
    bank = av.mel_filterbank()
    assert spec.shape == (av.N_MELS, 1 + av.SAMPLE_RATE // av.HOP)
    assert int(spec[:, 10].argmax()) == int(bank[round(1000 * av.N_FFT / av.SAMPLE_RATE)].argmax())


TINY_SET = dict(train=40, test=20, frames=6, size=16, utterances=1)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    if not ESPEAK:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("avfm")
    settings = av.Settings(mismatch=0.25, seed=3, **TINY_SET)
    return root, settings, av.load(settings, root)


@needs_espeak
def test_embedded_set_mismatch_rate_and_determinism(tiny_set, tmp_path):
    root, settings, data = tiny_set
    for split, n in (("train", 40), ("test", 20)):
        labels, heard = data[f"{split}_labels"], data[f"{split}_audio_targets"]
        assert int((labels != heard).sum()) == round(0.25 * n)  # exactly the set rate, never the own class
        assert data[f"{split}_video"].shape == (n, 6, 16, 16) and data[f"{split}_audio"].shape[:2] == (n, 1)
    assert (data["train_video"].float().std(dim=1) > 0).float().mean() > 0.1  # the items move
    assert json_settings(root, settings)["mismatch"] == 0.25
    again = av.load(settings, tmp_path)  # generated afresh elsewhere: the same set
    for key in data:
        assert torch.equal(data[key], again[key]), key
    other = av.Settings(mismatch=0.25, seed=4, **TINY_SET)
    assert not torch.equal(av.load(other, tmp_path)["train_video"], data["train_video"])


def json_settings(root: Path, settings) -> dict:
    import json

    return json.loads((av.dataset_path(settings, root).parent / "settings.json").read_text())


def test_a_missing_espeak_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(av.shutil, "which", lambda name: None)
    cfg = load_config(None, ["task=video", "data.name=av_fashion_mnist", f"data.root={tmp_path}",
                             "model.name=r2plus1d_10_w16"])
    from reviewkd.tasks import get_task

    with pytest.raises(ConfigError, match="apt-get install espeak-ng"):
        get_task("video").check_config(cfg)


# ----------------------------------------------------------------------------- models and config
def test_video_and_audio_models_expose_their_pooled_embedding():
    from reviewkd.features import FeatureTaps

    for name, x, dim in (("r2plus1d_10_w16", torch.randn(2, 3, 4, 16, 16), 128), ("audio_cnn", torch.randn(2, 1, 40, 61), 512),
                         ("audio_mlp", torch.randn(3, 512), 512)):
        model = create_model(name, num_classes=5).eval()
        taps = FeatureTaps(model, feature_spec_of(model).select([]))
        logits, (pooled,) = taps(x)
        assert logits.shape == (len(x), 5) and pooled.shape == (len(x), dim, 1, 1), name
        if name != "r2plus1d_10_w16":
            assert pooled.min() >= 0  # post-ReLU
        torch.testing.assert_close(model.fc(pooled.flatten(1)), logits)
    r10 = create_model("r2plus1d_10", num_classes=7)
    assert [len(getattr(r10, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert [len(getattr(create_model("r2plus1d_18", num_classes=7), f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert type(r10.stem).__name__ == "R2Plus1dStem" and r10.fc.in_features == 512


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="needs task: video"):
        load_config(None, ["data.name=av_fashion_mnist"])
    cfg = load_config(None, ["task=video", "data.name=av_fashion_mnist", "runtime.channels_last=true"])
    from reviewkd.tasks import get_task

    with pytest.raises(ConfigError, match="channels_last"):
        get_task("video").check_config(cfg)
    cfg = load_config(None, ["task=video", "data.name=ucf101", f"data.root={tmp_path}", "video.mismatch=0.3"])
    with pytest.raises(ConfigError, match="av_fashion_mnist only"):
        get_task("video").check_config(cfg)
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(None, ["task=video", "data.name=av_fashion_mnist", "video.crop_scale=[0.5,0.2]"])


# ----------------------------------------------------------------------------- runs
def _tiny_run(root: Path, out: Path, name: str, *extra: str):
    return load_config("av_fashion_mnist/video_vanilla", [
        f"data.root={root}", f"output_dir={out}", f"name={name}", "video.mismatch=0.25", "video.embedded.seed=3",
        *(f"video.embedded.{k}={v}" for k, v in TINY_SET.items() if k != "frames" and k != "size"),
        "video.embedded.extra_frames=2", "video.frames=4", "video.size=16", "data.batch_size=10",
        "data.eval_batch_size=8", "solver.epochs=2", "runtime.device=cpu", "runtime.precision=fp32",
        "runtime.deterministic=true", *extra])


@pytest.fixture(scope="module")
def full_run(tiny_set, tmp_path_factory):
    """A finished tiny video run (1 epoch of 4 steps)."""
    out = tmp_path_factory.mktemp("video_runs")
    return out, Run(_tiny_run(tiny_set[0], out, "full", "solver.epochs=1"), progress=False).fit()


@needs_espeak
@pytest.mark.slow  # three tiny video runs: about 40 s on a loaded 2-core CPU
def test_a_tiny_video_run_resumes_to_the_uninterrupted_result(tiny_set, tmp_path):
    out = tmp_path
    full = Run(_tiny_run(tiny_set[0], out, "full"), progress=False).fit()
    assert full.best_score is not None and set(full.metrics) >= {"test_top1", "test_top5", "test_loss"}
    Run(_tiny_run(tiny_set[0], tmp_path, "resumed"), progress=False, stop_after=1).fit()
    Run(_tiny_run(tiny_set[0], tmp_path, "resumed"), resume=True, progress=False).fit()
    a, b = load_checkpoint(out / "full" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in a["student"].items():
        assert torch.equal(value, b["student"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and a["metrics"] == b["metrics"]


@needs_espeak
@pytest.mark.parametrize("formats", [["pt", "safetensors"],
                                     pytest.param(["torchscript", "pt2", "onnx"], marks=pytest.mark.slow)])
def test_a_tiny_video_run_evaluates_and_exports_the_student(full_run, formats, tmp_path, capsys):
    from reviewkd.cli import main
    from reviewkd.export import export_student

    out, _ = full_run
    best = out / "full" / "best.pt"
    assert main(["eval", str(best)]) == 0
    assert f"{load_checkpoint(best)['metrics']['test_top1']:.2f}" in capsys.readouterr().out  # eval reproduces the run
    results = export_student(best, tmp_path / "export", formats)
    assert all(r["max_abs_diff"] <= 1e-4 for r in results.values())  # checked on N = 2 and N = 3 clips
    for fmt in set(formats) & {"pt2", "onnx"}:
        assert results[fmt]["dynamic_axes"] == {"batch": True}


@needs_espeak
def test_a_tiny_audio_teacher_run_learns_what_it_hears(tiny_set, tmp_path):
    cfg = _tiny_run(tiny_set[0], tmp_path, "audio", "model.name=audio_cnn", "video.modality=audio", "solver.epochs=1")
    result = Run(cfg, progress=False).fit()
    assert "test_label_top1" in result.metrics  # scored on the class heard; the clip labels differ on 25 %
    batch = next(iter(_loader(cfg)))
    assert torch.equal(batch.targets, batch.meta["audio_targets"]) and batch.inputs["image"].shape[1:] == (1, 40, 61)


def _loader(cfg):
    from reviewkd.tasks import get_task

    return get_task("video").build_data(cfg, torch.device("cpu")).train
