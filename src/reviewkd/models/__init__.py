"""Model zoo: ``create_model(name, num_classes)``, ``list_models()``, ``load_weights(model, path)``.

``create_model`` also builds ``torchvision/<builder>``, ``timm/<name>`` and ``package.module:function``
models (``external``) and finds their stages (``stages``).
"""
from .registry import create_model, list_models, model_family, register_model
from .weights import CheckpointMismatchError, load_weights
from .external import ExternalModelError, TimmNotInstalledError
from . import cifar  # noqa: F401  (registers the CIFAR zoo)
from . import imagenet  # noqa: E402,F401
from ..cgankd import dre as _cgankd_dre  # noqa: E402,F401  (registers the density-ratio feature extractors)
from . import video  # noqa: E402,F401  (R(2+1)D and the audio models)
from .imagenet import resnet_feature_spec
from .stages import StageError, attach_feature_spec, feature_spec_from_config, find_feature_spec

__all__ = ["create_model", "list_models", "model_family", "register_model", "load_weights", "CheckpointMismatchError",
           "ExternalModelError", "TimmNotInstalledError", "resnet_feature_spec", "find_feature_spec",
           "attach_feature_spec", "feature_spec_from_config", "StageError"]
