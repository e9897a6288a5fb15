"""The demos: a list of runs (a teacher, then students with the same schedule, seed and data) and
a report comparing them (a table, ``results.md``, ``curves.png`` and a score figure).

``reviewkd demo``: Fashion-MNIST, resnet20 teacher, vanilla and ReviewKD resnet8 students.
``reviewkd demo-detection``: rendered shapes on the CPU, Faster R-CNN teacher and students.
Runs are the configs named below; finished runs are reused (``fresh`` retrains), interrupted ones
resume. Students distil from the teacher trained just before, in the same output folder.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import Config, load_config  # noqa: E402
from .engine.checkpoint import load_checkpoint  # noqa: E402
from .engine.loop import Run  # noqa: E402
from .engine.metrics import plot_curves  # noqa: E402
from .models.summary import count_flops, count_parameters, format_table  # noqa: E402
from .tasks import get_task  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped inside the package


@dataclass(frozen=True)
class Demo:
    title: str
    config_dir: Path
    runs: tuple[tuple[str, str], ...]  # (role, config file); the first is the teacher
    metrics: tuple[str, ...]  # metric columns of the table (the first is the one compared)
    headers: dict[str, str]
    figure: str  # file name of the score figure
    quick: tuple[str, ...] = ()  # overrides of the smoke-test version
    data_root: str | None = None  # data.root inside the output folder (generated data)
    flops: bool = False
    unit: str = "points"


DEMOS = {
    "classification": Demo(
        title="Fashion-MNIST: teacher, vanilla and ReviewKD students",
        config_dir=CONFIGS / "fashion_mnist",
        runs=(("teacher", "demo_teacher.yaml"), ("vanilla student", "demo_vanilla.yaml"),
              ("ReviewKD student", "demo_reviewkd.yaml")),
        metrics=("test_top1",), headers={"test_top1": "top-1 (%)"}, figure="top1.png",
        # two epochs: the ReviewKD recipe's 1-epoch warm-up trains with cross-entropy alone first,
        # so the second epoch is the one that distils
        quick=("data.subset=512", "solver.epochs=2", "data.batch_size=64"), flops=True, unit="top-1 points",
    ),
    "detection": Demo(
        title="rendered shapes: teacher, vanilla and ReviewKD students (Faster R-CNN + FPN)",
        config_dir=CONFIGS / "coco",
        runs=(("teacher", "demo_shapes_teacher.yaml"), ("vanilla student", "demo_shapes_vanilla.yaml"),
              ("ReviewKD student", "demo_shapes_reviewkd.yaml")),
        metrics=("box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm"),
        headers={"box_AP": "AP", "box_AP50": "AP50", "box_AP75": "AP75", "box_APs": "APs", "box_APm": "APm"},
        figure="ap.png",
        # a tiny dataset of small images and a handful of iterations per run
        quick=("detection.shapes={num_train: 8, num_val: 4, min_size: 96, max_size: 112, max_objects: 2, seed: 0}",
               "detection.min_size_train=[96]", "detection.max_size_train=128", "detection.min_size_test=96",
               "detection.max_size_test=128", "detection.max_iter=6", "detection.steps=[4]", "detection.warmup_iters=2",
               "detection.eval_period=0", "detection.checkpoint_period=3", "detection.log_period=2",
               "data.batch_size=2", "data.eval_batch_size=4", "data.workers=0"),
        data_root="dataset", unit="box AP points (COCO AP on the val split, in %)",
    ),
}


def _configs(demo: Demo, out: Path, quick: bool) -> list[tuple[str, Config]]:
    if not demo.config_dir.is_dir():
        raise FileNotFoundError(f"demo configs not found in {demo.config_dir}: reinstall reviewkd (the package is incomplete)")
    overrides = [f"output_dir={out}", *(demo.quick if quick else ())]
    if demo.data_root:
        overrides.append(f"data.root={out / (demo.data_root + ('_quick' if quick else ''))}")
    runs, teacher_dir = [], None
    for role, file in demo.runs:
        raw = load_config(demo.config_dir / file, overrides)
        extra = ([f"teacher.checkpoint={teacher_dir}/best.pt", "teacher.config=null"]
                 if raw.teacher is not None and teacher_dir is not None else [])
        cfg = load_config(demo.config_dir / file, overrides + extra)
        teacher_dir = teacher_dir or cfg.run_dir
        runs.append((role, cfg))
    return runs


def _train(cfg: Config, fresh: bool) -> dict:
    """Train (or reuse / resume) one run; its summary from the checkpoint."""
    last = cfg.run_dir / "last.pt"
    if fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    if last.is_file() and load_checkpoint(last)["done"]:
        print(f"{cfg.name}: already trained, reusing {cfg.run_dir} (--fresh retrains)")
    else:
        Run(cfg, resume=last.is_file()).fit()
    return load_checkpoint(last)


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, fresh: bool = False,
             kind: str = "classification") -> list[dict]:
    demo, out = DEMOS[kind], Path(out)
    start = time.perf_counter()
    rows, curves = [], {}
    for role, cfg in _configs(demo, out, quick):
        ckpt = _train(cfg, fresh)
        task = get_task(cfg.task)
        model = task.rebuild(ckpt, cfg)
        row = {"role": role, "model": cfg.model.name, "method": cfg.method.name,
               **{k: ckpt["metrics"].get(k, float("nan")) for k in demo.metrics},
               "parameters": count_parameters(model)}
        if demo.flops:
            row["MFLOPs"] = count_flops(model, tuple(ckpt["input_size"])) / 1e6
        row["train_s"] = sum(r["seconds"] for r in ckpt["history"])
        rows.append(row)
        curves[role] = ckpt["history"]

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    headers = {**demo.headers, "train_s": "train time (s)"}
    formats = {"parameters": ",", "MFLOPs": ".1f", "train_s": ".0f"}
    table = format_table(rows, columns, formats=formats, headers=headers)
    key = demo.metrics[0]
    gain = rows[2][key] - rows[1][key]
    verdict = f"ReviewKD vs vanilla student: {gain:+.2f} {demo.unit} (same schedule, seed and data)"
    task = get_task(cfg.task)
    x = "iteration" if task.name == "detection" else "epoch"
    _score_figure(rows, curves, demo, report / demo.figure, x)
    plot_curves(curves, report / "curves.png", title=demo.title, x_key=x, scores={key: headers.get(key, key)},
                score_axis=task.score_axis)
    (report / "results.md").write_text(
        f"# {demo.title}\n\n{_markdown(rows, columns, formats, headers)}\n{verdict}\n\n"
        f"![scores]({demo.figure})\n\n![curves](curves.png)\n"
    )
    print("\n" + table + "\n\n" + verdict)
    print(f"report: {report / 'results.md'}, {report / demo.figure} ({time.perf_counter() - start:.0f}s in all)")
    return rows


def _score_figure(rows: list[dict], curves: dict[str, list[dict]], demo: Demo, path: Path, x: str) -> None:
    """The compared score over training (left) and the final metrics side by side (right)."""
    key = demo.metrics[0]
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.2))
    for role, history in curves.items():
        points = [(r[x], r[key]) for r in history if r.get(key) is not None]
        if points:
            ax_curve.plot(*zip(*points), marker="o", ms=4, label=role)
    ax_curve.set(xlabel=x, ylabel=f"{demo.headers[key]}", title="during training")
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(demo.metrics))]
        bars = ax_bar.bar(xs, [row[k] for k in demo.metrics], width=width, label=f"{row['role']} ({row['model']})")
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_bar.set_xticks(range(len(demo.metrics)), [demo.headers[k] for k in demo.metrics])
    finite = [row[k] for row in rows for k in demo.metrics if row[k] == row[k]]
    if finite:  # zoom on the differences: bars from a little below the lowest value
        ax_bar.set_ylim(bottom=max(0.0, min(finite) - 5.0), top=max(finite) + 2.0)
    ax_bar.set(title="final")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    ax_bar.grid(alpha=0.3)
    ax_bar.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(demo.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rows, columns, formats, headers) -> str:
    def cell(key, value):
        if isinstance(value, float):
            return format(value, formats.get(key, ".2f"))
        return format(value, formats[key]) if key in formats and isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
