"""ImageNet models of the paper's ImageNet experiments: torchvision ResNets and MobileNet (v1).

Features follow the released ImageNet code of the review mechanism: four stages plus the pooled
feature, and on ImageNet *both* teacher and student use the pre-activation stage outputs
(``FeatureTaps(model, model.feature_spec, kind="pre")``); ``post`` is declared too, for methods that
want post-activation features.

* ResNets are torchvision's own ``resnet18/34/50`` (built with ``weights=None``: nothing downloads),
  so torchvision weight files load as they are. Their blocks apply one ReLU module twice (BasicBlock)
  or three times (Bottleneck); the last application takes the residual sum, so a stage's
  pre-activation is the input of the last call of ``layerK.<last block>.relu``.
* MobileNet (v1) uses the module layout and parameter names of the released ImageNet code
  (``model.0`` .. ``model.13`` conv blocks, ``model.14`` pooling, ``fc``), so its checkpoints load.
  Its stages are the outputs of blocks 3, 5, 11 and 13 (128, 256, 512, 1024 channels; 56, 28, 14, 7
  pixels at 224x224 input), the pre-activation being the input of each block's final ReLU.
"""
from __future__ import annotations

import torchvision
from torch import nn

from reviewkd.features import FeatureSpec, Stage, Tap

from .registry import register_model

__all__ = ["MobileNetV1", "resnet_feature_spec"]


def resnet_feature_spec(model: nn.Module, layers=("layer1", "layer2", "layer3", "layer4"), pooled: str = "avgpool") -> FeatureSpec:
    """Spec for a torchvision-style ResNet (also ResNeXt, Wide ResNet, or a user's model built
    from torchvision's blocks): one stage per ``layerK`` (a Sequential of blocks). Public as
    ``reviewkd.resnet_feature_spec``.

    post = the stage output; pre = the input of the last call of the last block's ``relu``
    (the residual sum); bn = the last BatchNorm of that block's residual branch.
    """
    stages = []
    for name in layers:
        layer = getattr(model, name)
        last = len(layer) - 1
        block = layer[last]
        bn_name = next((b for b in ("bn3", "bn2") if isinstance(getattr(block, b, None), nn.BatchNorm2d)), None)
        stages.append(
            Stage(
                post=Tap(name),
                pre=Tap(f"{name}.{last}.relu", "input"),
                bn=f"{name}.{last}.{bn_name}" if bn_name else None,
            )
        )
    return FeatureSpec(tuple(stages), Tap(pooled))


def _torchvision_resnet(builder, num_classes: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    model.feature_spec = resnet_feature_spec(model)
    return model


@register_model("imagenet_resnet18", family="imagenet")
def imagenet_resnet18(num_classes: int = 1000) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet18, num_classes)


@register_model("imagenet_resnet34", family="imagenet")
def imagenet_resnet34(num_classes: int = 1000) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet34, num_classes)


@register_model("imagenet_resnet50", family="imagenet")
def imagenet_resnet50(num_classes: int = 1000) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet50, num_classes)


def _stem(cin: int, cout: int, stride: int) -> nn.Sequential:
    # indices 0 conv, 1 bn, 2 relu
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    # indices 0-2 depthwise 3x3 conv/bn/relu, 3-5 pointwise 1x1 conv/bn/relu
    return nn.Sequential(
        nn.Conv2d(cin, cin, kernel_size=3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel_size=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# (output channels, stride) of the 13 depthwise-separable blocks
_MOBILENET_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# indices in ``model`` of the blocks whose outputs are the four feature stages
_MOBILENET_STAGES = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
    """MobileNet (v1) for 224x224 ImageNet input; parameter names as in the released ReviewKD code.

    The pooling is adaptive (identical to a 7x7 average pool at 224x224 input, and it accepts
    smaller inputs too). Weights keep PyTorch's default initialisation, as the released code does.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks = [_stem(3, 32, 2)]
        cin = 32
        for cout, stride in _MOBILENET_BLOCKS:
            blocks.append(_separable(cin, cout, stride))
            cin = cout
        blocks.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self.feature_spec = FeatureSpec(
            tuple(
                Stage(post=Tap(f"model.{i}"), pre=Tap(f"model.{i}.5", "input"), bn=f"model.{i}.4")
                for i in _MOBILENET_STAGES
            ),
            Tap(f"model.{len(blocks) - 1}"),
        )

    def forward(self, x):
        x = self.model(x)
        return self.fc(x.flatten(1))


@register_model("imagenet_mobilenet_v1", family="imagenet")
def imagenet_mobilenet_v1(num_classes: int = 1000) -> nn.Module:
    return MobileNetV1(num_classes=num_classes)
