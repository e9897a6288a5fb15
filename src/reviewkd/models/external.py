"""Models beyond the zoo, named in a config or in ``create_model`` like zoo models.

* ``torchvision/<builder>`` (``torchvision/resnet34``, ``torchvision/mobilenet_v3_small``): one of
  torchvision's classification builders, built with ``weights=None`` (nothing downloads).
  GoogLeNet and Inception v3 are built without their auxiliary classifiers (the loop trains one
  output per network).
* ``timm/<name>`` (``timm/resnet18``, tags such as ``timm/resnet18.a1_in1k`` too): built with
  ``pretrained=False``. timm is optional; without it the error says how to install it.
* ``package.module:function``: a builder of the user's, called as ``function(num_classes=...)``
  and returning an ``nn.Module``. The module is imported as ``python -m`` would from the folder the
  command runs in: an installed package, or a file or package in the current folder.

Weights come from files through ``model.weights`` / ``teacher.checkpoint`` (``load_weights``), as for
zoo models. The stages are found afterwards (:mod:`reviewkd.models.stages`).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from difflib import get_close_matches

from torch import nn

TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
# builders whose auxiliary classifiers would make training-mode outputs a tuple
_NO_AUX_LOGITS = ("googlenet", "inception_v3")


class ExternalModelError(ValueError):
    """A model name outside the zoo that cannot be built; the message says how to fix it."""


class TimmNotInstalledError(ExternalModelError):
    """``timm/<name>`` without timm installed."""


def is_external(name: str) -> bool:
    """True for ``torchvision/...``, ``timm/...`` and ``package.module:function`` names."""
    return name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)) or ":" in name


def external_family(name: str) -> str:
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return "custom"


def torchvision_builders() -> list[str]:
    """torchvision's classification builders (not its detection, segmentation or video ones)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def timm_module():
    try:
        import timm
    except ImportError:
        raise TimmNotInstalledError("timm is not installed: pip install timm") from None
    return timm


def create_external(name: str, num_classes: int, **kwargs) -> nn.Module:
    family = external_family(name)
    if family == "torchvision":
        return _torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, **kwargs)
    if family == "timm":
        return _timm_model(name[len(TIMM_PREFIX):], num_classes, **kwargs)
    return _user_model(name, num_classes, **kwargs)


def _torchvision_model(builder: str, num_classes: int, **kwargs) -> nn.Module:
    import torchvision

    known = torchvision_builders()
    if builder not in known:
        hint = _did_you_mean(builder, known, TORCHVISION_PREFIX)
        raise ExternalModelError(f"torchvision has no classification model {builder!r}.{hint} Its models: {', '.join(known)}")
    if builder in _NO_AUX_LOGITS:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(builder, weights=None, num_classes=num_classes, **kwargs)


def _timm_model(model_name: str, num_classes: int, **kwargs) -> nn.Module:
    timm = timm_module()
    if not timm.is_model(model_name):
        hint = _did_you_mean(model_name, timm.list_models(), TIMM_PREFIX)
        raise ExternalModelError(f"timm has no model {model_name!r}.{hint} List them with: "
                                 "python -c \"import timm; print(timm.list_models())\"")
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)


def _did_you_mean(name: str, known, prefix: str) -> str:
    close = get_close_matches(name, list(known), n=3)
    return f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _user_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ExternalModelError(f"model {name!r}: a builder of your own is named package.module:function "
                                 "(e.g. mymodels.nets:small_cnn)")
    module = _import(module_name, name)
    builder = module
    for part in attr.split("."):
        if not hasattr(builder, part):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            close = get_close_matches(attr, defined, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ExternalModelError(f"model {name!r}: module {module_name!r} has no {attr!r}.{hint} "
                                     f"It defines: {', '.join(defined) or 'no functions'}")
        builder = getattr(builder, part)
    if not callable(builder):
        raise ExternalModelError(f"model {name!r}: {attr!r} in {module_name!r} is a {type(builder).__name__}, "
                                 "not a function that builds a model")
    if not _accepts_num_classes(builder):
        raise ExternalModelError(f"model {name!r}: {attr}() must accept num_classes= (the number of classes "
                                 "is given by the dataset)")
    model = builder(num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ExternalModelError(f"model {name!r}: {attr}(num_classes=...) returned a {type(model).__name__}, "
                                 "not a torch.nn.Module")
    return model


def _import(module_name: str, name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _is_prefix(exc.name, module_name):
            raise ExternalModelError(f"model {name!r}: importing {module_name!r} failed: {exc}") from exc
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # as `python -m` would: a file or package in the folder the command runs in
        sys.path.append(cwd)
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not _is_prefix(exc.name, module_name):
                raise ExternalModelError(f"model {name!r}: importing {module_name!r} failed: {exc}") from exc
    raise ExternalModelError(f"model {name!r}: no module named {module_name!r} (install it, or run from the folder "
                             f"that holds {module_name.replace('.', '/')}.py)")


def _is_prefix(missing: str | None, module_name: str) -> bool:
    """Whether the missing module is ``module_name`` itself or one of its parent packages (and not
    something it imports)."""
    return missing is not None and (module_name == missing or module_name.startswith(missing + "."))


def _accepts_num_classes(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return True
    return any((p.name == "num_classes" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params)
