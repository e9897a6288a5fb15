"""Video and audio models of the cross-modal recipes (``task: video``).

* ``r2plus1d_10`` / ``r2plus1d_18``: R(2+1)D on torchvision's ``VideoResNet`` with its
  ``Conv2Plus1D`` blocks and ``R2Plus1dStem`` (3x7x7 factored stem, stride (1, 2, 2), 64 channels),
  one / two ``BasicBlock`` s per stage (64, 128, 256, 512 channels), global average pooling and a
  linear classifier. ``r2plus1d_10`` is the student of the CCL reference (its layer sizes
  (1, 1, 1, 1)). Input: N x 3 x T x H x W.
* ``r2plus1d_10_w16``: the same network at a quarter of the width (16, 32, 64, 128 channels; the
  stem's 45 intermediate channels scaled alike), for CPU-sized clips (the embedded recipes).
* ``audio_cnn``: a small 2-D CNN on log-mel spectrograms (N x 1 x mels x frames): a BatchNorm over
  the input, four blocks of two 3x3 convolutions with BatchNorm and ReLU (average pooling 2x2
  between them), global average pooling, a 512-d embedding layer with ReLU and the classifier.
* ``audio_mlp``: for precomputed audio vectors (N x ``in_features``): two linear layers with
  BatchNorm and ReLU, the second the 512-d embedding, then the classifier.

Every model returns logits; ``feature_spec.pooled`` is the input of the final linear layer ``fc``
(N x D: 512 for R(2+1)D and the audio models, post-ReLU). The video models declare no stages
(their stage outputs are N x C x T x H x W, not image maps); ``audio_cnn``'s four blocks are its
stages.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

from reviewkd.features import FeatureSpec, Stage, Tap

from .registry import register_model

__all__ = ["R2Plus1D", "AudioCNN", "AudioMLP"]

EMBEDDING = 512


class _ScaledStem(nn.Sequential):
    """``R2Plus1dStem`` with ``width`` output channels (45 * width / 64 in between)."""

    def __init__(self, width: int):
        mid = max(1, 45 * width // 64)
        super().__init__(
            nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False), nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(width),
            nn.ReLU(inplace=True))


class R2Plus1D(VideoResNet):
    """torchvision's ``VideoResNet`` with (2+1)-D blocks, ``layers`` blocks per stage and a base
    ``width`` (64: torchvision's ``r2plus1d_18`` layout exactly, parameter names included)."""

    def __init__(self, layers=(1, 1, 1, 1), num_classes: int = 400, width: int = 64):
        nn.Module.__init__(self)
        self.inplanes = width
        self.stem = R2Plus1dStem() if width == 64 else _ScaledStem(width)
        self.layer1 = self._make_layer(BasicBlock, Conv2Plus1D, width, layers[0], stride=1)
        self.layer2 = self._make_layer(BasicBlock, Conv2Plus1D, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, Conv2Plus1D, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, Conv2Plus1D, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # as VideoResNet initialises
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
        self.feature_spec = FeatureSpec((), Tap("fc", "input"))


@register_model("r2plus1d_10", family="video")
def r2plus1d_10(num_classes: int = 400) -> nn.Module:
    return R2Plus1D((1, 1, 1, 1), num_classes)


@register_model("r2plus1d_18", family="video")
def r2plus1d_18(num_classes: int = 400) -> nn.Module:
    return R2Plus1D((2, 2, 2, 2), num_classes)


@register_model("r2plus1d_10_w16", family="video")
def r2plus1d_10_w16(num_classes: int = 400) -> nn.Module:
    return R2Plus1D((1, 1, 1, 1), num_classes, width=16)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class AudioCNN(nn.Module):
    """Log-mel spectrogram (N x 1 x mels x frames) -> logits; see the module docstring."""

    def __init__(self, num_classes: int = 10, channels=(32, 64, 128, 256), embedding: int = EMBEDDING):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(1)  # the input's scale is learnt, as PANNs' bn0 does per mel bin
        widths = (1, *channels)
        self.blocks = nn.ModuleList(_conv_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Sequential(nn.Linear(channels[-1], embedding), nn.ReLU())
        self.fc = nn.Linear(embedding, num_classes)
        self.feature_spec = FeatureSpec(
            tuple(Stage(Tap(f"blocks.{i}"), Tap(f"blocks.{i}.5", "input"), f"blocks.{i}.4") for i in range(len(channels))),
            Tap("fc", "input"))

    def forward(self, x):
        x = self.bn0(x)
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
        return self.fc(self.embedding(self.avgpool(x).flatten(1)))


class AudioMLP(nn.Module):
    """Precomputed audio vectors (N x ``in_features``) -> logits; see the module docstring."""

    def __init__(self, num_classes: int = 10, in_features: int = 512, embedding: int = EMBEDDING):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, embedding), nn.BatchNorm1d(embedding), nn.ReLU())
        self.embedding = nn.Sequential(nn.Linear(embedding, embedding), nn.BatchNorm1d(embedding), nn.ReLU())
        self.fc = nn.Linear(embedding, num_classes)
        self.feature_spec = FeatureSpec((), Tap("fc", "input"))

    def forward(self, x):
        return self.fc(self.embedding(self.hidden(x)))


@register_model("audio_cnn", family="audio")
def audio_cnn(num_classes: int = 10) -> nn.Module:
    return AudioCNN(num_classes)


@register_model("audio_cnn_e128", family="audio")
def audio_cnn_e128(num_classes: int = 10) -> nn.Module:
    """``audio_cnn`` with a 128-d embedding: the size of the embedded recipes' video student's feature,
    which CCL's cross-modal contrast compares it with."""
    return AudioCNN(num_classes, embedding=128)


@register_model("audio_mlp", family="audio_vector")
def audio_mlp(num_classes: int = 10, in_features: int = 512) -> nn.Module:
    return AudioMLP(num_classes, in_features)
