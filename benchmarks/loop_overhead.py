"""What the training loop costs on top of the bare step: ms per step of `reviewkd train` (the one
loop: optimiser groups, loss bookkeeping, periodic host sync, progress) against a hand-written loop
over the same batches, model, optimiser and precision.

Usage: python benchmarks/loop_overhead.py [--method reviewkd] [--subset 4096] [--batch 128]
Prints the CPU's capabilities and the precision used.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from reviewkd.config import load_config
from reviewkd.engine.loop import Run
from reviewkd.engine.runtime import autocast, cpu_supports_bf16, resolve_device, resolve_precision
from reviewkd.models.summary import format_table
from reviewkd.tasks import get_task


def bare_epoch_ms(cfg, teacher_path) -> float:
    """ms per step of a plain loop: forward (with the method), backward, SGD step."""
    task, device = get_task(cfg.task), resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    data = task.build_data(cfg, device)
    torch.manual_seed(cfg.seed)
    student = task.build_model(cfg.model.name, cfg, data.num_outputs)
    teacher = task.build_teacher(cfg.teacher.name, cfg, data.num_outputs, teacher_path) if cfg.teacher else None
    recipe = task.build_recipe(cfg, student, teacher, data.input_size, data.context).to(device)
    recipe.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(list(recipe.trainable_parameters()), lr=cfg.solver.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.solver.weight_decay)
    recipe.train()
    times = []
    for epoch in range(2):
        data.train.set_epoch(epoch)
        start = time.perf_counter()
        for batch in data.train:
            with autocast(device, precision):
                _, losses = recipe.losses(batch, float(epoch))
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * times[-1] / len(data.train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="reviewkd")
    p.add_argument("--subset", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        common = [f"output_dir={out}", f"data.subset={args.subset}", f"data.batch_size={args.batch}", "solver.epochs=2"]
        teacher_cfg = load_config("configs/fashion_mnist/teacher_resnet20.yaml", [*common, "solver.epochs=1"])
        Run(teacher_cfg, progress=False).fit()
        teacher = teacher_cfg.run_dir / "best.pt"
        extra = [] if args.method == "vanilla" else [f"teacher.checkpoint={teacher}"]
        if args.method == "reviewkd":
            extra.append("method.options.warmup_epochs=0")  # the HCL term from the first step
        cfg = load_config(f"configs/fashion_mnist/resnet20_resnet8/{args.method}.yaml", [*common, *extra])
        result = Run(cfg, progress=False).fit()
        steps = args.subset // args.batch
        loop_ms = 1000 * result.history[-1]["seconds"] / steps
        bare_ms = bare_epoch_ms(cfg, teacher)
    precision = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: AVX-512 BF16 / AMX {'yes' if cpu_supports_bf16() else 'no'}; precision auto -> {precision}; "
          f"{torch.get_num_threads()} threads; resnet20 -> resnet8, {args.method}, batch {args.batch}, "
          f"{steps} steps per epoch (second epoch timed)")
    print(format_table([{"loop": "reviewkd train", "ms/step": loop_ms},
                        {"loop": "hand-written", "ms/step": bare_ms},
                        {"loop": "ratio", "ms/step": loop_ms / bare_ms}], formats={"ms/step": ".2f"}))


if __name__ == "__main__":
    main()
