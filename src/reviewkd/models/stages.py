"""A model's stages (its :class:`~reviewkd.features.FeatureSpec`) found without writing code.

A model keeps the spec it declares (zoo models); otherwise :func:`find_feature_spec` knows these
families (any depth), and ``attach_feature_spec`` sets ``model.feature_spec`` from it:

* torchvision ResNet / ResNeXt / Wide ResNet: :func:`~reviewkd.models.imagenet.resnet_feature_spec`
  (``layer1..4``, strides 4-32; pre = the residual sum before the last block's final ReLU).
* torchvision MobileNet v2 / v3, EfficientNet v1 / v2, ConvNeXt: the children of ``features``; a
  stage is the last block at each stride from 4 on (a child's stride is the product of its
  convolutions' strides: these blocks have no strided shortcut). The 1x1 head convolution that
  feeds the pooling is not a stage (it is what the pooled entry summarises). Their blocks end in a
  linear projection plus identity (MobileNet, EfficientNet) or a residual sum (ConvNeXt), with no
  activation after it, so pre = post exactly; bn = the projection's BatchNorm of the stage's last
  block (ConvNeXt has LayerNorms: none). pooled = ``avgpool``; MobileNet v2 pools inside its
  forward, so there it is the input of ``classifier.0`` (N x 1280).
* torchvision RegNet: ``trunk_output.block1..4`` (strides 4-32); pre = the input of the last
  block's ``activation`` (the residual sum); bn = that block's last BatchNorm (``f.c.1``).
* torchvision VGG: post = the ReLU before each max pool but the first (the first block plays the
  stem, as in the zoo's CIFAR VGG), so strides 2, 4, 8, 16; the ReLU before the pool rather than
  the pool's output because only there the pre-activation exists as a tensor (pre = that ReLU's
  input, bn = the BatchNorm before it in the ``_bn`` variants). VGG has no global pooling (its
  ``avgpool`` is a 7x7 pool feeding the classifier), so pooled = the penultimate 4096-d feature,
  the output of ``classifier.4``.
* timm models (any): ``model.feature_info`` gives the module of each reduction; entries below
  reduction 4 (the stem) are dropped, as the review mechanism drops the stem, and of several
  entries at one reduction the deepest is kept. pooled = the ``global_pool`` module (else the
  input of the classifier). Pre-activation taps exist for timm's ResNet-type blocks (ResNet,
  ResNeXt, SE-ResNet, ... and RegNet): the input of the last block's final activation, with bn =
  its last BatchNorm. Other timm blocks: pre = post (no tap before an activation is known; methods
  that read pre-activation features, e.g. ReviewKD's teacher or OFD, then read the stage output)
  and no bn. timm models whose features are N x H x W x C (``output_fmt`` NHWC, e.g. Swin) are
  not found.

Anything else is named in the config (``model.features`` / ``teacher.features``, see
:func:`feature_spec_from_config`). :func:`check_stages` runs one forward pass of a side before the
recipe is built, so that a failure names the side, the model and a ``features:`` spec that fits.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torchvision
from torch import nn

from reviewkd.features import FeatureSpec, FeatureTapError, FeatureTaps, Stage, Tap

from .imagenet import resnet_feature_spec

# timm block class names whose final activation takes the residual sum: (activation, module path)
_TIMM_FINAL_ACT = {
    ("timm.models.resnet", "BasicBlock"): "act2",
    ("timm.models.resnet", "Bottleneck"): "act3",
    ("timm.models.regnet", "Bottleneck"): "act3",
}
# submodules on a block's shortcut path, whose BatchNorm does not describe the block's output
_SHORTCUTS = ("downsample", "proj", "shortcut")


class StageError(ValueError):
    """A model whose stages cannot be found or used; the message says what to write instead.
    ``unsupported``: its features are not N x C x H x W maps, so no spec would help."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


