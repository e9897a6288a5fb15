"""What a distillation step costs over its floor, in arithmetic and in time.

For each teacher -> student pair (the CIFAR-100 pairs of the ReviewKD paper's tables and the default
run's Fashion-MNIST pair) and each method, one training step (forward, backward, SGD) is measured:

* ``flop ratio``: FLOPs of the step (``torch.utils.flop_counter``, forward + backward) over the floor's,
  the floor being the teacher's forward plus the student's own cross-entropy step;
* ``time ratio``: ms of the step over the floor's ms, both on the default path (the engine's: frozen
  teacher with BatchNorm folded, channels_last, the precision ``auto`` picks, freed memory kept for
  reuse on the CPU); ``time / flop`` is how
  much slower than its arithmetic the step runs (1.0: exactly what the arithmetic demands);
* ``vs plain``: the same step run plainly (eager, fp32, channels-first, teacher as given, glibc's
  allocator as a fresh process has it after its first step) over the
  default path's time: how much faster the default path is.

Rounds are interleaved (default step, floor, plain step, ...) and the median of ``--rounds`` is kept,
so a busy machine affects every column alike; in each round every path first runs ``--settle``
untimed steps (default 1), so that its timed step finds the memory a run's consecutive steps would
(on the CPU the paths run with different allocator settings). Tests never assert timings; this
script prints them.

``--compile`` adds the default step under ``torch.compile`` (the engine's ``runtime.compile``): its
ms, the ratio to the eager default step, and the seconds the compilation took.

``--breakdown`` also times every operator of the default step and of its floor (a dispatch mode
around ``--rounds`` more steps of each) and prints, per kind of operator, ms and GFLOP/s in the floor
and in the step, and what the extra operators run at: where the time over the arithmetic goes.
Convolution backward passes are timed as two calls (input gradient, then weight and bias gradient).

Usage: python benchmarks/step_overhead.py [--pairs resnet56:resnet20 ...] [--methods reviewkd kd dkd crd ...]
       [--batch 64] [--rounds 7] [--settle 1] [--csv FILE] [--breakdown] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import reviewkd as rk
from reviewkd.engine.runtime import (CompiledOrEager, autocast, describe_machine, resolve_precision,
                                    reuse_freed_memory)
from reviewkd.models.summary import format_table

# (teacher, student, classes): the paper's CIFAR-100 pairs, then the default run's pair (10 classes)
PAIRS = ["resnet56:resnet20", "resnet110:resnet32", "resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2", "wrn_40_2:wrn_40_1",
         "vgg13:vgg8", "resnet32x4:ShuffleV1", "resnet32x4:ShuffleV2", "wrn_40_2:ShuffleV1", "vgg13:MobileNetV2",
         "ResNet50:MobileNetV2", "ResNet50:vgg8", "resnet20:resnet8@10"]
CIFAR_TRAIN = 50000
NO_WARMUP = {"reviewkd": {"warmup_epochs": 0}, "dkd": {"warmup_epochs": 0}}


class Step:
    """One SGD step of ``method`` (or the floor: ``method=None``) for a pair on a fixed batch."""

    def __init__(self, teacher_name, student_name, classes, method, batch, device, fast: bool):
        torch.manual_seed(0)
        student = rk.create_model(student_name, num_classes=classes)
        teacher = rk.create_model(teacher_name, num_classes=classes).eval().requires_grad_(False)
        self.fast, self.device = fast, device
        self.precision = resolve_precision("auto", device) if fast else "fp32"
        if method is None:
            self.distiller, self.teacher, self.student = None, teacher, student
            params = list(student.parameters())
            modules = [student, teacher]
        else:
            self.distiller = rk.Distiller(student, teacher, method, fold_teacher_bn=fast, context=self._context(classes),
                                          **NO_WARMUP.get(method, {}))
            self.run = self.distiller
            params = list(self.distiller.trainable_parameters())
            modules = [self.distiller]
        for m in modules:
            m.to(device)
            if fast:
                m.to(memory_format=torch.channels_last)
        if method is None and fast:  # the floor's teacher is the default path's teacher: folded
            folded = rk.Distiller(student, teacher, "kd", fold_teacher_bn=True)
            self.teacher = folded.teacher
            folded.remove()
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, 32, 32, device=device)
        if fast:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, classes, (batch,), device=device)
        # dataset indices of the batch, for the methods with a memory bank (CRD)
        self.index = torch.randperm(CIFAR_TRAIN, device=device)[:batch]

    @staticmethod
    def _context(classes: int) -> dict:
        """A CIFAR-sized training set: what memory-bank methods (CRD) size their banks from."""
        return {"num_samples": CIFAR_TRAIN, "train_targets": torch.arange(CIFAR_TRAIN) % classes}

    def compile(self) -> float:
        """Run the distiller compiled as the engine's ``runtime.compile`` does, from now on; returns
        the seconds the first (compiling) step took."""
        self.run = CompiledOrEager(self.distiller, lambda reason: print(f"compiling failed, timed eagerly: {reason}"))
        start = time.perf_counter()
        self()
        return time.perf_counter() - start

    def __call__(self):
        with autocast(self.device, self.precision):
            if self.distiller is None:
                with torch.inference_mode():
                    self.teacher(self.x)
                loss = F.cross_entropy(self.student(self.x), self.y)
            else:
                _, losses = self.run(self.x, self.y, epoch=10.0, indices=self.index)
                loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops()


def timed(step: Step, settle: int = 0) -> float:
    """ms of one step, after ``settle`` untimed ones: the allocator's switch between paths (and the
    plain path's trimming of the heap) otherwise leaves the next path's first step paying page faults
    for memory a run of consecutive steps would reuse."""
    # the engine keeps freed memory on CPU runs; a plain script runs with glibc's own steady state
    reuse_freed_memory(step.fast)
    for _ in range(settle):
        step()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def op_kind(name: str) -> str:
    """The kind of an aten operator (its name without overload), for the breakdown's rows."""
    if "conv" in name:
        return "conv backward" if "backward" in name else "conv forward"
    if "batch_norm" in name:
        return "batch norm"
    if "pool" in name or "upsample" in name:
        return "pool / resize"
    if name in ("mm", "addmm", "bmm", "linear", "matmul"):
        return "matmul"
    if name in ("copy_", "clone", "cat", "_to_copy", "contiguous"):
        return "copy"
    if name.startswith("_foreach"):
        return "optimiser"
    return "elementwise / reduction"


