"""Time one training step (forward + backward + SGD) of a student, with or without distillation.

Usage: python benchmarks/train_step.py [--batch 128] [--steps 10] [--pairs resnet20:resnet8 ...]
Prints ms/step for fp32 vs bf16 autocast, contiguous vs channels_last, on this machine's CPU/GPU.
"""
from __future__ import annotations

import argparse
import time

import torch

import reviewkd as rk
from reviewkd.engine.runtime import autocast
from reviewkd.models.summary import format_table


def time_step(teacher_name, student_name, method, precision, channels_last, batch, steps, device):
    student = rk.create_model(student_name, num_classes=10)
    teacher = rk.create_model(teacher_name, num_classes=10) if method != "vanilla" else None
    options = {"warmup_epochs": 0} if method == "reviewkd" else {}
    d = rk.Distiller(student, teacher, method, **options).to(device)
    if channels_last:
        d.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    d.train()

    def step():
        with autocast(torch.device(device), precision):
            _, losses = d(x, y, epoch=1)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    for _ in range(3):  # warm-up: kernel selection, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", nargs="*", default=["resnet20:resnet8", "wrn_16_2:resnet8", "resnet32x4:resnet8x4"])
    p.add_argument("--methods", nargs="*", default=["vanilla", "reviewkd"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    for pair in args.pairs:
        teacher, student = pair.split(":")
        for method in args.methods:
            for precision, cl in (("fp32", False), ("bf16", True)):
                ms = time_step(teacher, student, method, precision, cl, args.batch, args.steps, args.device)
                rows.append({"teacher": teacher if method != "vanilla" else "-", "student": student, "method": method,
                             "precision": precision, "channels_last": cl, "ms/step": ms})
    print(f"batch {args.batch}, {args.steps} timed steps, device {args.device}, {torch.get_num_threads()} threads")
    print(format_table(rows, formats={"ms/step": ".1f"}))


if __name__ == "__main__":
    main()
