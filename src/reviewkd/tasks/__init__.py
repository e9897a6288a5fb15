"""Tasks by name: ``get_task("classification")``. Each brings its data, loss, evaluation and export
pieces (see ``base.Task``)."""
from __future__ import annotations

from .base import Task, TaskData

_TASKS: dict[str, str] = {
    "classification": "classification:ClassificationTask",
    "detection": "detection:DetectionTask",
    "regression": "regression:RegressionTask",
    "cgan": "cgan:CganTask",
    "dre": "cgan:DreTask",
    "dre_autoencoder": "cgan:AutoencoderTask",
    "video": "video:VideoTask",
}


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(_TASKS)}")
    import importlib

    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


__all__ = ["Task", "TaskData", "get_task"]