class OpTimer(TorchDispatchMode):
    """Sums seconds and FLOPs (``torch.utils.flop_counter``'s formulas) per kind of operator. A
    convolution backward is run as two timed calls, the input gradient and then the weights' (and bias)."""

    def __init__(self):
        super().__init__()
        self.seconds, self.flops = defaultdict(float), defaultdict(float)

    def _timed(self, kind, func, args, kwargs):
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if any(torch.is_tensor(a) and a.is_cuda for a in args):
            torch.cuda.synchronize()
        self.seconds[kind] += time.perf_counter() - start
        if func is torch.ops.aten.conv2d.default:  # composite: counted with convolution's formula (shapes only)
            self.flops[kind] += flop_registry[torch.ops.aten.convolution](args[0], args[1], None, None, None, None,
                                                                          False, out_val=out)
        elif func._overloadpacket in flop_registry:
            self.flops[kind] += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if func is torch.ops.aten.convolution_backward.default:
            *head, mask = args
            grad_input = self._timed("conv backward (input)", func, (*head, [mask[0], False, False]), kwargs)[0]
            rest = self._timed("conv backward (weight)", func, (*head, [False, mask[1], mask[2]]), kwargs)
            return grad_input, rest[1], rest[2]
        return self._timed(op_kind(name), func, args, kwargs)


