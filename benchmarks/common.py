"""What the seeded Fashion-MNIST comparisons share: their command line and the machine line."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from reviewkd.config import load_config
from reviewkd.engine.runtime import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def seeded_parser(doc: str, runs: str, subset: int = 10000, epochs: int = 3) -> argparse.ArgumentParser:
    """--subset, --epochs, --seeds, --runs, --out and KEY=VALUE overrides for every run."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--subset", type=int, default=subset, help="training (and test) images")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default=runs, help="run folders (finished runs are reused, interrupted ones resumed)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run, "
                   "e.g. runtime.precision=fp32")
    return p


def machine_line(overrides: list[str]) -> str:
    """The CPU's capabilities and the precision the runs use (after the overrides)."""
    runtime = load_config(None, list(overrides)).runtime
    return describe_machine(runtime.precision, runtime.device)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
