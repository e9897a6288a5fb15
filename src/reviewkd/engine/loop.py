"""The one training loop, for every task and every recipe.

A run: check everything cheap (config, method options, a probe of both architectures, the output
folder) -> train the teacher first if its checkpoint is missing -> data -> networks -> the recipe's
stages. Each stage runs iterations of the recipe's step over its optimiser groups (see
``recipes/base.py`` for the backward / step rule), with one host sync every few iterations (progress
and the non-finite check), a history row every ``log_period``, evaluation every ``eval_period``
(the task's score picks ``best.pt``) and an atomic ``last.pt`` every ``checkpoint_period``.

Kill-safety: ``best.pt`` is written before ``last.pt``, so a run killed between the two resumes
from the older ``last.pt``, redoes the same iterations (deterministically with
``runtime.deterministic``) and writes both again; temporary files of an interrupted write are
removed at the next start.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .. import collectives
from ..config import Config, ConfigError, TeacherConfig, load_config, save_config
from ..methods import RunContext, method_class
from ..models.summary import count_parameters
from ..models.weights import CheckpointMismatchError, compare_state
from ..recipes.base import Group, Recipe, Stage
from ..tasks import get_task
from .checkpoint import FORMAT, atomic_save, load_checkpoint, remove_stale_temporaries, rng_state, set_rng_state
from .metrics import MetricsLog
from .runtime import (CompiledOrEager, autocast, init_distributed, resolve_precision, reuse_freed_memory,
                      seed_everything)

# Keys of a history row that measure wall time (differ between otherwise identical runs).
TIMING_KEYS = ("seconds", "eval_seconds")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, existing run without --resume, ...)."""


class Interrupted(RuntimeError):
    """Ctrl-C during a run; the message says truthfully what was saved."""


@dataclass
class RunResult:
    run_dir: Path
    score_key: str
    best_score: Optional[float]
    metrics: dict  # the last evaluation
    teacher_metrics: Optional[dict]
    parameters: int
    train_seconds: float
    history: list[dict]
    test_metrics: Optional[dict] = None  # with a validation split: the final model on the test set
    selected_test_metrics: Optional[dict] = None  # ... and the selected one (best.pt)


def build_optimizer(group: Group, solver) -> torch.optim.Optimizer:
    params = [p for p in group.params if p.requires_grad]
    lr = solver.lr if group.lr is None else group.lr
    kind = group.optimizer or solver.optimizer
    options = {"weight_decay": solver.weight_decay, **group.options}  # a group may set its own weight decay
    if kind == "sgd":
        # a group may set its own momentum / nesterov as well
        sgd = {"momentum": solver.momentum, "nesterov": solver.nesterov and solver.momentum > 0, **options}
        return torch.optim.SGD(params, lr=lr, **sgd)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, **options)
    return torch.optim.AdamW(params, lr=lr, **options)


@dataclass
class GroupOptimiser:
    group: Group
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    params: list[nn.Parameter]


def group_optimiser(group: Group, solver, lr_factor=None) -> GroupOptimiser:
    """The optimiser and LR schedule of one group (``lr_factor(iteration)``: the run's schedule)."""
    optimizer = build_optimizer(group, solver)
    factor = lr_factor if (group.schedule == "solver" and lr_factor is not None) else (lambda it: 1.0)
    return GroupOptimiser(group, optimizer, LambdaLR(optimizer, factor), [p for p in group.params if p.requires_grad])


