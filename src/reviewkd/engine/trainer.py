"""The training loop: one readable place that owns data, precision, checkpoints and logging.

A method owns its losses (and connectors); the trainer owns the loop. Order of a run:
teacher (loaded, or trained first from its own config) -> the method's pre-training stage, if it
has one -> epochs of distillation, each followed by evaluation, logging and an atomic checkpoint.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, ConfigError, load_config, save_config
from ..data import build_datasets
from ..distiller import Distiller
from ..methods import method_class
from ..models import create_model, load_weights
from ..models.summary import count_parameters
from .checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .metrics import MetricsLog
from .runtime import autocast, init_distributed, resolve_precision, seed_everything
from .schedule import build_scheduler


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, existing run without --resume, ...)."""


@dataclass
class RunResult:
    run_dir: Path
    best_top1: float
    final_top1: float
    final_top5: float
    teacher_top1: float | None
    parameters: int
    train_seconds: float
    history: list[dict]


def build_data(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
    d = cfg.data
    # Full training batches only: a last batch of one image would break BatchNorm.
    return build_datasets(
        d.name, d.root, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, device=device, seed=cfg.seed,
        rank=rank, world_size=world_size, subset=d.subset, augment=d.augment, drop_last=True,
        channels_last=cfg.runtime.channels_last, workers=d.workers, image_size=d.image_size,
    )


def build_optimizer(params, solver, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    lr = solver.lr if lr is None else lr
    if solver.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=solver.momentum, nesterov=solver.nesterov and solver.momentum > 0,
                               weight_decay=solver.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=solver.weight_decay)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device, precision: str, world_size: int = 1) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy; counts summed on the device, one sync."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss sum, count
    for images, targets, _ in loader:
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == targets[:, None]
        stats += torch.stack([
            hit[:, 0].sum(), hit.any(dim=1).sum(),
            nn.functional.cross_entropy(logits, targets, reduction="sum"), torch.tensor(len(targets), device=device),
        ]).double()
    if world_size > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    c1, c5, loss, n = stats.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True, stop_after_epoch: int | None = None):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.stop_after_epoch = stop_after_epoch
        self.dist, self.device = init_distributed(cfg.runtime.device)
        self.precision = resolve_precision(cfg.runtime.precision, self.device)
        self.run_dir = cfg.run_dir
        self._check_run_dir()
        seed_everything(cfg.seed, cfg.runtime.deterministic)

        self.data = build_data(cfg, self.device, self.dist.rank, self.dist.world_size)
        self.teacher = self._build_teacher()
        student = create_model(cfg.model.name, num_classes=self.data.num_classes)
        if cfg.model.weights:
            load_weights(student, cfg.model.weights)
        if cfg.runtime.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("runtime.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
            from .distributed import convert_sync_batchnorm

            student = convert_sync_batchnorm(student)
        self.distiller = Distiller(
            student, self.teacher, cfg.method.name,
            input_size=self.data.input_size, ce_weight=cfg.method.ce_weight,
            student_stages=cfg.method.student_stages, teacher_stages=cfg.method.teacher_stages,
            context={"num_samples": self.data.num_samples, "train_targets": self.data.train_targets,
                     "num_classes": self.data.num_classes},
            **cfg.method.options,
        ).to(self.device)
        if cfg.runtime.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.model = self._wrap(self.distiller)
        self.student_eval = student
        if cfg.runtime.compile:  # the training step (student, teacher, method) and evaluation
            self.model, self.student_eval = torch.compile(self.model), torch.compile(student)

        steps = len(self.data.train)
        self.optimizer = build_optimizer(self.distiller.trainable_parameters(), cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver, steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.pretrain_epochs = self.distiller.method.pretrain_epochs
        self.pretrain_optimizer = (
            build_optimizer(self.distiller.pretrain_parameters(), cfg.solver, lr=self._pretrain_lr())
            if self.pretrain_epochs > 0 else None
        )
        self.start_epoch, self.pretrain_done, self.best_top1 = 0, 0, -1.0
        self.history: list[dict] = []
        self.teacher_top1: float | None = None
        if resume:
            self._load_last()

    # ----------------------------------------------------------------- set-up
    def _pretrain_lr(self) -> float:
        """The config's solver.pretrain_lr, else the method's recipe value, else the base LR."""
        method_lr = getattr(self.distiller.method, "pretrain_lr", None)
        return self.cfg.solver.pretrain_lr or method_lr or self.cfg.solver.lr

    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume and not last.is_file():
            raise TrainingError(f"cannot resume: {last} does not exist (start the run without --resume)")
        if not self.resume and last.is_file():
            raise TrainingError(
                f"{self.run_dir} already holds a run: add --resume to continue it, or choose another name (name=...)"
            )

    def _build_teacher(self) -> nn.Module | None:
        cfg = self.cfg
        if not method_class(cfg.method.name).needs_teacher:
            return None
        t = cfg.teacher
        if t is None:
            raise ConfigError(f"method {cfg.method.name!r} needs a teacher: add a 'teacher' section (name + checkpoint or config)")
        path = Path(t.checkpoint) if t.checkpoint else None
        if path is None or not path.is_file():
            if t.config is None:
                raise ConfigError(
                    f"teacher checkpoint not found: {t.checkpoint}; train the teacher first or give teacher.config to train it"
                    if t.checkpoint else "teacher needs a checkpoint or a config (teacher.checkpoint / teacher.config)"
                )
            path = self._teacher_from_config(t.config, path)
        teacher = create_model(t.name, num_classes=self.data.num_classes)
        load_weights(teacher, path)
        return teacher.to(self.device)

    def _teacher_from_config(self, config_path: str, wanted: Path | None) -> Path:
        tcfg = load_config(config_path)
        best = tcfg.run_dir / "best.pt"
        if not best.is_file():
            self._say(f"teacher checkpoint missing: training the teacher first from {config_path}")
            resume = (tcfg.run_dir / "last.pt").is_file()
            Trainer(tcfg, resume=resume, progress=self.progress).fit()
        return wanted if wanted is not None and wanted.is_file() else best

    def _wrap(self, distiller: Distiller) -> nn.Module:
        if not self.dist.enabled:
            return distiller
        from .distributed import wrap_ddp

        return wrap_ddp(distiller, self.device)

    def _say(self, text: str) -> None:
        if self.dist.is_main and self.progress:
            tqdm.write(text)

    # ----------------------------------------------------------- checkpoints
    def _state(self, epoch: int) -> dict:
        return {
            "format": FORMAT,
            "epoch": epoch,
            "pretrain_done": self.pretrain_done,
            "model_name": self.cfg.model.name,
            "num_classes": self.data.num_classes,
            "input_size": list(self.data.input_size),
            "method_name": self.cfg.method.name,
            "student": self.distiller.student.state_dict(),
            "method": self.distiller.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "pretrain_optimizer": self.pretrain_optimizer.state_dict() if self.pretrain_optimizer else None,
            "best_top1": self.best_top1,
            "teacher_top1": self.teacher_top1,
            "history": self.history,
            "rng": rng_state(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        state = self._state(epoch)
        atomic_save(state, self.run_dir / "last.pt")
        if is_best:
            atomic_save(state, self.run_dir / "best.pt")

    def _load_last(self) -> None:
        ckpt = load_checkpoint(self.run_dir / "last.pt")
        if ckpt["model_name"] != self.cfg.model.name or ckpt["method_name"] != self.cfg.method.name:
            raise TrainingError(
                f"{self.run_dir}/last.pt is a {ckpt['model_name']}/{ckpt['method_name']} run, the config asks for "
                f"{self.cfg.model.name}/{self.cfg.method.name}: resume with the config it was started with"
            )
        self.distiller.student.load_state_dict(ckpt["student"])
        self.distiller.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.pretrain_optimizer is not None and ckpt.get("pretrain_optimizer"):
            self.pretrain_optimizer.load_state_dict(ckpt["pretrain_optimizer"])
        self.start_epoch, self.pretrain_done = ckpt["epoch"], ckpt["pretrain_done"]
        self.best_top1, self.teacher_top1 = ckpt["best_top1"], ckpt["teacher_top1"]
        self.history = list(ckpt["history"])
        set_rng_state(ckpt["rng"])
        saved = ckpt["config"].get("solver", {})
        changed = [k for k, v in self.cfg.solver.model_dump(mode="json").items() if k != "epochs" and saved.get(k) != v]
        if changed:
            self._say(f"note: solver settings {changed} differ from the checkpoint; the optimizer and LR schedule "
                      "continue from the checkpoint's state (start a new run to change them)")
        self._say(f"resuming {self.run_dir} after epoch {self.start_epoch}")

    # ------------------------------------------------------------------ loop
    def _run_epoch(self, epoch: int, pretrain: bool) -> dict[str, float]:
        loader = self.data.train
        loader.set_epoch(epoch if not pretrain else -1 - epoch)
        optimizer = self.pretrain_optimizer if pretrain else self.optimizer
        self.model.train()
        if pretrain and getattr(self.distiller.method, "pretrain_student_eval", False):
            self.distiller.student.eval()  # the method's recipe keeps the student's BatchNorm fixed here
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = 0
        desc = f"pretrain {epoch + 1}/{self.pretrain_epochs}" if pretrain else f"epoch {epoch + 1}/{self.cfg.solver.epochs}"
        # disable=None: bars on a terminal only, so CI logs keep just the per-epoch lines.
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                   disable=None if (self.progress and self.dist.is_main) else True)
        start = time.perf_counter()
        sync_every = max(1, min(50, len(loader) // 4 or 1))
        for step, (images, targets, indices) in enumerate(bar):
            with autocast(self.device, self.precision):
                logits, losses = self.model(images, targets, epoch=epoch, pretrain=pretrain, indices=indices)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            if not pretrain:
                self.scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["total"] = sums.get("total", 0.0) + loss.detach().float()
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            seen += len(targets)
            if (step + 1) % sync_every == 0 or step + 1 == len(loader):
                # The only host sync of the loop: progress display and the non-finite check.
                means = {k: v.item() / (step + 1) for k, v in sums.items()}
                if not math.isfinite(means["total"]):
                    last = self.run_dir / "last.pt"
                    saved = (f"The last good checkpoint is {last}" if last.is_file()
                             else "No checkpoint was written yet")
                    hint = "lower solver.lr" + (", or try runtime.precision=fp32" if self.precision != "fp32" else "")
                    raise TrainingError(
                        f"loss became {means['total']} in {desc} (step {step + 1}); stopped. {saved}: {hint}"
                    )
                rate = seen * self.dist.world_size / (time.perf_counter() - start)
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, "img/s": f"{rate:.0f}"})
        bar.close()
        stats = torch.stack([*(sums[k] for k in sorted(sums)), correct.float(),
                             torch.tensor(float(seen), device=self.device)])
        if self.dist.enabled:
            dist.all_reduce(stats)
        n_steps = len(loader) * self.dist.world_size
        row = {f"loss_{k}": v / n_steps for k, v in zip(sorted(sums), stats[:-2].tolist())}
        row["train_top1"] = 100.0 * stats[-2].item() / max(stats[-1].item(), 1.0)
        row["epoch_seconds"] = time.perf_counter() - start
        return row

    def fit(self) -> RunResult:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        log = MetricsLog(self.run_dir, self.history) if self.dist.is_main else None
        n_params = count_parameters(self.distiller.student)
        self._say(f"{self.cfg.name}: {self.cfg.model.name} ({n_params / 1e6:.2f}M parameters), method "
                  f"{self.cfg.method.name}, {self.data.num_samples} training images, device {self.device}, "
                  f"precision {self.precision}, {self.dist.world_size} process(es)")
        if self.teacher is not None and self.teacher_top1 is None:
            self.teacher_top1 = evaluate(self.teacher, self.data.test, self.device, self.precision, self.dist.world_size)["top1"]
            self._say(f"teacher {self.cfg.teacher.name}: top-1 {self.teacher_top1:.2f}%")

        train_start = time.perf_counter()
        try:
            for p_epoch in range(self.pretrain_done, self.pretrain_epochs):
                row = self._run_epoch(p_epoch, pretrain=True)
                self.pretrain_done = p_epoch + 1
                self._say(f"pretrain epoch {p_epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("loss_")))
                self._save(self.start_epoch, is_best=False)
            last_eval = self.history[-1] if self.history else {}
            for epoch in range(self.start_epoch, self.cfg.solver.epochs):
                row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                row.update(self._run_epoch(epoch, pretrain=False))
                final = epoch + 1 == self.cfg.solver.epochs
                if (epoch + 1) % self.cfg.runtime.eval_every == 0 or final:
                    ev = evaluate(self.student_eval, self.data.test, self.device, self.precision, self.dist.world_size)
                    row.update(test_top1=ev["top1"], test_top5=ev["top5"], test_loss=ev["loss"])
                    last_eval = row
                is_best = row.get("test_top1", -1.0) > self.best_top1
                self.best_top1 = max(self.best_top1, row.get("test_top1", -1.0))
                self.history.append(row)
                if log is not None:
                    log.add(row)
                self._save(epoch + 1, is_best)
                self._say(
                    f"epoch {epoch + 1}/{self.cfg.solver.epochs}: loss {row['loss_total']:.4f}, train top-1 "
                    f"{row['train_top1']:.2f}%" + (f", test top-1 {row['test_top1']:.2f}% (best {self.best_top1:.2f}%)"
                                                  if "test_top1" in row else "") + f", {row['epoch_seconds']:.1f}s"
                )
                if self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch:
                    break
        finally:
            if log is not None:
                log.close()
        return RunResult(
            run_dir=self.run_dir, best_top1=self.best_top1, final_top1=last_eval.get("test_top1", float("nan")),
            final_top5=last_eval.get("test_top5", float("nan")), teacher_top1=self.teacher_top1,
            parameters=n_params, train_seconds=time.perf_counter() - train_start, history=self.history,
        )
