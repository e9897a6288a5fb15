"""Per-epoch metrics: metrics.csv, TensorBoard scalars and a curves.png a person can read."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Keeps the history of epoch rows (restored on resume) and rewrites the files from it."""

    def __init__(self, run_dir: Path, history: list[dict] | None = None, tensorboard: bool = True,
                 x_key: str = "epoch", scores: dict[str, str] | None = None, score_axis: str | None = None):
        # x_key: the row key that counts progress (epoch; iteration for detection); scores / score_axis:
        # the evaluation columns of the right-hand panel of curves.png (see plot_curves).
        self.run_dir = Path(run_dir)
        self.x_key, self.scores, self.score_axis = x_key, scores, score_axis
        self.history: list[dict] = list(history or [])
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._writer = None

    def add(self, row: dict) -> None:
        self.history.append(row)
        if self._writer is not None:
            step = row[self.x_key]
            for key, value in row.items():
                if key != self.x_key and isinstance(value, (int, float)):
                    self._writer.add_scalar(key.replace("_", "/", 1), value, step)
            self._writer.flush()
        self.write_csv()
        plot_curves({"": self.history}, self.run_dir / "curves.png", x_key=self.x_key, scores=self.scores,
                    score_axis=self.score_axis)

    def write_csv(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str | None = None, *, x_key: str = "epoch",
                scores: dict[str, str] | None = None, score_axis: str | None = None) -> None:
    """Loss terms (left) and evaluation scores (right) over ``x_key``, one line style per run.

    ``scores`` maps row keys to legend labels (default: test top-1); rows without a score (e.g.
    logged between evaluations) are skipped on the right.
    """
    scores = scores or {"test_top1": "test top-1"}
    several = len(runs) > 1  # then: one colour per run, one line style per loss term
    styles = ("-", "--", ":", "-.")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, history) in enumerate(runs.items()):
        if not history:
            continue
        xs = [r[x_key] for r in history]
        prefix = f"{label}: " if label else ""
        terms = sorted((k for k in history[-1] if k.startswith("loss_")), key=lambda k: k != "loss_total")
        for j, key in enumerate(terms):
            style = {"color": f"C{i}", "linestyle": styles[j % len(styles)]} if several else {}
            ax_loss.plot(xs, [r.get(key, float("nan")) for r in history], label=prefix + key[5:], **style)
        for key, name in scores.items():
            points = [(r[x_key], r[key]) for r in history if r.get(key) is not None]
            if points:
                ax_acc.plot(*zip(*points), marker="o", ms=3, label=prefix + name, **({"color": f"C{i}"} if several else {}))
    ax_loss.set(xlabel=x_key, ylabel="training loss (weighted terms)", title="losses")
    ax_acc.set(xlabel=x_key, ylabel=score_axis or "top-1 accuracy (%)", title="evaluation" if score_axis else "test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
