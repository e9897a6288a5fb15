"""The regression task end to end: a tiny run on synthetic data trains, evaluates, resumes to the
uninterrupted result and exports; a feature method distils a regressor; logit methods are refused."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from reviewkd.cli import main
from reviewkd.data.regression import TargetScaler, make_synthetic_regression
from reviewkd.engine.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def ages(tmp_path_factory) -> Path:
    return make_synthetic_regression(tmp_path_factory.mktemp("ages") / "data", n=1024, image_size=32, seed=0)


def config(tmp_path: Path, ages: Path) -> Path:
    path = tmp_path / "age.yaml"
    path.write_text(f"""
task: regression
output_dir: {tmp_path}
data: {{name: regression, root: {ages}, image_size: 32, batch_size: 64, eval_batch_size: 128}}
regression: {{loss: mse, normalise: standard, test_fraction: 0.2}}
model: {{name: resnet8}}
solver: {{lr: 0.01, epochs: 3, schedule: cosine}}
runtime: {{device: cpu, precision: fp32, deterministic: true}}
""")
    return path


def cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.slow
def test_a_regression_run_trains_evaluates_resumes_and_exports(tmp_path, ages, capsys):
    cfg = config(tmp_path, ages)
    cli(capsys, "train", cfg, "name=whole", "--no-progress")
    cli(capsys, "train", cfg, "name=parts", "--no-progress", "--stop-after", "1")
    cli(capsys, "train", cfg, "name=parts", "--no-progress", "--resume")
    whole, parts = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")
    for key in whole["student"]:
        assert torch.equal(whole["student"][key], parts["student"][key]), key
    assert whole["metrics"] == parts["metrics"]

    # MAE in years: it learnt something (a constant prediction of the mean errs by about 22 years
    # on targets uniform in 1..90; this run reaches about 5), and the lowest MAE picks best.pt.
    rows = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    maes = [float(r["test_mae"]) for r in rows]
    assert len(rows) == 3 and whole["score_key"] == "test_mae" and whole["best_score"] == min(maes)
    assert min(maes) < 12.0
    assert load_checkpoint(tmp_path / "whole" / "best.pt")["metrics"]["test_mae"] == min(maes)
    scaler = TargetScaler.from_dict(whole["target_scaler"])
    assert scaler.kind == "standard" and 30 < scaler.a < 60  # the training targets' mean, in years

    out = cli(capsys, "eval", tmp_path / "whole" / "last.pt")
    header, row = [line.split() for line in out.strip().splitlines()[::2]]
    values = dict(zip(header, row))
    assert float(values["test_mae"]) == pytest.approx(whole["metrics"]["test_mae"], abs=1e-2)

    out = cli(capsys, "export", tmp_path / "whole" / "best.pt", "--out", tmp_path / "export")
    assert "onnx" in out and "every export reproduces" in out
    saved = torch.load(tmp_path / "export" / "resnet8.pt", weights_only=True)
    assert saved["target_scaler"] == whole["target_scaler"] and saved["num_classes"] == 1


@pytest.mark.slow
def test_a_regressor_is_distilled_with_a_feature_method_and_logit_methods_are_refused(tmp_path, ages, capsys):
    cfg = config(tmp_path, ages)
    cli(capsys, "train", cfg, "name=teacher", "model.name=resnet14", "solver.epochs=1", "--no-progress")
    teacher = ["teacher.name=resnet14", f"teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}", "solver.epochs=1"]
    cli(capsys, "train", cfg, "name=review", "method.name=reviewkd", "method.options.warmup_epochs=0", *teacher,
        "--no-progress")
    ckpt = load_checkpoint(tmp_path / "review" / "last.pt")
    assert "loss_reviewkd" in ckpt["history"][-1] and "loss_mse" in ckpt["history"][-1]
    assert ckpt["teacher_metrics"]["test_mae"] > 0

    capsys.readouterr()
    rc = main(["train", str(cfg), "name=kd", "method.name=kd", *teacher])
    err = capsys.readouterr().err
    assert rc == 2 and "not available for regression" in err and len(err.strip().splitlines()) == 1
