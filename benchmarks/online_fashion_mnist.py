"""Online distillation on Fashion-MNIST: FFSD's leader against DML and the same network trained alone.

For each seed, trains one architecture (default resnet8, the project's short-schedule student) three
ways on the same data, schedule and seed, from the recipes in configs/fashion_mnist/resnet20_resnet8/:
``vanilla`` (alone), ``dml`` (two networks learning from each other; the first is deployed) and
``ffsd`` (a leader taught by the fusion of two common students; the leader is deployed). Nothing
uses a teacher. Writes benchmarks/results/online_fashion_mnist.{md,csv,png}: the deployed network's
final and best test top-1 as mean +- sample standard deviation over the seeds, the training seconds
per epoch (evaluation excluded), and for DML / FFSD the mean of the common students, their logit
ensemble and (FFSD) the fusion module. Finished runs in --runs are reused, interrupted ones resumed.

Usage: python benchmarks/online_fashion_mnist.py [--subset 10000] [--epochs 3] [--seeds 0 1 2]
       [--model resnet8] [key=value overrides for every run, e.g. runtime.precision=fp32]
"""
from __future__ import annotations

import csv
import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from reviewkd.catalogue import find_recipe  # noqa: E402
from reviewkd.config import load_config  # noqa: E402
from reviewkd.engine.loop import Run  # noqa: E402
from reviewkd.models.summary import format_table  # noqa: E402
from common import machine_line, mean_std, seeded_parser  # noqa: E402

METHODS = ["vanilla", "dml", "ffsd"]
DEPLOYED = {"vanilla": "alone", "dml": "DML, first network", "ffsd": "FFSD, leader"}
EXTRA = ["peers_mean_top1", "ensemble_top1", "fusion_top1"]  # from the recipe's extra metrics
NAME = "online_fashion_mnist"


def train(method: str, seed: int, args) -> dict:
    name = f"online_{method}_{args.model}_n{args.subset}_e{args.epochs}_s{seed}"
    overrides = [f"output_dir={args.runs}", f"data.subset={args.subset}", f"solver.epochs={args.epochs}",
                 f"seed={seed}", f"name={name}", f"model.name={args.model}", *args.overrides]
    cfg = load_config(find_recipe(f"fashion_mnist/resnet20_resnet8/{method}"), overrides)
    result = Run(cfg, resume=(cfg.run_dir / "last.pt").is_file(), progress=False).fit()
    row = {"method": method, "seed": seed, "top1": result.metrics["test_top1"], "best_top1": result.best_score,
           "epoch_s": sum(r["seconds"] for r in result.history) / args.epochs,
           "curve": [r["test_top1"] for r in result.history if "test_top1" in r]}
    for key in EXTRA:
        row[key] = result.metrics.get(f"{key.removesuffix('_top1')}_test_top1")
    return row



def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for key in ("top1", "best_top1", "epoch_s", *EXTRA):
            values = [r[key] for r in mine if r[key] is not None]
            row[key], row[f"{key}_std"] = mean_std(values) if values else (None, None)
        row["curve"] = [statistics.fmean(epoch) for epoch in zip(*(r["curve"] for r in mine))]
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, (acc, curves, cost) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = [f"{r['method']}\n({DEPLOYED[r['method']]})" for r in rows]
    acc.bar(names, [r["top1"] for r in rows], yerr=[r["top1_std"] for r in rows], capsize=4, color="tab:blue")
    low = min(r["top1"] - r["top1_std"] for r in rows)
    acc.set_ylim(max(0.0, low - 2.0), min(100.0, max(r["top1"] + r["top1_std"] for r in rows) + 1.0))
    acc.set_ylabel("deployed network's test top-1 (%), mean ± std")
    for r in rows:
        curves.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["method"])
    curves.set_xlabel("epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_ylabel("test top-1 (%), mean over seeds")
    curves.legend()
    cost.bar(names, [r["epoch_s"] for r in rows], yerr=[r["epoch_s_std"] for r in rows], capsize=4, color="tab:gray")
    cost.set_ylabel("training seconds per epoch")
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = seeded_parser(__doc__, "runs/bench_online")
    p.add_argument("--model", default="resnet8", help="the architecture of every network")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = p.parse_args()

    machine = machine_line(args.overrides)
    print(machine)
    runs = [train(method, seed, args) for seed in args.seeds for method in args.methods]
    rows = summarise(runs, args.methods)

    header = (f"{args.model} on Fashion-MNIST, no teacher: {args.subset} train / {args.subset} test images, "
              f"{args.epochs} epochs (cosine), seeds {' '.join(map(str, args.seeds))}; {machine}"
              + (f"; overrides {' '.join(args.overrides)}" if args.overrides else ""))
    cell = lambda r, key: "-" if r[key] is None else f"{r[key]:.2f} ± {r[key + '_std']:.2f}"  # noqa: E731
    shown = [{"method": r["method"], "deployed": DEPLOYED[r["method"]], "seeds": r["seeds"],
              **{key: cell(r, key) for key in ("top1", "best_top1", "epoch_s", *EXTRA)}} for r in rows]
    table = format_table(shown, headers={"top1": "top-1 (%)", "best_top1": "best top-1 (%)", "epoch_s": "s / epoch",
                                         "peers_mean_top1": "students' mean", "ensemble_top1": "ensemble",
                                         "fusion_top1": "fusion"})
    columns = ["method", "seed", "top1", "best_top1", "epoch_s", *EXTRA]
    per_run = format_table(runs, columns, formats={"epoch_s": ".1f"})
    print(header + "\n" + table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    (out / f"{NAME}.md").write_text(
        f"{header}\n\nThe deployed network's test top-1, mean ± sample standard deviation over the seeds; for DML and "
        "FFSD also the common students' mean, their logit ensemble and FFSD's fusion module (not deployed):\n\n"
        f"```\n{table}\n```\n\nEach run:\n\n```\n{per_run}\n```\n")
    plot(rows, out / f"{NAME}.png", header)
    print(f"wrote {out / NAME}.md, .csv, .png")


if __name__ == "__main__":
    main()
