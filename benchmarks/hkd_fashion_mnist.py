"""HKD and HKD+KD against KD and CRD on Fashion-MNIST (resnet20 teacher -> resnet8 student).

Trains the resnet20 teacher of configs/fashion_mnist once, then a resnet8 student with each method
(configs/fashion_mnist/resnet20_resnet8/{kd,crd,hkd,hkd_kd}.yaml) for every seed, with the same
teacher, data subset and epochs, and writes benchmarks/results/hkd_fashion_mnist.{md,csv,png}: top-1
as mean +- std over the seeds, and seconds per training epoch (training only, no evaluation).

Usage: python benchmarks/hkd_fashion_mnist.py [--subset 10000] [--epochs 3] [--teacher-epochs 5]
       [--seeds 0 1 2] [--runs runs/bench_hkd] [--out DIR] [key=value overrides for every run]
Runs are named after their subset, epochs and seed: finished ones are reused (a second call only
rewrites the tables), interrupted ones resume.
"""
from __future__ import annotations

import csv
from pathlib import Path

from reviewkd.config import load_config
from reviewkd.engine.loop import Run
from reviewkd.models.summary import format_table
from common import machine_line, mean_std, seeded_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
METHODS = {"kd": "kd", "crd": "crd", "hkd": "hkd", "hkd+kd": "hkd_kd"}  # label -> recipe file stem
STEM = "hkd_fashion_mnist"


def train(file: Path, overrides: list[str]):
    cfg = load_config(file, overrides)
    return Run(cfg, resume=(cfg.run_dir / "last.pt").is_file(), progress=False).fit()



def summarise(runs: list[dict], seeds: list[int]) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        top1, best = mean_std([r["top1"] for r in mine]), mean_std([r["best_top1"] for r in mine])
        epoch_s = mean_std([r["s_per_epoch"] for r in mine])
        pm = len(seeds) > 1
        rows.append({"method": method, "top1": f"{top1[0]:.2f}" + (f" ± {top1[1]:.2f}" if pm else ""),
                     "best_top1": f"{best[0]:.2f}" + (f" ± {best[1]:.2f}" if pm else ""),
                     "s_per_epoch": f"{epoch_s[0]:.1f}", "top1_mean": top1[0], "top1_std": top1[1],
                     "s_per_epoch_mean": epoch_s[0], "s_per_epoch_std": epoch_s[1]})
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(9, 3.6))
    acc.bar(names, [r["top1_mean"] for r in rows], yerr=[r["top1_std"] for r in rows], capsize=4, color="#4c72b0")
    low = min(r["top1_mean"] - r["top1_std"] for r in rows)
    acc.set_ylim(max(0.0, low - 2), None)
    acc.set_ylabel("test top-1 (%)")
    acc.set_title("accuracy (mean ± std over seeds)")
    speed.bar(names, [r["s_per_epoch_mean"] for r in rows], yerr=[r["s_per_epoch_std"] for r in rows], capsize=4,
              color="#dd8452")
    speed.set_ylabel("seconds per training epoch")
    speed.set_title("cost")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = seeded_parser(__doc__, "runs/bench_hkd")
    p.add_argument("--teacher-epochs", type=int, default=5)
    args = p.parse_args()
    machine = machine_line(args.overrides)
    print(machine)

    common = [f"output_dir={args.runs}", f"data.subset={args.subset}", *args.overrides]
    teacher_cfg = load_config(CONFIGS / "teacher_resnet20.yaml",
                              common + [f"solver.epochs={args.teacher_epochs}",
                                        f"name=teacher_n{args.subset}_e{args.teacher_epochs}"])
    if not (teacher_cfg.run_dir / "best.pt").is_file():
        Run(teacher_cfg, resume=(teacher_cfg.run_dir / "last.pt").is_file(), progress=False).fit()
    teacher = teacher_cfg.run_dir / "best.pt"

    runs = []
    for seed in args.seeds:
        for method, stem in METHODS.items():
            overrides = common + [f"solver.epochs={args.epochs}", f"seed={seed}",
                                  f"name={stem}_n{args.subset}_e{args.epochs}_s{seed}",
                                  f"teacher.checkpoint={teacher}"]
            result = train(CONFIGS / "resnet20_resnet8" / f"{stem}.yaml", overrides)
            seconds = [r["seconds"] for r in result.history]
            runs.append({"method": method, "seed": seed, "top1": result.metrics["test_top1"],
                         "best_top1": result.best_score, "s_per_epoch": sum(seconds) / max(len(seconds), 1)})
            print(f"{method:7s} seed {seed}: top-1 {runs[-1]['top1']:.2f}, {runs[-1]['s_per_epoch']:.1f} s/epoch")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{STEM}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "top1", "best_top1", "s_per_epoch"])
        writer.writeheader()
        writer.writerows(runs)
    rows = summarise(runs, args.seeds)
    header = (f"resnet20 teacher ({args.teacher_epochs} epochs) -> resnet8 student, Fashion-MNIST "
              f"{args.subset} train / {args.subset} test images, {args.epochs} epochs, "
              f"seeds {', '.join(map(str, args.seeds))}; {machine}")
    table = format_table(rows, ["method", "top1", "best_top1", "s_per_epoch"])
    print(header + "\n" + table)
    (out / f"{STEM}.md").write_text(f"{header}\n\n```\n{table}\n```\n")
    plot(rows, header, out / f"{STEM}.png")


if __name__ == "__main__":
    main()
