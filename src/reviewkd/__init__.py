"""reviewkd: knowledge distillation built around the review mechanism (ABF + HCL)."""
from .recipes import Distiller, Recipe
from .features import FeatureSpec, FeatureTaps, Stage, Tap
from .methods import create_method, list_methods, register_method
from .models import CheckpointMismatchError, create_model, find_feature_spec, list_models, load_weights, resnet_feature_spec
from .review import ABF, ReviewFusion, hcl_loss
from .predict import LoadedStudent, load_student

__version__ = "0.1.0"

__all__ = [
    "Distiller", "Recipe", "FeatureSpec", "FeatureTaps", "Stage", "Tap", "create_method", "list_methods",
    "register_method", "CheckpointMismatchError", "create_model", "list_models", "load_weights",
    "ABF", "ReviewFusion", "hcl_loss", "resnet_feature_spec", "find_feature_spec", "load_student", "LoadedStudent",
]
