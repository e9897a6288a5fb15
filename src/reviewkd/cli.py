"""Command line: ``reviewkd train|eval|export|predict|models|methods|demo|demo-detection|make-shapes``
(also ``python -m reviewkd``).

User errors end with one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reviewkd", description="Knowledge distillation with the review mechanism and the methods it is compared with.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"reviewkd {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a teacher (method: vanilla) or distil a student from a YAML config",
                       description="Train from a YAML config. Overrides: dotted keys, e.g. solver.lr=0.01 data.subset=2000.")
    t.add_argument("config", help="YAML config file, or the name of a shipped recipe (see `reviewkd recipes`)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.add_argument("--resume", action="store_true", help="continue the run from <output_dir>/<name>/last.pt")
    t.add_argument("--stop-after", type=int, metavar="EPOCH", help="stop after this epoch, or iteration for detection "
                   "(resumable later with --resume)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    t.add_argument("--dry-run", action="store_true", help="check everything cheap, print the resolved config, the "
                   "models, the method's feature pairs and the teacher plan, and exit")
    t.add_argument("--quick", action="store_true", help="cGAN-KD pipelines: the recipe's tiny settings "
                   "(cgankd.quick) for smoke tests")

    e = sub.add_parser("eval", help="evaluate a run checkpoint on its test set")
    e.add_argument("checkpoint", help="best.pt / last.pt of a run")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=/data/cifar")

    x = sub.add_parser("export", help="export the bare student of a checkpoint (state dict, safetensors, TorchScript, "
                       "torch.export .pt2, ONNX) with its metadata (classes, input size, preprocessing) in model.json")
    x.add_argument("checkpoint", help="best.pt / last.pt of a run")
    x.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    x.add_argument("--formats", default=None, help="comma-separated formats (default: pt,safetensors,torchscript,pt2,onnx; "
                   "detectors: pt,safetensors,torchscript). pt2 and onnx come from torch.export with dynamic batch, "
                   "height and width where the model allows; torchscript is kept for runtimes that need it "
                   "(PyTorch deprecates it)")

    pr = sub.add_parser("predict", help="classify image or video files with a run checkpoint or an export: top-k "
                        "classes with their probabilities", description="Classify PNG / JPEG images (grey or colour) "
                        "with the preprocessing the model was trained with; a task: video model classifies video "
                        "files (.avi, .mp4, ..., read with PyAV) as its evaluation does: the softmax averaged over "
                        "video.eval_clips evenly spaced clips.")
    pr.add_argument("model", metavar="CHECKPOINT_OR_EXPORT", help="best.pt / last.pt of a run, a folder written by "
                    "`reviewkd export`, or one exported file (.pt, .safetensors, .pt2, .torchscript.pt, .onnx)")
    pr.add_argument("images", nargs="+", metavar="FILES", help="image files (video files for a video model), or "
                    "folders (searched recursively)")
    pr.add_argument("--topk", type=int, default=5, help="classes shown per image or video (default 5)")
    pr.add_argument("--json", action="store_true", help="machine-readable output (one JSON document)")
    pr.add_argument("--format", default=None, help="which file of an export folder to use (default: the state "
                    "dict): pt, safetensors, pt2, torchscript or onnx")

    m = sub.add_parser("models", help="list the model zoo with parameters and FLOPs")
    m.add_argument("--family", choices=["cifar", "imagenet"], default=None, help="only this family")
    m.add_argument("--measure", action="store_true", help="build every model and count again (slow) instead of "
                   "reading the table shipped with the package")
    m.add_argument("--methods", action="store_true", help="list the distillation methods instead")

    me = sub.add_parser("methods", help="list the distillation methods and their papers; NAME: one method in detail")
    me.add_argument("name", nargs="?", default=None, help="a method: its paper, what it reads, its options")

    r = sub.add_parser("recipes", help="list the recipes shipped with the package (train one: reviewkd train NAME)")
    r.add_argument("under", nargs="?", default=None, help="only the recipes below this folder, e.g. cifar100")

    d = sub.add_parser("demo", help="the default run: teacher, vanilla student and ReviewKD student on Fashion-MNIST")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a tiny version for smoke tests (minutes -> seconds)")
    d.add_argument("--fresh", action="store_true", help="retrain everything even if earlier demo runs exist")

    dd = sub.add_parser("demo-detection", help="CPU detection demo: teacher, vanilla and ReviewKD Faster R-CNN students "
                        "on rendered shapes, with their COCO AP side by side")
    dd.add_argument("--out", default="runs/shapes_demo", help="output folder (default: runs/shapes_demo)")
    dd.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    dd.add_argument("--fresh", action="store_true", help="retrain everything even if earlier demo runs exist")

    s = sub.add_parser("make-shapes", help="write a small COCO-format dataset of rendered shapes (boxes + polygon masks)")
    s.add_argument("out", help="output folder (gets train/, val/ and annotations/)")
    s.add_argument("--train", type=int, default=400, help="training images (default 400)")
    s.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    s.add_argument("--min-size", type=int, default=128, help="smallest image side (default 128)")
    s.add_argument("--max-size", type=int, default=192, help="largest image side (default 192)")
    s.add_argument("--max-objects", type=int, default=4, help="most shapes per image (default 4)")
    s.add_argument("--seed", type=int, default=0)
    return p


def _cmd_train(args) -> int:
    from .config import load_config
    from .engine.loop import Run

    cfg = load_config(args.config, args.overrides)
    if cfg.cgankd is not None:  # a pipeline of runs: every stage skips its finished output and resumes
        from .cgankd.pipeline import run_pipeline

        if args.stop_after is not None:
            raise ValueError("--stop-after is for single runs; a cGAN-KD pipeline resumes each stage by itself")
        run_pipeline(cfg, quick=args.quick, progress=not args.no_progress, dry_run=args.dry_run)
        return 0
    if args.quick:
        raise ValueError("--quick is for cGAN-KD pipelines (configs with a cgankd section)")
    run = Run(cfg, resume=args.resume, progress=not args.no_progress, stop_after=args.stop_after)
    if args.dry_run:
        print(run.describe())
        return 0
    result = run.fit()
    if int(os.environ.get("RANK", "0")) == 0:
        task = run.task
        best = "not evaluated yet" if result.best_score is None else f"{result.best_score:.2f}"
        split = "val" if result.score_key.startswith("val_") else "test"
        final = task.describe(result.metrics, split) if result.metrics else "not evaluated yet"
        teacher = f", teacher {task.describe(result.teacher_metrics)}" if result.teacher_metrics else ""
        test = (f"; test set: final model {task.describe(result.test_metrics)}, selected model "
                f"{task.describe(result.selected_test_metrics)}" if result.test_metrics else "")
        print(f"{cfg.name}: best {task.score_label} {best} ({split} set), final {final}{teacher}{test}; "
              f"outputs in {result.run_dir}")
    return 0


def _cmd_eval(args) -> int:
    import torch

    from .engine.runtime import resolve_device, resolve_precision
    from .export import student_from_checkpoint
    from .models.summary import format_table
    from .tasks import get_task

    model, ckpt, cfg = student_from_checkpoint(args.checkpoint, args.overrides, export=False)
    task = get_task(ckpt["task"])
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    data = task.build_eval_data(cfg, device)
    if data.num_outputs != ckpt["num_classes"]:
        raise ValueError(f"checkpoint has {ckpt['num_classes']} classes, dataset {cfg.data.name} has {data.num_outputs}")
    model = model.to(device)
    if cfg.runtime.channels_last and task.name != "detection":  # as the run evaluated it
        model = model.to(memory_format=torch.channels_last)
    metrics = task.evaluate(model, data, device, precision, progress=True)
    unit = ckpt.get("unit", "epoch")
    row = {"checkpoint": args.checkpoint, "model": ckpt["model_name"], unit: ckpt[unit], **metrics}
    columns = list(row)
    print(format_table([row], columns, formats={k: ".2f" for k in metrics}))
    return 0


def _cmd_export(args) -> int:
    from .export import export_student
    from .models.summary import format_table

    out = args.out or str(Path(args.checkpoint).resolve().parent / "export")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    results = export_student(args.checkpoint, out, formats)
    rows = [{"format": k, "file": v["path"], "max |diff|": v["max_abs_diff"],
             "dynamic axes": ", ".join(a for a, on in v.get("dynamic_axes", {}).items() if on) or "-"}
            for k, v in results.items()]
    print(format_table(rows, ["format", "file", "max |diff|", "dynamic axes"], formats={"max |diff|": ".1e"}))
    for note in dict.fromkeys(v["note"] for v in results.values() if v.get("note")):
        print(f"note: {note}")
    print(f"every export reproduces the trained student's outputs; metadata in {Path(out) / 'model.json'}")
    return 0


def _cmd_predict(args) -> int:
    import json

    from .data.video import is_video_input
    from .predict import find_images, find_videos, format_predictions, load_student

    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    # missing files, non-images and non-videos (and a missing PyAV) are refused before the model loads
    videos = any(is_video_input(p) for p in args.images)
    images = find_videos(args.images) if videos else find_images(args.images)
    student = load_student(args.model, format=args.format)
    predictions = student.predict(images, topk=args.topk)
    print(json.dumps(predictions, indent=2) if args.json else format_predictions(predictions))
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_methods(args) -> int:
    from .methods import describe_method, list_methods
    from .models.summary import format_table

    if getattr(args, "name", None):
        print(describe_method(args.name))
        return 0
    print(format_table([{"method": k, "paper": v} for k, v in list_methods().items()], ["method", "paper"]))
    print("\n`reviewkd methods NAME` shows a method's features, options and defaults")
    return 0


def _cmd_models(args) -> int:
    if args.methods:
        return _cmd_methods(args)
    from .models import list_models
    from .models.summary import ZOO_CONVENTIONS, format_table, zoo_table

    rows = zoo_table(list_models(args.family), measured=args.measure)
    print(format_table(rows, list(rows[0].keys())))
    print(f"\n{ZOO_CONVENTIONS}")
    return 0


def _cmd_recipes(args) -> int:
    from .catalogue import RECIPES_DIR, recipe_names, recipe_summary
    from .models.summary import format_table

    names = recipe_names(args.under)
    if not names:
        raise ValueError(f"no recipes below {args.under!r}: the folders are "
                         f"{', '.join(sorted(p.name for p in RECIPES_DIR.iterdir() if p.is_dir()))}")
    rows = [recipe_summary(n) for n in names]
    print(format_table(rows, ["recipe", "task", "data", "model", "teacher", "method"]))
    print(f"\n{len(rows)} recipes in {RECIPES_DIR}; train one with `reviewkd train RECIPE [KEY=VALUE ...]`, "
          "or copy its file and edit it")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, fresh=args.fresh)
    return 0


def _cmd_demo_detection(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, fresh=args.fresh, kind="detection")
    return 0


def _cmd_make_shapes(args) -> int:
    from .detection.shapes import make_shapes

    paths = make_shapes(args.out, num_train=args.train, num_val=args.val, min_size=args.min_size,
                        max_size=args.max_size, max_objects=args.max_objects, seed=args.seed)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "predict": _cmd_predict, "models": _cmd_models,
            "methods": _cmd_methods, "recipes": _cmd_recipes, "demo": _cmd_demo, "demo-detection": _cmd_demo_detection,
            "make-shapes": _cmd_make_shapes}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling a nargs="*" positional at the first option: overrides written after
        # one (``train cfg.yaml --resume solver.lr=0.01``) arrive here and still count as overrides.
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    restore_sigterm = _sigterm_interrupts()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # outside a run (a run says itself what it saved)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure ends as one line unless --debug
        from .engine.loop import Interrupted

        if isinstance(exc, Interrupted):
            print(str(exc), file=sys.stderr)
            return EXIT_INTERRUPTED
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"reviewkd {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        restore_sigterm()


def _sigterm_interrupts():
    """SIGTERM (a scheduler's pre-emption, `kill`) stops a run like Ctrl-C: it says what was saved and
    exits with EXIT_INTERRUPTED. Only where SIGTERM has its default action and we are the main thread;
    returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