# ----------------------------------------------------------------------------- finding a spec
def attach_feature_spec(model: nn.Module) -> nn.Module:
    """Set ``model.feature_spec`` from :func:`find_feature_spec` when the model declares none and
    its family is known; otherwise leave it (methods without features still run)."""
    if not isinstance(getattr(model, "feature_spec", None), FeatureSpec):
        try:
            model.feature_spec = find_feature_spec(model)
        except StageError:
            pass
    return model


def find_feature_spec(model: nn.Module) -> FeatureSpec:
    """The spec of a model of a known family; :class:`StageError` saying why not otherwise."""
    tv = torchvision.models
    if isinstance(model, tv.ResNet):
        return resnet_feature_spec(model)
    if isinstance(model, tv.VGG):
        return _vgg_spec(model)
    if isinstance(model, (tv.MobileNetV2, tv.MobileNetV3, tv.EfficientNet, tv.ConvNeXt)):
        pooled = Tap("classifier.0", "input") if isinstance(model, tv.MobileNetV2) else Tap("avgpool")
        return _features_spec(model, pooled)
    if isinstance(model, tv.RegNet):
        return _regnet_spec(model)
    if _is_timm(model):
        return _timm_spec(model)
    raise StageError(f"the stages of {type(model).__name__} are not known (found automatically: torchvision "
                     "ResNet, MobileNet, EfficientNet, RegNet, ConvNeXt, VGG and timm models)")


