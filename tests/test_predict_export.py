"""Inference and self-describing exports end to end: a tiny Fashion-MNIST run is exported in every
format (no deprecation warning, readable differences), each file carries its metadata, and
``load_student`` / ``reviewkd predict`` on PNG files written here (grey and RGB) give the classes a
hand computation of the training preprocessing gives; every user mistake is one line, exit code 2."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import reviewkd
from reviewkd.cli import main
from reviewkd.models import create_model

# Tiny but real: 256 training / 256 test images, one epoch of 4 steps, fp32 on the CPU.
TINY_YAML = """\
data: {name: fashion_mnist, subset: 256, batch_size: 64, eval_batch_size: 256}
model: {name: resnet8}
method: {name: vanilla}
solver: {lr: 0.05, epochs: 1, schedule: cosine}
runtime: {device: cpu, precision: fp32}
"""
# Written out here, not read from the code under test.
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FORMATS = ("pt", "safetensors", "torchscript", "pt2", "onnx")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def run(argv) -> tuple[int, str, str, list]:
    """``main`` with stdout, stderr and every warning captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue(), list(w)


def one_line_error(rc: int, out: str, err: str, command: str) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"reviewkd {command}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict_runs")
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    rc, out, err, _ = run(["train", config, f"output_dir={root}", "name=tiny", "--no-progress"])
    assert rc == 0, err
    return root / "tiny"


@pytest.fixture(scope="module")
def exported(trained) -> dict:
    out_dir = trained / "export"
    rc, out, err, caught = run(["export", trained / "best.pt", "--out", out_dir])
    assert rc == 0, err
    return {"dir": out_dir, "out": out, "warnings": caught}


@pytest.fixture(scope="module")
def images(fashion_test_set, tmp_path_factory) -> dict:
    """Eight real test images as PNGs: the even ones grey (mode L), the odd ones RGB (the grey value
    in every channel), plus a folder holding copies of the first four."""
    pixels, labels = fashion_test_set
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(8):
        grey = pixels[i, 0].numpy()
        image = Image.fromarray(grey, "L") if i % 2 == 0 else Image.fromarray(np.stack([grey] * 3, axis=2), "RGB")
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    inside = folder / "more"
    inside.mkdir()
    for p in paths[:4]:
        shutil.copy(p, inside / p.name)
    return {"paths": paths, "pixels": pixels[:8], "labels": labels[:8], "folder": inside}


