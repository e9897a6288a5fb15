"""A whole Fashion-MNIST run: the default path (``reviewkd train``) vs a plain eager implementation.

For each method (vanilla, KD, ReviewKD: the recipes of configs/fashion_mnist/resnet20_resnet8 with a
resnet56 teacher) and seed, the same student, teacher checkpoint, optimiser, schedule (cosine per
iteration), batch and epochs are run twice:

* ``engine``: ``Run(cfg).fit()``: batched augmentation on tensors, frozen teacher with BatchNorm
  folded, channels_last, ``precision: auto``, freed memory kept for reuse, no per-step host sync;
  evaluation after every epoch;
* ``plain``: what a released script does: a DataLoader (2 workers) applying torchvision's per-sample
  transforms (Pad, RandomCrop(32, padding=4), RandomHorizontalFlip, ToDtype, Normalize), eager fp32
  channels-first, the teacher as trained under ``no_grad``, ``loss.item()`` every step for the meters,
  glibc's allocator as it is by default, evaluation after every epoch.

Both use the package's loss modules (the same Distiller), so the comparison is of the path, not of
the method. Also measured: the batched augmentation's throughput over the student's training
throughput, and the evaluation of the test set as a share of an epoch (the engine's rows record
``eval_seconds``). Writes benchmarks/results/whole_run.{md,csv}.

Usage: python benchmarks/whole_run.py [--subset 60000] [--epochs 5] [--seeds 0 1 2]
       [--methods vanilla kd reviewkd] [--teacher-epochs 5] [--runs runs/bench_whole_run]
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import reviewkd as rk
from reviewkd.config import load_config
from reviewkd.data import build_datasets
from reviewkd.data.augment import DATASET_STATS
from reviewkd.engine.loop import Run
from reviewkd.engine.runtime import reuse_freed_memory
from reviewkd.models.summary import format_table
from reviewkd.tasks import get_task
from common import machine_line, mean_std, seeded_parser  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
TEACHER = "resnet56"


class PlainFashionMNIST(Dataset):
    """Per-sample torchvision transforms, as a released training script applies them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool):
        from torchvision.transforms import v2

        mean, std = DATASET_STATS["fashion_mnist"]
        steps = [v2.Pad(2)]
        if train:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.images, self.labels, self.transform = images, labels, v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]).expand(3, -1, -1), int(self.labels[i])


def plain_run(cfg, teacher_path: Path, data) -> dict:
    """The plain implementation of the run ``cfg`` describes, on the same (subset) images as the engine's
    ``data``; returns accuracy and seconds."""
    torch.manual_seed(cfg.seed)
    reuse_freed_memory(False)  # glibc as a plain script has it (the engine's Run sets its own again)
    task = get_task("classification")
    train = DataLoader(PlainFashionMNIST(data.train.images, data.train.labels, True), batch_size=cfg.data.batch_size,
                       shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)
    test = DataLoader(PlainFashionMNIST(data.test.images, data.test.labels, False),
                      batch_size=cfg.data.eval_batch_size, num_workers=2, persistent_workers=True)
    student = task.build_model(cfg.model.name, cfg, 10)
    teacher = task.build_teacher(cfg.teacher.name, cfg, 10, teacher_path) if cfg.teacher else None
    distiller = rk.Distiller(student, teacher, cfg.method.name, fold_teacher_bn=False, **cfg.method.options)
    s = cfg.solver
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=s.lr, momentum=s.momentum, nesterov=s.nesterov,
                                weight_decay=s.weight_decay)
    total = s.epochs * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    seconds = {"train": 0.0, "eval": 0.0}
    accuracy = 0.0
    for epoch in range(s.epochs):
        start = time.perf_counter()
        distiller.train()
        running = 0.0
        for x, y in train:
            _, losses = distiller(x, y, epoch=float(epoch))  # whole epochs, as the engine and the released script
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()  # the released scripts' AverageMeter
        seconds["train"] += time.perf_counter() - start
        start = time.perf_counter()
        student.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test:
                correct += (student(x).argmax(1) == y).sum().item()
        accuracy = 100.0 * correct / len(test.dataset)
        seconds["eval"] += time.perf_counter() - start
    return {"top1": accuracy, "train_s": seconds["train"], "eval_s": seconds["eval"]}


