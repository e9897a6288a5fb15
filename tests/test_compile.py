"""runtime.compile: the step and the evaluated model under torch.compile, eager where compiling fails."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reviewkd.engine import runtime
from reviewkd.engine.loop import TIMING_KEYS, Run
from reviewkd.engine.runtime import CompiledOrEager
from test_engine import tiny


def failing_backend(calls: list):
    def backend(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("no C++ compiler on this machine")
    return backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_failing_compiler_falls_back_to_the_eager_module_once():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    attempts, reasons = [], []
    wrapped = CompiledOrEager(module, reasons.append, backend=failing_backend(attempts))
    x = torch.randn(5, 4)
    assert torch.equal(wrapped(x), module(x))
    assert torch.equal(wrapped(x + 1), module(x + 1))
    assert len(attempts) == 1 and not wrapped.compiled
    assert reasons == ["RuntimeError: no C++ compiler on this machine"]
    # the wrapper's parameters are the module's, once
    assert list(wrapped.parameters()) == list(module.parameters())


def test_the_modules_own_errors_are_not_hidden_by_the_fallback():
    wrapped = CompiledOrEager(nn.Linear(4, 3), backend="eager")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        wrapped(torch.randn(2, 5))


def test_a_traced_module_gives_the_eager_results():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reasons = []
    wrapped = CompiledOrEager(module, reasons.append, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    assert torch.equal(wrapped(x), module(x))
    assert wrapped.compiled and reasons == []


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def test_a_run_whose_compilation_fails_trains_eagerly_to_the_same_numbers_and_says_so(tmp_path, monkeypatch):
    attempts = []
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", failing_backend(attempts))
    compiled = Run(tiny(tmp_path, "compiled", "runtime.compile=true"), progress=False).fit()
    eager = Run(tiny(tmp_path, "eager"), progress=False).fit()
    assert attempts, "the compiler was never asked"
    assert _without_timing(compiled.history) == _without_timing(eager.history)
    log = (tmp_path / "compiled" / "train.log").read_text()
    assert "torch.compile failed for the training step (RuntimeError: no C++ compiler on this machine)" in log
    assert "torch.compile failed for the evaluated model" in log


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_run_killed_mid_epoch_resumes_to_the_uninterrupted_compiled_run(tmp_path, teacher, monkeypatch,
                                                                                  backend):
    import reviewkd.engine.loop as loop_module
    from conftest import skip_unless_backend_can_compile, student_overrides, tiny as deterministic_tiny
    from reviewkd.engine.checkpoint import load_checkpoint
    from test_run_safety import Killed, assert_same_run

    skip_unless_backend_can_compile(backend)
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", backend)
    # 4 steps per epoch; a checkpoint after step 6, in the middle of epoch 2
    common = [*student_overrides(teacher), "runtime.compile=true", "runtime.checkpoint_every=3"]
    Run(deterministic_tiny(tmp_path, "whole", *common), progress=False).fit()
    torch._dynamo.reset()
    step_groups, steps = loop_module.step_groups, {"n": 0}

    def killed_at_step_8(*args, **kwargs):  # outside the compiled step: the optimiser update
        steps["n"] += 1
        if steps["n"] == 8:
            raise Killed
        return step_groups(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop_module, "step_groups", killed_at_step_8)
        with pytest.raises(Killed):
            Run(deterministic_tiny(tmp_path, "killed", *common), progress=False).fit()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["stage_iteration"] == 6
    torch._dynamo.reset()  # as a new process would find it
    Run(deterministic_tiny(tmp_path, "killed", *common), resume=True, progress=False).fit()
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    for name in ("whole", "killed"):
        assert "torch.compile failed" not in (tmp_path / name / "train.log").read_text()