def last_batchnorm(module: nn.Module, prefix: str) -> Optional[str]:
    """Name (under ``prefix``) of the last BatchNorm in ``module``, off its shortcut path."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and name.split(".")[0] not in _SHORTCUTS:
            found = name
    if found is None:
        return None
    return f"{prefix}.{found}" if found else prefix


def _vgg_spec(model: nn.Module) -> FeatureSpec:
    layers = list(model.features)
    relus = [i - 1 for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    stages = []
    for i in relus[1:]:
        bn = f"features.{i - 1}" if isinstance(layers[i - 1], nn.BatchNorm2d) else None
        stages.append(Stage(post=Tap(f"features.{i}"), pre=Tap(f"features.{i}", "input"), bn=bn))
    return FeatureSpec(tuple(stages), Tap("classifier.4"))


def _features_spec(model: nn.Module, pooled: Tap) -> FeatureSpec:
    from torchvision.ops.misc import Conv2dNormActivation

    last_at: dict[int, int] = {}  # stride -> index of the last block child at that stride
    stride = 1
    for i, child in enumerate(model.features):
        stride *= math.prod(m.stride[0] for m in child.modules() if isinstance(m, nn.Conv2d))
        if not isinstance(child, Conv2dNormActivation) and stride >= 4:  # stems and head convs are not stages
            last_at[stride] = i
    stages = []
    for _, i in sorted(last_at.items()):
        child = model.features[i]
        if isinstance(child, nn.Sequential):  # a stage of blocks: its last block
            block, prefix = child[-1], f"features.{i}.{len(child) - 1}"
        else:
            block, prefix = child, f"features.{i}"
        stages.append(Stage(post=Tap(f"features.{i}"), pre=Tap(f"features.{i}"), bn=last_batchnorm(block, prefix)))
    return FeatureSpec(tuple(stages), pooled)


def _regnet_spec(model: nn.Module) -> FeatureSpec:
    stages = []
    for name, stage in model.trunk_output.named_children():
        last_name, last = list(stage.named_children())[-1]
        prefix = f"trunk_output.{name}.{last_name}"
        stages.append(Stage(post=Tap(f"trunk_output.{name}"), pre=Tap(f"{prefix}.activation", "input"),
                            bn=last_batchnorm(last, prefix)))
    return FeatureSpec(tuple(stages), Tap("avgpool"))


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and isinstance(getattr(model, "feature_info", None), list)


def _timm_spec(model: nn.Module) -> FeatureSpec:
    fmt = getattr(model, "output_fmt", "NCHW")
    fmt = getattr(fmt, "name", fmt)  # an enum in some timm versions
    if str(fmt) != "NCHW":
        raise StageError(f"its features are {fmt} (channels last), not N x C x H x W", unsupported=True)
    deepest: dict[int, str] = {}
    for info in model.feature_info:
        if info.get("module") and int(info.get("reduction", 1)) >= 4:
            deepest[int(info["reduction"])] = info["module"]
    if not deepest:
        raise StageError("its feature_info lists no stage at reduction 4 or more")
    modules = dict(model.named_modules())
    missing = [name for name in deepest.values() if name not in modules]
    if missing:
        raise StageError(f"its feature_info names modules it does not have: {missing}")
    stages = [_timm_stage(name, modules[name]) for _, name in sorted(deepest.items())]
    return FeatureSpec(tuple(stages), _timm_pooled(model))


def _timm_stage(name: str, module: nn.Module) -> Stage:
    children = list(module.named_children())
    if children:
        last_name, block = children[-1]
        act = _TIMM_FINAL_ACT.get((type(block).__module__, type(block).__name__))
        if act is not None and isinstance(getattr(block, act, None), nn.Module):
            prefix = f"{name}.{last_name}"
            return Stage(post=Tap(name), pre=Tap(f"{prefix}.{act}", "input"), bn=last_batchnorm(block, prefix))
    return Stage(post=Tap(name), pre=Tap(name))


def _timm_pooled(model: nn.Module) -> Tap:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "global_pool":
            return Tap(name)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is classifier and name:
            return Tap(name, "input")
    raise StageError("it has neither a global_pool module nor a classifier module to read the pooled feature from")


# ------------------------------------------------------------------------- a spec in the config
def _tap(value, what: str) -> Tap:
    if isinstance(value, Tap):
        return value
    if isinstance(value, str) and value:
        return Tap(value)
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, Mapping) and isinstance(value.get("module"), str):
        port = value.get("port", "output")
        if port not in ("output", "input"):
            raise StageError(f"{what}: port must be output or input, got {port!r}")
        return Tap(value["module"], port)
    raise StageError(f"{what}: expected a module name or {{module: name, port: input}}, got {value!r}")


def feature_spec_from_config(features: Any) -> FeatureSpec:
    """A spec from the config's ``features`` section (or the same as a dict): ``post`` (module
    names, shallow to deep), ``pooled``, and optionally ``pre`` (default: the same as post) and
    ``bn`` (one BatchNorm name or null per stage). A name stands for the module's output;
    ``{module: name, port: input}`` for the input of its last call."""
    if hasattr(features, "model_dump"):
        features = features.model_dump()
    if not isinstance(features, Mapping):
        raise StageError(f"features must be a mapping with post, pooled (and optionally pre, bn), got {features!r}")
    unknown = sorted(set(features) - {"post", "pre", "pooled", "bn"})
    if unknown:
        raise StageError(f"features: unknown key(s) {unknown}; use post, pre, pooled, bn")
    post = features.get("post")
    if not isinstance(post, Sequence) or isinstance(post, str) or not post:
        raise StageError("features.post must be a non-empty list of module names, shallow to deep")
    if features.get("pooled") is None:
        raise StageError("features.pooled must name the module whose output is the pooled feature (e.g. avgpool)")
    pre = features.get("pre") or post
    bn = features.get("bn") or [None] * len(post)
    if len(pre) != len(post) or len(bn) != len(post):
        raise StageError(f"features: post has {len(post)} entries but pre has {len(pre)} and bn {len(bn)}: "
                         "give one per stage")
    stages = tuple(Stage(_tap(a, f"features.post[{i}]"), _tap(b, f"features.pre[{i}]"), c)
                   for i, (a, b, c) in enumerate(zip(post, pre, bn)))
    return FeatureSpec(stages, _tap(features["pooled"], "features.pooled"))


# -------------------------------------------------------------- checking one side before the recipe
def _config_key(side: str) -> str:
    return "model" if side == "student" else "teacher"


def prepare_stages(model: nn.Module, side: str, features: Any = None, kind: Optional[str] = None,
                   input_size: Optional[Sequence[int]] = None) -> nn.Module:
    """Apply a ``features`` spec from the config (it replaces any other), then, when the method
    reads this side's ``kind`` ("post" / "pre") features, :func:`check_stages`."""
    if features is not None:
        try:
            model.feature_spec = feature_spec_from_config(features)
        except StageError as exc:
            raise StageError(f"{side} {_name(model)}: {_config_key(side)}.{exc}"
                             if str(exc).startswith("features") else f"{side} {_name(model)}: {exc}") from None
    if kind is not None:
        check_stages(model, side, kind, input_size)
    return model


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def check_stages(model: nn.Module, side: str, kind: str, input_size: Sequence[int]) -> None:
    """One forward pass of ``model`` (eval mode, zeros, no gradients, nothing drawn from the RNG)
    through its stage taps: every stage must be N x C x H x W. Errors name the side and the model;
    where the stages are unknown or wrong, they give a ``features:`` spec that fits."""
    name, key = _name(model), _config_key(side)
    spec = getattr(model, "feature_spec", None)
    if not isinstance(spec, FeatureSpec):
        try:
            spec = model.feature_spec = find_feature_spec(model)
        except StageError as exc:
            if exc.unsupported:
                raise StageError(f"{side} {name}: {exc}; {_FEATURE_MAPS}") from None
            suggestion = suggest_features(model, key, input_size)
            raise StageError(f"{side} {name}: {exc}; name them in the config: {suggestion}") from None
    try:
        taps = FeatureTaps(model, spec, kind)
    except ValueError as exc:
        suggestion = suggest_features(model, key, input_size)
        raise StageError(f"{side} {name}: {str(exc).splitlines()[0]}; e.g. {suggestion}") from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            taps(_zeros(model, input_size))
    except FeatureTapError as exc:
        if exc.layout:
            raise StageError(f"{side} {name}: {exc}; {_FEATURE_MAPS}, or name modules with such outputs in "
                             f"{key}.features") from None
        raise StageError(f"{side} {name}: {exc}; e.g. {suggest_features(model, key, input_size)}") from None
    except Exception as exc:  # the model itself cannot run at this size
        raise StageError(f"{side} {name}: a forward pass at input size {'x'.join(map(str, input_size))} failed "
                         f"({type(exc).__name__}: {_first_line(exc)}); {_input_size_hint(model)}") from None
    finally:
        taps.remove()
        model.train(was_training)


