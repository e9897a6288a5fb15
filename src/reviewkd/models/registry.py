"""Name -> constructor registry for every model the toolkit can build."""
from __future__ import annotations

from difflib import get_close_matches
from typing import Callable

from torch import nn

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
    _check_name(name)
    return _FAMILY[name]


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = get_close_matches(name, list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(_MODELS)}")


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    _check_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.model_name = name
    return model
