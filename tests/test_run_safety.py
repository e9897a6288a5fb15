"""What the loop guarantees a run: killed at any moment and resumed, it ends exactly as an
uninterrupted run; Ctrl-C says what was saved; the student does not depend on whether its teacher
was trained first in the same process; everything cheap is checked before anything expensive."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reviewkd.engine.checkpoint as checkpoint_module
import reviewkd.engine.loop as loop_module
from reviewkd import Distiller
from reviewkd.cli import main
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import Run
from conftest import TINY, student_overrides, tiny  # noqa: F401  (the teacher and reference fixtures live there)

REPO = Path(__file__).resolve().parents[1]
class Killed(BaseException):
    """A hard stop: nothing of ours catches it (as SIGKILL would not let anything run)."""


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(a_dir / name), load_checkpoint(b_dir / name)
        assert (a["stage"], a["stage_iteration"], a["epoch"], a["best_score"]) == \
               (b["stage"], b["stage_iteration"], b["epoch"], b["best_score"]), name
        for part in ("student", "method"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{name}: {part}.{key}"
        for sa, sb in zip(a["optimizers"]["main"]["state"].values(), b["optimizers"]["main"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), name
        strip = lambda rows: [{k: v for k, v in r.items() if k not in loop_module.TIMING_KEYS} for r in rows]  # noqa: E731
        assert strip(a["history"]) == strip(b["history"]), name
        assert a["metrics"] == b["metrics"], name


def _kill_at_step(monkeypatch, step: int) -> None:
    losses, calls = Distiller.losses, {"n": 0}

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "losses", counting)


def _kill_at_write(monkeypatch, write: int, during: bool) -> None:
    """Stop at the ``write``-th checkpoint write: before it starts, or halfway through it
    (the temporary file stays behind, as after a hard kill)."""
    save, calls = checkpoint_module.atomic_save, {"n": 0}

    def partial_save(obj, f):
        f.write(b"half a checkpoint")
        raise Killed

    def stopping(obj, path):
        calls["n"] += 1
        if calls["n"] == write:
            if not during:
                raise Killed
            monkeypatch.setattr(checkpoint_module.torch, "save", partial_save)
            monkeypatch.setattr(checkpoint_module.os, "unlink", lambda p: None)  # no clean-up on a hard kill
        save(obj, path)

    monkeypatch.setattr(loop_module, "atomic_save", stopping)


@pytest.mark.parametrize("where", [pytest.param("step 2", marks=pytest.mark.slow), "step 7",
                                   pytest.param("write 1", marks=pytest.mark.slow), "write 2",
                                   pytest.param("write 3", marks=pytest.mark.slow), "during write 4"])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(where, tmp_path, teacher, reference, monkeypatch):
    writes = (reference.parent / "writes.txt").read_text().split()
    assert writes[:2] == ["best.pt", "last.pt"]  # epoch 1 is always the best so far: best.pt is written first
    cfg = tiny(tmp_path, "run", *student_overrides(teacher))
    number = int(where.split()[-1])
    if where.startswith("step"):
        _kill_at_step(monkeypatch, number)  # 4 steps per epoch: step 7 is in the middle of epoch 2
    else:
        _kill_at_write(monkeypatch, number, during=where.startswith("during"))
    with pytest.raises(Killed):
        Run(cfg, progress=False).fit()
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    if where.startswith("during"):
        assert list(run_dir.glob(".*.tmp")), "the interrupted write should have left its temporary file"

    Run(tiny(tmp_path, "run", *student_overrides(teacher)), resume=True, progress=False).fit()
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(reference, run_dir)


def test_the_student_does_not_depend_on_training_its_teacher_first(tmp_path):
    teacher_cfg = tmp_path / "teacher.yaml"
    teacher_cfg.write_text("\n".join(f"{k}: {v}" for k, v in {
        "name": "t", "output_dir": str(tmp_path / "teachers"), "model": "{name: resnet14}",
        "data": "{name: fashion_mnist, subset: 256, batch_size: 64, eval_batch_size: 256}",
        "solver": "{lr: 0.05, epochs: 1, schedule: cosine}",
        "runtime": "{device: cpu, precision: fp32, deterministic: true}"}.items()) + "\n")
    common = ["method.name=kd", "teacher.name=resnet14", f"teacher.checkpoint={tmp_path / 'teachers' / 't' / 'best.pt'}",
              f"teacher.config={teacher_cfg}", "solver.epochs=1"]
    first = Run(tiny(tmp_path, "first", *common), progress=False)
    assert first.teacher_plan.config is not None  # the teacher is trained in this process first
    first.fit()
    second = Run(tiny(tmp_path, "second", *common), progress=False)
    assert second.teacher_plan.config is None  # now it is loaded
    second.fit()
    a, b = load_checkpoint(tmp_path / "first" / "last.pt"), load_checkpoint(tmp_path / "second" / "last.pt")
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert a["metrics"] == b["metrics"]


# ------------------------------------------------------------------------------- Ctrl-C
def _train_process(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A shell without job control starts background commands with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: give the child the default disposition, as a terminal's Ctrl-C finds it.
    return subprocess.Popen([sys.executable, "-m", "reviewkd", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout=120.0) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout
        time.sleep(0.02)


@pytest.mark.parametrize("when, signum", [pytest.param("before the first checkpoint", signal.SIGINT, marks=pytest.mark.slow),
                                          ("after a checkpoint", signal.SIGINT), ("after a checkpoint", signal.SIGTERM)])
def test_ctrl_c_says_truthfully_what_was_saved(when, signum, tmp_path):
    """Ctrl-C (SIGINT) and a scheduler's SIGTERM: exit 130 with one line saying what is kept."""
    run_dir = tmp_path / "c"
    # many epochs: the run must still be training when the signal arrives, however fast the machine
    args = [*(o for o in TINY if "deterministic" not in o), "data.subset=1024", "solver.epochs=50",
            f"output_dir={tmp_path}", "name=c", "--no-progress"]
    proc = _train_process([str(REPO / "configs" / "fashion_mnist" / "_base.yaml"), *args], tmp_path)
    if when == "after a checkpoint":
        _wait_for(lambda: (run_dir / "last.pt").is_file(), proc)
    else:
        _wait_for(lambda: (run_dir / "config.yaml").is_file(), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if (run_dir / "last.pt").is_file():
        epoch = load_checkpoint(run_dir / "last.pt")["epoch"]
        assert f"last.pt (at train epoch {epoch}) is kept: continue with --resume" in err
    else:
        assert when == "before the first checkpoint"
        assert "nothing was saved" in err


@pytest.mark.slow
def test_a_hard_kill_resumes_with_identical_checkpoints(tmp_path):
    """SIGKILL while the second epoch trains or its checkpoint is written, then --resume: the same
    files as a run that was never stopped (both in subprocesses, as a user runs them)."""
    args = [*TINY, f"output_dir={tmp_path}", "--no-progress"]
    config = str(REPO / "configs" / "fashion_mnist" / "_base.yaml")
    whole = _train_process([config, *args, "name=whole"], tmp_path)
    assert whole.wait(timeout=300) == 0, whole.communicate()
    killed = _train_process([config, *args, "name=killed"], tmp_path)
    metrics = tmp_path / "killed" / "metrics.csv"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, killed)
    killed.kill()
    killed.wait()
    resumed = _train_process([config, *args, "name=killed", "--resume"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "whole" / name), load_checkpoint(tmp_path / "killed" / name)
        assert a["epoch"] == b["epoch"]
        for key in a["student"]:
            assert torch.equal(a["student"][key], b["student"][key]), (name, key)


# ----------------------------------------------------------------------- cheap checks first
def run_cli(capsys, argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return (rc, *capsys.readouterr())


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    config = REPO / "configs" / "fashion_mnist" / "demo_reviewkd.yaml"
    rc, out, err = run_cli(capsys, ["train", config, f"output_dir={tmp_path}", "--dry-run",
                                    f"teacher.checkpoint={tmp_path / 'absent.pt'}"])
    assert rc == 0, err
    assert "# resolved config" in out and "name: demo_reviewkd" in out
    assert "student  resnet8: 78,042 parameters" in out and "teacher  resnet20:" in out
    # the review mechanism's pairs: resnet8 stages (post) -> resnet20 stages (pre), pooled entry last
    assert "entry 1: student (16, 32, 32) -> teacher (16, 32, 32)" in out
    assert "entry 4: student (64, 1, 1) -> teacher (64, 1, 1)" in out
    assert "# teacher: train resnet20 first from its config (demo_teacher: 5 epochs)" in out
    assert "shorter than" not in out  # the demo's 4 epochs cover its 1-epoch warm-up
    assert not any(tmp_path.iterdir())
    rc, out, err = run_cli(capsys, ["train", config, f"output_dir={tmp_path}", "--dry-run", "method.options.warmup_epochs=10"])
    assert rc == 0 and "this run (4 epochs) is shorter than reviewkd's warm-up (10 epochs)" in out, err


def test_pairing_errors_come_before_the_teacher_is_trained_or_data_read(tmp_path, capsys):
    teacher_cfg = tmp_path / "t.yaml"
    teacher_cfg.write_text(f"output_dir: {tmp_path}\nmodel: {{name: vgg13}}\ndata: {{name: fashion_mnist, root: /nonexistent}}\n")
    rc, out, err = run_cli(capsys, ["train", REPO / "configs" / "fashion_mnist" / "_base.yaml", f"output_dir={tmp_path}",
                                    "name=s", "model.name=resnet8", "method.name=reviewkd", "teacher.name=vgg13",
                                    f"teacher.config={teacher_cfg}", "data.root=/nonexistent"])
    assert rc == 2 and "teacher_stages=" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml"]  # no teacher run, no student run


def test_an_unwritable_output_folder_is_refused_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, out, err = run_cli(capsys, ["train", REPO / "configs" / "fashion_mnist" / "_base.yaml",
                                    f"output_dir={blocker / 'runs'}", "data.root=/nonexistent"])
    assert rc == 2 and "cannot write the run folder" in err, err


def test_checkpoints_that_do_not_fit_their_architecture_name_file_and_keys(tmp_path, capsys, teacher):
    # teacher: a resnet8 file declared as resnet14
    rc, out, err = run_cli(capsys, ["train", REPO / "configs" / "fashion_mnist" / "_base.yaml", f"output_dir={tmp_path}",
                                    "method.name=kd", "teacher.name=resnet14", f"teacher.checkpoint={teacher}",
                                    "data.root=/nonexistent"])
    assert rc == 2 and str(teacher) in err and "keys" in err and "teacher resnet14" in err, err
    assert len(err.strip().splitlines()) == 1

    # eval / export / resume of a run whose student weights were damaged
    cfg = tiny(tmp_path, "damaged", "solver.epochs=1")
    Run(cfg, progress=False).fit()
    last = tmp_path / "damaged" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["student"].pop("fc.weight")
    torch.save(ckpt, last)
    for argv in (["eval", last], ["export", last, "--out", tmp_path / "x"],
                 ["train", REPO / "configs" / "fashion_mnist" / "_base.yaml", *TINY, "solver.epochs=2",
                  f"output_dir={tmp_path}", "name=damaged", "--resume"]):
        rc, out, err = run_cli(capsys, argv)
        assert rc == 2 and str(last) in err and "missing keys: fc.weight" in err, (argv[0], err)
        assert len(err.strip().splitlines()) == 1


def test_a_teacher_from_an_unfinished_run_is_refused_or_finished_first(tmp_path, capsys):
    cfg = tiny(tmp_path, "t", "solver.epochs=2")
    Run(cfg, progress=False, stop_after=1).fit()
    best = tmp_path / "t" / "best.pt"
    student = [REPO / "configs" / "fashion_mnist" / "_base.yaml", *TINY, f"output_dir={tmp_path}", "name=s",
               "method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={best}", "--dry-run"]
    rc, out, err = run_cli(capsys, ["train", *student])
    assert rc == 2 and "has not finished" in err and str(best) in err, err
    # with its config, the plan is to finish the teacher's run first
    (tmp_path / "t.yaml").write_text(cfg.to_yaml())
    rc, out, err = run_cli(capsys, ["train", *student, f"teacher.config={tmp_path / 't.yaml'}"])
    assert rc == 0 and "# teacher: train resnet8 first" in out, err
    # a weight file that is no run checkpoint is used as it is
    torch.save(load_checkpoint(best)["student"], tmp_path / "weights.pt")
    rc, out, err = run_cli(capsys, ["train", *student[:-2], f"teacher.checkpoint={tmp_path / 'weights.pt'}", "--dry-run"])
    assert rc == 0 and f"# teacher: load resnet8 from {tmp_path / 'weights.pt'}" in out, err


def test_a_run_killed_in_its_pre_training_stage_resumes_to_the_uninterrupted_result(tmp_path, teacher, monkeypatch):
    """AB's connector pre-training is a stage of its own (own optimiser, checkpoints per epoch)."""
    overrides = ["method.name=ab", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
                 "method.options.pretrain_epochs=2", "solver.epochs=1"]
    Run(tiny(tmp_path, "whole", *overrides), progress=False).fit()
    _kill_at_step(monkeypatch, 6)  # 4 steps per epoch: the middle of the second pre-training epoch
    with pytest.raises(Killed):
        Run(tiny(tmp_path, "killed", *overrides), progress=False).fit()
    monkeypatch.undo()
    halfway = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert (halfway["stage"], halfway["stage_name"], halfway["position"]) == (0, "pretrain", 1)
    Run(tiny(tmp_path, "killed", *overrides), resume=True, progress=False).fit()
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "killed" / "last.pt")
    for part in ("student", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert a["metrics"] == b["metrics"] and a["optimizers"].keys() == {"pretrain", "main"}


def test_a_validation_split_selects_the_model_and_the_test_set_is_evaluated_once_at_the_end(tmp_path, capsys):
    from reviewkd.data import build_datasets

    a = build_datasets("fashion_mnist", subset=400, val_split=0.25, seed=0)
    b = build_datasets("fashion_mnist", subset=400, val_split=0.25, seed=0)
    assert a.num_samples == 300 and a.val.num_samples == 100 and a.test.num_samples == 400
    assert torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [10] * 10  # balanced over the classes
    # no held-out image is a training image
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.images)

    Run(tiny(tmp_path, "v", "data.val_split=0.25"), progress=False).fit()
    last, best = load_checkpoint(tmp_path / "v" / "last.pt"), load_checkpoint(tmp_path / "v" / "best.pt")
    rows = last["history"]
    assert last["score_key"] == "val_top1" and all("val_top1" in r and "test_top1" not in r for r in rows)
    assert last["best_score"] == max(r["val_top1"] for r in rows) == best["metrics"]["val_top1"]
    assert set(last["test_metrics"]) == {"test_top1", "test_top5", "test_loss"}

    def evaluated(path):
        capsys.readouterr()
        assert main(["eval", str(path)]) == 0
        header, row = [line.split() for line in capsys.readouterr().out.strip().splitlines()[::2]]
        return float(dict(zip(header, row))["test_top1"])

    assert evaluated(tmp_path / "v" / "last.pt") == pytest.approx(last["test_metrics"]["test_top1"], abs=0.006)
    assert evaluated(tmp_path / "v" / "best.pt") == pytest.approx(last["selected_test_metrics"]["test_top1"], abs=0.006)
