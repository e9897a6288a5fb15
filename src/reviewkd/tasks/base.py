"""What a task is: its data, the student's own loss, evaluation (and the score that picks
``best.pt``), and the pieces of export. The loop and the recipes know tasks only through this."""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..batch import Batch
from ..engine.schedule import RunSchedule  # noqa: F401  (tasks return it)
from ..methods import RunContext


@dataclass
class TaskData:
    """A task's data for one run. ``train_batches(start, earlier)`` yields endless training batches
    from iteration ``start`` of a stage; ``earlier`` counts the stages between it and the main
    (last) one, whose passes are seeded by their epoch e; the stage just before it draws its batches
    from the negative epochs -1 - e, earlier ones from further below."""

    train: Any
    test: Any
    steps_per_epoch: int
    input_size: tuple[int, ...]
    num_outputs: int
    context: RunContext
    meta: dict = field(default_factory=dict)  # saved in checkpoints: what rebuilding the model needs
    num_train: int = 0
    val: Any = None  # held-out part of the training set for model selection (None: select on the test set)

    @property
    def selection_split(self) -> str:
        return "test" if self.val is None else "val"

    def train_batches(self, start: int, earlier: int = 0) -> Iterator[Batch]:
        """Must not draw from the global RNG after it returns, except as the uninterrupted run
        would (the loop restores the RNG state of a resumed run right after this call)."""
        return self._passes(start, earlier)

    def _passes(self, start: int, earlier: int) -> Iterator[Batch]:
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            self.train.set_epoch(epoch if earlier == 0 else -1 - epoch - 1_000_000 * (earlier - 1))
            for i, batch in enumerate(self.train):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0


# PyTorch announces TorchScript's deprecation on every call; exporting or loading that format is a
# deliberate choice, so only these notices are silenced, nothing else.
TORCHSCRIPT_NOTICE = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def quiet_torchscript():
    """Drops TorchScript's deprecation notices (and nothing else) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_NOTICE, category=FutureWarning)
        yield


class Task:
    """Base of the tasks; see classification.py for the reference implementation."""

    name: str = ""
    score_key: str = ""  # the metric that picks best.pt
    score_label: str = ""  # how a person reads it ("top-1", "box AP", "MAE")
    higher_is_better: bool = True
    curve_scores: dict[str, str] = {}  # metrics plotted on the right of curves.png
    score_axis: Optional[str] = None
    schedule_unit: str = "epoch"  # what the run's length counts (epoch | iteration)

    # ---------------------------------------------------------------- cheap
    def check_config(self, cfg) -> None:
        """Refuse settings this task would silently ignore (before anything expensive)."""

    def num_outputs(self, cfg) -> int:
        """Classes (or outputs) of the model, known without reading the data."""
        raise NotImplementedError

    def probe_size(self, cfg) -> tuple[int, ...]:
        raise NotImplementedError

    def build_model(self, name: str, cfg, num_outputs: int) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, model: nn.Module, path) -> nn.Module:
        """Initial weights of the student from a file (``model.weights``), checked strictly."""
        from ..models import load_weights

        return load_weights(model, path)

    def build_teacher(self, name: str, cfg, num_outputs: int, weights) -> nn.Module:
        """The frozen teacher network with ``weights`` (a path or a state dict) loaded."""
        raise NotImplementedError

    def build_recipe(self, cfg, student: nn.Module, teacher: nn.Module | None, input_size, context):
        raise NotImplementedError

    def schedule(self, cfg, steps_per_epoch: int) -> RunSchedule:
        raise NotImplementedError

    # ------------------------------------------------------------ expensive
    def build_data(self, cfg, device: torch.device, rank: int = 0, world_size: int = 1) -> TaskData:
        raise NotImplementedError

    def train_stats(self, outputs: torch.Tensor | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the batch that make training metrics (no host sync); see ``train_metrics``."""
        return {}

    def train_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {}

    def evaluate(self, model: nn.Module, data: TaskData, device, precision: str, progress: bool = False,
                 split: str = "test") -> dict[str, float]:
        """Metrics on ``split`` ("test", or "val" where the data hold a validation split), named
        ``{split}_...``."""
        raise NotImplementedError

    def score_key_for(self, split: str) -> str:
        return self.score_key.replace("test_", f"{split}_", 1)

    def build_eval_data(self, cfg, device) -> TaskData:
        """What evaluating a checkpoint needs (by default the run's data)."""
        return self.build_data(cfg, device)

    def describe_train(self, row: dict) -> str:
        """The training metrics of a history row, as a person reads them ("" when there are none)."""
        return ""

    def describe(self, metrics: dict[str, float], split: str = "test") -> str:
        """One line of the metrics a person wants to see."""
        return f"{self.score_label} {metrics[self.score_key_for(split)]:.2f}"

    def better(self, score: float, best: Optional[float]) -> bool:
        if best is None or not math.isfinite(best):
            return math.isfinite(score)
        return score > best if self.higher_is_better else score < best

    # ---------------------------------------------------------------- export
    export_formats: tuple[str, ...] = ("pt", "safetensors", "torchscript", "pt2", "onnx")
    # formats this task cannot write, with the one-line reason given to whoever asks for them
    unavailable_export_formats: dict[str, str] = {}
    # axes of the input tensor that pt2 / ONNX exports keep dynamic where the model allows
    dynamic_axes: dict[int, str] = {0: "batch", 2: "height", 3: "width"}

    def rebuild(self, meta: dict, cfg, export: bool = True) -> nn.Module:
        """The bare deployable network of a checkpoint, without weights, in eval mode."""
        raise NotImplementedError

    def sample_inputs(self, meta: dict, cfg):
        raise NotImplementedError

    def other_sample_inputs(self, inputs: torch.Tensor, dynamic: dict[str, bool]) -> list[torch.Tensor]:
        """Inputs of another size along every dynamic axis (one image, 8 / 16 more rows / columns),
        on which an export claiming those axes is checked as well."""
        n, c, h, w = inputs.shape
        shape = (1 if dynamic.get("batch") else n, c, h + 8 if dynamic.get("height") else h,
                 w + 16 if dynamic.get("width") else w)
        return [torch.randn(shape, generator=torch.Generator().manual_seed(1))] if shape != tuple(inputs.shape) else []

    def preprocessing(self, model: nn.Module, meta: dict, cfg) -> Optional[dict]:
        """How images become the model's input, as evaluation did it (``data.preprocessing``); None
        where the data's preprocessing is not known."""
        from ..data.preprocessing import eval_preprocessing

        return eval_preprocessing(cfg)

    def to_torchscript(self, model: nn.Module, inputs):
        # the export is compared with the model afterwards, so the tracer's warnings add nothing
        with torch.no_grad(), quiet_torchscript():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(model, inputs)

    def run_exported(self, model, inputs):
        return model(inputs)

    def output_difference(self, expected, got) -> float:
        return (torch.as_tensor(got).float() - expected.float()).abs().max().item()