def engine_run(cfg) -> dict:
    result = Run(cfg, resume=(cfg.run_dir / "last.pt").is_file(), progress=False).fit()
    train_s = sum(r["seconds"] for r in result.history)
    eval_s = sum(r.get("eval_seconds", 0.0) for r in result.history)
    return {"top1": result.metrics["test_top1"], "train_s": train_s, "eval_s": eval_s}


def augmentation_rate(data, batch: int, rounds: int = 50) -> float:
    """Images/s of the engine's batched training augmentation (one batch, repeated)."""
    raw = data.train.images[:batch]
    data.train.augment(raw)
    start = time.perf_counter()
    for _ in range(rounds):
        data.train.augment(raw)
    return rounds * len(raw) / (time.perf_counter() - start)


def main() -> None:
    p = seeded_parser(__doc__, "runs/bench_whole_run", subset=60000, epochs=5)
    p.add_argument("--methods", nargs="+", default=["vanilla", "kd", "reviewkd"])
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--skip-plain", action="store_true", help="engine runs only")
    args = p.parse_args()
    common = [f"output_dir={args.runs}", f"data.subset={args.subset}", *args.overrides]
    teacher = load_config(CONFIGS / "teacher_resnet20.yaml",
                          common + [f"model.name={TEACHER}",
                                    # the size in the name: a teacher of another size is never reused
                                    f"name=fmnist_{TEACHER}_teacher_{args.subset}x{args.teacher_epochs}",
                                    f"solver.epochs={args.teacher_epochs}"])
    if not (teacher.run_dir / "best.pt").is_file():
        Run(teacher, resume=(teacher.run_dir / "last.pt").is_file()).fit()
    teacher_path = teacher.run_dir / "best.pt"

    rows = []
    for seed in args.seeds:
        for method in args.methods:
            overrides = common + [f"solver.epochs={args.epochs}", f"seed={seed}",
                                  f"name=whole_{method}_{args.subset}x{args.epochs}_seed{seed}"]
            if method != "vanilla":
                overrides += [f"teacher.name={TEACHER}", f"teacher.checkpoint={teacher_path}", "teacher.config=null"]
            cfg = load_config(CONFIGS / "resnet20_resnet8" / f"{method}.yaml", overrides)
            row = {"method": method, "seed": seed, **{f"engine_{k}": v for k, v in engine_run(cfg).items()}}
            data = build_datasets("fashion_mnist", subset=args.subset, seed=cfg.seed, batch_size=cfg.data.batch_size,
                                  channels_last=True)
            steps = args.epochs * (len(data.train.images) // cfg.data.batch_size)
            row["engine_train_img_s"] = steps * cfg.data.batch_size / row["engine_train_s"]
            row["augment_img_s"] = augmentation_rate(data, cfg.data.batch_size)
            if not args.skip_plain:
                row.update({f"plain_{k}": v for k, v in plain_run(cfg, teacher_path, data).items()})
            rows.append(row)
            print(row, flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    table = []
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        line = {"method": method}
        for side in ("engine", "plain"):
            if f"{side}_top1" not in mine[0]:
                continue
            m, s = mean_std([r[f"{side}_top1"] for r in mine])
            line[f"{side} top-1"] = f"{m:.2f} ± {s:.2f}"
            line[f"{side} s"] = mean_std([r[f"{side}_train_s"] + r[f"{side}_eval_s"] for r in mine])[0]
            # evaluation of the test set over one epoch's training
            line[f"{side} eval/epoch"] = mean_std([r[f"{side}_eval_s"] / r[f"{side}_train_s"] for r in mine])[0]
        if "plain s" in line:
            line["engine / plain time"] = line["engine s"] / line["plain s"]
        line["augment / train img/s"] = mean_std([r["augment_img_s"] / r["engine_train_img_s"] for r in mine])[0]
        table.append(line)
    columns = list(table[0])
    text = format_table(table, columns)
    header = (f"# Whole Fashion-MNIST runs ({args.subset} images, {args.epochs} epochs, seeds {args.seeds}; "
              f"teacher {TEACHER}, student resnet8)\n\n{machine_line(args.overrides)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "whole_run.md").write_text(f"{header}\n\n```\n{text}\n```\n")
    with open(out / "whole_run.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(header + "\n\n" + text)


if __name__ == "__main__":
    main()
