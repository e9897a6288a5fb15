"""Every distillation method on one Fashion-MNIST pair for a fixed small budget.

Trains the resnet20 teacher of configs/fashion_mnist once, then a resnet8 student with each method
(configs/fashion_mnist/resnet20_resnet8/<method>.yaml) for the same epochs, data and seed, and
writes a table (top-1, time per training step) to benchmarks/results/methods_fashion_mnist.{md,csv}.

Usage: python benchmarks/methods_fashion_mnist.py [--subset 10000] [--epochs 3] [--methods kd at ...]
Methods with a pre-training stage (ab, ft, fsp) get one pre-training epoch here instead of 30.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from reviewkd.config import load_config
from reviewkd.engine.loop import Run
from reviewkd.methods import list_methods, method_class, method_options
from reviewkd.models.summary import format_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", type=int, default=10000, help="training (and test) images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--runs", default="runs/bench_methods")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    common = [f"output_dir={args.runs}", f"data.subset={args.subset}"]
    teacher = load_config(CONFIGS / "teacher_resnet20.yaml", common + [f"solver.epochs={args.teacher_epochs}"])
    if not (teacher.run_dir / "best.pt").is_file():
        Run(teacher, resume=(teacher.run_dir / "last.pt").is_file()).fit()

    rows = []
    for method in args.methods or list(list_methods()):
        file = CONFIGS / "resnet20_resnet8" / f"{method}.yaml"
        if not file.is_file():
            print(f"skipping {method}: no recipe {file}")
            continue
        overrides = common + [f"solver.epochs={args.epochs}", f"name=bench_{method}"]
        if method_class(method).reads.teacher:  # teacher-free recipes have no teacher section
            overrides.append(f"teacher.checkpoint={teacher.run_dir}/best.pt")
        if "pretrain_epochs" in method_options(method):
            overrides.append("method.options.pretrain_epochs=1")
        cfg = load_config(file, overrides)
        start = time.perf_counter()
        result = Run(cfg, resume=(cfg.run_dir / "last.pt").is_file()).fit()
        steps = len(result.history) * (args.subset // cfg.data.batch_size)  # full batches per epoch
        train_seconds = sum(r["seconds"] for r in result.history)
        rows.append({"method": method, "top1": result.metrics["test_top1"], "best_top1": result.best_score,
                     "ms_per_step": 1000 * train_seconds / max(steps, 1), "wall_s": time.perf_counter() - start})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["method", "top1", "best_top1", "ms_per_step", "wall_s"]
    formats = {"ms_per_step": ".0f", "wall_s": ".0f"}
    header = (f"resnet20 teacher -> resnet8 student, Fashion-MNIST {args.subset} train / {args.subset} test "
              f"images, {args.epochs} epochs, seed 0")
    table = format_table(rows, columns, formats=formats)
    print(header + "\n" + table)
    with open(out / "methods_fashion_mnist.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "methods_fashion_mnist.md").write_text(f"{header}\n\n```\n{table}\n```\n")


if __name__ == "__main__":
    main()
