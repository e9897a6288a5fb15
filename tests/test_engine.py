"""Training engine and configs on real Fashion-MNIST: exact resume, non-finite losses, config
files, overrides and ``base:`` inheritance."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from reviewkd.engine.loop import TIMING_KEYS
from reviewkd.config import Config, ConfigError, load_config
from reviewkd import Distiller
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.engine.loop import Run, TrainingError
from reviewkd.engine import runtime
from reviewkd.engine.runtime import _glibc as runtime_glibc
from conftest import skip_unless_backend_can_compile

REPO = Path(__file__).resolve().parents[1]

# Tiny but real: 256 / 256 Fashion-MNIST images, 4 steps of 64 per epoch, fp32 on the CPU.
TINY = [
    "data.name=fashion_mnist", "data.subset=256", "data.batch_size=64", "data.eval_batch_size=256",
    "model.name=resnet8", "solver.lr=0.05", "solver.epochs=2", "solver.schedule=cosine",
    "runtime.device=cpu", "runtime.precision=fp32",
]


def tiny(out: Path, name: str, *extra: str) -> Config:
    return load_config(None, [*TINY, f"output_dir={out}", f"name={name}", *extra])


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    Run(tiny(out, "teacher", "solver.epochs=1"), progress=False).fit()
    return out / "teacher" / "best.pt"


# ----------------------------------------------------------------------------- resume
@pytest.fixture
def restore_determinism():
    """runtime.deterministic switches PyTorch's global flag on; leave it as the other tests found it."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.slow
