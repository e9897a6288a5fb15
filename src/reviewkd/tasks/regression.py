"""Image regression: one float target per image (UTKFace ages, a CSV of values), MSE or L1 on
targets normalised with the training set's statistics, MAE / RMSE in the original unit (lower is
better: the MAE picks ``best.pt``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..batch import Batch
from ..collectives import sum_over_ranks
from ..config import ConfigError
from ..data.regression import TargetScaler, build_regression_data, make_synthetic
from ..engine.runtime import autocast
from ..methods import RunContext
from ..recipes.distill import Distiller
from .base import TaskData
from .classification import ClassificationTask, generated_data


def regression_loss(kind: str):
    fn = F.mse_loss if kind == "mse" else F.l1_loss

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {kind: fn(outputs.float().view(-1), targets.float())}

    return loss


@torch.inference_mode()
def evaluate_regressor(model, loader, scaler: TargetScaler, device, precision: str) -> dict[str, float]:
    """MAE and RMSE in the targets' original unit, and the loss on normalised targets, over every
    process's shard (one sync)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # |err|, err^2 (original), err^2 (normalised), n
    for batch in loader:
        with autocast(device, precision):
            out = model(batch.image)
        out = out.float().view(-1)
        err = scaler.denormalise(out.double()) - scaler.denormalise(batch.targets.double())
        stats += torch.stack([err.abs().sum(), err.square().sum(), (out.double() - batch.targets).square().sum(),
                              torch.tensor(float(len(out)), device=device, dtype=torch.float64)])
    model.train(was_training)
    mae, se, nse, n = sum_over_ranks(stats).tolist()
    n = max(n, 1.0)
    return {"test_mae": mae / n, "test_rmse": (se / n) ** 0.5, "test_loss": nse / n}


class RegressionTask(ClassificationTask):
    name = "regression"
    score_key, score_label, higher_is_better = "test_mae", "MAE", False
    curve_scores = {"test_mae": "test MAE", "test_rmse": "test RMSE"}
    score_axis = "error (original unit)"

    def check_config(self, cfg) -> None:
        if cfg.data.val_split:
            raise ConfigError("data.val_split is not available for regression yet: its test split is regression.test_fraction")
        if cfg.data.labelled_fraction is not None:
            raise ConfigError("data.labelled_fraction (scarce labels) is for classification; use data.subset for regression")

    def num_outputs(self, cfg) -> int:
        return 1

    def probe_size(self, cfg) -> tuple[int, ...]:
        return (cfg.regression.channels, cfg.data.image_size, cfg.data.image_size)

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        return Distiller(student, teacher, cfg.method.name, input_size=input_size, context=context,
                         task_loss=regression_loss(cfg.regression.loss), **self.recipe_options(cfg))

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        d, r = cfg.data, cfg.regression
        if r.synthetic is not None and d.root is not None and not Path(d.root).is_dir():
            make_synthetic(d.root, d.image_size, r.synthetic)
        b = build_regression_data(
            d.root, csv=r.csv, file_column=r.file_column, target_column=r.target_column, image_size=d.image_size,
            channels=r.channels, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, device=device,
            seed=cfg.seed, rank=rank, world_size=world_size, subset=d.subset, augment=d.augment, drop_last=True,
            channels_last=cfg.runtime.channels_last, test_fraction=r.test_fraction, normalise=r.normalise,
            generated=generated_data(d), normalisation=d.normalisation)
        context = RunContext(num_samples=b.num_samples, train_targets=b.train_targets)
        meta = {"num_classes": 1, "input_size": list(b.input_size), "target_scaler": b.scaler.to_dict()}
        return TaskData(b.train, b.test, len(b.train), tuple(b.input_size), 1, context, meta, num_train=b.num_samples)

    def train_stats(self, outputs, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def train_metrics(self, sums, count) -> dict[str, float]:
        return {}

    def describe_train(self, row: dict) -> str:
        return ""

    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        return evaluate_regressor(model, data.test, TargetScaler.from_dict(data.meta["target_scaler"]), device, precision)

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        return f"MAE {m['test_mae']:.3f} (RMSE {m['test_rmse']:.3f})"