def breakdown(steps: dict, rounds: int) -> list[dict]:
    """Per kind of operator: ms and GFLOP/s of the floor and of the step, and of the step's extra."""
    for k in ("floor", "step"):  # the first steps under a dispatch mode pay one-off costs
        with OpTimer():
            steps[k]()
    timers = {k: OpTimer() for k in ("floor", "step")}
    wall = defaultdict(float)
    for _ in range(rounds):
        for k, timer in timers.items():
            with timer:
                wall[k] += timed(steps[k]) / 1000
    kinds = sorted(set(timers["floor"].seconds) | set(timers["step"].seconds),
                   key=lambda kind: -timers["step"].seconds[kind])
    rows = []

    def rate(gflop, seconds):
        return gflop / seconds if gflop and seconds > 0 else None

    for kind in [*kinds, "outside operators", "total"]:
        ms, gflop = {}, {}
        for k, timer in timers.items():
            inside = sum(timer.seconds.values())
            seconds = {"outside operators": wall[k] - inside, "total": wall[k]}.get(kind, timer.seconds.get(kind, 0.0))
            ms[k] = 1000 * seconds / rounds
            gflop[k] = (sum(timer.flops.values()) if kind == "total" else timer.flops.get(kind, 0.0)) / rounds / 1e9
        rows.append({"operators": kind, "floor ms": ms["floor"], "step ms": ms["step"],
                     "extra ms": ms["step"] - ms["floor"], "floor GFLOP/s": rate(gflop["floor"], ms["floor"] / 1000),
                     "step GFLOP/s": rate(gflop["step"], ms["step"] / 1000),
                     "extra GFLOP/s": rate(gflop["step"] - gflop["floor"], (ms["step"] - ms["floor"]) / 1000)})
    return rows


def measure(pair: str, method: str, batch: int, rounds: int, device, settle: int = 1, with_breakdown: bool = False,
            with_compile: bool = False) -> dict:
    names, _, classes = pair.partition("@")
    teacher, student = names.split(":")
    classes = int(classes or 100)
    batch = 128 if classes == 10 else batch  # the default run's batch for its pair
    steps = {"step": Step(teacher, student, classes, method, batch, device, fast=True),
             "floor": Step(teacher, student, classes, None, batch, device, fast=True),
             "plain": Step(teacher, student, classes, method, batch, device, fast=False)}
    flops = {k: steps[k].flops() for k in ("step", "floor")}  # also the first warm-up step
    compile_s = None
    if with_compile:
        steps["compiled"] = Step(teacher, student, classes, method, batch, device, fast=True)
        reuse_freed_memory(True)
        compile_s = steps["compiled"].compile()
    for s in steps.values():
        s()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            times[k].append(timed(s, settle))
    ms = {k: statistics.median(v) for k, v in times.items()}
    flop_ratio, time_ratio = flops["step"] / flops["floor"], ms["step"] / ms["floor"]
    row = {"pair": f"{teacher} -> {student}", "method": method, "batch": batch,
           "GFLOP/img": flops["step"] / batch / 1e9, "flop ratio": flop_ratio, "ms/step": ms["step"],
           "floor ms": ms["floor"], "time ratio": time_ratio, "time / flop": time_ratio / flop_ratio,
           "plain ms": ms["plain"], "vs plain": ms["plain"] / ms["step"]}
    if with_compile:
        row.update({"compiled ms": ms["compiled"], "compiled / eager": ms["compiled"] / ms["step"],
                    "compile s": compile_s})
    if with_breakdown:
        rows = breakdown(steps, rounds)
        print(f"\n{row['pair']}, {method}: every operator timed ({rounds} steps each; the dispatch mode adds "
              "its own cost to 'outside operators')")
        print(format_table(rows, formats={k: ".1f" for k in rows[0] if k != "operators"}))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="*", default=PAIRS, help="teacher:student[@classes] (classes default 100)")
    p.add_argument("--methods", nargs="*", default=["reviewkd"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--settle", type=int, default=1, help="untimed steps of each path before its timed step")
    p.add_argument("--breakdown", action="store_true", help="also time every operator: ms and GFLOP/s per kind")
    p.add_argument("--compile", action="store_true", help="also time the default step under torch.compile")
    args = p.parse_args()
    device = torch.device(args.device)
    print(describe_machine("auto", args.device))
    print(f"default path: folded teacher, channels_last, precision {resolve_precision('auto', device)}, freed memory "
          "reused; plain: eager fp32, channels-first, teacher as given, glibc's allocator as it is")
    rows = []
    for pair in args.pairs:
        for method in args.methods:
            rows.append(measure(pair, method, args.batch, args.rounds, device, args.settle, args.breakdown,
                                args.compile))
            print(format_table(rows[-1:], formats={k: ".2f" for k in rows[-1] if k not in ("pair", "method", "batch")}),
                  flush=True)
    print()
    print(format_table(rows, formats={k: ".2f" for k in rows[0] if k not in ("pair", "method", "batch")}))
    if args.csv:
        import csv

        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
