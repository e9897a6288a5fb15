"""Iteration-based training of a (distilled) detector; the detection counterpart of engine.trainer.

Order of a run: teacher detector (loaded, or trained first from its own config) -> COCO eval of the
teacher -> ``detection.max_iter`` iterations of the student (+ the method's modules), with a
metrics row every ``log_period`` iterations, COCO eval every ``eval_period`` (and at the end), and
``last.pt`` written atomically every ``checkpoint_period`` iterations and at the end (``best.pt``
keeps the best box AP). The pieces are the engine's: devices, precision and process groups
(runtime), atomic checkpoints and RNG states (checkpoint), metrics.csv / curves.png (metrics),
the LR multiplier (schedule) and the optimizer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..config import Config, ConfigError, load_config, save_config
from ..engine.checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from ..engine.metrics import MetricsLog
from ..engine.runtime import autocast, init_distributed, resolve_precision, seed_everything
from ..engine.schedule import lr_factor
from ..engine.trainer import TrainingError, build_optimizer
from ..methods import method_class
from ..models.summary import count_parameters
from .coco_eval import evaluate_detector
from .data import build_detection_data, to_device
from .distiller import DetectionDistiller
from .models import classes_in, create_detector, detector_state_dict, load_detector_weights, parse_name

SCORES = {"box_AP": "box AP", "mask_AP": "mask AP"}
# solver fields of epoch-based schedules, and what replaces them in a detection config
_EPOCH_FIELDS = {"epochs": "detection.max_iter", "milestones": "detection.steps",
                 "warmup_epochs": "detection.warmup_iters", "schedule": "detection.steps (multistep)",
                 "pretrain_lr": "nothing (no method with a pre-training stage runs on detectors)"}


def check_config(cfg: Config) -> None:
    """Refuse settings that a detection run would silently ignore."""
    if cfg.task != "detection" or cfg.detection is None:
        raise ConfigError("not a detection config: set task: detection")
    for key in sorted(cfg.solver.model_fields_set & set(_EPOCH_FIELDS)):
        raise ConfigError(f"solver.{key} is for epoch-based runs; a detection run uses {_EPOCH_FIELDS[key]}")
    for key in ("ce_weight", "student_stages", "teacher_stages"):
        if getattr(cfg.method, key) is not None:
            raise ConfigError(f"method.{key} has no meaning for detection (the detector's losses are added "
                              "unweighted and every FPN level is used)")
    if cfg.runtime.compile:
        raise ConfigError("runtime.compile is not supported for detection runs")
    steps = cfg.detection.steps
    if steps != sorted(steps) or any(s >= cfg.detection.max_iter for s in steps):
        raise ConfigError(f"detection.steps {steps} must increase and stay below detection.max_iter={cfg.detection.max_iter}")
    parse_name(cfg.model.name)
    if cfg.teacher is not None:
        parse_name(cfg.teacher.name)


def build_student(cfg: Config, num_classes: int) -> nn.Module:
    det = cfg.detection
    return create_detector(cfg.model.name, num_classes, backbone_weights=det.backbone_weights,
                           trainable_layers=det.trainable_layers, frozen_bn=det.frozen_bn,
                           min_size=det.min_size_test, max_size=det.max_size_test, options=det.detector_options)


def build_teacher_detector(cfg: Config, name: str, weights, num_classes: int) -> nn.Module:
    """A frozen-BatchNorm detector with the checkpoint's weights; its number of classes is read
    from the checkpoint when it differs from the dataset's (feature methods do not need the heads)."""
    det = cfg.detection
    state = detector_state_dict(weights)
    classes = classes_in(state) or num_classes
    model = create_detector(name, classes, frozen_bn=True, min_size=det.min_size_test, max_size=det.max_size_test,
                            options=det.detector_options)
    load_detector_weights(model, state)
    model.requires_grad_(False)
    return model.eval()


@dataclass
class DetectionResult:
    run_dir: Path
    metrics: dict[str, float]  # the last evaluation (box_AP, ..., mask_AP, ...)
    best_ap: float
    teacher_metrics: dict[str, float] | None
    parameters: int
    train_seconds: float
    history: list[dict]


