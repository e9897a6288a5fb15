"""torchvision detectors with FPN backbones, built by name, with every weight read from local files.

Names follow torchvision: ``{arch}_{backbone}_fpn`` with arch ``fasterrcnn``, ``maskrcnn`` or
``retinanet`` and backbone ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` or ``mobilenet_v2``
(e.g. ``fasterrcnn_resnet18_fpn``, ``maskrcnn_mobilenet_v2_fpn``).

* Faster / Mask R-CNN: FPN on the four ResNet stages (strides 4..32) plus a max-pooled level, i.e.
  five 256-channel levels P2..P6, as torchvision's ``fasterrcnn_resnet50_fpn`` (and the released
  ReviewKD detection code's detectron2 models).
* RetinaNet: FPN on stages 2..4 plus P6/P7 computed from P5, i.e. P3..P7, as torchvision's
  ``retinanet_resnet50_fpn``.
* MobileNetV2: the ends of its stride-4/8/16/32 stages (blocks 3, 6, 13 and 17: 24, 32, 96 and 320
  channels) feed the FPN, so it has the same five levels as the ResNets.

Because the layouts equal torchvision's, torchvision state dicts load: ImageNet classification
weights into the backbone (``backbone_weights``), and detector checkpoints (e.g. torchvision's
``fasterrcnn_resnet50_fpn`` COCO weights, 91 classes) into the whole model.
Nothing is downloaded.

Training images are resized by the data pipeline (``data.py``); the model's transform is built with
``_skip_resize=True`` so in training it only normalises and batches, while in evaluation it resizes
to ``min_size``/``max_size`` and maps the detections back to the original image size.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet34, resnet50, resnet101
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..models.weights import CheckpointMismatchError, check_state_dict, extract_state_dict, load_file

ARCHS = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet}
RESNETS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
}
BACKBONES = (*RESNETS, "mobilenet_v2")
FPN_CHANNELS = 256

# MobileNetV2: (last block index, channels) of the stride-4, 8, 16 and 32 stages, and the first
# block index of each of its five stages (stem + four) for freezing.
MOBILENET_V2_LEVELS = ((3, 24), (6, 32), (13, 96), (17, 320))
MOBILENET_V2_STAGE_STARTS = (0, 2, 4, 7, 14)

_NAME = re.compile(r"^(fasterrcnn|maskrcnn|retinanet)_(resnet18|resnet34|resnet50|resnet101|mobilenet_v2)_fpn$")


def detector_names() -> list[str]:
    return [f"{a}_{b}_fpn" for a in ARCHS for b in BACKBONES]


def parse_name(name: str) -> tuple[str, str]:
    """``fasterrcnn_resnet18_fpn`` -> ("fasterrcnn", "resnet18")."""
    match = _NAME.match(name)
    if match is None:
        from difflib import get_close_matches

        close = get_close_matches(name, detector_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown detector {name!r}.{hint} Detectors are {{{', '.join(ARCHS)}}}_"
                         f"{{{', '.join(BACKBONES)}}}_fpn")
    return match.group(1), match.group(2)


def _load_backbone_weights(body: nn.Module, state: dict, path) -> None:
    """Load torchvision ImageNet weights into the FPN body; classifier keys (and blocks the body
    does not use) are ignored, but every key the body has must be in the file."""
    expected = body.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or wrong:
        detail = (f"missing keys {missing[:5]}" if missing else "") + (f" wrong shapes {wrong[:3]}" if wrong else "")
        raise CheckpointMismatchError(f"backbone weights {path} do not fit this backbone: {detail.strip()}")
    body.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _freeze_mobilenet(features: nn.Module, trainable_layers: int) -> None:
    n = len(MOBILENET_V2_STAGE_STARTS)
    if not 0 <= trainable_layers <= n:
        raise ValueError(f"trainable_layers for mobilenet_v2 must be in 0..{n}, got {trainable_layers}")
    first_trainable = MOBILENET_V2_STAGE_STARTS[n - trainable_layers] if trainable_layers else len(features)
    for index, block in enumerate(features):
        if index < first_trainable:
            block.requires_grad_(False)


def build_backbone(
    backbone: str,
    arch: str,
    *,
    weights: str | os.PathLike | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
) -> BackboneWithFPN:
    """A ResNet / MobileNetV2 + FPN backbone with 256-channel outputs.

    Defaults as torchvision's detection builders: with ``weights`` (ImageNet, torchvision format)
    BatchNorm is frozen and 3 of the 5 ResNet stages train (all 5 MobileNetV2 stages, as the
    released MobileNetV2 recipes); without weights, trainable BatchNorm and every stage trains.
    """
    pretrained = weights is not None
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    retina = arch == "retinanet"
    if backbone in RESNETS:
        trainable = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
        net = RESNETS[backbone](weights=None, norm_layer=norm_layer)
        if weights is not None:
            _load_backbone_weights(net, extract_state_dict(load_file(weights)), weights)
        if retina:
            return _resnet_fpn_extractor(net, trainable, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS))
        return _resnet_fpn_extractor(net, trainable)
    if backbone == "mobilenet_v2":
        features = mobilenet_v2(weights=None, norm_layer=norm_layer).features
        if weights is not None:
            # torchvision's mobilenet_v2 file names keys features.N...; the body holds the blocks.
            state = extract_state_dict(load_file(weights))
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            _load_backbone_weights(features, state, weights)
        _freeze_mobilenet(features, len(MOBILENET_V2_STAGE_STARTS) if trainable_layers is None else trainable_layers)
        levels = MOBILENET_V2_LEVELS[1:] if retina else MOBILENET_V2_LEVELS
        extra = LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS) if retina else LastLevelMaxPool()
        return BackboneWithFPN(features, {str(i): str(k) for k, (i, _) in enumerate(levels)},
                               [c for _, c in levels], FPN_CHANNELS, extra_blocks=extra)
    raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")


def _to_float(value):
    if torch.is_tensor(value):
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float(v) for k, v in value.items()}
    return value


def _float_outputs(module, args, output):
    return _to_float(output)


def _float_anchors(module, args):
    # The anchor generator reads only the levels' sizes, dtype and device: hand it float32 views
    # of the right shapes (no copy) so that anchors are not rounded to bfloat16.
    images, levels = args
    return images, [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in levels]


def keep_boxes_float32(model: nn.Module) -> nn.Module:
    """Box coordinates in float32 under bf16 / fp16 autocast.

    torchvision decodes boxes in the dtype of the regression outputs and builds anchors in the
    dtype of the features, so under bfloat16 autocast proposals, anchors and detections would be
    rounded to bfloat16 (steps of 4 pixels between 512 and 1024). These hooks cast the heads'
    outputs to float32 (convolutions still run in low precision) and make anchors in float32.
    """
    if isinstance(model, RetinaNet):
        heads, anchors = [model.head], model.anchor_generator
    else:
        heads, anchors = [model.rpn.head, model.roi_heads.box_predictor], model.rpn.anchor_generator
        if getattr(model.roi_heads, "mask_predictor", None) is not None:
            heads.append(model.roi_heads.mask_predictor)
    for head in heads:
        head.register_forward_hook(_float_outputs)
    anchors.register_forward_pre_hook(_float_anchors)
    return model


def create_detector(
    name: str,
    num_classes: int,
    *,
    backbone_weights: str | os.PathLike | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    options: dict[str, Any] | None = None,
    float_boxes: bool = True,
) -> nn.Module:
    """A torchvision detector by name (``num_classes`` counts the background, as torchvision's).

    ``options`` go to the torchvision constructor (e.g. ``box_batch_size_per_image``,
    ``rpn_post_nms_top_n_train``, ``box_detections_per_img``). ``float_boxes`` adds the hooks of
    :func:`keep_boxes_float32` (leave them out for TorchScript, which runs in float32 anyway).
    """
    arch, backbone = parse_name(name)
    body = build_backbone(backbone, arch, weights=backbone_weights, trainable_layers=trainable_layers,
                          frozen_bn=frozen_bn)
    kwargs = dict(options or {})
    model = ARCHS[arch](body, num_classes=num_classes, min_size=min_size, max_size=max_size,
                        _skip_resize=True, **kwargs)
    model.model_name = name
    model.num_classes = num_classes
    return keep_boxes_float32(model) if float_boxes else model


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a (teacher) detector in place: eval mode, no gradients."""
    model.requires_grad_(False)
    return model.eval()


def detector_state_dict(source) -> dict[str, torch.Tensor]:
    """The detector state dict in a file (or dict): a torchvision detector checkpoint, a dict with
    'model' / 'state_dict', or a run checkpoint of this toolkit (its 'student')."""
    return extract_state_dict(load_file(source) if isinstance(source, (str, os.PathLike)) else source)


def classes_in(state: dict[str, torch.Tensor], num_anchors: int = 9) -> int | None:
    """Number of classes (with background) of a detector state dict, None if it has no class head."""
    if "roi_heads.box_predictor.cls_score.weight" in state:
        return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    if "head.classification_head.cls_logits.weight" in state:
        return int(state["head.classification_head.cls_logits.weight"].shape[0]) // num_anchors
    return None


def load_detector_weights(model: nn.Module, source) -> nn.Module:
    """Strictly load a detector checkpoint (see :func:`detector_state_dict`).

    BatchNorm bookkeeping is reconciled: frozen BatchNorm has no ``num_batches_tracked`` (dropped
    from files of trainable-BatchNorm models) and trainable BatchNorm gets its own where a file of
    a frozen-BatchNorm model (torchvision's COCO weights) has none.
    """
    state = detector_state_dict(source)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    check_state_dict(model, state, what=str(source) if isinstance(source, (str, os.PathLike)) else "state dict")
    model.load_state_dict(state)
    return model
