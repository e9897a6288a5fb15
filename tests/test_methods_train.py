"""Every registered method trains end to end through the trainer from its shipped recipe."""
from pathlib import Path

import pytest
import torch

from reviewkd.config import load_config
from reviewkd.engine.loop import Run
from reviewkd.methods import list_methods, method_class, method_options

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist" / "resnet20_resnet8"


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(RECIPES.parent / "teacher_resnet20.yaml",
                      [f"output_dir={out}", "data.subset=256", "data.batch_size=64", "solver.epochs=1"])
    Run(cfg, progress=False).fit()
    return cfg.run_dir / "best.pt"


# every method of image classification (the video task's methods train in tests/test_ccl.py)
@pytest.mark.parametrize("method", [m for m in list_methods() if "classification" in method_class(m).reads.tasks])
def test_recipe_trains(method, teacher_checkpoint, tmp_path):
    recipe = RECIPES / f"{method}.yaml"
    assert recipe.is_file(), f"no Fashion-MNIST recipe for {method}"
    overrides = [f"output_dir={tmp_path}", "data.subset=256", "data.batch_size=64", "solver.epochs=1"]
    if method_class(method).reads.teacher:  # teacher-free recipes have no teacher section
        overrides.append(f"teacher.checkpoint={teacher_checkpoint}")
    if "pretrain_epochs" in method_options(method):
        overrides.append("method.options.pretrain_epochs=1")
    cfg = load_config(recipe, overrides)
    result = Run(cfg, progress=False).fit()
    row = result.history[-1]
    assert 0.0 <= result.metrics["test_top1"] <= 100.0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("loss_"))
    ckpt = torch.load(cfg.run_dir / "last.pt", weights_only=True)
    assert ckpt["method_name"] == method and ckpt["epoch"] == 1
