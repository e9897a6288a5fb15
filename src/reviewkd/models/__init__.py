"""Model zoo: ``create_model(name, num_classes)``, ``list_models()``, ``load_weights(model, path)``."""
from .registry import create_model, list_models, model_family, register_model
from .weights import CheckpointMismatchError, load_weights
from . import cifar  # noqa: F401  (registers the CIFAR zoo)

__all__ = ["create_model", "list_models", "model_family", "register_model", "load_weights", "CheckpointMismatchError"]
from . import imagenet  # noqa: E402,F401
