"""CCL against the video student alone, KD and FitNet from audio, on the embedded audio-visual set.

On av_fashion_mnist (clips of a moving Fashion-MNIST item with its class name spoken; a rate of the
clips carries another class's audio), for each mismatch rate: trains the audio teacher
(configs/av_fashion_mnist/audio_teacher.yaml) and the frame teacher (frame_teacher.yaml) once, then
the r2plus1d_10 video student with each method for every seed, at the same data, epochs and batch:
video alone (video_vanilla), KD from audio (kd_audio), FitNet from audio (fitnet_audio), CCL audio,
CCL image, CCL audio+image (ccl_*.yaml). Writes benchmarks/results/ccl_av_fashion_mnist.{md,csv,png}:
per-video test top-1 as mean +- std over the seeds, and seconds per training epoch (training only).

Usage: python benchmarks/ccl_av_fashion_mnist.py [--subset 1200] [--test 400] [--epochs 6]
       [--teacher-epochs 6] [--mismatch 0 0.3] [--seeds 0 1 2] [--methods vanilla ccl_audio ...]
       [--runs runs/bench_ccl] [--out DIR] [key=value overrides for every run]
--subset / --test: training / test clips of the embedded set (generated once per size and rate).
Runs are named after their size, epochs, rate and seed: finished ones are reused (a second call only
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
CONFIGS = ROOT / "configs" / "av_fashion_mnist"
# label -> (recipe file stem, teachers it reads)
METHODS = {
    "video alone": ("video_vanilla", ()),
    "KD (audio)": ("kd_audio", ("audio",)),
    "FitNet (audio)": ("fitnet_audio", ("audio",)),
    "CCL (audio)": ("ccl_audio", ("audio",)),
    "CCL (image)": ("ccl_image", ("image",)),
    "CCL (audio+image)": ("ccl_audio_image", ("audio", "image")),
}
STEM = "ccl_av_fashion_mnist"


def fit(file: Path, overrides: list[str]):
    cfg = load_config(file, overrides)
    done = (cfg.run_dir / "last.pt").is_file()
    return cfg, Run(cfg, resume=done, progress=False).fit()


def finished(file: Path, overrides: list[str]) -> bool:
    """Whether the run these overrides name has finished (its last.pt says done)."""
    import torch

    path = load_config(file, overrides).run_dir / "last.pt"
    return path.is_file() and bool(torch.load(path, map_location="cpu", weights_only=False).get("done"))


def rate_name(rate: float) -> str:
    return f"{round(100 * rate)}%"


def summarise(runs: list[dict], rates: list[float], labels: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for label in labels:
        row = {"method": label}
        for rate in rates:
            mine = [r for r in runs if r["method"] == label and r["mismatch"] == rate]
            if not mine:  # --finished-only: nothing finished for this cell
                row[f"top1 @ {rate_name(rate)}"], row[f"_mean_{rate}"], row[f"_std_{rate}"] = "—", float("nan"), 0.0
                continue
            top1 = mean_std([r["top1"] for r in mine])
            row[f"top1 @ {rate_name(rate)}"] = (f"{top1[0]:.2f}" + (f" ± {top1[1]:.2f}" if len(mine) > 1 else "")
                                                + (f" (n={len(mine)})" if len(mine) != len(seeds) else ""))
            row[f"_mean_{rate}"], row[f"_std_{rate}"] = top1
        seconds = [r["s_per_epoch"] for r in runs if r["method"] == label]
        row["s/epoch"] = f"{mean_std(seconds)[0]:.1f}" if seconds else "—"
        rows.append(row)
    return rows


def plot(rows: list[dict], rates: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(rates)
    xs = range(len(rows))
    for i, rate in enumerate(rates):
        ax.bar([x + (i - (len(rates) - 1) / 2) * width for x in xs], [r[f"_mean_{rate}"] for r in rows], width,
               yerr=[r[f"_std_{rate}"] for r in rows], capsize=3, label=f"mismatched audio {rate_name(rate)}")
    low = min(r[f"_mean_{rate}"] - r[f"_std_{rate}"] for r in rows for rate in rates if r[f"_mean_{rate}"] == r[f"_mean_{rate}"])
    ax.set_ylim(max(0.0, low - 3), None)
    ax.set_xticks(list(xs), [r["method"] for r in rows], fontsize=8)
    ax.set_ylabel("per-video test top-1 (%)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = seeded_parser(__doc__, "runs/bench_ccl", subset=1200, epochs=6)
    p.add_argument("--test", type=int, default=400, help="test clips")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--mismatch", type=float, nargs="+", default=[0.0, 0.3], help="rates of clips with another class's audio")
    p.add_argument("--methods", nargs="+", default=[stem for stem, _ in METHODS.values()],
                   choices=[stem for stem, _ in METHODS.values()], help="recipe stems to run")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate the runs that have finished (a cell may then have fewer seeds)")
    args = p.parse_args()
    machine = machine_line([o for o in args.overrides if o.startswith("runtime.")])  # the others need task: video
    print(machine)
    labels = [label for label, (stem, _) in METHODS.items() if stem in args.methods]
    size = f"n{args.subset}_t{args.test}"
    common = [f"output_dir={args.runs}", f"video.embedded.train={args.subset}", f"video.embedded.test={args.test}",
              *args.overrides]

    runs, teachers_line = [], []
    for rate in args.mismatch:
        at_rate = common + [f"video.mismatch={rate}"]
        tag = f"{size}_m{round(100 * rate)}"
        checkpoints = {}
        needed = {t for label in labels for t in METHODS[label][1]}
        for modality, stem in (("audio", "audio_teacher"), ("image", "frame_teacher")):
            if modality not in needed:
                continue
            if args.finished_only and not finished(CONFIGS / f"{stem}.yaml", at_rate + [
                    f"name={stem}_{tag}_e{args.teacher_epochs}"]):
                continue
            cfg, result = fit(CONFIGS / f"{stem}.yaml", at_rate + [f"solver.epochs={args.teacher_epochs}",
                                                                         f"name={stem}_{tag}_e{args.teacher_epochs}"])
            checkpoints[modality] = cfg.run_dir / "best.pt"
            teachers_line.append(f"{modality} teacher @ {rate_name(rate)}: top-1 {result.best_score:.2f}")
            print(teachers_line[-1])
        for seed in args.seeds:
            for label in labels:
                stem, reads = METHODS[label]
                if any(t not in checkpoints for t in reads):  # --finished-only: its teacher has not finished
                    continue
                overrides = at_rate + [f"solver.epochs={args.epochs}", f"seed={seed}",
                                       f"name={stem}_{tag}_e{args.epochs}_s{seed}"]
                if "audio" in reads:
                    overrides.append(f"teacher.checkpoint={checkpoints['audio']}")
                if "image" in reads:
                    overrides.append(f"method.options.image_teacher.checkpoint={checkpoints['image']}")
                if args.finished_only and not finished(CONFIGS / f"{stem}.yaml", overrides):
                    continue
                _, result = fit(CONFIGS / f"{stem}.yaml", overrides)
                seconds = [r["seconds"] for r in result.history]
                runs.append({"mismatch": rate, "method": label, "seed": seed, "top1": result.metrics["test_top1"],
                             "best_top1": result.best_score, "s_per_epoch": sum(seconds) / max(len(seconds), 1)})
                print(f"{label:18s} mismatch {rate_name(rate):>4s} seed {seed}: top-1 {runs[-1]['top1']:.2f}, "
                      f"{runs[-1]['s_per_epoch']:.1f} s/epoch")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{STEM}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mismatch", "method", "seed", "top1", "best_top1", "s_per_epoch"])
        writer.writeheader()
        writer.writerows(runs)
    rows = summarise(runs, args.mismatch, labels, args.seeds)
    header = (f"r2plus1d_10_w16 video student, av_fashion_mnist {args.subset} train / {args.test} test clips, "
              f"{args.epochs} epochs (teachers {args.teacher_epochs}), seeds {', '.join(map(str, args.seeds))}, "
              f"top-1 of the final model (mean ± std); {'; '.join(teachers_line)}; {machine}")
    columns = ["method", *[f"top1 @ {rate_name(r)}" for r in args.mismatch], "s/epoch"]
    table = format_table(rows, columns)
    print(header + "\n" + table)
    (out / f"{STEM}.md").write_text(f"{header}\n\n```\n{table}\n```\n")
    plot(rows, args.mismatch, header if len(header) < 160 else header[:157] + "...", out / f"{STEM}.png")


if __name__ == "__main__":
    main()
