"""cGAN-KD on the embedded data: NOKD vs cGAN-KD vs KD vs cGAN-KD + KD (Fashion-MNIST, scarce and full
labels) and NOKD vs cGAN-KD MAE (rotated Fashion-MNIST), with the sampler's acceptance rate, the fraction
the filter keeps and the stage times.

Per setting and seed, the recipe's pipeline (configs/cgankd/*.yaml, student with CE) gives NOKD (its
nokd stage) and cGAN-KD (its student); "real only" is the student stage (same start, schedule and
epochs) on the real data alone, the control for the student's extra training; KD is the same student
trained on the real data with KD from the same teacher and budget as NOKD; cGAN-KD + KD is the student
stage again with KD on the same mixed data.
Writes benchmarks/results/cgankd_fashion_mnist.{md,csv,png}.

Usage: python benchmarks/cgankd_fashion_mnist.py [--quick] [--settings scarce full rotated] [--seeds 0 1 2]
       [--runs runs/bench_cgankd] [--out DIR] [key=value overrides for every pipeline]
--quick uses the recipes' tiny settings (a smoke test, minutes); without it each pipeline is the recipe's
size (scarce: about 25 minutes on 2 cores, so 3 seeds of all three settings take hours; give fewer seeds or
settings, or scale down with overrides, e.g. cgankd.gan.solver.epochs=20). Finished stages are reused.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from reviewkd.cgankd.pipeline import Pipeline
from reviewkd.config import load_config, validate
from reviewkd.engine.loop import Run
from reviewkd.models.summary import format_table
from common import RESULTS, machine_line, mean_std  # noqa: E402

STEM = "cgankd_fashion_mnist"
SETTINGS = {"scarce": "cgankd/fashion_mnist_scarce", "full": "cgankd/fashion_mnist_full",
            "rotated": "cgankd/rotated_fashion_mnist"}
KD = {"name": "kd", "ce_weight": 0.1, "options": {"weight": 0.9, "temperature": 4.0}}  # the released -r 0.1 -a 0.9


def _fit(cfg):
    result = Run(cfg, resume=(cfg.run_dir / "last.pt").is_file(), progress=False).fit()
    return result.metrics[result.score_key]


def one(setting: str, seed: int, runs: Path, quick: bool, overrides: list[str]) -> dict:
    cfg = load_config(SETTINGS[setting], [f"output_dir={runs / setting}", f"seed={seed}",
                                          f"name={setting}_seed{seed}", *overrides])
    pipeline = Pipeline(cfg, quick=quick, progress=False)
    summary = pipeline.run()
    stages = summary["stages"]
    row = {"setting": setting, "seed": seed, "nokd": stages["nokd"]["metrics"][stages["nokd"]["score_key"]],
           "cgankd": stages["student"]["metrics"][stages["student"]["score_key"]],
           "acceptance_rate": stages["sample"]["acceptance_rate"], "fraction_kept": stages["filter"]["fraction_kept"],
           "stage_seconds": {k: v["seconds"] for k, v in stages.items()}}
    # the control for the student's extra training: the same stage (start, schedule, epochs) on the real data alone
    control = pipeline.student_config().model_dump(mode="json")
    control.update(name="student_real_only")
    control["data"].update(generated=None, mean=None, std=None)
    row["real_only"] = _fit(validate(control, "student stage on real data only"))
    if pipeline.classification:
        data = pipeline.plan[0].config.model_dump(mode="json")  # the NOKD run: same student, data and budget
        data.update(name="kd", method=KD,
                    teacher={"name": cfg.teacher.name, "checkpoint": str(pipeline._teacher_plan().checkpoint)})
        row["kd"] = _fit(validate(data, "kd baseline"))
        student = pipeline.student_config().model_dump(mode="json")
        student.update(name="student_kd", method=data["method"], teacher=data["teacher"])
        row["cgankd_kd"] = _fit(validate(student, "cGAN-KD + KD"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/bench_cgankd")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    rows = [one(s, seed, runs, args.quick, args.overrides) for s in args.settings for seed in args.seeds]
    table = []
    for setting in args.settings:
        mine = [r for r in rows if r["setting"] == setting]
        line = {"setting": setting}
        for key in ("nokd", "real_only", "cgankd", "kd", "cgankd_kd", "acceptance_rate", "fraction_kept"):
            if key in mine[0]:
                m, s = mean_std([r[key] for r in mine])
                line[key] = f"{m:.3f}" + (f" ± {s:.3f}" if len(mine) > 1 else "")
        seconds = {k: mean_std([r["stage_seconds"].get(k, 0.0) for r in mine])[0] for k in mine[0]["stage_seconds"]}
        line["stage_seconds"] = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        table.append(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["setting", "nokd", "real_only", "cgankd", "kd", "cgankd_kd", "acceptance_rate", "fraction_kept",
               "stage_seconds"]
    text = format_table(table, columns)
    header = (f"# cGAN-KD on embedded data ({'quick settings' if args.quick else 'recipe settings'}; seeds "
              f"{args.seeds}); classification: top-1 %, rotated: MAE in degrees\n\n{machine_line(args.overrides)}")
    (out / f"{STEM}.md").write_text(f"{header}\n\n```\n{text}\n```\n")
    with open(out / f"{STEM}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["setting", "seed", "nokd", "real_only", "cgankd", "kd", "cgankd_kd",
                                               "acceptance_rate", "fraction_kept", "stage_seconds"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "stage_seconds": json.dumps(r["stage_seconds"])})
    plot(table, rows, out / f"{STEM}.png")
    print(header + "\n\n" + text)


def plot(table: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [t["setting"] for t in table]
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        mine = [r for r in rows if r["setting"] == setting]
        keys = [k for k in ("nokd", "real_only", "cgankd", "kd", "cgankd_kd") if k in mine[0]]
        means = [mean_std([r[k] for r in mine]) for k in keys]
        ax.bar(keys, [m for m, _ in means], yerr=[s for _, s in means], capsize=3)
        ax.set_title(setting)
        ax.set_ylabel("MAE (degrees)" if setting == "rotated" else "top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