_FEATURE_MAPS = "the methods read N x C x H x W feature maps: choose a convolutional model"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _zeros(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(2, *input_size, device=device)


def _input_size_hint(model: nn.Module) -> str:
    size = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        size = cfg["input_size"][-1]
    elif isinstance(getattr(model, "image_size", None), int):  # torchvision's vision transformers
        size = model.image_size
    if size is not None:
        return f"the model takes {size}x{size} inputs only: set data.image_size={size} (imagefolder or regression data)"
    return "if the model needs another input size, set data.image_size (imagefolder or regression data)"


def module_outputs(model: nn.Module, input_size: Sequence[int], depth: int = 2) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, output shape) of the modules at most ``depth`` levels down, in the order
    their calls end, from one forward pass of zeros in eval mode."""
    seen: list[tuple[str, nn.Module, tuple]] = []
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            def hook(mod, args, out, name=name):
                if torch.is_tensor(out):
                    seen.append((name, mod, tuple(out.shape)))
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_zeros(model, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _stride(size: int, height: int) -> Optional[int]:
    """The power of two that ``size / height`` rounds to (within 10%: pools with ceil_mode), or None
    for maps that are not a downsampling of the input (VGG's 7x7 pool of a small input)."""
    ratio = size / height
    power = 2 ** round(math.log2(ratio)) if ratio >= 1 else 0
    return power if power and abs(ratio - power) <= 0.1 * power else None


def suggest_features(model: nn.Module, key: str, input_size: Sequence[int]) -> str:
    """``key: {features: {...}}`` written from one forward pass, and the candidates it chose from:
    the model's children with N x C x H x W outputs (a child's own children where it spans several
    strides), with channels and strides. The spec takes the last candidate at each stride from 4
    on (the stem left out) and the first pooled output (N x C or N x C x 1 x 1) after them. Probed
    at 64x64 or more, so that strides up to 32 are told apart from pooling."""
    size = tuple(input_size)
    sizes = [size] if size[-1] >= 64 else [(*size[:-2], 64, 64), size]
    outputs, failure = None, None
    for s in sizes:
        try:
            outputs, size = module_outputs(model, s), s
            break
        except Exception as exc:
            failure = exc
    if outputs is None:
        return (f"{key}: {{features: {{post: [...], pooled: ...}}}} (a forward pass to list the candidate modules failed: "
                f"{type(failure).__name__}: {_first_line(failure)}; {_input_size_hint(model)})")
    candidates = _candidates(outputs, size[-2])
    by_stride = {stride: name for name, _, stride in candidates}  # the last one at each stride
    deep = {st: n for st, n in by_stride.items() if st >= 4} or by_stride
    post = [deep[st] for st in sorted(deep)] or ["..."]
    last_spatial = max((i for i, (n, _, _) in enumerate(outputs) if n in {c[0] for c in candidates}), default=-1)
    pooled = "..."
    final_name, final_shape = outputs[-1][0], outputs[-1][2]
    after = [(n, m, sh) for n, m, sh in outputs[last_spatial + 1:] if len(sh) == 2 or (len(sh) == 4 and sh[-2:] == (1, 1))]
    tops = {n for n, _, _ in after if "." not in n and n != final_name}  # prefer global_pool to global_pool.pool
    for name, module, shape in after:
        if "." in name and name.split(".")[0] in tops:
            continue
        # the model's last layer: its input is the pooled feature
        final = name == final_name or (isinstance(module, nn.Linear) and shape == final_shape)
        pooled = f"{{module: {name}, port: input}}" if final else name
        break
    shown = [f"{n} ({c} ch, stride {st})" for n, c, st in candidates]
    listing = ", ".join(shown[:24]) + (f" (+{len(shown) - 24} more)" if len(shown) > 24 else "")
    tokens = any(len(shape) == 3 and shape[1] > 1 for _, _, shape in outputs)
    note = "; some modules give N x L x C tokens, which cannot be stages" if tokens else ""
    return (f"{key}: {{features: {{post: [{', '.join(post)}], pooled: {pooled}}}}} "
            f"(modules with N x C x H x W outputs at {size[-2]}x{size[-1]}: {listing or 'none'}{note})")


def _candidates(outputs: list[tuple[str, nn.Module, tuple]], height: int) -> list[tuple[str, int, int]]:
    """(name, channels, stride) of the children with feature-map outputs, in the order their calls
    end; a child whose own children span several strides is replaced by them."""
    maps = {}
    for name, _, shape in outputs:
        # square input, square maps: N x H x W x C outputs (channels last) are left out
        stride = _stride(height, shape[-2]) if len(shape) == 4 and shape[-2] == shape[-1] > 1 else None
        if stride is not None:
            maps[name] = (shape[1], stride)
    spans = {}
    for name, (_, stride) in maps.items():
        if "." in name:
            spans.setdefault(name.split(".")[0], set()).add(stride)
    chosen = []
    for name, _, _ in outputs:
        if name not in maps:
            continue
        top = name.split(".")[0]
        several = len(spans.get(top, ())) > 1
        if ("." in name) == several:
            chosen.append((name, *maps[name]))
    return chosen
