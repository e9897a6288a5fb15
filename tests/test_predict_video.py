"""``reviewkd predict`` / ``load_student(...).predict`` on video files: a hand-written checkpoint of
a tiny (untrained) R(2+1)D student, a video written here with PyAV, and the probabilities of a hand
computation of the evaluation (evenly spaced clips, central square, normalisation, softmax averaged
over the clips); the preprocessing equals the evaluation loader's, and bad inputs are one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reviewkd
from reviewkd.config import validate
from reviewkd.engine.checkpoint import FORMAT
from reviewkd.models import create_model
from test_cli import run_quiet as run

av = pytest.importorskip("av")

CLASSES = ["archery", "bowling", "cutting"]
# Not the Kinetics defaults: the constants must come from the checkpoint's config.
MEAN, STD = (0.40, 0.45, 0.50), (0.20, 0.25, 0.30)
VIDEO = {"frames": 4, "size": 16, "load_size": [16, 24], "eval_clips": 3, "mean": list(MEAN), "std": list(STD)}


def write_video(path: Path, frames: int, height: int, width: int) -> Path:
    """A bar sliding to the right over a gradient: every frame differs."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.zeros((height, width, 3), dtype=np.uint8)
            image[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
            image[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
            image[:, 2 * i: 2 * i + 4, 2] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def checkpoint(path: Path, task: str, cfg: dict, model, **entries) -> Path:
    """A run checkpoint as the loop writes it (untrained weights: only the format matters)."""
    config = validate(cfg, "test").model_dump(mode="json")
    torch.save({"format": FORMAT, "task": task, "unit": "epoch", "epoch": 1, "metrics": {}, "config": config,
                "student": model.state_dict(), **entries}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict_video")
    torch.manual_seed(0)
    student = create_model("r2plus1d_10_w16", num_classes=3).eval()
    cfg = {"task": "video", "data": {"name": "video_folder", "root": str(root / "videos"), "workers": 0, "batch_size": 1},
           "model": {"name": "r2plus1d_10_w16"}, "video": VIDEO}
    video_ckpt = checkpoint(root / "best.pt", "video", cfg, student, model_name="r2plus1d_10_w16", num_classes=3,
                            class_names=CLASSES, input_size=[3, 4, 16, 16])
    image_model = create_model("resnet8", num_classes=10).eval()
    image_ckpt = checkpoint(root / "image.pt", "classification", {"data": {"name": "fashion_mnist"},
                            "model": {"name": "resnet8"}}, image_model, model_name="resnet8", num_classes=10,
                            input_size=[3, 32, 32])
    png = root / "frame.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(png)
    # 10 frames at the load size (16 x 24): frames are not resized, only their central square taken
    return {"root": root, "cfg": cfg, "student": student, "video_ckpt": video_ckpt, "image_ckpt": image_ckpt,
            "png": png, "clip": write_video(root / "clip.avi", 10, 16, 24)}


def hand_probabilities(student, path: Path) -> torch.Tensor:
    """Evaluation by hand: clips of 4 frames from 0, 3, 6 (linspace(0, 10 - 4, 3)), columns 4..19
    (the central 16 x 16 square of 16 x 24), (x / 255 - mean) / std, softmax averaged over clips."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (10, 16, 24, 3)
    clips = np.stack([frames[s:s + 4, :, 4:20] for s in (0, 3, 6)])  # 3 x 4 x 16 x 16 x 3
    x = torch.from_numpy(clips).double().permute(0, 4, 1, 2, 3) / 255.0
    x = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(
        1, 3, 1, 1, 1)
    with torch.no_grad():
        return student(x.float()).softmax(1).mean(0)


def by_class(top: list[dict]) -> torch.Tensor:
    probabilities = torch.zeros(len(CLASSES))
    for t in top:
        assert t["class"] == CLASSES[t["index"]]
        probabilities[t["index"]] = t["probability"]
    return probabilities


def test_predict_averages_the_clips_softmax_as_a_hand_computation(files):
    expected = hand_probabilities(files["student"], files["clip"])
    assert expected.max() - expected.min() > 1e-3  # the classes are told apart
    student = reviewkd.load_student(files["video_ckpt"])
    (prediction,) = student.predict(files["clip"], topk=3)
    assert prediction["video"] == str(files["clip"])
    torch.testing.assert_close(by_class(prediction["top"]), expected, atol=1e-5, rtol=0)
    assert [t["index"] for t in prediction["top"]] == expected.argsort(descending=True).tolist()
    assert student.preprocess([files["clip"], files["clip"]]).shape == (6, 3, 4, 16, 16)  # 3 clips per video


def test_an_export_folder_predicts_the_same_from_the_command_line(files, tmp_path):
    rc, out, err = run(["export", files["video_ckpt"], "--out", tmp_path / "export", "--formats", "pt,safetensors"])
    assert rc == 0, err
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["preprocessing"]["load_size"] == [16, 24] and meta["preprocessing"]["mean"] == pytest.approx(MEAN)
    expected = hand_probabilities(files["student"], files["clip"])
    for fmt in ("pt", "safetensors"):
        rc, out, err = run(["predict", tmp_path / "export", files["clip"], "--json", "--format", fmt])
        assert rc == 0, err
        (prediction,) = json.loads(out)
        torch.testing.assert_close(by_class(prediction["top"]), expected, atol=1e-5, rtol=0)


def test_predict_command_prints_the_top_classes_of_each_video(files):
    rc, out, err = run(["predict", files["video_ckpt"], files["clip"], files["root"] / "clip.avi", "--topk", "2"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == lines[3] == str(files["clip"]) and len(lines) == 6
    best = CLASSES[int(hand_probabilities(files["student"], files["clip"]).argmax())]
    assert lines[1].endswith(f"%  {best}")


def test_preprocessing_is_the_evaluation_loaders(files):
    """A video of another size (resized to the load size first) in a video_folder tree: predict
    prepares the clips the evaluation batches of the run's data hold."""
    from reviewkd.tasks import get_task

    root = files["root"] / "videos"
    for split in ("train", "test"):
        (root / split / CLASSES[0]).mkdir(parents=True, exist_ok=True)
        write_video(root / split / CLASSES[0] / "v.avi", 7, 32, 40)
    data = get_task("video").build_data(validate(files["cfg"], "test"), torch.device("cpu"))
    batch = next(iter(data.test))
    prepared = reviewkd.load_student(files["video_ckpt"]).preprocess(root / "test" / CLASSES[0] / "v.avi")
    assert batch.meta["clips"] == 3 and prepared.shape == (3, 3, 4, 16, 16)
    torch.testing.assert_close(prepared, batch.inputs["video"], atol=1e-6, rtol=0)


# id -> (argv builder (files, tmp), substrings of the one-line message); a missing model in some cases
# shows that the input was refused before the model loaded
BAD_INPUTS = {
    "garbage-video": (lambda f, t: ["predict", t / "missing.pt", _write(t / "noise.mp4", bytes(range(256)) * 4)],
                      ["noise.mp4 is not a video that can be decoded"]),
    "image-for-a-video-model": (lambda f, t: ["predict", f["video_ckpt"], f["png"]],
                                ["holds a video model: give video files", "frame.png"]),
    "video-for-an-image-model": (lambda f, t: ["predict", f["image_ckpt"], f["clip"]],
                                 ["clip.avi is a video", "holds an image model"]),
    "images-and-videos-mixed": (lambda f, t: ["predict", f["video_ckpt"], f["clip"], f["png"]],
                                ["frame.png is not a video file"]),
    "missing-video": (lambda f, t: ["predict", f["video_ckpt"], t / "nope.mp4"], ["video not found", "nope.mp4"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def one_line_error(rc: int, out: str, err: str) -> str:
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reviewkd predict: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_with_exit_code_2(files, tmp_path, case):
    build, expected = BAD_INPUTS[case]
    line = one_line_error(*run(build(files, tmp_path)))
    for text in expected:
        assert text in line, (text, line)


def test_a_missing_pyav_is_one_line_with_the_install_command(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    line = one_line_error(*run(["predict", tmp_path / "missing.pt", files["clip"]]))
    assert "needs PyAV: pip install 'reviewkd[video]'" in line
