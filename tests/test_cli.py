"""The command line end to end on real Fashion-MNIST: training runs, eval, export, listings, and
the one-line errors every user mistake must end in (with no existing checkpoint touched)."""
from __future__ import annotations

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reviewkd.cli import main
from reviewkd.config import load_config
from reviewkd import Distiller
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.methods import list_methods
from reviewkd.models import create_model, list_models, model_family
from reviewkd.models.summary import DEFAULT_NUM_CLASSES, count_parameters

# Tiny but real: 256 training / 256 test images, 4 steps of 64 per epoch, fp32 on the CPU.
TINY_YAML = """\
data: {name: fashion_mnist, subset: 256, batch_size: 64, eval_batch_size: 256}
model: {name: resnet8}
method: {name: vanilla}
solver: {lr: 0.05, epochs: 1, schedule: cosine}
runtime: {device: cpu, precision: fp32}
"""


def run_cli(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_quiet(argv) -> tuple[int, str, str]:
    """``main`` outside a test function (module fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, out: str, err: str, command: str) -> str:
    assert rc != 0
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"reviewkd {command}: error: "), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config):
    """Three real one-epoch runs through the CLI: a resnet20 teacher (vanilla), then kd and
    reviewkd resnet8 students of it. Tests below must leave them as they are."""
    root = tmp_path_factory.mktemp("runs")
    teacher = root / "teacher" / "best.pt"
    specs = {
        "vanilla": ["name=teacher", "model.name=resnet20"],
        "kd": ["name=kd", "method.name=kd", "teacher.name=resnet20", f"teacher.checkpoint={teacher}"],
        "reviewkd": ["name=reviewkd", "method.name=reviewkd", "teacher.name=resnet20", f"teacher.checkpoint={teacher}",
                     "method.options.warmup_epochs=0"],
    }
    results = {}
    for method, overrides in specs.items():
        overrides = [f"output_dir={root}", *overrides]
        rc, out, err = run_quiet(["train", tiny_config, *overrides, "--no-progress"])
        name = overrides[1].split("=", 1)[1]
        results[method] = {"rc": rc, "out": out, "err": err, "dir": root / name, "overrides": overrides}
    return {"root": root, "config": tiny_config, "teacher": teacher, **results}


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["vanilla", "kd", "reviewkd"])
def test_train_end_to_end(runs, method):
    res = runs[method]
    assert res["rc"] == 0, res["err"]
    assert "Traceback" not in res["out"] + res["err"]
    run_dir: Path = res["dir"]
    assert f"outputs in {run_dir}" in res["out"]

    # config.yaml: every section and default written out, and it loads back to the same config.
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {"name", "output_dir", "seed", "data", "model", "teacher", "method", "solver", "runtime"} <= set(raw)
    assert {"root", "batch_size", "subset", "augment"} <= set(raw["data"])
    assert {"lr", "epochs", "milestones", "momentum", "weight_decay"} <= set(raw["solver"])
    saved = load_config(run_dir / "config.yaml")
    assert saved == load_config(runs["config"], res["overrides"])
    assert saved.method.name == method

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    top1 = float(rows[0]["test_top1"])
    assert 0.0 <= top1 <= 100.0
    assert float(rows[0]["loss_total"]) > 0

    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(run_dir / "curves.png") as im:
        im.verify()

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert best["epoch"] == last["epoch"] == 1
    assert best["method_name"] == method
    assert best["history"][-1]["test_top1"] == pytest.approx(top1)
    if method == "reviewkd":
        assert any("abf" in k.lower() or "fusion" in k for k in best["method"]), list(best["method"])


# --------------------------------------------------------------------------------- eval
def test_eval_prints_table_with_top1(runs, capsys):
    run_dir = runs["reviewkd"]["dir"]
    before = snapshot(runs["root"])
    rc, out, err = run_cli(capsys, ["eval", run_dir / "last.pt"])
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    header = lines[0].split()
    assert {"checkpoint", "model", "epoch", "test_top1", "test_top5", "test_loss"} <= set(header)
    row = lines[-1].split()
    assert len(row) == len(header)
    values = dict(zip(header, row))
    assert values["model"] == "resnet8" and values["epoch"] == "1"
    # Same images, same weights, fp32: the accuracy logged at the end of training (within one image).
    logged = load_checkpoint(run_dir / "last.pt")["history"][-1]["test_top1"]
    assert abs(float(values["test_top1"]) - logged) <= 100.0 / 256 + 1e-6
    assert snapshot(runs["root"]) == before


# ------------------------------------------------------------------------------- export
def test_export_every_format_reproduces_the_student(runs, capsys, tmp_path, fashion_batch):
    import onnxruntime as ort
    from safetensors.torch import load_file

    best = runs["reviewkd"]["dir"] / "best.pt"
    out_dir = tmp_path / "export"
    rc, out, err = run_cli(capsys, ["export", best, "--out", out_dir])
    assert rc == 0, err
    for fmt in ("pt", "safetensors", "torchscript", "onnx"):
        assert fmt in out

    # The student rebuilt by hand from the run checkpoint (which does hold the ABF modules).
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["method"], "a reviewkd checkpoint should carry the method's modules"
    student = create_model(ckpt["model_name"], num_classes=ckpt["num_classes"])
    student.load_state_dict(ckpt["student"])
    student.eval()
    images = fashion_batch[0][:16].contiguous()
    with torch.no_grad():
        expected = student(images)
    student_keys = set(create_model("resnet8", num_classes=10).state_dict())

    def check_state(state):
        assert set(state) == student_keys
        assert not any(k.startswith("method") or "abf" in k.lower() or "fusion" in k for k in state)
        assert not set(state) & set(ckpt["method"])
        for k, v in state.items():
            assert torch.equal(v, ckpt["student"][k]), k
        fresh = create_model("resnet8", num_classes=10)
        fresh.load_state_dict(state)
        with torch.no_grad():
            return fresh.eval()(images)

    pt = torch.load(out_dir / "resnet8.pt", map_location="cpu", weights_only=True)
    assert pt["model_name"] == "resnet8" and pt["num_classes"] == 10
    torch.testing.assert_close(check_state(pt["model"]), expected, atol=1e-4, rtol=0)

    torch.testing.assert_close(check_state(load_file(str(out_dir / "resnet8.safetensors"))), expected, atol=1e-4, rtol=0)

    scripted = torch.jit.load(str(out_dir / "resnet8.torchscript.pt"), map_location="cpu")
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), expected, atol=1e-4, rtol=0)

    session = ort.InferenceSession(str(out_dir / "resnet8.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})  # batch 16, exported with 4
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- listings
def test_models_lists_every_model_with_parameters(capsys):
    rc, out, err = run_cli(capsys, ["models"])
    assert rc == 0, err
    lines = out.splitlines()
    header = lines[0].split()
    assert "name" in header and "parameters" in header
    col = header.index("parameters")
    table = lines[2:lines.index("")] if "" in lines else lines[2:]  # the conventions follow a blank line
    rows = {ln.split()[0]: ln.split() for ln in table}
    assert "2 x multiply-adds" in out
    assert set(rows) == set(list_models())
    for name in list_models():
        model = create_model(name, num_classes=DEFAULT_NUM_CLASSES[model_family(name)])
        assert int(rows[name][col].replace(",", "")) == count_parameters(model), name


@pytest.mark.parametrize("argv", [["methods"], ["models", "--methods"]])
def test_methods_lists_papers(capsys, argv):
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0, err
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln.strip()}
    for name in ("vanilla", "kd", "reviewkd"):
        assert name in lines
    assert "Hinton" in lines["kd"]
    assert "Knowledge Review" in lines["reviewkd"]
    for name, paper in list_methods().items():
        assert paper in lines[name]


# ---------------------------------------------------------------------- user errors
def _bad_yaml(tmp: Path) -> Path:
    path = tmp / "typo.yaml"
    path.write_text(TINY_YAML.replace("schedule: cosine", "schedule: cosine, momentun: 0.9"))
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 40)
    return path


def _truncated(tmp: Path, runs) -> Path:
    data = (runs["reviewkd"]["dir"] / "best.pt").read_bytes()
    path = tmp / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _bare_state_dict(tmp: Path) -> Path:
    path = tmp / "weights.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    return path


# id -> (argv builder (tmp, runs) -> argv, substrings the one-line message must contain)
BAD_INPUTS = {
    "unknown-override-key": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=typo", "solver.lrr=0.1"],
        lambda tmp, r: ["solver.lrr", str(r["config"])],
    ),
    "unknown-yaml-key": (
        lambda tmp, r: ["train", _bad_yaml(tmp), f"output_dir={r['root']}"],
        lambda tmp, r: ["solver.momentun", str(tmp / "typo.yaml")],
    ),
    "wrong-type": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=wrongtype", "solver.epochs=abc"],
        lambda tmp, r: ["solver.epochs", "abc"],
    ),
    "missing-config": (
        lambda tmp, r: ["train", tmp / "nope.yaml", f"output_dir={r['root']}"],
        lambda tmp, r: [str(tmp / "nope.yaml"), "not found"],
    ),
    "missing-dataset": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=nodata", "data.root=/nonexistent"],
        lambda tmp, r: ["/nonexistent"],
    ),
    "eval-garbage": (lambda tmp, r: ["eval", _garbage(tmp)], lambda tmp, r: [str(tmp / "garbage.pt"), "corrupted"]),
    "export-garbage": (
        lambda tmp, r: ["export", _garbage(tmp), "--out", tmp / "exp"],
        lambda tmp, r: [str(tmp / "garbage.pt"), "corrupted"],
    ),
    "eval-truncated": (
        lambda tmp, r: ["eval", _truncated(tmp, r)], lambda tmp, r: [str(tmp / "truncated.pt"), "corrupted"],
    ),
    "export-truncated": (
        lambda tmp, r: ["export", _truncated(tmp, r), "--out", tmp / "exp"],
        lambda tmp, r: [str(tmp / "truncated.pt"), "corrupted"],
    ),
    "eval-missing-checkpoint": (
        lambda tmp, r: ["eval", tmp / "missing.pt"], lambda tmp, r: [str(tmp / "missing.pt"), "not found"],
    ),
    "eval-bare-state-dict": (
        lambda tmp, r: ["eval", _bare_state_dict(tmp)], lambda tmp, r: ["not a reviewkd run checkpoint"],
    ),
    "export-unknown-format": (
        lambda tmp, r: ["export", r["reviewkd"]["dir"] / "best.pt", "--out", tmp / "exp", "--formats", "pt,tflite"],
        lambda tmp, r: ["tflite"],
    ),
    "unknown-model": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=typo_model", "model.name=resnet9"],
        lambda tmp, r: ["resnet9", "Did you mean", "resnet8"],
    ),
    "unknown-method": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=typo_method", "method.name=reviewdk"],
        lambda tmp, r: ["reviewdk", "reviewkd"],
    ),
    "teacher-wrong-architecture": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=wrong_teacher", "method.name=kd",
                        "teacher.name=resnet8", f"teacher.checkpoint={r['teacher']}"],
        lambda tmp, r: [str(r["teacher"]), "resnet8", "unexpected keys", "layer1.1."],
    ),
    "teacher-missing-checkpoint": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=no_teacher", "method.name=kd",
                        "teacher.name=resnet20", f"teacher.checkpoint={tmp / 'none.pt'}"],
        lambda tmp, r: [str(tmp / "none.pt")],
    ),
    "existing-run-without-resume": (
        lambda tmp, r: ["train", r["config"], *r["kd"]["overrides"]],
        lambda tmp, r: [str(r["kd"]["dir"]), "--resume"],
    ),
    "resume-nothing": (
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=never_started", "--resume"],
        lambda tmp, r: ["cannot resume", str(r["root"] / "never_started" / "last.pt")],
    ),
    "resume-other-architecture": (
        # the teacher run is a resnet20; the tiny config asks for resnet8
        lambda tmp, r: ["train", r["config"], f"output_dir={r['root']}", "name=teacher", "--resume"],
        lambda tmp, r: ["resnet20", "resnet8"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_touches_nothing(runs, capsys, tmp_path, case):
    build_argv, expected = BAD_INPUTS[case]
    argv = build_argv(tmp_path, runs)
    before = snapshot(runs["root"])
    rc, out, err = run_cli(capsys, argv)
    line = assert_one_line_error(rc, out, err, argv[0])
    for text in expected(tmp_path, runs):
        assert text in line, f"{text!r} not in {line!r}"
    # No existing checkpoint (or any other file) changed, and no run folder appeared.
    assert snapshot(runs["root"]) == before


def test_bad_inputs_through_the_installed_command(runs, tmp_path):
    """The real console script: the user sees one line and never a traceback."""
    exe = Path(sys.executable).parent / "reviewkd"
    assert exe.is_file(), exe
    before = snapshot(runs["root"])
    cases = [
        (["train", str(runs["config"]), f"output_dir={runs['root']}", "solver.lrr=0.1"], "train", "solver.lrr"),
        (["eval", str(_garbage(tmp_path))], "eval", "corrupted"),
    ]
    for argv, command, text in cases:
        proc = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=300)
        line = assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, command)
        assert text in line
    assert snapshot(runs["root"]) == before


def test_overrides_may_follow_options(tiny_config, tmp_path, capsys):
    """``reviewkd train CONFIG --no-progress key=value``: overrides after an option still apply."""
    rc, out, err = run_cli(capsys, ["train", tiny_config, "--no-progress", f"output_dir={tmp_path}", "name=late",
                                    "--stop-after", "1", "solver.epochs=2", "data.subset=128"])
    assert rc == 0, err
    ckpt = load_checkpoint(tmp_path / "late" / "last.pt")
    assert ckpt["epoch"] == 1
    assert ckpt["config"]["solver"]["epochs"] == 2 and ckpt["config"]["data"]["subset"] == 128


# ------------------------------------------------------------------- divergence
def test_exploding_learning_rate_stops_and_keeps_last_checkpoint(tiny_config, tmp_path, capsys):
    """Epoch 1 trains normally; the multistep milestone then multiplies the LR by 1e20, the loss
    becomes non-finite, and the run stops naming epoch 1's checkpoint, which stays as it was."""
    args = ["train", tiny_config, f"output_dir={tmp_path}", "name=diverge", "solver.epochs=2",
            "solver.schedule=multistep", "solver.milestones=[1]", "solver.gamma=1e20"]
    rc, out, err = run_cli(capsys, [*args, "--no-progress", "--stop-after", "1"])
    assert rc == 0, err
    run_dir = tmp_path / "diverge"
    before = {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in ("last.pt", "best.pt")}

    rc, out, err = run_cli(capsys, [*args, "--no-progress", "--resume"])
    line = assert_one_line_error(rc, out, err, "train")
    assert "loss became" in line and "epoch 2/2" in line
    assert str(run_dir / "last.pt") in line
    after = {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in ("last.pt", "best.pt")}
    assert after == before
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    with open(run_dir / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_nan_loss_on_a_fresh_run_claims_no_checkpoint(tiny_config, tmp_path, capsys, monkeypatch):
    """A loss that is NaN from the first step: nothing good was ever saved, and the message must
    not send the user to a checkpoint that does not exist."""
    losses_of = Distiller.losses

    def nan_losses(self, *args, **kwargs):
        logits, losses = losses_of(self, *args, **kwargs)
        return logits, {k: v * float("nan") for k, v in losses.items()}

    monkeypatch.setattr(Distiller, "losses", nan_losses)
    rc, out, err = run_cli(capsys, ["train", tiny_config, f"output_dir={tmp_path}", "name=nan", "--no-progress"])
    line = assert_one_line_error(rc, out, err, "train")
    assert "loss became nan" in line
    assert not (tmp_path / "nan" / "last.pt").exists()
    assert "no checkpoint" in line.lower()
    assert "last good checkpoint is" not in line


@pytest.mark.slow
def test_quick_demo_distils_for_part_of_the_run_from_identical_students(tmp_path, capsys):
    rc, out, err = run_cli(capsys, ["demo", "--quick", "--out", tmp_path / "demo"])
    assert rc == 0, err
    assert "vanilla student" in out and "ReviewKD student" in out and "top-1 points" in out
    vanilla = load_checkpoint(tmp_path / "demo" / "demo_vanilla" / "last.pt")["history"]
    review = load_checkpoint(tmp_path / "demo" / "demo_reviewkd" / "last.pt")["history"]
    # epoch 1 is cross-entropy alone (warm-up) from the same initial weights: the same epoch as the vanilla one
    assert review[0]["loss_reviewkd"] == 0.0 and review[0]["test_top1"] == vanilla[0]["test_top1"]
    assert review[1]["loss_reviewkd"] > 0.0  # epoch 2 distils
    assert (tmp_path / "demo" / "report" / "top1.png").is_file()
