"""Per-epoch metrics: metrics.csv, TensorBoard scalars and a curves.png a person can read."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Keeps the history of epoch rows (restored on resume) and rewrites the files from it."""

    def __init__(self, run_dir: Path, history: list[dict] | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
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
            step = row["epoch"]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key.replace("_", "/", 1), value, step)
            self._writer.flush()
        self.write_csv()
        plot_curves({"": self.history}, self.run_dir / "curves.png")

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


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str | None = None) -> None:
    """Loss terms (left) and test accuracy (right) over epochs, one line style per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in runs.items():
        if not history:
            continue
        epochs = [r["epoch"] for r in history]
        prefix = f"{label}: " if label else ""
        for key in [k for k in history[-1] if k.startswith("loss_")]:
            ax_loss.plot(epochs, [r.get(key, float("nan")) for r in history], label=prefix + key[5:])
        if "test_top1" in history[-1]:
            ax_acc.plot(epochs, [r.get("test_top1", float("nan")) for r in history], marker="o", ms=3,
                        label=prefix + "test top-1")
    ax_loss.set(xlabel="epoch", ylabel="training loss (weighted terms)", title="losses")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
