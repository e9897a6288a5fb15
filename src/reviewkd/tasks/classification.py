"""Image classification: integer labels, cross-entropy, top-1 / top-5 accuracy."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..collectives import sum_over_ranks
from ..data import build_datasets
from ..engine.runtime import autocast
from ..methods import RunContext, method_class
from ..models import create_model, load_weights
from ..models.stages import prepare_stages
from ..methods.online import OnlineMethod
from ..recipes.distill import Distiller
from ..recipes.online import build_online_recipe
from .base import RunSchedule, Task, TaskData

_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


@torch.inference_mode()
def accuracy_stats(model: nn.Module, loader, device, precision: str) -> torch.Tensor:
    """[correct top-1, correct top-5, summed cross-entropy, count] on this process's shard."""
    stats = torch.zeros(4, device=device, dtype=torch.float64)
    for batch in loader:
        with autocast(device, precision):
            logits = model(batch.image)
        logits, targets = logits.float(), batch.targets
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        stats += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), F.cross_entropy(logits, targets, reduction="sum"),
                              torch.tensor(len(targets), device=device)]).double()
    return stats


def evaluate_classifier(model: nn.Module, loader, device, precision: str, split: str = "test") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every process's shard; one sync."""
    was_training = model.training
    model.eval()
    c1, c5, loss, n = sum_over_ranks(accuracy_stats(model, loader, device, precision)).tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {f"{split}_top1": 100.0 * c1 / n, f"{split}_top5": 100.0 * c5 / n, f"{split}_loss": loss / n}


def generated_data(data_cfg):
    """(uint8 images, labels) of ``data.generated`` (a cGAN-KD store), None without one."""
    if data_cfg.generated is None:
        return None
    from ..cgankd.store import load_generated

    store = load_generated(data_cfg.generated)
    return store.images, store.labels


class ClassificationTask(Task):
    name = "classification"
    score_key, score_label, higher_is_better = "test_top1", "top-1", True
    curve_scores = {"test_top1": "test top-1"}

    def num_outputs(self, cfg) -> int:
        d = cfg.data
        if d.name in _NUM_CLASSES:
            return _NUM_CLASSES[d.name]
        train = Path(d.root or "") / "train"
        if d.root is None or not train.is_dir():
            raise FileNotFoundError(f"the imagefolder dataset needs data.root with train/<class>/ and val/<class>/ "
                                    f"folders (got {d.root})")
        return sum(1 for p in train.iterdir() if p.is_dir())

    def probe_size(self, cfg) -> tuple[int, ...]:
        return (3, cfg.data.image_size, cfg.data.image_size) if cfg.data.name == "imagefolder" else (3, 32, 32)

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        return self._with_stages(create_model(name, num_classes=num_outputs), "student", cfg)

    def build_teacher(self, name: str, cfg, num_outputs: int, weights) -> nn.Module:
        model = create_model(name, num_classes=num_outputs)
        model = model if weights is None else load_weights(model, weights)
        return self._with_stages(model, "teacher", cfg)

    def _with_stages(self, model: nn.Module, side: str, cfg) -> nn.Module:
        """The config's ``features`` spec applied, and the stages the method reads checked by one
        forward pass of this side alone, so that errors name the side (before the recipe's probe)."""
        reads = method_class(cfg.method.name).reads
        kind = reads.student_features if side == "student" else reads.teacher_features
        section = cfg.model if side == "student" else cfg.teacher
        return prepare_stages(model, side, getattr(section, "features", None), kind, self.probe_size(cfg))

    def recipe_options(self, cfg) -> dict:
        m = cfg.method
        return dict(ce_weight=m.ce_weight, student_stages=m.student_stages, teacher_stages=m.teacher_stages,
                    pretrain_lr=cfg.solver.pretrain_lr, task=self.name,
                    fold_teacher_bn=cfg.runtime.fold_teacher_bn, **m.options)

    def build_recipe(self, cfg, student, teacher, input_size, context: RunContext):
        if issubclass(method_class(cfg.method.name), OnlineMethod):  # several networks trained together, no teacher
            make = lambda: self.build_model(cfg.model.name, cfg, context.num_classes)  # noqa: E731
            return build_online_recipe(cfg, student, make, input_size)
        return Distiller(student, teacher, cfg.method.name, input_size=input_size, context=context,
                         **self.recipe_options(cfg))

    def schedule(self, cfg, steps_per_epoch: int) -> RunSchedule:
        s = cfg.solver
        return RunSchedule(unit=steps_per_epoch, length=s.epochs, kind=s.schedule, milestones=tuple(s.milestones),
                           gamma=s.gamma, warmup=s.warmup_epochs, eval_period=cfg.runtime.eval_every * steps_per_epoch,
                           checkpoint_period=steps_per_epoch, log_period=steps_per_epoch, x_key=self.schedule_unit)

    def build_data(self, cfg, device, rank: int = 0, world_size: int = 1) -> TaskData:
        d = cfg.data
        # Full training batches only: a last batch of one image would break BatchNorm.
        b = build_datasets(d.name, d.root, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, device=device,
                           seed=cfg.seed, rank=rank, world_size=world_size, subset=d.subset, augment=d.augment,
                           drop_last=True, channels_last=cfg.runtime.channels_last, workers=d.workers,
                           image_size=d.image_size, val_split=d.selection_split,
                           labelled_fraction=d.labelled_fraction, labelled_seed=d.labelled_seed,
                           generated=generated_data(d), normalisation=d.normalisation)
        context = RunContext(num_samples=b.num_samples, train_targets=b.train_targets, num_classes=b.num_classes,
                             epochs=cfg.solver.epochs)
        meta = {"num_classes": b.num_classes, "input_size": list(b.input_size),
                "class_names": list(b.class_names) if b.class_names else None}
        return TaskData(b.train, b.test, len(b.train), tuple(b.input_size), b.num_classes, context, meta,
                        num_train=b.num_samples, val=b.val)

    def train_stats(self, outputs, batch: Batch) -> dict[str, torch.Tensor]:
        return {"correct": (outputs.argmax(dim=1) == batch.targets).sum()}

    def train_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {"train_top1": 100.0 * sums["correct"] / max(count, 1)}

    def evaluate(self, model, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        return evaluate_classifier(model, data.val if split == "val" else data.test, device, precision, split)

    def describe_train(self, row: dict) -> str:
        return f"train top-1 {row['train_top1']:.2f}%" if "train_top1" in row else ""

    def describe(self, m: dict[str, float], split: str = "test") -> str:
        return f"{split} top-1 {m[f'{split}_top1']:.2f}% (top-5 {m[f'{split}_top5']:.2f}%)"

    # ---------------------------------------------------------------- export
    def rebuild(self, meta: dict, cfg, export: bool = True) -> nn.Module:
        model = create_model(meta["model_name"], num_classes=meta["num_classes"])
        return prepare_stages(model, "student", getattr(getattr(cfg, "model", None), "features", None)).eval()

    def sample_inputs(self, meta: dict, cfg):
        return torch.randn(4, *meta["input_size"], generator=torch.Generator().manual_seed(0))