def hand_input(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """N x 1 x 28 x 28 uint8 -> the input evaluation gives the model: zero pixels padded to 32 x 32
    (so they normalise to -mean/std), scaled, normalised, repeated to three channels."""
    padded = F.pad(pixels_uint8.float(), (2, 2, 2, 2), value=0.0)
    return ((padded / 255.0 - FASHION_MEAN) / FASHION_STD).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def expected(trained, images) -> dict:
    """Class probabilities of the trained student on the PNGs' pixels, computed without the code
    under test's preprocessing or loading."""
    ckpt = torch.load(trained / "best.pt", map_location="cpu", weights_only=True)
    student = create_model("resnet8", num_classes=10)
    student.load_state_dict(ckpt["student"])
    with torch.no_grad():
        probabilities = torch.softmax(student.eval()(hand_input(images["pixels"])), dim=1)
    return {"probabilities": probabilities, "top1": probabilities.argmax(dim=1).tolist()}


# ------------------------------------------------------------------------------------ export
def test_export_writes_every_format_with_readable_differences_and_no_deprecation_warning(exported):
    out_dir = exported["dir"]
    for fmt, name in zip(FORMATS, ("resnet8.pt", "resnet8.safetensors", "resnet8.torchscript.pt", "resnet8.pt2",
                                   "resnet8.onnx")):
        assert (out_dir / name).is_file(), name
        row = next(line for line in exported["out"].splitlines() if line.startswith(fmt + " "))
        assert re.search(r"\s\d\.\de[-+]\d\d\s", row), row  # e.g. 3.1e-06, not 0.00
    assert re.search(r"pt2 .*batch, height, width", exported["out"])
    assert re.search(r"onnx .*batch, height, width", exported["out"])
    assert f"metadata in {out_dir / 'model.json'}" in exported["out"]
    deprecations = [f"{w.category.__name__}: {w.message}" for w in exported["warnings"]
                    if issubclass(w.category, DEPRECATIONS)]
    assert not deprecations, deprecations


def check_metadata(meta: dict, where: str) -> None:
    assert meta["format"] == "reviewkd-export-1", where
    assert meta["reviewkd_version"] == reviewkd.__version__, where
    assert meta["task"] == "classification" and meta["model_name"] == "resnet8", where
    assert meta["num_classes"] == 10 and meta["class_names"] == FASHION_CLASSES, where
    assert meta["input_size"] == [3, 32, 32], where
    pre = meta["preprocessing"]
    # Fashion-MNIST: grey 28 x 28, zero-padded to 32 x 32, repeated to RGB, its own mean / std.
    assert pre["color"] == "L" and pre["resize"] == {"size": [28, 28]} and pre["pad_to"] == [32, 32], where
    assert pre["channels"] == 3 and pre["center_crop"] is None and pre["batch"] == "stack", where
    assert pre["mean"] == pytest.approx([FASHION_MEAN]) and pre["std"] == pytest.approx([FASHION_STD]), where
    assert meta["config"]["model"]["name"] == "resnet8" and meta["config"]["data"]["name"] == "fashion_mnist", where


def test_every_file_carries_its_metadata(exported):
    import onnx
    from safetensors import safe_open

    out_dir = exported["dir"]
    described = json.loads((out_dir / "model.json").read_text())
    check_metadata(described, "model.json")
    assert set(described["files"]) == set(FORMATS)
    for fmt, entry in described["files"].items():
        assert (out_dir / entry["file"]).is_file()
        assert 0.0 <= entry["max_abs_diff"] <= 1e-4, (fmt, entry)
    for fmt in ("pt2", "onnx"):
        assert described["files"][fmt]["dynamic_axes"] == {"batch": True, "height": True, "width": True}

    model = onnx.load(str(out_dir / "resnet8.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    check_metadata(json.loads(props["reviewkd"]), "onnx")
    assert json.loads(props["class_names"]) == FASHION_CLASSES and props["model_name"] == "resnet8"
    assert json.loads(props["mean"]) == pytest.approx([FASHION_MEAN]) and props["task"] == "classification"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]

    with safe_open(str(out_dir / "resnet8.safetensors"), "pt") as f:
        metadata = f.metadata()
    check_metadata(json.loads(metadata["reviewkd"]), "safetensors")
    assert json.loads(metadata["input_size"]) == [3, 32, 32] and json.loads(metadata["std"]) == pytest.approx([FASHION_STD])

    pt = torch.load(out_dir / "resnet8.pt", map_location="cpu", weights_only=True)
    check_metadata(pt, "pt")
    for name in ("resnet8.pt2", "resnet8.torchscript.pt"):  # an extra file inside the archive
        with zipfile.ZipFile(out_dir / name) as archive:
            (entry,) = [n for n in archive.namelist() if n.endswith("/extra/reviewkd.json")]
            check_metadata(json.loads(archive.read(entry)), name)


# ----------------------------------------------------------------------------- load_student
def test_preprocessing_is_the_training_one_for_grey_and_rgb_files(exported, images):
    student = reviewkd.load_student(exported["dir"])
    x = student.preprocess(images["paths"])
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, hand_input(images["pixels"]), atol=1e-6, rtol=0)
    # a PIL image gives the same, and an image of another size is brought to the input size
    with Image.open(images["paths"][1]) as im:
        torch.testing.assert_close(student.preprocess(im), x[1:2], atol=0, rtol=0)
        assert student.preprocess(im.resize((56, 70))).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("source", ["checkpoint", "folder", *[f"folder:{f}" for f in FORMATS],
                                    *[f"file:{f}" for f in FORMATS]])
def test_load_student_from_checkpoint_and_every_export_gives_the_same_top1(trained, exported, images, expected, source):
    files = {"pt": "resnet8.pt", "safetensors": "resnet8.safetensors", "torchscript": "resnet8.torchscript.pt",
             "pt2": "resnet8.pt2", "onnx": "resnet8.onnx"}
    kind, _, fmt = source.partition(":")
    if kind == "checkpoint":
        student = reviewkd.load_student(trained / "best.pt")
    elif kind == "folder":
        student = reviewkd.load_student(exported["dir"], format=fmt or None)
    else:
        student = reviewkd.load_student(exported["dir"] / files[fmt])
    assert student.format == (fmt or ("pt" if kind == "folder" else "checkpoint"))
    check_metadata(student.meta, source)
    predictions = student.predict(images["paths"], topk=3)
    assert [p["image"] for p in predictions] == [str(p) for p in images["paths"]]
    for p, probabilities, top1 in zip(predictions, expected["probabilities"], expected["top1"]):
        assert len(p["top"]) == 3
        assert p["top"][0]["index"] == top1 and p["top"][0]["class"] == FASHION_CLASSES[top1]
        for t in p["top"]:
            assert t["probability"] == pytest.approx(probabilities[t["index"]].item(), abs=1e-5)
        assert [t["probability"] for t in p["top"]] == sorted((t["probability"] for t in p["top"]), reverse=True)


# ------------------------------------------------------------------------------- the command
def test_predict_command_prints_the_class_names(exported, images, expected):
    paths = images["paths"]
    rc, out, err, _ = run(["predict", exported["dir"], paths[0], paths[1], images["folder"], "--topk", "2"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    shown = [*paths[:2], *sorted(images["folder"].iterdir())]
    source = [0, 1, 0, 1, 2, 3]  # which of the eight images each shown file is (the folder holds copies of 0..3)
    assert len(lines) == 3 * len(shown)
    for k, (path, i) in enumerate(zip(shown, source)):
        top1 = expected["top1"][i]
        assert lines[3 * k] == str(path)
        percent, name = lines[3 * k + 1].split(maxsplit=1)
        assert name == FASHION_CLASSES[top1]
        assert float(percent.rstrip("%")) == pytest.approx(100 * expected["probabilities"][i, top1].item(), abs=0.006)

    rc, out, err, _ = run(["predict", exported["dir"] / "resnet8.onnx", paths[2], "--json"])
    assert rc == 0, err
    (prediction,) = json.loads(out)
    assert prediction["image"] == str(paths[2]) and len(prediction["top"]) == 5
    assert prediction["top"][0]["class"] == FASHION_CLASSES[expected["top1"][2]]
    assert prediction["top"][0]["probability"] == pytest.approx(expected["probabilities"][2].max().item(), abs=1e-5)

    rc, out, err, _ = run(["predict", exported["dir"], paths[3], "--json", "--topk", "50"])  # more than the classes
    assert rc == 0, err
    assert len(json.loads(out)[0]["top"]) == 10


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bare_state_dict(tmp: Path) -> Path:
    path = tmp / "weights.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    return path


def _plain_onnx(tmp: Path) -> Path:
    path = tmp / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=True,
                      verbose=False)
    return path


def _only_pt(tmp: Path, exported) -> Path:
    folder = tmp / "only_pt"
    folder.mkdir()
    for name in ("model.json", "resnet8.pt"):
        shutil.copy(exported["dir"] / name, folder / name)
    return folder


# id -> (argv builder (tmp, trained, exported, images), substrings of the one-line message)
BAD_INPUTS = {
    "missing-image": (lambda t, r, e, i: ["predict", e["dir"], t / "nope.png"], ["image not found", "nope.png"]),
    "not-an-image": (lambda t, r, e, i: ["predict", e["dir"], _write(t / "notes.png", b"hello")],
                     ["notes.png", "not an image"]),
    "empty-folder": (lambda t, r, e, i: ["predict", e["dir"], (t / "empty").mkdir() or t / "empty"],
                     ["holds no image files"]),
    "missing-model": (lambda t, r, e, i: ["predict", t / "missing.pt", i["paths"][0]], ["model not found"]),
    "bare-state-dict": (lambda t, r, e, i: ["predict", _bare_state_dict(t), i["paths"][0]],
                        ["neither a reviewkd run checkpoint nor a reviewkd export"]),
    "garbage-model": (lambda t, r, e, i: ["predict", _write(t / "garbage.pt", bytes(range(256)) * 8), i["paths"][0]],
                      ["garbage.pt", "corrupted or not a model file"]),
    "folder-without-model-json": (lambda t, r, e, i: ["predict", i["folder"], i["paths"][0]], ["holds no model.json"]),
    "onnx-without-metadata": (lambda t, r, e, i: ["predict", _plain_onnx(t), i["paths"][0]],
                              ["plain.onnx", "carries no reviewkd export metadata"]),
    "format-not-in-folder": (lambda t, r, e, i: ["predict", _only_pt(t, e), i["paths"][0], "--format", "onnx"],
                             ["holds no onnx export", "it has: pt"]),
    "topk-zero": (lambda t, r, e, i: ["predict", e["dir"], i["paths"][0], "--topk", "0"], ["--topk must be at least 1"]),
    "export-unknown-format": (lambda t, r, e, i: ["export", r / "best.pt", "--out", t / "x", "--formats", "pt,tflite"],
                              ["tflite", "pt2"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_with_exit_code_2(tmp_path, trained, exported, images, case):
    build, expected_text = BAD_INPUTS[case]
    argv = build(tmp_path, trained, exported, images)
    rc, out, err, _ = run(argv)
    line = one_line_error(rc, out, err, argv[0])
    for text in expected_text:
        assert text in line, (text, line)


# ---------------------------------------------------------------------- dynamic or fixed axes
class _Flatten(torch.nn.Module):
    """A linear layer on the flattened image: runs at one input size only."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 24, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_height_and_width_stay_fixed_with_a_note_where_the_model_needs_one_size():
    from reviewkd.export import export_program
    from reviewkd.tasks import get_task

    task = get_task("classification")
    x = torch.randn(4, 3, 16, 24)
    program = export_program(_Flatten().eval(), x, task, "flat")
    assert program.dynamic == {"batch": True, "height": False, "width": False}
    assert "height and width fixed at 16 x 24" in program.note
    assert program.program.module()(torch.randn(1, 3, 16, 24)).shape == (1, 5)  # the batch is still free

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    program = export_program(conv, x, task, "conv")
    assert program.dynamic == {"batch": True, "height": True, "width": True} and program.note is None
    other = torch.randn(2, 3, 20, 40)
    torch.testing.assert_close(program.program.module()(other), conv(other))


# ----------------------------------------------------------------------- preprocessing specs
def _cfg(**data):
    from reviewkd.config import validate

    return validate({"data": data}, "test")


def test_preprocessing_specs_follow_each_data_module():
    from reviewkd.data.preprocessing import eval_preprocessing

    cifar = eval_preprocessing(_cfg(name="cifar100"))
    assert cifar["color"] == "RGB" and cifar["resize"] == {"size": [32, 32]} and cifar["pad_to"] is None
    assert cifar["mean"] == pytest.approx([0.5071, 0.4867, 0.4408]) and cifar["std"] == pytest.approx([0.2675, 0.2565, 0.2761])
    assert eval_preprocessing(_cfg(name="cifar10"))["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    folder = eval_preprocessing(_cfg(name="imagefolder", image_size=64))
    assert folder["resize"] == {"shorter_side": 73} and folder["center_crop"] == [64, 64]  # round(64 * 256 / 224)
    assert folder["mean"] == pytest.approx([0.485, 0.456, 0.406]) and folder["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_imagefolder_preprocessing_reproduces_the_evaluation_transform(tmp_path):
    """Against the data module's own evaluation transform (Resize + CenterCrop + ToTensor + Normalize)."""
    from reviewkd.data.imagefolder import imagenet_transforms
    from reviewkd.data.preprocessing import ImagePreprocessor, eval_preprocessing

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    prepared = ImagePreprocessor(eval_preprocessing(_cfg(name="imagefolder", image_size=64)))([path])
    with Image.open(path) as im:
        reference = imagenet_transforms(False, 64, 73)(im.convert("RGB"))
    torch.testing.assert_close(prepared[0], reference, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- regression
def test_predict_gives_a_regressor_value_in_the_targets_unit(tmp_path):
    config = tmp_path / "reg.yaml"
    config.write_text(f"""
task: regression
output_dir: {tmp_path}
name: reg
data: {{name: regression, root: {tmp_path / 'data'}, image_size: 16, batch_size: 16, eval_batch_size: 64}}
regression: {{synthetic: {{n: 48}}}}
model: {{name: resnet8}}
solver: {{lr: 0.01, epochs: 1}}
runtime: {{device: cpu, precision: fp32}}
""")
    rc, out, err, _ = run(["train", config, "--no-progress"])
    assert rc == 0, err
    image = sorted((tmp_path / "data").glob("*.png"))[0]
    rc, out, err, _ = run(["predict", tmp_path / "reg" / "best.pt", image, "--json"])
    assert rc == 0, err
    (prediction,) = json.loads(out)

    ckpt = torch.load(tmp_path / "reg" / "best.pt", map_location="cpu", weights_only=True)
    model = create_model("resnet8", num_classes=1)
    model.load_state_dict(ckpt["student"])
    with Image.open(image) as im:
        x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        y = model.eval()((x / 255.0 - 0.5) / 0.5).item()  # pixels to -1..1, as the regression data do
    scaler = ckpt["target_scaler"]
    assert prediction["value"] == pytest.approx(y * scaler["b"] + scaler["a"], abs=1e-4)


# ----------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def detection_checkpoint(tmp_path_factory) -> Path:
    """A detection run checkpoint as the loop writes it (untrained weights: only the format matters)."""
    from reviewkd.config import validate
    from reviewkd.detection.models import create_detector
    from reviewkd.engine.checkpoint import FORMAT

    root = tmp_path_factory.mktemp("det")
    cfg = validate({"task": "detection", "data": {"name": "shapes", "root": str(root / "none")},
                    "model": {"name": "fasterrcnn_mobilenet_v2_fpn"},
                    "detection": {"min_size_test": 64, "max_size_test": 96}}, "test")
    torch.manual_seed(0)
    student = create_detector("fasterrcnn_mobilenet_v2_fpn", 3, min_size=64, max_size=96)
    path = root / "last.pt"
    torch.save({"format": FORMAT, "task": "detection", "model_name": "fasterrcnn_mobilenet_v2_fpn", "num_classes": 3,
                "class_names": {"1": "disc", "2": "square"}, "label_to_cat": {"1": 1, "2": 2}, "unit": "iteration",
                "iteration": 0, "metrics": {}, "config": cfg.model_dump(mode="json"),
                "student": student.state_dict()}, path)
    return path


def test_detectors_are_refused_by_predict_and_by_the_torch_export_formats(tmp_path, detection_checkpoint, images):
    rc, out, err, _ = run(["predict", detection_checkpoint, images["paths"][0]])
    assert "predict is for classification" in one_line_error(rc, out, err, "predict")
    for fmt in ("onnx", "pt2"):
        rc, out, err, _ = run(["export", detection_checkpoint, "--out", tmp_path / "x", "--formats", f"pt,{fmt}"])
        line = one_line_error(rc, out, err, "export")
        assert f"{fmt} export is not available for detectors" in line and "torch.export" in line and "batched_nms" in line


@pytest.mark.slow
def test_a_detector_export_round_trip_reproduces_its_detections(tmp_path, detection_checkpoint, images):
    rc, out, err, caught = run(["export", detection_checkpoint, "--out", tmp_path / "export"])
    assert rc == 0, err
    assert not [w for w in caught if issubclass(w.category, DEPRECATIONS)]
    described = json.loads((tmp_path / "export" / "model.json").read_text())
    assert set(described["files"]) == {"pt", "safetensors", "torchscript"}
    pre = described["preprocessing"]
    assert pre["batch"] == "list" and pre["color"] == "RGB" and pre["inside_model"]["resize"] == {"min_size": 64,
                                                                                                   "max_size": 96}
    reference = reviewkd.load_student(detection_checkpoint)
    inputs = reference.preprocess(images["paths"][:2])
    assert [tuple(x.shape) for x in inputs] == [(3, 28, 28)] * 2
    torch.testing.assert_close(inputs[0], images["pixels"][0].float().repeat(3, 1, 1) / 255.0)
    expected = reference(inputs)
    assert sum(len(d["boxes"]) for d in expected) > 0  # something to compare
    for fmt in ("pt", "safetensors", "torchscript"):
        student = reviewkd.load_student(tmp_path / "export", format=fmt)
        got = student(inputs)  # detections for every format (a scripted detector's own output is a pair)
        for a, b in zip(expected, got, strict=True):
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=1e-3, rtol=0)
