"""Feature taps: multi-stage features of any ``nn.Module`` without touching its forward.

A model's stages are described by a :class:`FeatureSpec` (zoo models carry one as the
``feature_spec`` attribute; for any other module, name the modules yourself). Each stage has two
taps: ``post`` (the stage output after its final activation) and ``pre`` (the value just before
that activation, e.g. the last residual sum). ``pooled`` names the module whose output is the
globally pooled feature; it is returned as N x C x 1 x 1 and comes last, as the deepest entry.

A :class:`Tap` reads either the output of a module or the first positional input of its *last*
call in the forward pass, which handles modules that are called several times (torchvision's
ResNet blocks call one ReLU module twice: the input of the second call is the pre-activation).

Stage features must be N x C x H x W maps: a tap that gives anything else (the N x L x C tokens of
a vision transformer, say) is refused with :class:`FeatureTapError` on the first call, which is the
recipe's probe pass at set-up, not a step in the middle of training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

Port = Literal["output", "input"]
Kind = Literal["post", "pre"]


class FeatureTapError(RuntimeError):
    """Taps that do not give usable features; ``layout`` is True when a stage is not N x C x H x W."""

    def __init__(self, message: str, layout: bool = False):
        super().__init__(message)
        self.layout = layout


@dataclass(frozen=True)
class Tap:
    module: str  # dotted path as in ``model.named_modules()``
    port: Port = "output"


@dataclass(frozen=True)
class Stage:
    post: Tap
    pre: Tap
    # The BatchNorm whose statistics describe the pre-activation (the last BN before the stage's
    # final ReLU); methods that derive margins from BN statistics (OFD) read it. None if unknown.
    bn: str | None = None


@dataclass(frozen=True)
class FeatureSpec:
    stages: tuple[Stage, ...]
    pooled: Tap

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))

    @classmethod
    def from_names(
        cls,
        post: Sequence[str],
        pooled: str,
        pre: Sequence[str | Tap] | None = None,
    ) -> "FeatureSpec":
        """Build a spec from module names; ``pre`` entries may be names (module outputs) or Taps."""
        pre = list(post) if pre is None else list(pre)
        if len(pre) != len(post):
            raise ValueError(f"got {len(post)} post-activation taps but {len(pre)} pre-activation taps")
        as_tap = lambda t: t if isinstance(t, Tap) else Tap(t)  # noqa: E731
        return cls(tuple(Stage(as_tap(a), as_tap(b)) for a, b in zip(post, pre)), as_tap(pooled))

    def select(self, stages: Sequence[int] | None) -> "FeatureSpec":
        """Keep the given stages (1-based, shallow to deep); the pooled entry always stays."""
        if stages is None:
            return self
        n = len(self.stages)
        bad = [s for s in stages if not 1 <= s <= n]
        if bad or list(stages) != sorted(set(stages)):
            raise ValueError(f"stages must be increasing numbers in 1..{n}, got {list(stages)}")
        return FeatureSpec(tuple(self.stages[s - 1] for s in stages), self.pooled)

    @property
    def num_entries(self) -> int:
        return len(self.stages) + 1


def feature_spec_of(model: nn.Module) -> FeatureSpec:
    spec = getattr(model, "feature_spec", None)
    if not isinstance(spec, FeatureSpec):
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(
            f"{name} does not declare its stages: pass a FeatureSpec (student_spec= / teacher_spec=), e.g. "
            "FeatureSpec.from_names(post=['layer1', 'layer2', 'layer3'], pooled='avgpool'), or in a config "
            "model.features / teacher.features: {post: [layer1, layer2, layer3], pooled: avgpool}"
        )
    return spec


def stage_batchnorms(model: nn.Module, spec: FeatureSpec) -> list[nn.Module | None]:
    """The BatchNorm that ``Stage.bn`` names for each stage of ``spec`` (None where not declared
    or where the name is not a BatchNorm module)."""
    modules = dict(model.named_modules())
    out = []
    for stage in spec.stages:
        module = modules.get(stage.bn) if stage.bn is not None else None
        out.append(module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None)
    return out


class FeatureTaps:
    """Runs ``model`` and returns ``(output, [stage features..., pooled])`` for one kind of tap.

    Hooks stay registered for the life of this object but record only during ``__call__``, so a
    plain ``model(x)`` keeps nothing. Call :meth:`remove` to detach them.
    """

    def __init__(self, model: nn.Module, spec: FeatureSpec, kind: Kind = "post"):
        if kind not in ("post", "pre"):
            raise ValueError(f"kind must be 'post' or 'pre', got {kind!r}")
        self.model, self.spec, self.kind = model, spec, kind
        self.taps: list[Tap] = [getattr(s, kind) for s in spec.stages] + [spec.pooled]
        modules = dict(model.named_modules())
        missing = [t.module for t in self.taps if t.module not in modules]
        if missing:
            raise ValueError(
                f"{type(model).__name__} has no module(s) {missing}; "
                f"available names start with: {[n for n in modules if n][:12]}"
            )
        self._store: dict[int, torch.Tensor] = {}
        self._recording = False
        self._handles = []
        for i, tap in enumerate(self.taps):
            module = modules[tap.module]
            if tap.port == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(i)))
            else:
                # An in-place module (ReLU(inplace=True)) would overwrite the tensor we keep.
                copy = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(i, copy)))

    def _output_hook(self, i):
        def hook(module, args, output):
            if self._recording:
                self._store[i] = output
        return hook

    def _input_hook(self, i, copy):
        def hook(module, args):
            if self._recording:
                self._store[i] = args[0].clone() if copy else args[0]
        return hook

    def __call__(self, *args, **kwargs):
        self._store.clear()
        self._recording = True
        try:
            out = self.model(*args, **kwargs)
        finally:
            self._recording = False
        if len(self._store) != len(self.taps):
            unseen = [self.taps[i].module for i in range(len(self.taps)) if i not in self._store]
            raise FeatureTapError(f"modules {unseen} of {type(self.model).__name__} did not run in forward")
        feats = [self._store[i] for i in range(len(self.taps))]
        self._store.clear()
        for tap, f in zip(self.taps[:-1], feats[:-1]):
            if not torch.is_tensor(f) or f.dim() != 4:
                shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                tokens = " (tokens, N x L x C)" if torch.is_tensor(f) and f.dim() == 3 else ""
                raise FeatureTapError(f"stage tap {tap.module!r} gives {shape}{tokens}, not N x C x H x W", layout=True)
        pooled = feats[-1]
        if not torch.is_tensor(pooled) or pooled.dim() not in (2, 4):
            shape = tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__
            raise FeatureTapError(f"pooled tap {self.spec.pooled.module!r} gives {shape}, not N x C or N x C x 1 x 1",
                                  layout=True)
        if pooled.dim() == 4 and pooled.shape[-2:] != (1, 1):
            raise FeatureTapError(
                f"pooled tap {self.spec.pooled.module!r} gives {tuple(pooled.shape)}: name the module "
                "whose output is the globally pooled feature (N x C or N x C x 1 x 1)"
            )
        feats[-1] = pooled.reshape(pooled.shape[0], -1, 1, 1)
        return out, feats

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