@pytest.mark.parametrize("compiled_with", [None, "aot_eager", "inductor"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, teacher_checkpoint, restore_determinism, compiled_with,
                                                 monkeypatch):
    common = ["method.name=reviewkd", "teacher.name=resnet8", f"teacher.checkpoint={teacher_checkpoint}",
              "method.options.warmup_epochs=1", "runtime.deterministic=true"]
    skip_unless_backend_can_compile(compiled_with)
    if compiled_with:  # runtime.compile: the resumed run compiles afresh, starting at epoch 1
        monkeypatch.setattr(runtime, "COMPILE_BACKEND", compiled_with)
        common.append("runtime.compile=true")
    torch._dynamo.reset()

    full = Run(tiny(tmp_path, "full", *common), progress=False).fit()
    assert len(full.history) == 2

    Run(tiny(tmp_path, "split", *common), progress=False, stop_after=1).fit()
    split_dir = tmp_path / "split"
    halfway = load_checkpoint(split_dir / "last.pt")
    assert halfway["epoch"] == 1 and len(csv_rows(split_dir)) == 1

    torch._dynamo.reset()  # as a new process would find it
    Run(tiny(tmp_path, "split", *common), resume=True, progress=False).fit()
    log = (split_dir / "train.log").read_text()
    assert "resuming" in log and "at train epoch 1" in log
    assert "torch.compile failed" not in log + (tmp_path / "full" / "train.log").read_text()

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(split_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["student"].keys() == b["student"].keys()
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    # The review mechanism's ABF modules are trained state too and must match exactly.
    assert any("abf" in k.lower() or "fusion" in k for k in a["method"]), list(a["method"])
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    for sa, sb in zip(a["optimizers"]["main"]["state"].values(), b["optimizers"]["main"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # The second epoch did train after resuming.
    assert not all(torch.equal(halfway["student"][k], b["student"][k]) for k in b["student"])

    skip = set(TIMING_KEYS)
    assert [{k: v for k, v in r.items() if k not in skip} for r in a["history"]] == \
           [{k: v for k, v in r.items() if k not in skip} for r in b["history"]]
    rows = csv_rows(split_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["test_top1"]) for r in rows] == [r["test_top1"] for r in a["history"]]
    assert b["teacher_metrics"] == a["teacher_metrics"]


# ----------------------------------------------------------------------- non-finite loss
def _nan_losses(monkeypatch):
    losses_of = Distiller.losses

    def nan_losses(self, *args, **kwargs):
        logits, losses = losses_of(self, *args, **kwargs)
        return logits, {k: v * float("nan") for k, v in losses.items()}

    monkeypatch.setattr(Distiller, "losses", nan_losses)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    Run(tiny(tmp_path, "nan"), progress=False, stop_after=1).fit()
    run_dir = tmp_path / "nan"
    before = {name: file_state(run_dir / name) for name in ("last.pt", "best.pt")}

    _nan_losses(monkeypatch)
    with pytest.raises(TrainingError) as info:
        Run(tiny(tmp_path, "nan"), resume=True, progress=False).fit()
    message = str(info.value)
    assert "\n" not in message
    assert "loss became nan" in message and "epoch 2/2" in message
    assert f"last good checkpoint is {run_dir / 'last.pt'}" in message
    assert {name: file_state(run_dir / name) for name in ("last.pt", "best.pt")} == before
    assert len(csv_rows(run_dir)) == 1


def test_nan_loss_before_any_checkpoint(tmp_path, monkeypatch):
    _nan_losses(monkeypatch)
    with pytest.raises(TrainingError) as info:
        Run(tiny(tmp_path, "nan0"), progress=False).fit()
    message = str(info.value)
    assert "\n" not in message and "loss became nan" in message and "epoch 1/2" in message
    assert not (tmp_path / "nan0" / "last.pt").exists()
    assert "no checkpoint" in message.lower()
    # fp32 already: the message must not suggest switching to it
    assert "precision=fp32" not in message
    # The failed run left no last.pt, so it may simply be started again.
    monkeypatch.undo()
    Run(tiny(tmp_path, "nan0", "solver.epochs=1", "data.subset=128"), progress=False).fit()
    assert (tmp_path / "nan0" / "last.pt").is_file()


def test_existing_run_and_missing_resume_are_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "once"
    Run(tiny(tmp_path, "once", "solver.epochs=1", "data.subset=128"), progress=False).fit()
    before = {p.name: file_state(p) for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match="already holds a run"):
        Run(tiny(tmp_path, "once", "solver.epochs=1", "data.subset=128"), progress=False)
    with pytest.raises(TrainingError, match="cannot resume"):
        Run(tiny(tmp_path, "never", "solver.epochs=1"), resume=True, progress=False)
    assert {p.name: file_state(p) for p in run_dir.iterdir() if p.is_file()} == before
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------ configs
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name and "/" not in cfg.name
    # The fully written-out form loads back to the same config.
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg
    # A teacher trained on demand from its own config (paths relative to the repository root)
    # must be that architecture.
    if cfg.teacher is not None and cfg.teacher.config is not None:
        teacher_cfg = load_config(REPO / cfg.teacher.config)
        assert teacher_cfg.model.name == cfg.teacher.name
        assert teacher_cfg.data.name == cfg.data.name


def test_overrides_lists_null_and_new_sections():
    cfg = load_config(None, [
        "solver.milestones=[1,2]", "teacher.name=resnet20", "teacher.checkpoint=runs/t/best.pt",
        "data.subset=null", "model.weights=", "method.options.weight=2.5", "solver.lr=1e-3", "name=exp",
    ])
    assert cfg.solver.milestones == [1, 2]
    assert cfg.teacher is not None and cfg.teacher.name == "resnet20" and cfg.teacher.checkpoint == "runs/t/best.pt"
    assert cfg.data.subset is None and cfg.model.weights is None
    assert cfg.method.options == {"weight": 2.5}
    assert cfg.solver.lr == pytest.approx(1e-3)
    assert cfg.name == "exp"
    assert load_config(None, ["teacher.name=resnet20", "teacher=null"]).teacher is None


@pytest.mark.parametrize("override, key", [
    ("solver.lrr=0.1", "solver.lrr"),
    ("solver.epochs=abc", "solver.epochs"),
    ("solver.milestones=oops", "solver.milestones"),
    ("solver.lr=-1", "solver.lr"),
    ("name=a/b", "name"),
    ("data.name=mnist", "data.name"),
    ("solver.lr", "solver.lr"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_base_inheritance_merges_recursively(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(
        "output_dir: out\n"
        "data: {name: fashion_mnist, subset: 100, batch_size: 32}\n"
        "solver: {lr: 0.1, epochs: 5, milestones: [3, 4]}\n"
        "method: {name: reviewkd, options: {weight: 2.0, warmup_epochs: 3}}\n"
    )
    (tmp_path / "mid.yaml").write_text("base: common/base.yaml\ndata: {batch_size: 16}\nmodel: {name: resnet14}\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "child.yaml").write_text(
        "base: ../mid.yaml\nsolver: {epochs: 3}\nmethod: {options: {weight: 5.0}}\n"
    )
    cfg = load_config(tmp_path / "exp" / "child.yaml", ["solver.milestones=[1]"])
    assert cfg.name == "child"  # from the file name
    assert cfg.output_dir == "out"
    assert (cfg.data.subset, cfg.data.batch_size) == (100, 16)
    assert (cfg.solver.lr, cfg.solver.epochs, cfg.solver.milestones) == (0.1, 3, [1])
    assert cfg.model.name == "resnet14"
    assert cfg.method.name == "reviewkd"
    # the same method: the child's options merge over the base's
    assert cfg.method.options == {"weight": 5.0, "warmup_epochs": 3}

    (tmp_path / "loop_a.yaml").write_text("base: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("base: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_yaml_file_errors_name_the_file_and_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: {name: resnet8}\nsolver: {lr: 0.1, epoch: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert "solver.epoch" in str(info.value) and str(typo) in str(info.value)

    broken = tmp_path / "broken.yaml"
    broken.write_text("solver: {lr: 0.1\nmodel: x\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(broken)

    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_the_machine_line_names_the_cpu_its_vector_level_and_the_precision_auto_picks(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_name", lambda: "Example CPU 9000")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    line = runtime.describe_machine("auto", "cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith(f"CPU: Example CPU 9000 ({capability}), AVX-512 BF16 / AMX no, ")
    assert line.endswith("GPU: none used; precision auto -> fp32")  # no bf16 units: fp32 is the faster path
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.describe_machine("auto", "cpu").endswith("precision auto -> bf16")
    assert runtime.cpu_name()  # the real CPU's name is never empty


_PAGE_FAULTS = """
import resource, sys, torch
from reviewkd.engine.runtime import reuse_freed_memory
print(reuse_freed_memory(sys.argv[1] == "reuse"))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = 64 * 2**20 // 4  # a 64 MB tensor: over glibc's 32 MB mmap ceiling
x = torch.ones(block); del x
before = faults()
for _ in range(10):
    x = torch.ones(block); del x
print((faults() - before) / 10 / (64 * 2**20 // resource.getpagesize()))
"""


@pytest.mark.skipif(runtime_glibc() is None, reason="glibc's allocator only")
def test_reused_memory_spares_large_tensors_their_page_faults():
    """Counted page faults, not time: each fresh 64 MB tensor faults in every page under glibc's own
    settings, and (after the first) almost none once freed memory is kept."""
    import subprocess
    import sys

    def faults_per_page(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        applied, ratio = out.stdout.split()
        assert applied == "True"
        return float(ratio)

    assert faults_per_page("system") > 0.9
    assert faults_per_page("reuse") < 0.25


def test_cpu_runs_keep_freed_memory_unless_told_not_to(tmp_path, monkeypatch):
    from reviewkd.engine import loop

    calls = []
    monkeypatch.setattr(loop, "reuse_freed_memory", lambda: calls.append(True))
    Run(tiny(tmp_path, "keeps"))
    assert calls == [True]
    Run(tiny(tmp_path, "system", "runtime.reuse_freed_memory=false"))
    assert calls == [True]
