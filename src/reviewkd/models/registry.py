"""Name -> constructor registry for every model the toolkit can build.

Names outside the zoo (``torchvision/<builder>``, ``timm/<name>``, ``package.module:function``) are
built by :mod:`reviewkd.models.external`; every model gets its stages (``model.feature_spec``) found
by :mod:`reviewkd.models.stages` when it does not declare them.
"""
from __future__ import annotations

from difflib import get_close_matches
from typing import Callable

from torch import nn

from .external import (TimmNotInstalledError, create_external, external_family, is_external, timm_module,
                       torchvision_builders)

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


def register_model(name: str | None = None, family: str = "cifar"):
    """Decorator: ``@register_model()`` on a function ``f(num_classes=...) -> nn.Module``."""

    def wrap(fn):
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} registered twice")
        _MODELS[key] = fn
        _FAMILY[key] = family
        return fn

    return wrap


def list_models(family: str | None = None) -> list[str]:
    return [n for n in _MODELS if family is None or _FAMILY[n] == family]


def model_family(name: str) -> str:
    if name not in _MODELS and is_external(name):
        return external_family(name)
    _check_name(name)
    return _FAMILY[name]


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = get_close_matches(name, list(_MODELS), n=3)
        close += [c for c in _external_spellings(name) if c not in close]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(_MODELS)}; or any of "
                         "torchvision/<builder>, timm/<name>, package.module:function")


def _external_spellings(name: str) -> list[str]:
    """``torchvision/name`` / ``timm/name`` when the bare name is one of theirs."""
    out = [f"torchvision/{name}"] if name in torchvision_builders() else []
    try:
        if timm_module().is_model(name):
            out.append(f"timm/{name}")
    except TimmNotInstalledError:
        pass
    return out


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """A zoo model, or ``torchvision/<builder>``, ``timm/<name>``, ``package.module:function``
    (see :mod:`reviewkd.models.external`), with ``model.feature_spec`` where its stages are known."""
    external = name not in _MODELS and is_external(name)
    if not external:
        _check_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = create_external(name, num_classes, **kwargs) if external else _MODELS[name](num_classes=num_classes, **kwargs)
    from .stages import attach_feature_spec  # here: the stage finders import the zoo, which imports this module

    attach_feature_spec(model)
    model.model_name = name
    return model
