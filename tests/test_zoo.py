"""The CIFAR model zoo against the published checkpoints' state-dict layout, plus feature taps."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from reviewkd.features import FeatureTaps
from reviewkd.models import CheckpointMismatchError, create_model, list_models, load_weights

# Keys, shapes and parameter counts of the community's CIFAR-100 checkpoints (reference data).
REFERENCE_PATH = Path(__file__).parent / "data" / "cifar_zoo_state_dicts.json"
REFERENCE = json.loads(REFERENCE_PATH.read_text())
NAMES = list(REFERENCE)


def _resnet(c, pooled=None):
    return [(c[0], 32), (c[1], 16), (c[2], 8)] + ([(c[3], 4)] if len(c) == 4 else []), pooled or c[-1]


def _wrn(w):
    return _resnet((16 * w, 32 * w, 64 * w))


# (channels, spatial size) of each stage for a 32x32 input, and the pooled width
STAGES = {
    **{f"resnet{d}": _resnet((16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet((64, 128, 256)),
    "resnet32x4": _resnet((64, 128, 256)),
    "ResNet18": _resnet((64, 128, 256, 512)),
    "ResNet50": _resnet((256, 512, 1024, 2048)),
    "wrn_16_1": _wrn(1),
    "wrn_16_2": _wrn(2),
    "wrn_40_1": _wrn(1),
    "wrn_40_2": _wrn(2),
    **{f"vgg{d}": ([(128, 16), (256, 8), (512, 4), (512, 4)], 512) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ([(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "ShuffleV1": ([(240, 16), (480, 8), (960, 4)], 960),
    "ShuffleV2": ([(116, 16), (232, 8), (464, 4)], 1024),
}
# families where post = relu(pre) holds stage by stage
POST_IS_RELU_OF_PRE = {n for n in NAMES if n.startswith(("resnet", "ResNet", "vgg", "ShuffleV1"))}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=100).eval()


@lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    return _build(name)


def test_reference_covers_the_zoo():
    assert set(STAGES) == set(NAMES)
    assert set(NAMES) <= set(list_models("cifar"))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_reference(name):
    model = _model(name)
    ref = REFERENCE[name]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref["state_dict"]


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_checkpoint_round_trip_and_forward(name, tmp_path):
    model = _model(name)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = _build(name, seed=1)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(fresh(x), model(x))
    load_weights(fresh, path)
    out = fresh(x)
    assert out.shape == (2, 100)
    assert torch.equal(out, model(x))
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 100)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_feature_taps(name):
    model = _model(name)
    stages, pooled = STAGES[name]
    assert len(model.feature_spec.stages) == len(stages)
    expected = [(2, c, s, s) for c, s in stages] + [(2, pooled, 1, 1)]
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    for kind in ("post", "pre"):
        taps = FeatureTaps(model, model.feature_spec, kind)
        try:
            out, feats[kind] = taps(x)
        finally:
            taps.remove()
        assert out.shape == (2, 100)
        assert [tuple(f.shape) for f in feats[kind]] == expected
    assert torch.equal(feats["post"][-1], feats["pre"][-1])
    modules = dict(model.named_modules())
    for stage, (channels, _) in zip(model.feature_spec.stages, stages):
        if stage.bn is not None:  # the BatchNorm ending the stage: its output feeds the pre-activation
            assert isinstance(modules[stage.bn], nn.BatchNorm2d) and modules[stage.bn].num_features == channels
    if name in POST_IS_RELU_OF_PRE:
        for post, pre in zip(feats["post"][:-1], feats["pre"][:-1]):
            assert torch.equal(post, torch.relu(pre))


@pytest.mark.parametrize("name", NAMES)
def test_no_inplace_activations(name):
    assert not [n for n, m in _model(name).named_modules() if getattr(m, "inplace", False)]


def test_wrong_architecture_is_rejected(tmp_path):
    cases = [
        ("resnet8", "resnet20", "missing keys: layer1.1."),  # deeper model: blocks missing
        ("resnet20", "resnet8", "unexpected keys: layer1.1."),
        ("resnet8x4", "resnet8", "wrong shapes: conv1.weight (32, 3, 3, 3) vs model (16, 3, 3, 3)"),
    ]
    for source, target, message in cases:
        path = tmp_path / f"{source}.pth"
        torch.save({"model": _model(source).state_dict()}, path)
        with pytest.raises(CheckpointMismatchError) as err:
            load_weights(_build(target), path)
        assert message in str(err.value)
