"""Teacher-free training on Fashion-MNIST: introspective learning against its comparisons.

Trains the resnet8 student of configs/fashion_mnist/resnet20_resnet8/ with each teacher-free recipe
(vanilla, label_smoothing, confidence_penalty, pskd, introspective) on the same data and schedule,
for several seeds, and writes benchmarks/results/teacher_free_fashion_mnist.{md,csv,png}: final and
best test top-1 as mean +- sample standard deviation over the seeds, and the training seconds per
epoch (evaluation excluded). Finished runs in --runs are reused, interrupted ones resumed.

Usage: python benchmarks/teacher_free_fashion_mnist.py [--subset 10000] [--epochs 3] [--seeds 0 1 2]
       [--methods vanilla introspective ...] [key=value overrides for every run, e.g. runtime.precision=fp32]
"""
from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reviewkd.catalogue import find_recipe  # noqa: E402
from reviewkd.config import load_config  # noqa: E402
from reviewkd.engine.loop import Run  # noqa: E402
from reviewkd.models.summary import format_table  # noqa: E402
from common import machine_line, mean_std, seeded_parser  # noqa: E402

METHODS = ["vanilla", "label_smoothing", "confidence_penalty", "pskd", "introspective"]
NAME = "teacher_free_fashion_mnist"


def train(method: str, seed: int, args) -> dict:
    name = f"tf_{method}_n{args.subset}_e{args.epochs}_s{seed}"
    overrides = [f"output_dir={args.runs}", f"data.subset={args.subset}", f"solver.epochs={args.epochs}",
                 f"seed={seed}", f"name={name}", *args.overrides]
    cfg = load_config(find_recipe(f"fashion_mnist/resnet20_resnet8/{method}"), overrides)
    result = Run(cfg, resume=(cfg.run_dir / "last.pt").is_file(), progress=False).fit()
    return {"method": method, "seed": seed, "top1": result.metrics["test_top1"], "best_top1": result.best_score,
            "epoch_s": sum(r["seconds"] for r in result.history) / args.epochs}



def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for key in ("top1", "best_top1", "epoch_s"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in mine])
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = [r["method"] for r in rows]
    acc.bar(names, [r["top1"] for r in rows], yerr=[r["top1_std"] for r in rows], capsize=4, color="tab:blue")
    low = min(r["top1"] - r["top1_std"] for r in rows)
    acc.set_ylim(max(0.0, low - 2.0), min(100.0, max(r["top1"] + r["top1_std"] for r in rows) + 1.0))
    acc.set_ylabel("test top-1 (%), mean ± std")
    cost.bar(names, [r["epoch_s"] for r in rows], yerr=[r["epoch_s_std"] for r in rows], capsize=4, color="tab:gray")
    cost.set_ylabel("training seconds per epoch")
    for ax in (acc, cost):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = seeded_parser(__doc__, "runs/bench_teacher_free")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = p.parse_args()

    machine = machine_line(args.overrides)
    print(machine)
    runs = [train(method, seed, args) for method in args.methods for seed in args.seeds]
    rows = summarise(runs, args.methods)

    header = (f"resnet8 on Fashion-MNIST without a teacher: {args.subset} train / {args.subset} test images, "
              f"{args.epochs} epochs (cosine), seeds {' '.join(map(str, args.seeds))}; {machine}"
              + (f"; overrides {' '.join(args.overrides)}" if args.overrides else ""))
    shown = [{"method": r["method"], "seeds": r["seeds"],
              **{key: f"{r[key]:.2f} ± {r[key + '_std']:.2f}" for key in ("top1", "best_top1", "epoch_s")}}
             for r in rows]
    table = format_table(shown, headers={"top1": "top-1 (%)", "best_top1": "best top-1 (%)", "epoch_s": "s / epoch"})
    per_run = format_table(runs, ["method", "seed", "top1", "best_top1", "epoch_s"], formats={"epoch_s": ".1f"})
    print(header + "\n" + table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "top1", "best_top1", "epoch_s"])
        writer.writeheader()
        writer.writerows(runs)
    (out / f"{NAME}.md").write_text(f"{header}\n\nMean ± sample standard deviation over the seeds:\n\n"
                                    f"```\n{table}\n```\n\nEach run:\n\n```\n{per_run}\n```\n")
    plot(rows, out / f"{NAME}.png", header)
    print(f"wrote {out / NAME}.md, .csv, .png")


if __name__ == "__main__":
    main()