@dataclass
class TeacherPlan:
    """Where the teacher comes from: a checkpoint to load, or a config to train first."""

    name: Optional[str] = None
    checkpoint: Optional[Path] = None
    config: Optional[Config] = None  # set when the teacher must be trained first
    inherited: list[str] = field(default_factory=list)  # student overrides passed to the teacher's config
    ignored: list[str] = field(default_factory=list)  # student overrides the teacher does not get
    warning: Optional[str] = None  # e.g. a teacher trained at another input size

    def describe(self) -> str:
        if self.name is None:
            return "no teacher"
        if self.checkpoint is None and self.config is None:
            return f"{self.name}: the teacher's outputs come with the data"
        if self.config is None:
            return f"load {self.name} from {self.checkpoint}"
        text = (f"train {self.name} first from its config ({self.config.name}: {_length(self.config)}) into "
                f"{self.config.run_dir}, then load its best.pt")
        if self.inherited:
            text += f"; the teacher also gets {' '.join(self.inherited)}"
        if self.ignored:
            text += (f"; the teacher does not get {' '.join(self.ignored)} (student only: put what the teacher "
                     "needs in teacher.overrides)")
        return text

    def check_input_size(self, task, cfg: Config) -> None:
        """Flag a teacher trained (or to be trained) at another input size than the student's data."""
        want = tuple(task.probe_size(cfg))
        if self.config is not None:
            got, source = tuple(task.probe_size(self.config)), f"its config {self.config.name}"
        elif self.checkpoint is not None:
            try:
                got = load_checkpoint(self.checkpoint).get("input_size")
            except Exception:  # a bare weight file: nothing recorded
                got = None
            got, source = (tuple(got) if got else None), str(self.checkpoint)
        else:
            return
        if got is not None and len(got) != len(want):
            return  # another kind of input (an audio or frame teacher of a video student): nothing to compare
        if got is not None and got != want:
            self.warning = (f"warning: the teacher was trained at input size {'x'.join(map(str, got))} ({source}) "
                            f"but the student's data is {'x'.join(map(str, want))}: its features and accuracy may "
                            "not carry over; train the teacher at the student's input size")


def _length(cfg: Config) -> str:
    return f"{cfg.detection.max_iter} iterations" if cfg.task == "detection" else f"{cfg.solver.epochs} epochs"


PRECOMPUTED = "precomputed"  # a teacher name whose outputs are part of the data (e.g. audio features)


def plan_teacher(cfg: Config, section: Optional[TeacherConfig] = None) -> TeacherPlan:
    """Decided from the config and the file system alone (cheap). ``section``: plan this teacher
    section instead of ``cfg.teacher`` (a second teacher of the run, e.g. CCL's image teacher)."""
    if section is None and not method_class(cfg.method.name).uses_teacher(cfg.method.options):
        return TeacherPlan()
    t = cfg.teacher if section is None else section
    if t is None:
        raise ConfigError(f"method {cfg.method.name!r} needs a teacher: add a 'teacher' section (name + checkpoint or config)")
    if t.name == PRECOMPUTED and t.checkpoint is None and t.config is None:
        return TeacherPlan(t.name)  # its outputs come with the data: nothing to load or train
    if t.features is None and t.config is not None and Path(t.config).is_file():
        # the stages the teacher's own config names are the teacher's stages here too
        t.features = load_config(t.config).model.features
    path = Path(t.checkpoint) if t.checkpoint else None
    if path is not None and path.is_file():
        if _run_checkpoint_unfinished(path):
            if t.config is None:
                raise ConfigError(f"teacher checkpoint {path} is from a run that has not finished: continue it with "
                                  "--resume, or give teacher.config to have it finished first")
        else:
            return TeacherPlan(t.name, path)
    if t.config is None:
        raise ConfigError(f"teacher checkpoint not found: {t.checkpoint}; train the teacher first or give teacher.config "
                          "to train it" if t.checkpoint else "teacher needs a checkpoint or a config (teacher.checkpoint / "
                          "teacher.config)")
    inherited, ignored = teacher_overrides(cfg)
    tcfg = load_config(t.config, inherited + list(t.overrides))
    if tcfg.model.name != t.name:
        raise ConfigError(f"teacher.name is {t.name} but its config {t.config} trains {tcfg.model.name}: make them agree")
    best = tcfg.run_dir / "best.pt"
    if best.is_file() and _finished(tcfg.run_dir / "last.pt"):
        return TeacherPlan(t.name, path if path is not None and path.is_file() else best)
    return TeacherPlan(t.name, best, tcfg, inherited, ignored)


# The student's command-line overrides that also reach a teacher trained first: where and how to run,
# never what to train (the teacher's config is its recipe; teacher.overrides changes it on purpose).
_TEACHER_INHERITS = ("output_dir", "data.root", "data.workers")


def teacher_overrides(cfg: Config) -> tuple[list[str], list[str]]:
    """(overrides passed on to the teacher's config, overrides that stay with the student)."""
    passed, kept = [], []
    for item in cfg._overrides:
        key = item.split("=", 1)[0].strip()
        (passed if key in _TEACHER_INHERITS or key.startswith("runtime.") else kept).append(item)
    return passed, kept


def _run_checkpoint_unfinished(path: Path) -> bool:
    """True for a run checkpoint of this toolkit whose run is known not to have reached its end:
    its ``last.pt`` (beside it, or itself) says so. A plain weight file, or a best.pt moved away
    from its run, cannot tell and counts as finished."""
    try:
        ckpt = load_checkpoint(path)
    except Exception:
        return False
    if ckpt.get("done", True):
        return False
    last = path.parent / "last.pt"
    return not _finished(last) if last.is_file() else path.name == "last.pt"