class DetectionTrainer:
    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True, stop_after_iter: int | None = None):
        check_config(cfg)
        self.cfg, self.det, self.resume, self.progress = cfg, cfg.detection, resume, progress
        self.stop_after_iter = stop_after_iter
        self.dist, self.device = init_distributed(cfg.runtime.device)
        self.precision = resolve_precision(cfg.runtime.precision, self.device)
        self.run_dir = cfg.run_dir
        self._check_run_dir()
        seed_everything(cfg.seed, cfg.runtime.deterministic)

        self.arch = parse_name(cfg.model.name)[0]
        self.masks = self.arch == "maskrcnn"
        self.data = build_detection_data(cfg, masks=self.masks, rank=self.dist.rank, world=self.dist.world_size)
        self.teacher = self._build_teacher()
        student = build_student(cfg, self.data.num_classes)
        if cfg.model.weights:
            load_detector_weights(student, cfg.model.weights)
        if cfg.runtime.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("runtime.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.distiller = DetectionDistiller(student, self.teacher, cfg.method.name, **cfg.method.options).to(self.device)
        self.model = self._wrap(self.distiller)

        self._trainable = list(self.distiller.trainable_parameters())
        self.optimizer = build_optimizer(self._trainable, cfg.solver)
        det = self.det
        self.scheduler = LambdaLR(self.optimizer, lambda it: lr_factor(
            float(it), schedule="multistep", epochs=det.max_iter, milestones=det.steps, gamma=cfg.solver.gamma,
            warmup_epochs=det.warmup_iters, warmup_start=0.001))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.iteration, self.best_ap = 0, -1.0
        self.history: list[dict] = []
        self.teacher_metrics: dict[str, float] | None = None
        self.last_metrics: dict[str, float] = {}
        self._rng_to_restore = None
        if resume:
            self._load_last()

    # ----------------------------------------------------------------- set-up
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
        return build_teacher_detector(cfg, t.name, path, self.data.num_classes).to(self.device)

    def _teacher_from_config(self, config_path: str, wanted: Path | None) -> Path:
        tcfg = load_config(config_path)
        best = tcfg.run_dir / "best.pt"
        if not best.is_file():
            self._say(f"teacher checkpoint missing: training the teacher first from {config_path}")
            resume = (tcfg.run_dir / "last.pt").is_file()
            DetectionTrainer(tcfg, resume=resume, progress=self.progress).fit()
        return wanted if wanted is not None and wanted.is_file() else best

    def _wrap(self, distiller: DetectionDistiller) -> nn.Module:
        if not self.dist.enabled:
            return distiller
        from ..engine.distributed import wrap_ddp

        return wrap_ddp(distiller, self.device)

    def _say(self, text: str) -> None:
        if self.dist.is_main and self.progress:
            tqdm.write(text)

    # ----------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        val = self.data.val_set
        return {
            "format": FORMAT,
            "task": "detection",
            "iteration": self.iteration,
            "epoch": self.iteration * self.data.passes_per_iter,
            "model_name": self.cfg.model.name,
            "num_classes": self.data.num_classes,
            "label_to_cat": {str(k): v for k, v in val.label_to_cat.items()},
            "class_names": {str(k): v for k, v in val.class_names.items()},
            "method_name": self.cfg.method.name,
            "student": self.distiller.student.state_dict(),
            "method": self.distiller.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_ap": self.best_ap,
            "metrics": self.last_metrics,
            "teacher_metrics": self.teacher_metrics,
            "history": self.history,
            "rng": rng_state(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def _save(self, is_best: bool = False) -> None:
        if not self.dist.is_main:
            return
        state = self._state()
        atomic_save(state, self.run_dir / "last.pt")
        if is_best:
            atomic_save(state, self.run_dir / "best.pt")

    def _load_last(self) -> None:
        ckpt = load_checkpoint(self.run_dir / "last.pt")
        if ckpt.get("task") != "detection" or ckpt["model_name"] != self.cfg.model.name \
                or ckpt["method_name"] != self.cfg.method.name:
            raise TrainingError(
                f"{self.run_dir}/last.pt is a {ckpt['model_name']}/{ckpt['method_name']} run, the config asks for "
                f"{self.cfg.model.name}/{self.cfg.method.name}: resume with the config it was started with"
            )
        self.distiller.student.load_state_dict(ckpt["student"])
        self.distiller.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration, self.best_ap = ckpt["iteration"], ckpt["best_ap"]
        self.teacher_metrics, self.last_metrics = ckpt["teacher_metrics"], ckpt["metrics"]
        self.history = list(ckpt["history"])
        # restored once the data iterator exists (creating it draws from the RNG)
        self._rng_to_restore = ckpt["rng"]
        self._say(f"resuming {self.run_dir} after iteration {self.iteration}")

    # ------------------------------------------------------------------ loop
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate_detector(model if model is not None else self.distiller.student, self.data.val_loader(),
                                 self.data.val_set, self.device, autocast(self.device, self.precision),
                                 masks=self.masks, progress=self.progress and self.dist.is_main)

    def _reduce(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        keys = sorted(sums)
        stats = torch.stack([sums[k] for k in keys]) / max(count, 1)
        if self.dist.enabled:
            dist.all_reduce(stats)
            stats /= self.dist.world_size
        return dict(zip(keys, stats.tolist()))

    def fit(self) -> DetectionResult:
        cfg, det = self.cfg, self.det
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        log = MetricsLog(self.run_dir, self.history, x_key="iteration", scores=SCORES,
                         score_axis="COCO AP (%)") if self.dist.is_main else None
        n_params = count_parameters(self.distiller.student)
        self._say(f"{cfg.name}: {cfg.model.name} ({n_params / 1e6:.2f}M parameters), method {cfg.method.name}, "
                  f"{len(self.data.train_set)} training / {len(self.data.val_set)} val images, device {self.device}, "
                  f"precision {self.precision}, {self.dist.world_size} process(es), {det.max_iter} iterations")
        if self.teacher is not None and self.teacher_metrics is None:
            self.teacher_metrics = self.evaluate(self.teacher)
            self._say(f"teacher {cfg.teacher.name}: " + _ap_text(self.teacher_metrics))

        loader = iter(self.data.train_loader(start_iter=self.iteration))
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        stop = min(det.max_iter, self.stop_after_iter) if self.stop_after_iter else det.max_iter
        bar = tqdm(total=det.max_iter, initial=self.iteration, desc=cfg.name, leave=False, dynamic_ncols=True,
                   disable=None if (self.progress and self.dist.is_main) else True)
        sums: dict[str, torch.Tensor] = {}
        window, window_start, train_start = 0, time.perf_counter(), time.perf_counter()
        self.model.train()
        try:
            while self.iteration < stop:
                images, targets = next(loader)
                images, targets = to_device(images, targets, self.device)
                epoch = self.iteration * self.data.passes_per_iter
                with autocast(self.device, self.precision):
                    losses = self.model(images, targets, epoch=epoch, iteration=self.iteration)
                loss = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if det.clip_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self._trainable, det.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.iteration += 1
                bar.update(1)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                sums["total"] = sums.get("total", 0.0) + loss.detach().float()
                window += 1

                it = self.iteration
                final = it == det.max_iter
                evaluate = final or (det.eval_period and it % det.eval_period == 0)
                save = final or it % det.checkpoint_period == 0 or it == stop
                if not (it % det.log_period == 0 or evaluate or save):
                    continue
                means = self._reduce(sums, window)
                if not math.isfinite(means["total"]):
                    last = self.run_dir / "last.pt"
                    saved = f"The last good checkpoint is {last}" if last.is_file() else "No checkpoint was written yet"
                    hint = "lower solver.lr" + (", or try runtime.precision=fp32" if self.precision != "fp32" else "")
                    raise TrainingError(f"loss became {means['total']} at iteration {it}; stopped. {saved}: {hint}")
                seconds = time.perf_counter() - window_start
                row = {"iteration": it, "epoch": round(it * self.data.passes_per_iter, 3),
                       "lr": self.optimizer.param_groups[0]["lr"],
                       **{f"loss_{k}": v for k, v in means.items()}, "iter_seconds": seconds / window}
                bar.set_postfix({"loss": f"{means['total']:.3f}", "s/it": f"{seconds / window:.2f}"})
                is_best = False
                if evaluate:
                    self.last_metrics = self.evaluate()
                    row.update(self.last_metrics)
                    is_best = self.last_metrics["box_AP"] > self.best_ap
                    self.best_ap = max(self.best_ap, self.last_metrics["box_AP"])
                    self._say(f"iteration {it}/{det.max_iter}: loss {means['total']:.4f}, " + _ap_text(self.last_metrics))
                self.history.append(row)
                if log is not None:
                    log.add(row)
                if save or is_best:
                    self._save(is_best)
                sums, window, window_start = {}, 0, time.perf_counter()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return DetectionResult(
            run_dir=self.run_dir, metrics=self.last_metrics, best_ap=self.best_ap, teacher_metrics=self.teacher_metrics,
            parameters=n_params, train_seconds=time.perf_counter() - train_start, history=self.history,
        )


def _ap_text(m: dict[str, float]) -> str:
    text = f"box AP {m['box_AP']:.2f} (AP50 {m['box_AP50']:.2f}, AP75 {m['box_AP75']:.2f})"
    if "mask_AP" in m:
        text += f", mask AP {m['mask_AP']:.2f}"
    return text
