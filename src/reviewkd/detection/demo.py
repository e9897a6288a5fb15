"""The detection demo on CPU: on the rendered-shapes dataset, train a teacher detector, then a
vanilla and a ReviewKD student with the same schedule, seed and data, and compare their COCO AP.

The runs are ``configs/coco/demo_shapes_{teacher,vanilla,reviewkd}.yaml``; finished runs are reused
(``fresh=True`` retrains), interrupted ones resume. The report (``<out>/report``) has
``results.md``, ``ap.png`` (AP over iterations and the final AP side by side) and ``curves.png``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import Config, load_config  # noqa: E402
from ..engine.checkpoint import load_checkpoint  # noqa: E402
from ..engine.metrics import plot_curves  # noqa: E402
from ..models.summary import format_table  # noqa: E402
from .trainer import SCORES, DetectionTrainer  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "coco"
ROLES = (("teacher", "demo_shapes_teacher.yaml"), ("vanilla student", "demo_shapes_vanilla.yaml"),
         ("ReviewKD student", "demo_shapes_reviewkd.yaml"))
# A smoke-test version: a tiny dataset of small images and a handful of iterations per run.
QUICK = ["detection.shapes={num_train: 8, num_val: 4, min_size: 96, max_size: 112, max_objects: 2, seed: 0}",
         "detection.min_size_train=[96]", "detection.max_size_train=128", "detection.min_size_test=96",
         "detection.max_size_test=128", "detection.max_iter=6", "detection.steps=[4]", "detection.warmup_iters=2",
         "detection.eval_period=0", "detection.checkpoint_period=3", "detection.log_period=2", "data.batch_size=2",
         "data.eval_batch_size=4", "data.workers=0"]
METRIC_COLUMNS = ("box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm")


def _configs(out: Path, quick: bool) -> list[tuple[str, Config]]:
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"demo configs not found in {CONFIG_DIR}: run the demo from a source checkout")
    overrides = [f"output_dir={out}", f"data.root={out / ('dataset_quick' if quick else 'dataset')}"]
    overrides += QUICK if quick else []
    runs = []
    teacher_dir = None
    for role, file in ROLES:
        # the students distil from the teacher trained just before, in this output folder
        extra = [f"teacher.checkpoint={teacher_dir}/best.pt", "teacher.config=null"] if "ReviewKD" in role else []
        cfg = load_config(CONFIG_DIR / file, overrides + extra)
        if role == "teacher":
            teacher_dir = cfg.run_dir
        runs.append((role, cfg))
    return runs


def _train(cfg: Config, fresh: bool) -> dict:
    last = cfg.run_dir / "last.pt"
    if fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    done = last.is_file() and load_checkpoint(last)["iteration"] >= cfg.detection.max_iter
    if done:
        print(f"{cfg.name}: already trained, reusing {cfg.run_dir} (fresh=True retrains)")
    else:
        DetectionTrainer(cfg, resume=last.is_file()).fit()
    ckpt = load_checkpoint(last)
    history = ckpt["history"]
    return {"metrics": ckpt["metrics"], "history": history, "num_classes": ckpt["num_classes"],
            "train_seconds": sum(r["iter_seconds"] * _steps(history, i) for i, r in enumerate(history))}


def _steps(history: list[dict], i: int) -> int:
    return history[i]["iteration"] - (history[i - 1]["iteration"] if i else 0)


def _ap_figure(rows: list[dict], curves: dict[str, list[dict]], path: Path, title: str) -> None:
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.2))
    for role, history in curves.items():
        points = [(r["iteration"], r["box_AP"]) for r in history if r.get("box_AP") is not None]
        if points:
            ax_curve.plot(*zip(*points), marker="o", ms=4, label=role)
    ax_curve.set(xlabel="iteration", ylabel="box AP (%)", title="val box AP during training")
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [row.get(k, float("nan")) for k in METRIC_COLUMNS]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(METRIC_COLUMNS))]
        bars = ax_bar.bar(xs, values, width=width, label=f"{row['role']} ({row['model']})")
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_bar.set_xticks(range(len(METRIC_COLUMNS)), [k.removeprefix("box_") for k in METRIC_COLUMNS])
    ax_bar.set(ylabel="%", title="final COCO box metrics")
    for ax in (ax_curve, ax_bar):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_detection_demo(out: Path = Path("runs/shapes_demo"), quick: bool = False, fresh: bool = False) -> list[dict]:
    from ..models.summary import count_parameters
    from .export import detector_kwargs
    from .models import create_detector

    out = Path(out)
    start = time.perf_counter()
    rows, curves = [], {}
    for role, cfg in _configs(out, quick):
        summary = _train(cfg, fresh)
        params = count_parameters(create_detector(cfg.model.name, summary["num_classes"], **detector_kwargs(cfg)))
        rows.append({"role": role, "model": cfg.model.name, "method": cfg.method.name,
                     **{k: summary["metrics"].get(k, float("nan")) for k in METRIC_COLUMNS},
                     "parameters": params, "train_s": summary["train_seconds"]})
        curves[role] = summary["history"]

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    columns = ["role", "model", "method", *METRIC_COLUMNS, "parameters", "train_s"]
    headers = {k: k.removeprefix("box_") for k in METRIC_COLUMNS} | {"train_s": "train time (s)"}
    formats = {"parameters": ",", "train_s": ".0f"}
    table = format_table(rows, columns, formats=formats, headers=headers)
    gain = rows[2]["box_AP"] - rows[1]["box_AP"]
    verdict = (f"ReviewKD vs vanilla student: {gain:+.2f} box AP points "
               "(same schedule, seed and data; COCO AP on the val split, in %)")
    title = "rendered shapes: teacher, vanilla and ReviewKD students (Faster R-CNN + FPN)"
    _ap_figure(rows, curves, report / "ap.png", title)
    plot_curves(curves, report / "curves.png", title=title, x_key="iteration", scores={"box_AP": "box AP"},
                score_axis="COCO box AP (%)")
    md_head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    md_rows = "".join("| " + " | ".join(_md(c, r[c], formats) for c in columns) + " |\n" for r in rows)
    (report / "results.md").write_text(
        f"# Detection demo (rendered shapes, CPU)\n\n{md_head}{md_rows}\n{verdict}\n\n![AP](ap.png)\n\n![curves](curves.png)\n"
    )
    print("\n" + table + "\n\n" + verdict)
    print(f"report: {report / 'results.md'}, {report / 'ap.png'} ({time.perf_counter() - start:.0f}s in all)")
    return rows


def _md(key, value, formats) -> str:
    if isinstance(value, float):
        return format(value, formats.get(key, ".2f"))
    if isinstance(value, int) and key in formats:
        return format(value, formats[key])
    return str(value)


__all__ = ["run_detection_demo", "SCORES"]
