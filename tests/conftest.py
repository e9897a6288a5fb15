"""Shared test fixtures: real Fashion-MNIST batches and small zoo pairs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reviewkd.data.fashion_mnist import default_root, load_fashion_mnist

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def fashion_available() -> bool:
    return os.path.isfile(os.path.join(default_root(), "t10k-images-idx3-ubyte.gz"))


@pytest.fixture(scope="session")
def fashion_test_set():
    if not fashion_available():
        pytest.fail(f"Fashion-MNIST missing in {default_root()}: run `make test` (installs dataset-fashion-mnist)")
    return load_fashion_mnist(split="test")


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """N x 1 x 28 x 28 uint8 -> N x 3 x 32 x 32 float, normalised (zero padding after normalising)."""
    x = (images_uint8.float() / 255.0 - FASHION_MEAN) / FASHION_STD
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


@pytest.fixture(scope="session")
def fashion_batch(fashion_test_set):
    """A fixed batch of 64 real images (3 x 32 x 32) and labels."""
    images, labels = fashion_test_set
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(images), generator=g)[:64]
    return to_model_input(images[idx]), labels[idx]


# ------------------------------------------------------------------ tiny runs (run safety, resume)
TINY = [
    "data.name=fashion_mnist", "data.subset=256", "data.batch_size=64", "data.eval_batch_size=256",
    "model.name=resnet8", "solver.lr=0.05", "solver.epochs=3", "solver.schedule=cosine",
    "runtime.device=cpu", "runtime.precision=fp32", "runtime.deterministic=true",
]


@pytest.fixture(autouse=True)
def restore_determinism():
    """Runs with runtime.deterministic=true switch PyTorch's global flag: give it back after each test."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def tiny(out: Path, name: str, *extra: str):
    from reviewkd.config import load_config

    return load_config(None, [*TINY, f"output_dir={out}", f"name={name}", *extra])


def student_overrides(teacher: Path) -> list[str]:
    return ["method.name=reviewkd", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
            "method.options.warmup_epochs=1"]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A resnet8 teacher of one tiny epoch, shared by the tests that need a finished teacher."""
    from reviewkd.engine.loop import Run

    enabled = torch.are_deterministic_algorithms_enabled()
    out = tmp_path_factory.mktemp("teacher")
    Run(tiny(out, "teacher", "solver.epochs=1"), progress=False).fit()
    torch.use_deterministic_algorithms(enabled)
    return out / "teacher" / "best.pt"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, teacher) -> Path:
    """The uninterrupted tiny ReviewKD run, and the order of its checkpoint writes (writes.txt)."""
    import reviewkd.engine.checkpoint as checkpoint_module
    import reviewkd.engine.loop as loop_module
    from reviewkd.engine.loop import Run

    enabled = torch.are_deterministic_algorithms_enabled()
    out = tmp_path_factory.mktemp("reference")
    writes = []
    save = checkpoint_module.atomic_save

    def recording(obj, path):
        writes.append(Path(path).name)
        save(obj, path)

    loop_module.atomic_save = recording
    try:
        Run(tiny(out, "run", *student_overrides(teacher)), progress=False).fit()
    finally:
        loop_module.atomic_save = save
        torch.use_deterministic_algorithms(enabled)
    (out / "writes.txt").write_text(" ".join(writes))
    return out / "run"


def skip_unless_backend_can_compile(backend: str | None) -> None:
    """inductor writes and compiles C++ on a CPU: without a compiler its case is skipped, not failed."""
    import shutil

    if backend == "inductor" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor needs a C++ compiler (apt-get install g++)")
