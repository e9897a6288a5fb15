"""Distillation methods, registered by name: ``create_method("reviewkd", weight=5.0)``."""
from .base import (
    DistillMethod,
    IncompatiblePairError,
    Step,
    create_method,
    list_methods,
    method_class,
    method_options,
    register_method,
)
from . import vanilla, kd, reviewkd  # noqa: F401,E401  (register the built-in methods)

__all__ = [
    "DistillMethod", "IncompatiblePairError", "Step", "create_method", "list_methods",
    "method_class", "method_options", "register_method",
]
