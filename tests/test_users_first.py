"""What a user meets first: recipes by name, the config rules (options merge, paths), what reaches a
teacher trained first, a teacher at another input size, logs without a terminal, checkpoints every N
steps, and the listing commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reviewkd.catalogue import RECIPES_DIR, recipe_names
from reviewkd.cli import main
from reviewkd.config import ConfigError, load_config
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import Run
from conftest import student_overrides, tiny
from test_run_safety import Killed, _kill_at_step, assert_same_run


def run_cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------ recipes
def test_recipes_ship_inside_the_package_and_load_by_name():
    assert RECIPES_DIR.parent.name == "reviewkd" and RECIPES_DIR.is_dir()
    names = recipe_names()
    assert "fashion_mnist/resnet20_resnet8/reviewkd" in names
    assert not any(Path(n).name.startswith("_") for n in names)  # bases are not recipes
    by_name = load_config("fashion_mnist/resnet20_resnet8/reviewkd")
    by_file = load_config(RECIPES_DIR / "fashion_mnist/resnet20_resnet8/reviewkd.yaml")
    assert by_name == by_file and by_name.method.name == "reviewkd"
    # every recipe loads and validates (a broken shipped recipe fails here, not on a user's machine)
    for name in names:
        load_config(name)


def test_an_unknown_recipe_suggests_the_closest_names(capsys):
    with pytest.raises(ConfigError, match="Did you mean fashion_mnist/resnet20_resnet8/reviewkd"):
        load_config("fashion_mnist/resnet20_resnet8/reviewdk")
    rc, out, err = run_cli(capsys, ["train", "fashion_mnist/nonexistent"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "reviewkd recipes" in err


def test_reviewkd_recipes_lists_them(capsys):
    rc, out, err = run_cli(capsys, ["recipes", "fashion_mnist"])
    assert rc == 0
    assert "fashion_mnist/resnet20_resnet8/reviewkd" in out and "cifar100/" not in out
    row = next(line for line in out.splitlines() if line.startswith("fashion_mnist/resnet20_resnet8/kd "))
    assert row.split()[1:] == ["classification", "fashion_mnist", "resnet8", "resnet20", "kd"]
    rc, out, err = run_cli(capsys, ["recipes", "nope"])
    assert rc == 2 and "cifar100" in err


# ------------------------------------------------------------------------------ config rules
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_method_options_merge_over_the_recipe(tmp_path):
    base = _write(tmp_path / "base.yaml", "method: {name: reviewkd, options: {weight: 1.0, warmup_epochs: 5}}\n")
    same = _write(tmp_path / "same.yaml", "base: base.yaml\nmethod: {options: {weight: 2.0}}\n")
    other = _write(tmp_path / "other.yaml", "base: base.yaml\nmethod: {name: kd, options: {temperature: 2.0}}\n")
    assert load_config(same).method.options == {"weight": 2.0, "warmup_epochs": 5}
    # another method does not inherit options meant for the base's method
    assert load_config(other).method.options == {"temperature": 2.0}
    dotted = load_config(base, ["method.options.weight=3"])
    mapping = load_config(base, ["method.options={weight: 3}"])
    assert dotted.method.options == mapping.method.options == {"weight": 3, "warmup_epochs": 5}


def test_config_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    _write(tmp_path / "teachers" / "t.yaml", "name: t\nmodel: {name: resnet20}\n")
    _write(tmp_path / "students" / "_base.yaml", "teacher: {name: resnet20, config: ../teachers/t.yaml}\n")
    student = _write(tmp_path / "students" / "s.yaml", "base: _base.yaml\nmethod: {name: kd}\n")
    monkeypatch.chdir(tmp_path / "students")  # not where the path would resolve from the working directory
    cfg = load_config(student)
    assert Path(cfg.teacher.config) == (tmp_path / "teachers" / "t.yaml").resolve()
    # on the command line, a path is relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert load_config(student, ["teacher.config=teachers/t.yaml"]).teacher.config == "teachers/t.yaml"
    # every shipped recipe's teacher config exists wherever it is run from
    for name in recipe_names():
        t = load_config(name).teacher
        if t is not None and t.config is not None:
            assert Path(t.config).is_file(), name


# ------------------------------------------------------------------------------ teacher plan
def test_the_teacher_plan_says_which_overrides_reach_a_teacher_trained_first(tmp_path):
    teacher_cfg = _write(tmp_path / "t.yaml", "name: t\nmodel: {name: resnet8}\ndata: {subset: 512}\n")
    cfg = tiny(tmp_path, "s", "method.name=kd", "teacher.name=resnet8", f"teacher.config={teacher_cfg}",
               "teacher.overrides=[solver.epochs=2]", "data.subset=128")
    run = Run(cfg, progress=False)
    plan = run.teacher_plan
    assert plan.config is not None  # to be trained first
    assert plan.config.output_dir == str(tmp_path)  # where to run: passed on
    assert plan.config.runtime.precision == "fp32"  # how to run: passed on
    assert plan.config.data.subset == 512  # what to train: the teacher's own config decides
    assert plan.config.solver.epochs == 2  # ... unless teacher.overrides says otherwise
    text = plan.describe()
    assert "does not get" in text and "data.subset=128" in text and "teacher.overrides" in text
    assert "teacher does not get" in run.describe()


def test_a_teacher_trained_at_another_input_size_is_flagged(tmp_path, teacher, capsys):
    ckpt = load_checkpoint(teacher)
    assert list(ckpt["input_size"]) == [3, 32, 32]
    ckpt["input_size"] = [3, 64, 64]
    moved = tmp_path / "teacher64" / "best.pt"
    moved.parent.mkdir()
    torch.save(ckpt, moved)
    cfg = tiny(tmp_path, "s", "method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={moved}")
    run = Run(cfg, progress=False)
    assert "3x64x64" in run.teacher_plan.warning and "3x32x32" in run.teacher_plan.warning
    assert "trained at input size 3x64x64" in run.describe()
    same = Run(tiny(tmp_path, "s2", "method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={teacher}"),
               progress=False)
    assert same.teacher_plan.warning is None


# ------------------------------------------------------------------------------ logs and checkpoints
def test_without_a_terminal_progress_lines_carry_loss_terms_and_speed(tmp_path, teacher):
    cfg = tiny(tmp_path, "r", *student_overrides(teacher), "solver.epochs=1", "runtime.log_every_seconds=0.000001")
    Run(cfg, progress=True).fit()  # pytest's stdout is not a terminal: no bar
    log = (tmp_path / "r" / "train.log").read_text().splitlines()
    lines = [line for line in log if line.startswith("train iteration ")]
    assert lines, log
    assert "samples/s" in lines[0] and "ce " in lines[0] and "reviewkd " in lines[0]
    quiet = tiny(tmp_path, "q", *student_overrides(teacher), "solver.epochs=1", "runtime.log_every_seconds=0")
    Run(quiet, progress=True).fit()
    assert not [line for line in (tmp_path / "q" / "train.log").read_text().splitlines()
                if line.startswith("train iteration ")]


def test_checkpoints_every_n_steps_resume_to_the_uninterrupted_result(tmp_path, teacher, reference, monkeypatch):
    every = ["runtime.checkpoint_every=3"]  # 4 steps per epoch: step 6 is in the middle of epoch 2
    cfg = tiny(tmp_path, "run", *student_overrides(teacher), *every)
    _kill_at_step(monkeypatch, 8)
    with pytest.raises(Killed):
        Run(cfg, progress=False).fit()
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["stage_iteration"] == 6 and saved["open_row"]["window"] == 2
    Run(tiny(tmp_path, "run", *student_overrides(teacher), *every), resume=True, progress=False).fit()
    assert_same_run(reference, tmp_path / "run")


# ------------------------------------------------------------------------------ listings
def test_version_methods_and_models(capsys, monkeypatch):
    import reviewkd
    from reviewkd.methods import method_options
    import reviewkd.models.summary as summary

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"reviewkd {reviewkd.__version__}"

    rc, out, err = run_cli(capsys, ["methods", "reviewkd"])
    assert rc == 0 and "Distilling Knowledge via Knowledge Review" in out
    assert "teacher pre-activation stage features" in out
    for key, value in method_options("reviewkd").items():
        assert f"  {key} = {value!r}" in out
    rc, out, err = run_cli(capsys, ["methods", "reviewdk"])
    assert rc == 2 and "Did you mean reviewkd" in err

    # the listing builds no model: it reads the table shipped with the package
    monkeypatch.setattr(summary, "create_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    rc, out, err = run_cli(capsys, ["models", "--family", "cifar"])
    assert rc == 0 and "resnet8 " in out and "2 x multiply-adds" in out


def test_the_shipped_zoo_table_matches_a_fresh_measurement():
    from reviewkd.models import list_models
    from reviewkd.models.summary import ZOO_TABLE_FILE, zoo_table

    stored = {row["name"]: row for row in json.loads(ZOO_TABLE_FILE.read_text())}
    assert sorted(stored) == sorted(list_models()), "refresh it: python -m reviewkd.models.summary"
    for row in zoo_table():
        want = stored[row["name"]]
        assert (row["parameters"], row["stages"], list(row["channels"])) == \
               (want["parameters"], want["stages"], want["channels"]), row["name"]
        assert row["MFLOPs"] == pytest.approx(want["MFLOPs"], rel=1e-9), row["name"]


def test_sync_batchnorm_keeps_the_activation_timm_folds_into_its_batchnorm():
    timm = pytest.importorskip("timm")
    from reviewkd.engine.loop import _convert_sync_batchnorm

    model = _convert_sync_batchnorm(timm.create_model("efficientnet_b0", pretrained=False, num_classes=3))
    assert isinstance(model.bn1, torch.nn.SyncBatchNorm) and isinstance(model.bn1.act, torch.nn.SiLU)
    plain = _convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))
    assert isinstance(plain[1], torch.nn.SyncBatchNorm)


def test_a_users_own_images_select_best_pt_on_a_held_out_split_by_default(tmp_path):
    from reviewkd.config import Config

    own = Config.model_validate({"data": {"name": "imagefolder", "root": str(tmp_path)}})
    assert own.data.selection_split == 0.1
    assert Config.model_validate({"data": {"name": "imagefolder", "val_split": 0}}).data.selection_split is None
    assert Config.model_validate({"data": {"name": "cifar100"}}).data.selection_split is None  # papers' convention
    assert Config.model_validate({"data": {"name": "cifar100", "val_split": 0.2}}).data.selection_split == 0.2
    assert load_config("imagenet/resnet34_resnet18_reviewkd").data.selection_split is None  # the released recipe
    dry = Run(tiny(tmp_path, "r"), progress=False).describe()
    assert "best.pt selected on the test set, the papers' convention" in dry
    dry = Run(tiny(tmp_path, "v", "data.val_split=0.25"), progress=False).describe()
    assert "best.pt selected on 25% of the training set held out" in dry


def test_a_teacher_config_that_names_its_stages_names_them_for_the_student_run_too(tmp_path, teacher):
    stages = "features: {post: [layer1, layer2], pooled: avgpool}"
    teacher_cfg = _write(tmp_path / "t.yaml", f"name: t\nmodel: {{name: resnet8, {stages}}}\n")
    cfg = tiny(tmp_path, "s", "method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
               f"teacher.config={teacher_cfg}")
    Run(cfg, progress=False)
    assert [t if isinstance(t, str) else t.module for t in cfg.teacher.features.post] == ["layer1", "layer2"]
    # a teacher section that names its own stages keeps them
    own = tiny(tmp_path, "s2", "method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
               f"teacher.config={teacher_cfg}", "teacher.features={post: [layer1, layer2, layer3], pooled: avgpool}")
    Run(own, progress=False)
    assert len(own.teacher.features.post) == 3
