"""cGAN-KD data and pipeline: the store, the mixed set, the scarce-label and rotated-angle data, the
student's data hook, and the pipeline end to end on tiny settings."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reviewkd.cgankd import mixed
from reviewkd.cgankd.store import load_generated, save_generated
from reviewkd.config import ConfigError, load_config
from reviewkd.data import build_datasets, labelled_indices
from reviewkd.data.fashion_mnist import load_fashion_mnist
from reviewkd.data.regression import build_regression_data, make_rotated_fashion_mnist

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")


# ------------------------------------------------------------------------------ store
def test_store_round_trip_keeps_images_labels_and_provenance(tmp_path):
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    provenance = {"stage": "sample", "seed": 3, "acceptance_rate": 0.25, "per_label": [1, 2]}
    path = save_generated(tmp_path / "a" / "pool.npz", images, labels, provenance)
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    back = load_generated(path)
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels) and back.labels.dtype == torch.int64
    assert back.provenance == provenance
    targets = torch.tensor([0.5, 1.25, 2.0], dtype=torch.float64)
    back = load_generated(save_generated(tmp_path / "r.npz", images[:3], targets, {}))
    assert back.labels.dtype == torch.float64 and torch.equal(back.labels, targets)
    assert back.teacher_labels is None
    back = load_generated(save_generated(tmp_path / "t.npz", images[:3], labels[:3], {}, teacher_labels=[2, 0, 1]))
    assert back.teacher_labels.tolist() == [2, 0, 1] and back.teacher_labels.dtype == torch.int64
    with pytest.raises(ValueError, match="teacher_labels"):
        save_generated(tmp_path / "bad.npz", images[:3], labels[:3], {}, teacher_labels=[1, 2])


def test_store_refuses_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.generated"):
        load_generated(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a cGAN-KD store"):
        load_generated(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="uint8"):
        save_generated(tmp_path / "f.npz", torch.zeros(2, 1, 4, 4), torch.zeros(2), {})


# ------------------------------------------------------------------------------ mixed set
def test_balanced_subsampling_gives_exactly_mg_over_c_per_class_remainder_on_the_last():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    for total in (0, 10, 37, 123, 499 // 1 - 9):
        keep = mixed.balanced_subsample(labels, total, 10, seed=1)
        counts = torch.bincount(labels[keep], minlength=10).tolist()
        expected = [total // 10] * 9 + [total // 10 + total % 10]
        assert counts == expected, total
        assert len(set(keep.tolist())) == len(keep)  # without replacement
    # seeded: the same draw for the same seed, another for another seed
    assert torch.equal(mixed.balanced_subsample(labels, 37, 10, 1), mixed.balanced_subsample(labels, 37, 10, 1))
    assert not torch.equal(mixed.balanced_subsample(labels, 37, 10, 1), mixed.balanced_subsample(labels, 37, 10, 2))
    # as released: a class short of its share gives all it holds; a pool of at most M^g is used whole
    short = torch.cat([labels[labels != 3], torch.full((4,), 3)])
    counts = torch.bincount(short[mixed.balanced_subsample(short, 100, 10, seed=0)], minlength=10).tolist()
    assert counts == [10, 10, 10, 4, 10, 10, 10, 10, 10, 10]
    assert mixed.balanced_subsample(labels, 500, 10).tolist() == list(range(500))
    assert mixed.balanced_subsample(labels, 10 * 51, 10).tolist() == list(range(500))
    keep = mixed.uniform_subsample(100, 30, seed=0)
    assert len(keep) == 30 == len(set(keep.tolist())) and keep.max() < 100
    assert mixed.uniform_subsample(20, 30).tolist() == list(range(20))


def test_a_regression_recipe_asking_for_more_fakes_than_the_filter_keeps_is_refused_up_front(tmp_path):
    from reviewkd.cgankd.pipeline import Pipeline

    cfg = load_config("cgankd/rotated_fashion_mnist", [f"output_dir={tmp_path}", "cgankd.num_fake=5000"])
    with pytest.raises(ConfigError, match=r"num_fake = 5000 but the filter keeps about 3780.*pool_per_class"):
        Pipeline(cfg, progress=False)
    assert not (tmp_path / cfg.name).exists()  # before any stage


def test_normalisation_is_recomputed_on_real_and_fake_together():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 120, (40, 3, 5, 5), dtype=torch.uint8, generator=g)
    fake = torch.randint(100, 256, (25, 3, 5, 5), dtype=torch.uint8, generator=g)
    mean, std = mixed.pixel_stats(real, fake, chunk=7)
    # by hand: every pixel of both sets, per channel, population std
    values = [[] for _ in range(3)]
    for images in (real, fake):
        for image in images.tolist():
            for c in range(3):
                values[c].extend(v / 255 for row in image[c] for v in row)
    for c in range(3):
        m = sum(values[c]) / len(values[c])
        s = math.sqrt(sum((v - m) ** 2 for v in values[c]) / len(values[c]))
        assert mean[c] == pytest.approx(m, abs=1e-12) and std[c] == pytest.approx(s, abs=1e-12)
    assert mixed.pixel_stats(real)[0] != mean  # the fakes move it


# ------------------------------------------------------------------------------ scarce labels
def test_scarce_label_selection_is_class_balanced_and_fixed_by_its_own_seed():
    labels = torch.arange(5).repeat_interleave(200)
    keep = labelled_indices(labels, 0.1, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [20] * 5
    assert torch.equal(keep, labelled_indices(labels, 0.1, seed=0)) and torch.equal(keep, keep.sort().values)
    assert not torch.equal(keep, labelled_indices(labels, 0.1, seed=1))
    # unbalanced classes keep their proportions
    labels = torch.cat([torch.zeros(300), torch.ones(100)]).long()
    assert torch.bincount(labels[labelled_indices(labels, 0.25)]).tolist() == [75, 25]


@needs_fashion
def test_scarce_label_fashion_mnist_does_not_follow_the_run_seed(tmp_path):
    a = build_datasets("fashion_mnist", labelled_fraction=0.01, seed=0)
    b = build_datasets("fashion_mnist", labelled_fraction=0.01, seed=5)
    assert a.num_samples == 600 and torch.bincount(a.train_targets).tolist() == [60] * 10
    assert torch.equal(a.train.images, b.train.images) and len(a.test.images) == 10000  # test set untouched
    cfg = load_config(None, ["data.labelled_fraction=0.1"])
    assert cfg.data.labelled_fraction == 0.1
    with pytest.raises(ConfigError, match="labelled_fraction"):
        load_config(None, ["data.labelled_fraction=1.5"])


# ------------------------------------------------------------------------------ rotated set
@needs_fashion
def test_rotated_set_targets_are_the_applied_rotation(tmp_path):
    root = make_rotated_fashion_mnist(tmp_path / "rot", n_train=40, n_test=12, seed=3)
    train, test = sorted((root / "train").iterdir()), sorted((root / "test").iterdir())
    assert len(train) == 40 and len(test) == 12
    angles = [float(p.name.split("_")[0]) for p in train + test]
    assert all(0 <= a < 90 for a in angles) and len(set(angles)) > 30
    items, labels = load_fashion_mnist(None, "train")
    for path in train[:12]:
        angle, cls, _ = path.stem.split("_")
        rotated = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float64))
        # find the item and its angle by brute force: rotate the original back to upright and compare
        back = torch.from_numpy(np.asarray(Image.open(path).rotate(-float(angle), resample=Image.Resampling.BILINEAR),
                                           dtype=np.float64))[2:30, 2:30]
        candidates = items[labels == int(cls), 0].double()
        errors = (candidates - back).abs().mean(dim=(1, 2))
        best = candidates[errors.argmin()]
        assert errors.min() < 0.4 * errors.median()  # the item is found again once rotated back by the target angle
        # ... and the target is the angle that explains the image best (to a degree)
        canvas = np.zeros((32, 32), dtype=np.uint8)
        canvas[2:30, 2:30] = best.numpy().astype(np.uint8)
        trial = [float((torch.from_numpy(np.asarray(Image.fromarray(canvas).rotate(a, resample=Image.Resampling.BILINEAR),
                                                    dtype=np.float64)) - rotated).abs().mean())
                 for a in np.arange(0, 90, 0.5)]
        assert abs(0.5 * int(np.argmin(trial)) - float(angle)) <= 1.0
    data = build_regression_data(root, image_size=32, channels=3, augment=False)
    assert data.num_samples == 40 and data.input_size == (3, 32, 32)
    assert sorted(data.train_targets.tolist()) == pytest.approx(sorted(angles[:40]), abs=1e-4)
    again = make_rotated_fashion_mnist(tmp_path / "rot2", n_train=40, n_test=12, seed=3)
    assert sorted(p.name for p in (again / "train").iterdir()) == [p.name for p in train]  # fixed by the seed


# ------------------------------------------------------------------------------ the student's data hook
@needs_fashion
def test_generated_images_are_appended_with_the_recomputed_normalisation(tmp_path):
    fakes = torch.full((30, 1, 28, 28), 200, dtype=torch.uint8)
    store = save_generated(tmp_path / "g.npz", fakes, torch.arange(30) % 10, {})
    cfg = load_config(None, ["data.subset=100", f"data.generated={store}", "data.mean=[0.5]", "data.std=[0.25]",
                             "runtime.device=cpu"])
    from reviewkd.data.preprocessing import eval_preprocessing
    from reviewkd.tasks import get_task

    data = get_task("classification").build_data(cfg, torch.device("cpu"))
    assert data.num_train == 130 and torch.equal(data.train.images[100:], fakes)
    assert data.context.train_targets[100:].tolist() == (torch.arange(30) % 10).tolist()
    batch = next(iter(data.test))
    # the test set is normalised with the same statistics: a padded (black) pixel is (0 - 0.5) / 0.25
    assert batch.image[0, 0, 0, 0].item() == pytest.approx(-2.0)
    spec = eval_preprocessing(cfg)
    assert spec["mean"] == [0.5] and spec["std"] == [0.25]
    with pytest.raises(ConfigError, match="together"):
        load_config(None, ["data.mean=[0.5]"])


# ------------------------------------------------------------------------------ the regression student
@needs_fashion
def test_a_regression_student_on_real_and_generated_data_predicts_degrees(tmp_path, capsys):
    from reviewkd.cli import main
    from reviewkd.engine.loop import Run

    root = make_rotated_fashion_mnist(tmp_path / "rot", n_train=64, n_test=16, seed=1)
    real_angles = [float(p.name.split("_")[0]) for p in (root / "train").iterdir()]
    fakes = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    store = save_generated(tmp_path / "g.npz", fakes, torch.full((32,), 500.0, dtype=torch.float64), {})
    cfg = load_config(None, ["task=regression", "data.name=regression", f"data.root={root}", "data.image_size=32",
                             "data.batch_size=16", "data.augment=false", "regression.normalise=minmax",
                             f"data.generated={store}", "model.name=resnet8", "solver.epochs=1", "name=reg",
                             f"output_dir={tmp_path}", "runtime.precision=fp32", "runtime.device=cpu"])
    Run(cfg, progress=False).fit()
    ckpt = torch.load(tmp_path / "reg" / "best.pt", weights_only=False)
    # 96 samples trained on; the target scale comes from the real angles alone (the fakes' 500 is not in it)
    assert ckpt["target_scaler"]["a"] == pytest.approx(min(real_angles))
    assert ckpt["target_scaler"]["b"] == pytest.approx(max(real_angles) - min(real_angles))
    image = sorted((root / "test").iterdir())[0]
    assert main(["export", str(tmp_path / "reg" / "best.pt"), "--formats", "pt"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "reg" / "export"), str(image), "--json"]) == 0
    value = json.loads(capsys.readouterr().out)[0]["value"]
    # by hand: the network's output on the image prepared as in training, mapped back to degrees
    from reviewkd.predict import load_student

    student = load_student(tmp_path / "reg" / "export")
    x = (torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    raw = student.model(x).item()
    assert value == pytest.approx(raw * ckpt["target_scaler"]["b"] + ckpt["target_scaler"]["a"], rel=1e-4, abs=1e-3)


# ------------------------------------------------------------------------------ the pipeline end to end
@needs_fashion
@pytest.mark.slow
def test_the_scarce_label_pipeline_runs_end_to_end_and_skips_finished_stages(tmp_path, capsys):
    from reviewkd.cgankd.pipeline import Pipeline

    cfg = load_config("cgankd/fashion_mnist_scarce", [f"output_dir={tmp_path}", "runtime.precision=fp32",
                                                       "runtime.device=cpu"])
    lines = []
    pipeline = Pipeline(cfg, quick=True, progress=False, say=lines.append)
    summary = pipeline.run()
    stages = summary["stages"]
    assert list(stages) == ["nokd", "teacher", "gan", "dre_extractor", "dre", "sample", "filter", "relabel", "mixed",
                            "student"]
    c = pipeline.c
    assert c.pool_per_class == 12 and c.num_fake == 60  # the quick settings
    assert 0 < stages["sample"]["acceptance_rate"] <= 1 and stages["filter"]["kept"] == 10 * c.pool_per_class
    run = tmp_path / "cgankd_fashion_mnist_scarce_quick"
    generated = load_generated(run / "mixed" / "generated.npz")
    kept = load_generated(run / "filter" / "kept.npz")
    relabelled = load_generated(run / "relabel" / "fakes.npz")
    assert torch.equal(relabelled.labels, kept.teacher_labels)  # the filter's own pass gave the new labels
    # balanced over the adjusted labels: 6 per class, or all a class has (the quick teacher is weak)
    available = torch.bincount(relabelled.labels, minlength=10)
    assert torch.bincount(generated.labels, minlength=10).tolist() == available.clamp(max=6).tolist()
    assert generated.provenance["short_classes"] == {str(c): int(n) for c, n in enumerate(available) if n < 6}
    assert generated.images.shape[1:] == (1, 28, 28)
    assert generated.provenance["stage"] == "mixed" and "acceptance_rate" in generated.provenance
    student = torch.load(run / "student" / "best.pt", weights_only=False)
    assert student["config"]["data"]["generated"] == str(run / "mixed" / "generated.npz")
    stats = json.loads((run / "mixed" / "normalisation.json").read_text())
    assert student["config"]["data"]["mean"] == stats["mean"]
    assert student["config"]["model"]["weights"] == str(run / "nokd" / "best.pt")  # final: fine-tuned from NOKD
    assert (run / "samples_per_class.png").is_file() and (run / "summary.md").is_file()
    per_label = [line for line in lines if line.startswith("[cgankd] sample: label ")]
    assert len(per_label) == 10 and per_label[-1].startswith("[cgankd] sample: label 10/10 (9): ")
    # a second run finds every output and trains nothing
    lines.clear()
    Pipeline(cfg, quick=True, progress=False, say=lines.append).run()
    assert sum("skipped" in line for line in lines) == 9  # every stage but the teacher (its plan loads it)


def test_pipeline_progress_lines_are_printed_and_kept_in_the_run_log(tmp_path, capsys):
    from reviewkd.cgankd.pipeline import Pipeline

    cfg = load_config("cgankd/fashion_mnist_scarce", [f"output_dir={tmp_path}"])
    pipeline = Pipeline(cfg)
    pipeline.say("[cgankd] sample: label 3/10 (2): 600 accepted")
    assert "label 3/10 (2): 600 accepted" in capsys.readouterr().out
    log = (tmp_path / "cgankd_fashion_mnist_scarce" / "pipeline.log").read_text()
    assert log.endswith(" [cgankd] sample: label 3/10 (2): 600 accepted\n")


@needs_fashion
@pytest.mark.slow
def test_a_pipeline_killed_in_a_training_stage_resumes_it_and_skips_the_finished_ones(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "reviewkd", "train", "cgankd/fashion_mnist_scarce", "--quick", "--no-progress",
               f"output_dir={tmp_path}", "runtime.precision=fp32", "runtime.device=cpu", "runtime.checkpoint_every=2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "cgankd_fashion_mnist_scarce_quick"
    deadline = time.time() + 300
    while not (run / "gan" / "last.pt").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # killed inside the GAN stage, after its first checkpoint
    process.wait()
    assert (run / "nokd" / "best.pt").is_file() and not (run / "sample" / "pool.npz").exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nokd: output exists" in done.stdout and "resuming" in (run / "gan" / "train.log").read_text()
    assert (run / "student" / "best.pt").is_file()


# ------------------------------------------------------------------------------ recipes and zoo
def test_every_shipped_recipe_validates_its_stages_and_names_zoo_models(tmp_path):
    from reviewkd.catalogue import recipe_names
    from reviewkd.cgankd.pipeline import Pipeline
    from reviewkd.models import list_models

    pipelines = 0
    for name in (n for n in recipe_names() if n.startswith("cgankd/")):
        cfg = load_config(name, [f"output_dir={tmp_path}"])
        assert cfg.model.name in list_models() and (cfg.teacher is None or cfg.teacher.name in list_models()), name
        if cfg.cgankd is None:  # a teacher recipe
            continue
        for quick in (False, True):  # every stage config (task names, options) is validated up front
            plan = Pipeline(cfg, quick=quick, say=lambda line: None).plan
            stages = {stage.name: stage.config for stage in plan}
            assert stages["dre_extractor"] is not None, name
            if cfg.task == "regression":  # the sparse autoencoder; no flips, they change an angle's sign
                assert stages["dre_extractor"].task == "dre_autoencoder", name
                if "rotated" in name:
                    assert not stages["dre"].dre.flip and not stages["dre_extractor"].dre.flip, name
        pipelines += 1
    assert pipelines >= 7


def test_densenet121_is_the_cifar_densenet_bc_of_the_cgankd_filter_teacher():
    from reviewkd.models import create_model

    model = create_model("densenet121", num_classes=100).eval()
    # closed form: 3x3 stem of 64, bottlenecks (BN, 1x1 to 128, BN, 3x3 to 32), halving transitions
    growth, width = 32, 64
    expected = 3 * 64 * 9
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            expected += 2 * width + width * 4 * growth + 2 * 4 * growth + 4 * growth * growth * 9
            width += growth
        if i < 3:
            expected += 2 * width + width * (width // 2)
            width //= 2
    expected += 2 * width + width * 100 + 100
    assert width == 1024
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 6.9e6 < expected < 7.1e6  # about 7.0M, as the CIFAR DenseNet-121 is known
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    from reviewkd.features import FeatureTaps

    taps = FeatureTaps(model, model.feature_spec, "post")
    try:
        with torch.no_grad():
            _, feats = taps(torch.randn(1, 3, 32, 32))
    finally:
        taps.remove()
    assert [tuple(f.shape) for f in feats] == [(1, 256, 32, 32), (1, 512, 16, 16), (1, 1024, 8, 8), (1, 1024, 4, 4),
                                               (1, 1024, 1, 1)]


# ------------------------------------------------------------------------------ the released label scaling
def test_max_scaler_divides_by_the_largest_training_target():
    from reviewkd.data.regression import TargetScaler

    scaler = TargetScaler.fit(torch.tensor([2.0, 5.0, 10.0]), "max")
    assert (scaler.a, scaler.b) == (0.0, 10.0)
    assert scaler.normalise(torch.tensor([5.0, 1.0])).tolist() == pytest.approx([0.5, 0.1])
    assert scaler.denormalise(torch.tensor([0.25])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="positive targets"):
        TargetScaler.fit(torch.tensor([-3.0, -1.0]), "max")


def test_normalise_max_puts_the_generator_labels_at_y_over_the_largest(tmp_path):
    from reviewkd.data.regression import make_synthetic_regression
    from reviewkd.tasks.cgan import real_training_data

    root = make_synthetic_regression(tmp_path / "ages", n=40, image_size=16, seed=3)
    ages = sorted(float(p.name.split("_")[0]) for p in root.iterdir())
    for normalise in ("max", "minmax"):
        cfg = load_config(None, ["task=cgan", "data.name=regression", f"data.root={root}", "data.image_size=16",
                                 f"regression.normalise={normalise}", "regression.test_fraction=0.25"])
        _, labels, label_range = real_training_data(cfg)
        low = label_range[0]
        # max: y / max (low 0, the smallest age above 0); minmax: the smallest training age at 0
        assert low == 0.0 and min(labels.tolist()) > 0 if normalise == "max" else min(labels.tolist()) == 0.0
        # the training part's targets, back from [0, 1] with the hand formula, are ages from the file names
        back = sorted((labels.double() * (label_range[1] - low) + low).tolist())
        assert all(min(abs(b - a) for a in ages) < 1e-4 for b in back)
        assert max(labels.tolist()) == pytest.approx(1.0)


@needs_fashion
def test_integer_labels_truncate_the_teachers_relabelled_targets(tmp_path):
    from reviewkd.cgankd.pipeline import Pipeline, StagePlan

    root = make_rotated_fashion_mnist(tmp_path / "rot", n_train=32, n_test=8, seed=2)
    top = max(float(p.name.split("_")[0]) for p in (root / "train").iterdir())
    cfg = load_config("cgankd/rotated_fashion_mnist", [f"data.root={root}", "regression.normalise=max",
                                                       "cgankd.integer_labels=true", f"output_dir={tmp_path}"])
    pipeline = Pipeline(cfg, progress=False)
    (pipeline.run_dir / "filter").mkdir(parents=True)
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    save_generated(pipeline.run_dir / "filter" / "kept.npz", images, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), {})
    predictions = torch.tensor([0.25, 0.5, 0.999])  # the teacher's, on the generator's [0, 1] (= y / top)
    pipeline._teacher = lambda: (lambda x: predictions[: len(x)])
    out = tmp_path / "relabel.npz"
    pipeline._stage_relabel(StagePlan("relabel", "process", out))
    expected = [math.trunc(p * top) for p in predictions.double().tolist()]  # by hand: degrees, truncated
    assert load_generated(out).labels.tolist() == expected


@needs_fashion
def test_distinct_regression_labels_are_the_training_targets_on_the_unit_scale(tmp_path):
    from reviewkd.cgankd.pipeline import Pipeline

    root = make_rotated_fashion_mnist(tmp_path / "rot", n_train=24, n_test=8, seed=5)
    cfg = load_config("cgankd/rotated_fashion_mnist", [f"data.root={root}", "regression.normalise=max",
                                                       "cgankd.regression_labels=distinct", f"output_dir={tmp_path}"])
    _, targets = Pipeline(cfg, progress=False)._real_training_set()
    top = float(targets.max())
    labels = Pipeline(cfg, progress=False)._conditioning_labels(None)
    # by hand: every distinct training angle once, ascending, divided by the largest (normalise: max)
    assert labels == pytest.approx(sorted(set(t / top for t in targets.tolist())), abs=1e-12)
    assert len(labels) == len(set(targets.tolist())) and labels[-1] == pytest.approx(1.0)
    for bad in ("1", "many"):
        with pytest.raises(ConfigError, match="regression_labels"):
            load_config("cgankd/rotated_fashion_mnist", [f"cgankd.regression_labels={bad}"])


def test_real_images_reach_the_gan_and_the_autoencoder_as_released(tmp_path):
    from reviewkd.data.regression import make_synthetic_regression
    from reviewkd.tasks import get_task

    root = make_synthetic_regression(tmp_path / "ages", n=40, image_size=16, seed=3)
    base = ["data.name=regression", f"data.root={root}", "data.image_size=16", "regression.test_fraction=0.25",
            "data.batch_size=8"]
    train = lambda task, *more: get_task(task).build_data(load_config(None, [f"task={task}", *base, *more]),  # noqa: E731
                                                          torch.device("cpu")).train
    plain = train("cgan")
    assert not plain.augment.train and not plain.label_uniform  # default: D sees the images as stored
    flipped = train("cgan", "cgan.real_augment=flip").augment
    assert flipped.train and flipped.flip and flipped.crop_padding == 0  # the released CcGAN
    cropped = train("cgan", "cgan.real_augment=crop_flip")
    assert cropped.augment.flip and cropped.augment.crop_padding == 4  # BigGAN's --augment on CIFAR
    # the zero padding is black: a white image cropped off-centre shows -1 at its border
    white = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    x = cropped.augment(white, generator=torch.Generator().manual_seed(0))
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    ae = train("dre_autoencoder")
    assert ae.label_uniform and ae.augment.flip and ae.augment.train  # train_sparseAE: flip + label-uniform draws
    assert not train("dre_autoencoder", "dre.flip=false").augment.flip
