"""The default run: on real Fashion-MNIST, train a teacher, a vanilla student and a ReviewKD student
(same schedule and seed as the vanilla one), then compare them in a table and a plot.

The three runs are the configs in ``configs/fashion_mnist/demo_*.yaml``; finished runs are reused
(``--fresh`` retrains), interrupted ones resume.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .config import Config, load_config
from .engine.checkpoint import load_checkpoint
from .engine.metrics import plot_curves
from .engine.trainer import Trainer
from .models import create_model
from .models.summary import count_flops, count_parameters, format_table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist"
ROLES = (("teacher", "demo_teacher.yaml"), ("vanilla student", "demo_vanilla.yaml"), ("ReviewKD student", "demo_reviewkd.yaml"))
# A smoke-test version: a few hundred images, one epoch each.
QUICK = ["data.subset=256", "solver.epochs=1", "data.batch_size=64"]


def _configs(out: Path, quick: bool) -> list[tuple[str, Config]]:
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"demo configs not found in {CONFIG_DIR}: run the demo from a source checkout")
    overrides = [f"output_dir={out}"] + (QUICK if quick else [])
    runs = []
    for role, file in ROLES:
        extra = [f"teacher.checkpoint={out}/demo_teacher/best.pt"] if "ReviewKD" in role else []
        runs.append((role, load_config(CONFIG_DIR / file, overrides + extra)))
    return runs


def _train(cfg: Config, fresh: bool) -> dict:
    """Train (or reuse / resume) one run; returns its summary from the checkpoints."""
    last = cfg.run_dir / "last.pt"
    if fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    done = last.is_file() and load_checkpoint(last)["epoch"] >= cfg.solver.epochs
    if done:
        print(f"{cfg.name}: already trained, reusing {cfg.run_dir} (--fresh retrains)")
    else:
        Trainer(cfg, resume=last.is_file()).fit()
    ckpt = load_checkpoint(last)
    history = ckpt["history"]
    return {
        "top1": history[-1]["test_top1"],
        "best_top1": ckpt["best_top1"],
        "teacher_top1": ckpt["teacher_top1"],
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "history": history,
    }


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, fresh: bool = False) -> list[dict]:
    out = Path(out)
    start = time.perf_counter()
    rows, curves = [], {}
    for role, cfg in _configs(out, quick):
        summary = _train(cfg, fresh)
        model = create_model(cfg.model.name, num_classes=10)
        rows.append({
            "role": role,
            "model": cfg.model.name,
            "method": cfg.method.name,
            "top1": summary["top1"],
            "parameters": count_parameters(model),
            "MFLOPs": count_flops(model, (3, 32, 32)) / 1e6,
            "train_s": summary["train_seconds"],
        })
        curves[role] = summary["history"]

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    columns = ["role", "model", "method", "top1", "parameters", "MFLOPs", "train_s"]
    headers = {"top1": "top-1 (%)", "train_s": "train time (s)"}
    formats = {"parameters": ",", "MFLOPs": ".1f", "train_s": ".0f"}
    table = format_table(rows, columns, formats=formats, headers=headers)
    gain = rows[2]["top1"] - rows[1]["top1"]
    verdict = f"ReviewKD vs vanilla student: {gain:+.2f} top-1 points (same schedule, seed and data)"
    plot_curves(curves, report / "curves.png", title="Fashion-MNIST: teacher, vanilla and ReviewKD students")
    (report / "results.md").write_text(
        "# Fashion-MNIST demo\n\n" + _markdown(rows, columns, formats, headers) + f"\n{verdict}\n\n![curves](curves.png)\n"
    )
    print("\n" + table + "\n\n" + verdict)
    print(f"report: {report / 'results.md'} and {report / 'curves.png'} ({time.perf_counter() - start:.0f}s in all)")
    return rows


def _markdown(rows, columns, formats, headers) -> str:
    def cell(key, value):
        fmt = formats.get(key)
        if isinstance(value, float):
            return format(value, fmt or ".2f")
        return format(value, fmt) if fmt and isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