def _finished(last: Path) -> bool:
    try:
        return bool(load_checkpoint(last)["done"])
    except Exception:
        return False


class Run:
    """One training run of a config. ``stop_after`` counts epochs (iterations for iteration-based
    tasks) of the main stage; the run can be continued with ``resume=True``."""

    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None):
        self.cfg, self.resume, self.progress, self.stop_after = cfg, resume, progress, stop_after
        self.task = get_task(cfg.task)
        self.task.check_config(cfg)
        self.dist, self.device = init_distributed(cfg.runtime.device)
        if self.device.type == "cpu" and cfg.runtime.reuse_freed_memory:
            reuse_freed_memory()
        self.precision = resolve_precision(cfg.runtime.precision, self.device)
        self.run_dir = cfg.run_dir
        self._start_note: Optional[str] = None
        self._check_run_dir()
        self.teacher_plan = plan_teacher(cfg)
        self.teacher_plan.check_input_size(self.task, cfg)
        self.probe = self._probe_architectures()

    # ------------------------------------------------------------ cheap checks
    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume and not last.is_file():
            if not (self.run_dir / "config.yaml").is_file():
                raise TrainingError(f"cannot resume: {last} does not exist (start the run without --resume)")
            # started, but killed before its first checkpoint: nothing to continue from
            self.resume = False
            self._start_note = f"{last} does not exist yet (the run stopped before its first checkpoint): starting from the beginning"
        if not self.resume and last.is_file():
            raise TrainingError(
                f"{self.run_dir} already holds a run: add --resume to continue it, or choose another name (name=...)"
            )
        existing = self.run_dir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not _writable(existing):
            raise TrainingError(f"cannot write the run folder {self.run_dir} ({existing} is not a writable folder): "
                                "choose another output_dir")

    def _probe_architectures(self) -> Recipe:
        """Both architectures (no weights) and the recipe on a dummy batch: pairing errors now."""
        cfg, task = self.cfg, self.task
        num = task.num_outputs(cfg)
        student = task.build_model(cfg.model.name, cfg, num)
        teacher = None
        plan = self.teacher_plan
        if plan.name is not None:
            # the checkpoint's weights are checked now when it exists (a teacher trained first: later)
            weights = plan.checkpoint if plan.config is None else None
            try:
                teacher = task.build_teacher(plan.name, cfg, num, weights)
            except CheckpointMismatchError as exc:
                raise CheckpointMismatchError(f"teacher {plan.name}: {exc}") from None
        try:
            return task.build_recipe(cfg, student, teacher, task.probe_size(cfg), _probe_context(cfg, num))
        except ValueError as exc:
            raise ConfigError(f"{cfg.name}: {exc}") from None

    def describe(self) -> str:
        """The resolved config, both models, the method's feature pairs and the teacher plan."""
        cfg, recipe = self.cfg, self.probe
        lines = ["# resolved config", cfg.to_yaml().rstrip(), "", "# models"]
        lines.append(f"student  {cfg.model.name}: {count_parameters(recipe.deployable()):,} parameters")
        teacher = recipe.frozen_teacher()
        if teacher is not None:
            lines.append(f"teacher  {cfg.teacher.name}: {count_parameters(teacher):,} parameters")
        lines += ["", *recipe.describe()]
        lines += recipe.notes(self.cfg.solver.epochs if self.task.schedule_unit == "epoch" else None)
        stages = ", ".join(f"{s.name} ({s.epochs} epochs)" if s.epochs else s.name for s in recipe.stages())
        lines += ["", f"# stages: {stages}", f"# teacher: {self.teacher_plan.describe()}",
                  f"# output: {self.run_dir}", f"# device {self.device}, precision {self.precision}"]
        if cfg.task == "classification":
            fraction = cfg.data.selection_split
            lines.append(f"# best.pt selected on {round(100 * fraction)}% of the training set held out (data.val_split; the "
                         "test set is evaluated once, at the end)" if fraction else
                         "# best.pt selected on the test set, the papers' convention (data.val_split=0.1 holds a "
                         "tenth of the training set out instead)")
        if self.teacher_plan.warning:
            lines.append(f"# {self.teacher_plan.warning}")
        return "\n".join(lines)

    # --------------------------------------------------------------- set-up
    def _say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.progress:
            tqdm.write(text)
        if self.run_dir.is_dir():
            with open(self.run_dir / "train.log", "a") as f:
                f.write(text + "\n")

    def _teacher(self, num_outputs: int) -> Optional[nn.Module]:
        plan = self.teacher_plan
        if plan.name is None:
            return None
        if plan.config is not None:
            self._say(f"teacher checkpoint missing: {plan.describe()}")
            resume = (plan.config.run_dir / "last.pt").is_file()
            Run(plan.config, resume=resume, progress=self.progress).fit()
        return self.task.build_teacher(plan.name, self.cfg, num_outputs, plan.checkpoint).to(self.device)

    def _build(self) -> None:
        cfg, task = self.cfg, self.task
        # Every component seeds its own stream: the student starts from the same weights whether
        # or not a teacher was trained first in this process.
        seed_everything(cfg.seed, cfg.runtime.deterministic)
        self.data = task.build_data(cfg, self.device, self.dist.rank, self.dist.world_size)
        self.split = self.data.selection_split  # what picks best.pt: a validation split, else the test set
        self.score_key = task.score_key_for(self.split)
        self.teacher = self._teacher(self.data.num_outputs)
        seed_everything(cfg.seed, cfg.runtime.deterministic)
        student = task.build_model(cfg.model.name, cfg, self.data.num_outputs)
        if cfg.model.weights:
            task.load_weights(student, cfg.model.weights)
        if cfg.runtime.sync_bn and self.dist.enabled:  # BatchNorm statistics over the global batch
            if self.device.type != "cuda":
                raise ConfigError("runtime.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
            student = _convert_sync_batchnorm(student)
        self.recipe = task.build_recipe(cfg, student, self.teacher, self.data.input_size, self.data.context).to(self.device)
        if cfg.runtime.channels_last and task.name != "detection":
            self.recipe.to(memory_format=torch.channels_last)
        self.stages = self.recipe.stages()
        self.schedule = task.schedule(cfg, self.data.steps_per_epoch)
        self.optimisers: dict[str, GroupOptimiser] = {}
        for stage in self.stages:
            for group in self.recipe.groups(stage):
                self.optimisers[group.name] = group_optimiser(group, cfg.solver, self.schedule.lr_factor)
        self.step_fn, self.eval_model = self.recipe, self.recipe.deployable()
        if cfg.runtime.compile:
            self.step_fn, self.eval_model = (
                CompiledOrEager(m, lambda reason, what=what: self._say(
                    f"warning: torch.compile failed for the {what} ({reason}); it runs eagerly from here on"))
                for m, what in ((self.step_fn, "training step"), (self.eval_model, "evaluated model")))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.stage_index, self.stage_iteration = 0, 0
        self.best_score: Optional[float] = None
        self.metrics: dict = {}
        self.teacher_metrics: Optional[dict] = None
        self.test_metrics: Optional[dict] = None
        self.selected_test_metrics: Optional[dict] = None
        self.history: list[dict] = []
        self._rng: Optional[dict] = None
        self._open_row: Optional[tuple] = None  # (sums, window, seen, lr) of a row a checkpoint interrupts
        if self.resume:
            self._load_last()
        collectives.broadcast_state_dicts(self.recipe.trained_state())

    # ----------------------------------------------------------- checkpoints
    def _stage_length(self, stage: Stage) -> int:
        return self.schedule.total if stage.epochs is None else stage.epochs * self.data.steps_per_epoch

    def _state(self, done: bool) -> dict:
        main = self.stage_index == len(self.stages) - 1
        iteration = self.stage_iteration if main else 0
        return {
            "format": FORMAT, "task": self.task.name, "done": done,
            "stage": self.stage_index, "stage_iteration": self.stage_iteration,
            "stage_name": self.stages[self.stage_index].name, "unit": self.schedule.x_key,
            "position": self._position_value(),
            "iteration": iteration, "epoch": _units(iteration, self.data.steps_per_epoch),
            "model_name": self.cfg.model.name, "method_name": self.cfg.method.name, **self.data.meta,
            **self.recipe.trained_state(),
            "optimizers": {k: o.optimizer.state_dict() for k, o in self.optimisers.items()},
            "schedulers": {k: o.scheduler.state_dict() for k, o in self.optimisers.items()},
            "scaler": self.scaler.state_dict(),
            "score_key": self.score_key, "best_score": self.best_score, "metrics": self.metrics,
            "test_metrics": self.test_metrics, "selected_test_metrics": self.selected_test_metrics,
            "teacher_metrics": self.teacher_metrics, "history": self.history,
            "rng": rng_state(), "config": self.cfg.model_dump(mode="json"),
            "open_row": None if self._open_row is None else {
                "sums": {k: v.detach().cpu() for k, v in self._open_row[0].items()},
                "window": self._open_row[1], "seen": self._open_row[2], "lr": self._open_row[3]},
        }

    def _save(self, is_best: bool, done: bool = False) -> None:
        collectives.broadcast_state_dicts(self.recipe.trained_state())  # rank 0's BatchNorm statistics
        if not self.dist.is_main:
            return
        state = self._state(done)
        if is_best:  # best first: see the module docstring
            atomic_save(state, self.run_dir / "best.pt")
        atomic_save(state, self.run_dir / "last.pt")

    def _load_last(self) -> None:
        path = self.run_dir / "last.pt"
        ckpt = load_checkpoint(path)
        if (ckpt.get("task"), ckpt["model_name"], ckpt["method_name"]) != (self.task.name, self.cfg.model.name,
                                                                            self.cfg.method.name):
            raise TrainingError(
                f"{path} is a {ckpt['model_name']}/{ckpt['method_name']} run, the config asks for "
                f"{self.cfg.model.name}/{self.cfg.method.name}: resume with the config it was started with"
            )
        for name, state in self.recipe.trained_state().items():
            compare_state(state, ckpt.get(name, {}), f"{path} ({name})")
        self.recipe.load_trained_state(ckpt)
        for name, o in self.optimisers.items():
            o.optimizer.load_state_dict(ckpt["optimizers"][name])
            o.scheduler.load_state_dict(ckpt["schedulers"][name])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.stage_index, self.stage_iteration = ckpt["stage"], ckpt["stage_iteration"]
        self.best_score, self.metrics = ckpt["best_score"], ckpt["metrics"]
        self.teacher_metrics, self.history = ckpt["teacher_metrics"], list(ckpt["history"])
        self.test_metrics, self.selected_test_metrics = ckpt["test_metrics"], ckpt["selected_test_metrics"]
        self._rng = ckpt["rng"]  # restored once the data stream exists (creating it may draw from the RNG)
        row = ckpt.get("open_row")
        if row is not None:  # written in the middle of a row (runtime.checkpoint_every)
            self._open_row = ({k: v.to(self.device) for k, v in row["sums"].items()}, row["window"], row["seen"],
                              row["lr"])
        saved = ckpt["config"].get("solver", {})
        changed = [k for k, v in self.cfg.solver.model_dump(mode="json").items() if k != "epochs" and saved.get(k) != v]
        if changed:
            self._say(f"note: solver settings {changed} differ from the checkpoint; the optimizer and LR schedule "
                      "continue from the checkpoint's state (start a new run to change them)")
        self._say(f"resuming {self.run_dir} at {self._position()}")

    def _position_value(self):
        if self.schedule.x_key == "iteration":
            return self.stage_iteration
        return _units(self.stage_iteration, self.data.steps_per_epoch)

    def _position(self) -> str:
        return f"{self.stages[self.stage_index].name} {self.schedule.x_key} {self._position_value()}"

    # ------------------------------------------------------------------ run
    def fit(self) -> RunResult:
        log, start = None, time.perf_counter()
        self.probe = None  # the architecture probe's networks are not needed any more
        try:
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                for path in remove_stale_temporaries(self.run_dir):
                    self._say(f"removed {path.name}, left by a checkpoint write that was interrupted")
                if self._start_note:
                    self._say(self._start_note)
                if self.teacher_plan.warning:
                    self._say(self.teacher_plan.warning)
            self._build()
            cfg = self.cfg
            if self.dist.is_main:
                save_config(cfg, self.run_dir / "config.yaml")
                log = MetricsLog(self.run_dir, self.history, x_key=self.schedule.x_key, scores=self.task.curve_scores,
                                 score_axis=self.task.score_axis)
            n_params = count_parameters(self.recipe.deployable())
            self._say(f"{cfg.name}: {cfg.model.name} ({n_params / 1e6:.2f}M parameters), method {cfg.method.name}, "
                      f"{self.data.num_train} training samples, device {self.device}, precision {self.precision}, "
                      f"{self.dist.world_size} process(es), {self._plan_text()}")
            for note in self.recipe.notes(self._epochs()):
                self._say(note)
            teacher = self.recipe.frozen_teacher()
            if teacher is not None and self.teacher_metrics is None:
                self.teacher_metrics = self.task.evaluate(teacher, self.data, self.device, self.precision, self._bars())
                self._say(f"teacher {cfg.teacher.name}: {self.task.describe(self.teacher_metrics)}")
            start = time.perf_counter()
            while self.stage_index < len(self.stages):
                if not self._run_stage(log):
                    break  # stopped early (stop_after)
                self.stage_index, self.stage_iteration = self.stage_index + 1, 0
            else:
                self._final_test()
        except KeyboardInterrupt:
            last = self.run_dir / "last.pt"
            raise Interrupted(
                f"interrupted; {last} (at {_describe_checkpoint(last)}) is kept: continue with --resume"
                if last.is_file() else "interrupted before the first checkpoint: nothing was saved"
            ) from None
        finally:
            if log is not None:
                log.close()
        collectives.barrier()  # every rank leaves with the files written (e.g. a teacher's best.pt)
        self.stage_index = min(self.stage_index, len(self.stages) - 1)
        return RunResult(self.run_dir, self.score_key, self.best_score, self.metrics, self.teacher_metrics,
                         count_parameters(self.recipe.deployable()), time.perf_counter() - start, self.history,
                         self.test_metrics, self.selected_test_metrics)

    def _final_test(self) -> None:
        """With a validation split: the test set, once, for the final and the selected model."""
        if self.split == "test" or self.test_metrics is not None:
            return
        self.stage_index = len(self.stages) - 1
        evaluate = lambda model: self.task.evaluate(model, self.data, self.device, self.precision)  # noqa: E731
        self.test_metrics = evaluate(self.eval_model)
        collectives.barrier()  # best.pt is written by rank 0
        selected = copy.deepcopy(self.recipe.deployable())
        selected.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["student"])
        self.selected_test_metrics = evaluate(selected)
        self._say(f"test set (evaluated once, at the end): final model {self.task.describe(self.test_metrics)}; "
                  f"selected on the validation split (best.pt) {self.task.describe(self.selected_test_metrics)}")
        self._save(is_best=False, done=True)

    def _epochs(self) -> Optional[float]:
        return self.schedule.length if self.schedule.x_key == "epoch" else None

    def _plan_text(self) -> str:
        parts = [f"{s.name}: {self._stage_length(s)} iterations" for s in self.stages]
        return ", ".join(parts)

    def _bars(self) -> bool:
        return self.progress and self.dist.is_main

    def _run_stage(self, log: Optional[MetricsLog]) -> bool:
        """Iterations of the current stage from ``stage_iteration``; False when stopped early."""
        stage = self.stages[self.stage_index]
        main = self.stage_index == len(self.stages) - 1
        total, spe, sched = self._stage_length(stage), self.data.steps_per_epoch, self.schedule
        if self.stage_iteration >= total:
            return True
        groups = [self.optimisers[g.name] for g in self.recipe.groups(stage)]
        # earlier stages draw their batches from other seeds than the main stage's epochs
        stream = self.data.train_batches(self.stage_iteration, len(self.stages) - 1 - self.stage_index)
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        stop = total
        if self.stop_after is not None and main:
            stop = min(total, self.stop_after * sched.unit)
        log_period = sched.log_period if main else spe
        checkpoint_period = sched.checkpoint_period if main else spe
        eval_period = sched.eval_period if (main and stage.evaluated) else 0
        sync_every = max(1, min(50, log_period // 4 or 1))
        step_checkpoints = self.cfg.runtime.checkpoint_every if main else None

        self.recipe.train()
        self.recipe.enter_stage(stage)
        bar = tqdm(total=total, initial=self.stage_iteration, desc=f"{self.cfg.name} {stage.name}", leave=False,
                   dynamic_ncols=True, disable=None if self._bars() else True)
        # a row's running sums, restored when a checkpoint was written in the middle of it
        lr = groups[0].optimizer.param_groups[0]["lr"]
        sums, window, seen, lr = self._open_row or ({}, 0, 0, lr)
        self._open_row = None
        window_start = last_line = time.perf_counter()
        lines = bar.disable and self.cfg.runtime.log_every_seconds > 0  # no bar: progress lines instead
        try:
            while self.stage_iteration < stop:
                it = self.stage_iteration
                batch = next(stream)
                # epoch-based recipes see whole epochs (as the released scripts), iteration-based ones fractions
                epoch = float(it // spe) if sched.x_key == "epoch" else it / spe
                with autocast(self.device, self.precision):
                    out = self.step_fn(batch, stage, epoch)
                step_groups(groups, out.losses, self.scaler, self.cfg.solver.clip_grad_norm, out.idle)
                self.recipe.after_step(stage)
                self.stage_iteration = it = it + 1
                bar.update(1)
                self._accumulate(sums, out, batch)
                window += 1
                seen += len(batch)
                if window % sync_every == 0 or it % log_period == 0 or it == stop:
                    # the loop's only host sync: progress display and the non-finite check
                    total_loss = sums["loss_total"].item() / window
                    if not math.isfinite(total_loss):
                        self._non_finite(total_loss, stage, it, total)
                    rate = seen * self.dist.world_size / (time.perf_counter() - window_start)
                    bar.set_postfix({"loss": f"{total_loss:.3f}", "samples/s": f"{rate:.0f}"})
                    if lines and time.perf_counter() - last_line >= self.cfg.runtime.log_every_seconds:
                        self._say(self._progress_line(stage, it, total, sums, window, rate))
                        last_line = time.perf_counter()
                end_of_row = it % log_period == 0 or it == stop
                evaluate = stage.evaluated and main and ((eval_period and it % eval_period == 0) or it == total)
                save = it % checkpoint_period == 0 or it == total or it == stop
                if not (end_of_row or save or evaluate):
                    if step_checkpoints and it % step_checkpoints == 0:
                        self._open_row = (sums, window, seen, lr)
                        self._save(is_best=False)
                        self._open_row = None
                    continue
                row = self._row(stage, it, lr, sums, window, seen, time.perf_counter() - window_start)
                is_best = False
                if evaluate:
                    eval_start = time.perf_counter()
                    collectives.broadcast_state_dicts(self.recipe.trained_state())
                    self.metrics = self.task.evaluate(self.eval_model, self.data, self.device, self.precision,
                                                      self._bars(), split=self.split)
                    self.metrics.update(self.recipe.extra_metrics(
                        lambda m: self.task.evaluate(m, self.data, self.device, self.precision, split=self.split)))
                    row.update(self.metrics)
                    row["eval_seconds"] = time.perf_counter() - eval_start
                    score = self.metrics[self.score_key]
                    is_best = self.task.better(score, self.best_score)
                    if is_best:
                        self.best_score = score
                if stage.logged:
                    self.history.append(row)
                    if log is not None:
                        log.add(row)
                self._say(self._row_text(stage, row, total))
                if save or is_best:
                    self._save(is_best, done=main and it == total)
                sums, window, seen, window_start = {}, 0, 0, time.perf_counter()
                lr = groups[0].optimizer.param_groups[0]["lr"]
        finally:
            bar.close()
        return self.stage_iteration >= total

    def _progress_line(self, stage: Stage, it: int, total: int, sums: dict, window: int, rate: float) -> str:
        """A line for logs without a progress bar: position, mean loss terms of the row so far, speed."""
        keys = [k for k in sums if k.startswith("loss_")]
        values = dict(zip(keys, (torch.stack([sums[k] for k in keys]) / max(window, 1)).tolist()))
        terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items() if k != "loss_total")
        return (f"{stage.name} iteration {it}/{total} ({100.0 * it / total:.0f}%): loss {values['loss_total']:.4f}"
                f"{f' ({terms})' if terms else ''}, {rate:.0f} samples/s")

    def _accumulate(self, sums: dict, out, batch) -> None:
        several = len(out.losses) > 1
        total = 0.0
        for group, terms in out.losses.items():
            for name, value in terms.items():
                key = f"loss_{group}_{name}" if several else f"loss_{name}"
                value = value.detach().float()
                sums[key] = sums.get(key, 0.0) + value
                total = total + value
        sums["loss_total"] = sums.get("loss_total", 0.0) + total
        for name, value in self.task.train_stats(out.outputs, batch).items():
            sums[f"stat_{name}"] = sums.get(f"stat_{name}", 0.0) + value.detach().float()

    def _row(self, stage: Stage, it: int, lr: float, sums: dict, window: int, seen: int, seconds: float) -> dict:
        keys = sorted(sums)
        stats = collectives.sum_over_ranks(torch.stack([sums[k] for k in keys] + [torch.tensor(
            float(seen), device=self.device)]).double())
        values = dict(zip(keys, stats[:-1].tolist()))
        count = stats[-1].item()
        world = self.dist.world_size
        spe = self.data.steps_per_epoch
        if self.schedule.x_key == "iteration":
            row = {"iteration": it, "epoch": round(it / spe, 3)}
        else:
            row = {"epoch": _units(it, spe), "iteration": it}
        row["lr"] = lr
        row.update({k: v / (window * world) for k, v in values.items() if k.startswith("loss_")})
        row.update(self.task.train_metrics({k[5:]: v for k, v in values.items() if k.startswith("stat_")}, int(count)))
        row["seconds"] = seconds
        return row

    def _row_text(self, stage: Stage, row: dict, total: int) -> str:
        x = self.schedule.x_key
        where = (f"iteration {row['iteration']}/{total}" if x == "iteration"
                 else f"{'epoch' if stage.logged else stage.name + ' epoch'} {row['epoch']}/{_units(total, self.data.steps_per_epoch)}")
        parts = [f"{where}: loss {row['loss_total']:.4f}"]
        if self.task.describe_train(row):
            parts.append(self.task.describe_train(row))
        if self.score_key in row:
            best = "-" if self.best_score is None else f"{self.best_score:.2f}"
            parts.append(self.task.describe(row, self.split) + f" (best {best})")
        parts.append(f"{row['seconds']:.1f}s")
        return ", ".join(parts)

    def _non_finite(self, value: float, stage: Stage, it: int, total: int) -> None:
        last = self.run_dir / "last.pt"
        saved = f"The last good checkpoint is {last}" if last.is_file() else "No checkpoint was written yet"
        hint = "lower solver.lr" + (", or try runtime.precision=fp32" if self.precision != "fp32" else "")
        spe = self.data.steps_per_epoch
        if self.schedule.x_key == "iteration":
            where = f"at iteration {it}"
        else:
            epoch = (it - 1) // spe + 1
            where = f"in {'' if stage.logged else stage.name + ' '}epoch {epoch}/{_units(total, spe)} (step {it - (epoch - 1) * spe})"
        raise TrainingError(f"loss became {value} {where}; stopped. {saved}: {hint}")


def step_groups(groups: list[GroupOptimiser], losses: dict[str, dict[str, torch.Tensor]], scaler,
                default_clip: Optional[float] = None, idle: tuple[str, ...] = ()) -> None:
    """The step rule: in the recipe's order, zero a group's gradients and run the backward pass of
    its losses (keeping the graph for the groups after it); average the gradients over the ranks;
    then clip and step every group. A group therefore receives the gradients of its own losses
    and of later groups' losses that reach it, and none of earlier groups' losses. Groups in
    ``idle`` sit the step out (no zeroing, backward or step; their schedules still advance)."""
    all_groups, groups = groups, [o for o in groups if o.group.name not in idle]
    for i, o in enumerate(groups):
        o.optimizer.zero_grad(set_to_none=True)
        loss = sum(losses[o.group.name].values())
        if torch.is_tensor(loss) and loss.requires_grad:
            scaler.scale(loss).backward(retain_graph=i + 1 < len(groups))
    collectives.average_gradients(p for o in groups for p in o.params)  # consumed only with several ranks
    for o in groups:
        clip = o.group.clip if o.group.clip is not None else default_clip
        if clip is not None:
            scaler.unscale_(o.optimizer)
            nn.utils.clip_grad_norm_(o.params, clip)
        scaler.step(o.optimizer)
    scaler.update()
    for o in groups:
        o.scheduler.step()
    for o in all_groups:
        if o not in groups:  # an idle group's schedule follows the iteration although it did not step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                o.scheduler.step()


def _convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm in place of BatchNorm. timm's BatchNormAct2d carries its activation, which
    PyTorch's converter would drop: timm's own converter keeps it."""
    if type(model).__module__.startswith("timm.") or any(type(m).__module__.startswith("timm.layers")
                                                          for m in model.modules()):
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _units(iteration: int, unit: int):
    return iteration // unit if iteration % unit == 0 else round(iteration / unit, 3)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _probe_context(cfg: Config, num_outputs: int):
    """A stand-in run context for the architecture probe (no data read yet)."""
    n = max(2 * num_outputs, 2)
    return RunContext(num_samples=n, train_targets=torch.arange(n) % max(num_outputs, 2), num_classes=num_outputs,
                      probe=True)


def _describe_checkpoint(path: Path) -> str:
    try:
        ckpt = load_checkpoint(path)
    except Exception:
        return "an unreadable state"
    return f"{ckpt['stage_name']} {ckpt['unit']} {ckpt['position']}"
