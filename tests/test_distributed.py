"""Data-parallel training on CPU with gloo: the engine's gradient averaging, checked against one
process, and torchrun runs of the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reviewkd as rk
from reviewkd.collectives import average_gradients

WORLD = 2
METHODS = {"vanilla": {}, "kd": {}, "reviewkd": {"warmup_epochs": 0, "kd_weight": 1.0}}


def _distiller(method: str) -> rk.Distiller:
    torch.manual_seed(0)
    student = rk.create_model("resnet8", 10)
    teacher = rk.create_model("resnet14", 10) if method != "vanilla" else None
    return rk.Distiller(student, teacher, method, **METHODS[method])


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _grads(d: rk.Distiller) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in d.named_parameters() if p.grad is not None}


def _worker(rank: int, method: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        d = _distiller(method)
        d.train()
        x, y = _batch()
        shard = slice(rank * 4, rank * 4 + 4)  # each rank sees its half of the global batch
        _, losses = d(x[shard], y[shard], epoch=1)
        sum(losses.values()).backward()
        average_gradients(d.trainable_parameters())  # what the loop does after a step's backward passes
        grads = _grads(d)
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
        opt.step()
        params = {n: p.detach().clone() for n, p in d.named_parameters() if p.requires_grad}
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", [m if m == "reviewkd" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_averaged_gradients_equal_the_mean_of_per_shard_gradients(method, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(method, init_file, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # One process, each shard separately (BatchNorm statistics per shard, as on each rank), then the mean.
    x, y = _batch()
    per_shard = []
    for r in range(WORLD):
        d = _distiller(method)
        d.train()
        _, losses = d(x[r * 4:r * 4 + 4], y[r * 4:r * 4 + 4], epoch=1)
        sum(losses.values()).backward()
        per_shard.append(_grads(d))
    expected = {n: (per_shard[0][n] + per_shard[1][n]) / 2 for n in per_shard[0]}

    assert set(ranks[0]["grads"]) == set(expected)
    assert not any(n.startswith("teacher.") for n in expected)
    for name, g in expected.items():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"ranks disagree on {name} after the step"


def _torchrun(args, cwd, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "reviewkd", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_writes_once_and_resumes(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
name: ddp
output_dir: {tmp_path}
data: {{name: fashion_mnist, batch_size: 64, subset: 256, eval_batch_size: 128}}
model: {{name: resnet8}}
method: {{name: vanilla}}
solver: {{lr: 0.05, epochs: 2, schedule: cosine}}
runtime: {{precision: fp32}}
""")
    first = _torchrun([str(cfg), "--stop-after", "1", "--no-progress"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".pt", ".csv")) == ["best.pt", "last.pt", "metrics.csv"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1

    second = _torchrun([str(cfg), "--resume", "--no-progress"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert second.stdout.count("best top-1") == 1  # only rank 0 reports


@pytest.mark.slow
def test_torchrun_failure_ends_the_job_with_the_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {name: fashion_mnist, root: /nonexistent}\nmodel: {name: resnet8}\n")
    result = _torchrun([str(cfg), f"output_dir={tmp_path}"], cwd=tmp_path, timeout=180)
    assert result.returncode != 0
    # each rank ends with our one-line message (torchrun's launcher then prints its own summary)
    assert "reviewkd train: error: Fashion-MNIST file" in result.stderr
    assert "reviewkd/engine" not in result.stderr and "reviewkd/data" not in result.stderr  # no frames of ours


def _crd_distiller() -> rk.Distiller:
    torch.manual_seed(0)
    targets = torch.arange(16) % 10
    context = {"num_samples": 16, "train_targets": targets, "num_classes": 10}
    return rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet14", 10), "crd", context=context)


def _crd_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        d = _crd_distiller()
        d.train()
        x, y = _batch()
        shard = slice(rank * 4, rank * 4 + 4)
        _, losses = d(x[shard], y[shard], epoch=1, index=torch.arange(8)[shard])
        sum(losses.values()).backward()
        torch.save({k: v.clone() for k, v in d.method.state_dict().items()}, os.path.join(out_dir, f"crd{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_crd_memory_banks_stay_identical_across_ranks(tmp_path):
    initial = {k: v.clone() for k, v in _crd_distiller().method.state_dict().items()}
    mp.spawn(_crd_worker, args=(tempfile.mktemp(dir=tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"crd{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ("memory_s", "memory_t", "z"):
        key = next(k for k in ranks[0] if k.endswith(name))
        assert torch.equal(ranks[0][key], ranks[1][key]), name
    bank = next(k for k in ranks[0] if k.endswith("memory_s"))
    changed = (ranks[0][bank] != initial[bank]).any(dim=1)
    # the rows of both ranks' samples (0..7) were updated on every rank, the others not
    assert changed[:8].all() and not changed[8:].any()


@pytest.mark.slow
def test_torchrun_trains_the_teacher_first_and_records_what_eval_reports(tmp_path, capsys):
    """Both processes train the missing teacher together, then distil from the same finished one;
    the accuracies the run records (teacher's and student's) are what `reviewkd eval` reports."""
    from reviewkd.cli import main

    common = "data: {name: fashion_mnist, batch_size: 64, subset: 256, eval_batch_size: 128}\n" \
             "solver: {lr: 0.05, epochs: 1, schedule: cosine}\nruntime: {precision: fp32}\n"
    (tmp_path / "teacher.yaml").write_text(f"name: teacher\noutput_dir: {tmp_path}\nmodel: {{name: resnet14}}\n{common}")
    (tmp_path / "student.yaml").write_text(
        f"name: student\noutput_dir: {tmp_path}\nmodel: {{name: resnet8}}\nmethod: {{name: kd}}\n"
        f"teacher: {{name: resnet14, checkpoint: {tmp_path}/teacher/best.pt, config: {tmp_path}/teacher.yaml}}\n{common}")
    result = _torchrun([str(tmp_path / "student.yaml"), "--no-progress"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best top-1") == 1  # only rank 0 reports
    assert torch.load(tmp_path / "teacher" / "last.pt", weights_only=True)["done"]

    def evaluated(path: Path) -> float:
        capsys.readouterr()
        assert main(["eval", str(path)]) == 0
        header, row = [line.split() for line in capsys.readouterr().out.strip().splitlines()[::2]]
        return float(dict(zip(header, row))["test_top1"])

    student = torch.load(tmp_path / "student" / "last.pt", weights_only=True)
    assert student["teacher_metrics"]["test_top1"] == pytest.approx(evaluated(tmp_path / "teacher" / "best.pt"), abs=0.006)
    assert student["metrics"]["test_top1"] == pytest.approx(evaluated(tmp_path / "student" / "last.pt"), abs=0.006)
