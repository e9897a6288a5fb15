"""Distillation methods, registered by name: ``create_method("reviewkd", weight=5.0)``."""
from .base import (
    DistillMethod,
    IncompatiblePairError,
    Pretraining,
    Reads,
    RunContext,
    Step,
    create_method,
    describe_method,
    list_methods,
    method_class,
    method_options,
    register_method,
)
from . import vanilla, kd, reviewkd  # noqa: F401,E401  (register the built-in methods)

__all__ = [
    "DistillMethod", "IncompatiblePairError", "Pretraining", "Reads", "RunContext", "Step", "create_method", "describe_method", "list_methods",
    "method_class", "method_options", "register_method",
]
from . import fitnet  # noqa: E402,F401
from . import at  # noqa: E402,F401
from . import sp  # noqa: E402,F401
from . import cc  # noqa: E402,F401
from . import rkd  # noqa: E402,F401
from . import pkt  # noqa: E402,F401
from . import nst  # noqa: E402,F401
from . import vid  # noqa: E402,F401
from . import ab  # noqa: E402,F401
from . import ft  # noqa: E402,F401
from . import fsp  # noqa: E402,F401
from . import crd  # noqa: E402,F401
from . import hkd  # noqa: E402,F401
from . import ofd  # noqa: E402,F401
from . import dkd  # noqa: E402,F401
from . import feature_mse  # noqa: E402,F401
from . import introspective  # noqa: E402,F401
from . import teacher_free  # noqa: E402,F401
from . import online  # noqa: E402,F401  (dml, ffsd: trained by recipes.OnlineDistillation)
from . import ccl  # noqa: E402,F401  (trained by recipes.crossmodal.CrossModalDistillation)
