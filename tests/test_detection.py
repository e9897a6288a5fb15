"""Detection and instance segmentation: review mechanism on FPN levels, distilled detectors,
COCO data / augmentation / evaluation, iteration-based runs (resume, export) and the CPU demo."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reviewkd.cli import main as cli
from reviewkd.config import ConfigError, load_config
from reviewkd.detection.coco_eval import coco_metrics, to_coco_results
from reviewkd.detection.data import CocoDetection, TrainAugment, collate, hflip, resize
from reviewkd.detection.distiller import DetectionDistiller
from reviewkd.detection.models import create_detector
from reviewkd.detection.shapes import CLASSES, make_shapes
from reviewkd.review import hcl_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_train=12, num_val=6, min_size=96, max_size=128, max_objects=3, seed=1)
    return root


def _dataset(root, split="train", masks=True, augment=None):
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json", train=split == "train",
                         masks=masks, augment=augment)


def _batch(root, n=2, masks=True):
    ds = _dataset(root, masks=masks, augment=TrainAugment((96, 112), 160, 0.5))
    batch = collate([ds[(i, (0, 0))] for i in range(n)])
    return (batch.inputs["images"], batch.targets), ds.num_classes


# ----------------------------------------------------------------------------- review on FPN levels
def _pool_by_hand(x: torch.Tensor, level: int) -> torch.Tensor:
    """Adaptive average pooling to level x level written out (bins floor(i*H/L) .. ceil((i+1)*H/L))."""
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], level, level, dtype=torch.float64)
    for i in range(level):
        for j in range(level):
            r0, r1 = (i * h) // level, -(-((i + 1) * h) // level)
            c0, c1 = (j * w) // level, -(-((j + 1) * w) // level)
            out[..., i, j] = x[..., r0:r1, c0:c1].double().mean(dim=(-2, -1))
    return out


def _hcl_by_hand(students, teachers) -> float:
    total = 0.0
    for s, t in zip(students, teachers):
        h = s.shape[-2]
        terms = [(1.0, ((s.double() - t.double()) ** 2).mean().item())]
        weight = 1.0
        for level in (4, 2, 1):
            if level < h:  # levels are skipped by the height only, as the released code
                weight /= 2
                terms.append((weight, ((_pool_by_hand(s, level) - _pool_by_hand(t, level)) ** 2).mean().item()))
        total += sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    return total


def test_hcl_non_square_levels_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 7, 5), (2, 3, 3, 9), (2, 3, 12, 4), (2, 3, 2, 6), (2, 3, 1, 3)]
    s = [torch.randn(*sh, generator=g) for sh in shapes]
    t = [torch.randn(*sh, generator=g) for sh in shapes]
    assert hcl_loss(s, t).item() == pytest.approx(_hcl_by_hand(s, t), rel=1e-5)


def test_review_on_fpn_levels_of_r18_student_and_r50_teacher():
    student = create_detector("fasterrcnn_resnet18_fpn", 5)
    teacher = create_detector("fasterrcnn_resnet50_fpn", 5, frozen_bn=True)
    d = DetectionDistiller(student, teacher, "reviewkd", weight=1.2, warmup_epochs=0)
    fusion = d.method.fusion
    assert len(fusion.abfs) == 5 and fusion.mid_channels == 256
    assert [a.att_conv is None for a in fusion.abfs] == [True, False, False, False, False]  # only the deepest unfused
    x = torch.randn(2, 3, 96, 160)  # non-square, not the probe's size
    with torch.no_grad():
        s = list(student.eval().backbone(x).values())
        t = list(teacher.backbone(x).values())
        fused = fusion(s, [f.shape[-2:] for f in t])
    assert [tuple(f.shape) for f in fused] == [tuple(f.shape) for f in t]
    assert [tuple(f.shape[-2:]) for f in t] == [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    assert all(f.shape[1] == 256 for f in t)


# --------------------------------------------------------------------------- one distilled step
def _step_and_check(distiller, images, targets, head_modules):
    distiller.train()
    losses = distiller(images, targets, epoch=0.0)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    s = distiller.student
    for name, module in [("backbone body", s.backbone.body), ("fpn", s.backbone.fpn), *head_modules(s)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"no gradient in the student's {name}"
        assert any(g.abs().sum() > 0 for g in grads), name
    if len(list(distiller.method.parameters())):
        assert all(p.grad is not None for p in distiller.method.parameters())
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert not distiller.teacher.training
    return losses


RCNN_HEADS = lambda s: [("rpn", s.rpn), ("box head", s.roi_heads.box_head), ("box predictor", s.roi_heads.box_predictor)]  # noqa: E731


@pytest.mark.parametrize("arch, heads, expected", [
    ("fasterrcnn", RCNN_HEADS, {"objectness", "rpn_box_reg", "classifier", "box_reg"}),
    ("maskrcnn", lambda s: RCNN_HEADS(s) + [("mask head", s.roi_heads.mask_head), ("mask predictor", s.roi_heads.mask_predictor)],
     {"objectness", "rpn_box_reg", "classifier", "box_reg", "mask"}),
    ("retinanet", lambda s: [("head", s.head)], {"classification", "bbox_regression"}),
])
def test_one_reviewkd_step_of_each_detector(shapes, arch, heads, expected):
    torch.manual_seed(0)
    (images, targets), num_classes = _batch(shapes, masks=arch == "maskrcnn")
    student = create_detector(f"{arch}_resnet18_fpn", num_classes, min_size=112, max_size=160)
    teacher = create_detector(f"{arch}_resnet50_fpn", num_classes, frozen_bn=True, min_size=112, max_size=160)
    d = DetectionDistiller(student, teacher, "reviewkd", weight=1.0, warmup_epochs=0)
    losses = _step_and_check(d, images, targets, heads)
    assert set(losses) == expected | {"reviewkd"}
    assert all(p.grad is not None for p in d.method.fusion.parameters())


@pytest.mark.parametrize("method, options", [("feature_mse", {"weight": 1.0}), ("kd", {"weight": 1.0, "temperature": 2.0})])
def test_other_registry_methods_on_faster_rcnn(shapes, method, options):
    torch.manual_seed(0)
    (images, targets), num_classes = _batch(shapes, masks=False)
    student = create_detector("fasterrcnn_mobilenet_v2_fpn", num_classes, min_size=112, max_size=160)
    teacher = create_detector("fasterrcnn_resnet18_fpn", num_classes, frozen_bn=True, min_size=112, max_size=160)
    d = DetectionDistiller(student, teacher, method, **options)
    losses = _step_and_check(d, images, targets, RCNN_HEADS)
    assert method in losses and losses[method].item() > 0


def test_logit_kd_is_refused_for_retinanet():
    s = create_detector("retinanet_resnet18_fpn", 5)
    t = create_detector("retinanet_resnet18_fpn", 5)
    with pytest.raises(ValueError, match="RetinaNet"):
        DetectionDistiller(s, t, "kd")


# ------------------------------------------------------------------------------ data and metrics
def _box_of(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flip_and_resize_move_boxes_and_masks_together(shapes):
    ds = _dataset(shapes, masks=True)
    image, target = ds.load(0)
    assert len(target["boxes"]) >= 1 and target["masks"].shape[-2:] == image.shape[-2:]
    w = image.shape[-1]
    flipped, ft = hflip(image, target)
    assert torch.equal(flipped, image.flip(-1))
    for box, fbox, mask, fmask in zip(target["boxes"], ft["boxes"], target["masks"], ft["masks"]):
        assert torch.allclose(fbox, torch.stack([w - box[2], box[1], w - box[0], box[3]]))
        # the flipped mask's box is the flipped box of the mask, exactly, and the flipped annotation box
        # within the rasterisation of the polygon
        mb = _box_of(mask)
        assert torch.equal(_box_of(fmask), torch.stack([w - mb[2], mb[1], w - mb[0], mb[3]]))
        assert (_box_of(fmask) - fbox).abs().max() <= 1.5
    big, bt = resize(image, target, short=160, max_size=1000)
    scale = 160 / min(image.shape[-2:])
    assert min(big.shape[-2:]) == 160
    for box, mask in zip(bt["boxes"], bt["masks"]):
        assert (_box_of(mask) - box).abs().max() <= 1.5 * scale + 1
    # training items: reproducible draws, both flip outcomes occur
    aug = _dataset(shapes, masks=True, augment=TrainAugment((96, 128), 200, 0.5))
    a1, t1 = aug[(0, (3, 7))]
    a2, t2 = aug[(0, (3, 7))]
    assert torch.equal(a1, a2) and torch.equal(t1["boxes"], t2["boxes"])


def test_coco_eval_gives_one_for_the_ground_truth_and_zero_for_nothing(shapes):
    ds = _dataset(shapes, split="val", masks=True)
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds.load(i)
        outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["boxes"])),
                        "masks": t["masks"][:, None].float()})
        ids.append(t["image_id"])
    results = to_coco_results(outputs, ids, ds.label_to_cat, masks=True)
    assert len(results) == len(ds.coco.getAnnIds())
    box = coco_metrics(ds.coco, results, "bbox")
    segm = coco_metrics(ds.coco, results, "segm")
    assert box["AP"] == pytest.approx(1.0) and box["AP50"] == pytest.approx(1.0) and box["AP75"] == pytest.approx(1.0)
    assert segm["AP"] == pytest.approx(1.0)
    assert coco_metrics(ds.coco, [], "bbox") == {k: 0.0 for k in box}


def test_shapes_dataset_is_coco_and_reproducible(tmp_path):
    a = make_shapes(tmp_path / "a", num_train=3, num_val=2, seed=5)
    b = make_shapes(tmp_path / "b", num_train=3, num_val=2, seed=5)
    ja, jb = (json.loads(p["train_annotations"].read_text()) for p in (a, b))
    assert ja["annotations"] == jb["annotations"] and [c["name"] for c in ja["categories"]] == list(CLASSES)
    sizes = {(i["height"], i["width"]) for i in ja["images"]}
    assert all(128 <= h <= 192 and 128 <= w <= 192 for h, w in sizes)
    ds = CocoDetection(a["train_images"], a["train_annotations"], train=True, masks=True)
    _, t = ds.load(0)
    assert t["masks"].dtype == torch.uint8 and t["masks"].sum() > 0


# --------------------------------------------------------------------------- configs and runs
def _tiny_config(tmp_path, shapes, **extra) -> Path:
    cfg = {
        "base": str(REPO / "configs" / "coco" / "_shapes_base.yaml"),
        "name": "tiny", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(shapes), "batch_size": 2, "eval_batch_size": 6, "workers": 0},
        "model": {"name": "fasterrcnn_resnet18_fpn"},
        "method": {"name": "vanilla"},
        "detection": {"min_size_train": [96, 112], "max_size_train": 160, "min_size_test": 112, "max_size_test": 160,
                      "max_iter": 6, "steps": [4], "warmup_iters": 2, "checkpoint_period": 3, "eval_period": 0,
                      "log_period": 2},
        "runtime": {"precision": "fp32", "deterministic": True},
    }
    for key, value in extra.items():
        section, _, field = key.partition(".")
        cfg.setdefault(section, {})[field] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RECIPES = {  # file: (teacher, student, review weight, base LR), as the released configs
    "reviewkd_fasterrcnn_r101_r18": ("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn", 1.2, 0.01),
    "reviewkd_fasterrcnn_r101_r50": ("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet50_fpn", 1.0, 0.01),
    "reviewkd_fasterrcnn_r50_mv2": ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v2_fpn", 2.0, 0.01),
    "reviewkd_maskrcnn_r101_r18": ("maskrcnn_resnet101_fpn", "maskrcnn_resnet18_fpn", 1.5, 0.01),
    "reviewkd_maskrcnn_r101_r50": ("maskrcnn_resnet101_fpn", "maskrcnn_resnet50_fpn", 0.8, 0.01),
    "reviewkd_maskrcnn_r50_mv2": ("maskrcnn_resnet50_fpn", "maskrcnn_mobilenet_v2_fpn", 1.0, 0.01),
    "reviewkd_retinanet_r101_r50": ("retinanet_resnet101_fpn", "retinanet_resnet50_fpn", 1.0, 0.005),
}


def test_coco_recipes_follow_the_released_configs():
    for file, (teacher, student, weight, lr) in RECIPES.items():
        cfg = load_config(REPO / "configs" / "coco" / f"{file}.yaml")
        assert (cfg.teacher.name, cfg.model.name, cfg.solver.lr) == (teacher, student, lr), file
        assert cfg.method.name == "reviewkd" and cfg.method.options == {"weight": weight, "warmup_epochs": 0}
        assert cfg.data.batch_size == 8 and cfg.detection.max_iter == 180000
        assert cfg.detection.steps == [120000, 160000] and cfg.solver.gamma == 0.1
        assert load_config(cfg.teacher.config).model.name == teacher
        assert cfg.detection.backbone_weights is not None


def test_detection_configs_validate_and_refuse_epoch_settings(tmp_path, shapes):
    paths = [p for p in sorted((REPO / "configs" / "coco").rglob("*.yaml")) if not p.name.startswith("_")]
    assert len(paths) >= 3 + len(RECIPES) + 10
    for path in paths:
        cfg = load_config(path)
        assert cfg.task == "detection" and cfg.detection is not None
    from reviewkd.tasks import get_task

    with pytest.raises(ConfigError, match="detection.max_iter"):
        get_task("detection").check_config(load_config(_tiny_config(tmp_path, shapes), ["solver.epochs=3"]))
    with pytest.raises(ConfigError, match="task: detection"):
        load_config(None, ["data.name=coco"])
    assert load_config(REPO / "configs" / "fashion_mnist" / "teacher_resnet20.yaml").task == "classification"


class Killed(BaseException):
    """A hard stop that nothing of ours catches."""


def test_a_non_finite_detection_loss_stops_the_run_without_a_checkpoint(tmp_path, shapes, capsys, monkeypatch):
    losses = DetectionDistiller.losses

    def nan_losses(self, *args, **kwargs):
        outputs, terms = losses(self, *args, **kwargs)
        return outputs, {k: v * float("nan") for k, v in terms.items()}

    monkeypatch.setattr(DetectionDistiller, "losses", nan_losses)
    capsys.readouterr()
    assert cli(["train", str(_tiny_config(tmp_path, shapes)), "name=nan", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss became nan at iteration 1" in err and "No checkpoint" in err
    assert not (tmp_path / "runs" / "nan" / "last.pt").exists()


@pytest.mark.slow
def test_resume_of_an_iteration_run_matches_an_uninterrupted_one_and_export(tmp_path, shapes, capsys):
    whole = _tiny_config(tmp_path, shapes)
    assert cli(["train", str(whole), "name=whole", "--no-progress"]) == 0
    assert cli(["train", str(whole), "name=parts", "--no-progress", "--stop-after", "3"]) == 0
    parts_dir = tmp_path / "runs" / "parts"
    first = torch.load(parts_dir / "last.pt", weights_only=True)
    assert first["iteration"] == 3 and first["task"] == "detection"
    assert cli(["train", str(whole), "name=parts", "--no-progress", "--resume"]) == 0
    a = torch.load(tmp_path / "runs" / "whole" / "last.pt", weights_only=True)
    b = torch.load(parts_dir / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for key, value in a["student"].items():
        assert torch.equal(value, b["student"][key]), key
    rows = (parts_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,") and "box_AP" in rows[0] and len(rows) == 1 + 4
    assert (parts_dir / "curves.png").is_file() and (parts_dir / "best.pt").is_file()
    assert all(math.isfinite(b["metrics"][k]) for k in ("box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm"))

    # a run killed in the middle (iteration 5, after the checkpoint at 3) resumes to the same weights
    losses, calls = DetectionDistiller.losses, {"n": 0}

    def killing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return losses(self, *args, **kwargs)

    DetectionDistiller.losses = killing
    try:
        with pytest.raises(Killed):
            cli(["train", str(whole), "name=killed", "--no-progress"])
    finally:
        DetectionDistiller.losses = losses
    assert torch.load(tmp_path / "runs" / "killed" / "last.pt", weights_only=True)["iteration"] == 3
    assert cli(["train", str(whole), "name=killed", "--no-progress", "--resume"]) == 0
    c = torch.load(tmp_path / "runs" / "killed" / "last.pt", weights_only=True)
    for key, value in a["student"].items():
        assert torch.equal(value, c["student"][key]), key
    assert str(a["metrics"]) == str(c["metrics"])  # as text: AP of an absent size is nan, which != itself
    # the finished run is not overwritten by starting it again
    before = (tmp_path / "runs" / "whole" / "last.pt").read_bytes()
    capsys.readouterr()
    assert cli(["train", str(whole), "name=whole", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "runs" / "whole" / "last.pt").read_bytes() == before

    capsys.readouterr()
    assert cli(["eval", str(parts_dir / "last.pt")]) == 0
    assert "box_AP50" in capsys.readouterr().out
    assert cli(["export", str(parts_dir / "last.pt"), "--out", str(tmp_path / "export")]) == 0
    out = capsys.readouterr().out
    assert "torchscript" in out and "safetensors" in out
    scripted = torch.jit.load(str(tmp_path / "export" / "fasterrcnn_resnet18_fpn.torchscript.pt"))
    saved = torch.load(tmp_path / "export" / "fasterrcnn_resnet18_fpn.pt", weights_only=True)
    assert saved["num_classes"] == 5 and "roi_heads.box_predictor.cls_score.weight" in saved["model"]
    assert not any(k.startswith(("teacher", "method", "abfs")) for k in saved["model"])
    assert scripted is not None


@pytest.mark.slow
def test_cli_smoke_demo_reports_vanilla_and_reviewkd_side_by_side(tmp_path, capsys):
    # --quick: 8 images of about 100 px and 6 iterations per run, about 20 s on an idle 2-core CPU
    assert cli(["demo-detection", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "vanilla student" in out and "ReviewKD student" in out and "box AP points" in out
    report = tmp_path / "demo" / "report"
    assert (report / "ap.png").is_file() and (report / "curves.png").is_file()
    assert "| ReviewKD student |" in (report / "results.md").read_text()


def test_make_shapes_command(tmp_path):
    assert cli(["make-shapes", str(tmp_path / "s"), "--train", "2", "--val", "1"]) == 0
    assert (tmp_path / "s" / "annotations" / "instances_val.json").is_file()


@pytest.mark.slow
def test_cpu_demo_end_to_end(tmp_path):
    """The full CPU demo: teacher, vanilla and ReviewKD students (a few hundred iterations each)."""
    proc = subprocess.run([sys.executable, "-m", "reviewkd", "demo-detection", "--out", str(tmp_path / "demo")],
                          cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ReviewKD vs vanilla student" in proc.stdout
    text = (tmp_path / "demo" / "report" / "results.md").read_text()
    assert "| teacher |" in text and "| vanilla student |" in text and "| ReviewKD student |" in text


@pytest.mark.slow
def test_torchrun_detection_run_writes_once_and_resumes(tmp_path, shapes):
    """Two CPU processes (gloo): DDP over the student detector + ABFs, one checkpoint and metrics file."""
    teacher_cfg = _tiny_config(tmp_path, shapes)
    assert cli(["train", str(teacher_cfg), "name=teacher", "--no-progress", "detection.max_iter=2", "detection.steps=[1]"]) == 0
    cfg = _tiny_config(tmp_path, shapes)
    overrides = ["name=ddp", "method.name=reviewkd", "method.options={weight: 1.0, warmup_epochs: 0}",
                 "teacher={name: fasterrcnn_resnet18_fpn, checkpoint: " + str(tmp_path / "runs" / "teacher" / "last.pt") + "}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "reviewkd", "train", str(cfg), *overrides, "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, "--stop-after", "3"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 6 and "abfs.0.conv1.0.weight" in "".join(ckpt["method"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[-1].startswith("6,")
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]


def test_detection_distiller_needs_the_epoch_for_a_warm_up_and_removes_every_hook(shapes):
    torch.manual_seed(0)
    (images, targets), num_classes = _batch(shapes, masks=False)
    student = create_detector("fasterrcnn_mobilenet_v2_fpn", num_classes, min_size=112, max_size=160)
    teacher = create_detector("fasterrcnn_resnet18_fpn", num_classes, frozen_bn=True, min_size=112, max_size=160)
    def hooks():  # the detector's own hooks (fp32 heads under autocast) stay; the distiller's go
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in student.modules())

    d = DetectionDistiller(student, teacher, "reviewkd", warmup_epochs=2).train()
    with pytest.raises(TypeError, match="pass the epoch"):
        d(images, targets)
    own = hooks()
    with DetectionDistiller(student, teacher, "kd") as d:  # reads the box head's logits through a hook
        assert hooks() > own
    assert hooks() == own  # the ROI-head tap is gone too
