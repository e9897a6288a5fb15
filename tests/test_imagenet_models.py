"""ImageNet zoo (torchvision ResNets, MobileNet v1), torchvision weight files, model summary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reviewkd.features import FeatureTaps
from reviewkd.models import CheckpointMismatchError, create_model, list_models, load_weights, model_family
from reviewkd.models.summary import count_flops, count_parameters, format_table, zoo_table

IMAGENET = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v1"]
PRE_CHANNELS = {
    "imagenet_resnet18": (64, 128, 256, 512, 512),
    "imagenet_resnet34": (64, 128, 256, 512, 512),
    "imagenet_resnet50": (256, 512, 1024, 2048, 2048),
    # the released ImageNet code's MobileNet features (in_channels of its ReviewKD student)
    "imagenet_mobilenet_v1": (128, 256, 512, 1024, 1024),
}


def test_registered_as_imagenet_family():
    for name in IMAGENET:
        assert name in list_models("imagenet")
        assert model_family(name) == "imagenet"


@pytest.mark.parametrize("name", IMAGENET)
def test_forward_and_pre_taps(name):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    pre = FeatureTaps(model, model.feature_spec, "pre")
    post = FeatureTaps(model, model.feature_spec, "post")
    with torch.no_grad():
        logits, f_pre = pre(x)
        logits2, f_post = post(x)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, logits2)
    assert tuple(f.shape[1] for f in f_pre) == PRE_CHANNELS[name]
    assert f_pre[-1].shape[-2:] == (1, 1)
    # spatial sizes shrink by 2 per stage: 1/4 .. 1/32 of the input
    assert [f.shape[-1] for f in f_pre[:-1]] == [16, 8, 4, 2]
    for a, b in zip(f_pre[:-1], f_post[:-1]):
        assert a.min() < 0  # really taken before the ReLU
        torch.testing.assert_close(F.relu(a), b)
    torch.testing.assert_close(f_pre[-1], f_post[-1])
    # each declared BN exists and has the stage's channels
    modules = dict(model.named_modules())
    for stage, c in zip(model.feature_spec.stages, PRE_CHANNELS[name]):
        assert isinstance(modules[stage.bn], nn.BatchNorm2d) and modules[stage.bn].num_features == c
    pre.remove()
    post.remove()


def test_resnet_bn_names():
    assert [s.bn for s in create_model("imagenet_resnet18", 10).feature_spec.stages] == [
        "layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"]
    assert [s.bn for s in create_model("imagenet_resnet50", 10).feature_spec.stages] == [
        "layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"]


def test_mobilenet_layout_matches_released_code():
    torch.manual_seed(0)
    model = create_model("imagenet_mobilenet_v1", 1000).eval()
    state = model.state_dict()
    # stem conv_bn, 13 depthwise-separable blocks, pooling at model.14, fc
    assert state["model.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["model.1.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    assert state["model.1.3.weight"].shape == (64, 32, 1, 1)  # pointwise
    assert state["model.13.4.running_mean"].shape == (1024,)
    assert state["fc.weight"].shape == (1000, 1024)
    assert not any(k.startswith("model.14") for k in state)
    assert len([k for k in state if k.endswith(".weight") and state[k].dim() == 4]) == 27
    # at 224x224 the stages have the released shapes 56, 28, 14, 7 and the pooled entry
    taps = FeatureTaps(model, model.feature_spec, "pre")
    with torch.no_grad():
        logits, feats = taps(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7), (1024, 1, 1)]
    taps.remove()


def test_torchvision_weight_file_round_trip(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(reference.state_dict(), path)
    model = load_weights(create_model("imagenet_resnet18", 1000), path).eval()
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_wrong_torchvision_file_names_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(create_model("imagenet_resnet18", 1000), path)
    msg = str(err.value)
    assert "unexpected keys" in msg and "layer1.2.conv1.weight" in msg
    # wrong number of classes: names the fc shapes
    path100 = tmp_path / "resnet18_100.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=100).state_dict(), path100)
    with pytest.raises(CheckpointMismatchError, match=r"fc\.weight \(100, 512\) vs model \(1000, 512\)"):
        load_weights(create_model("imagenet_resnet18", 1000), path100)


# ----- summary -----

def test_count_parameters():
    for name in ("imagenet_resnet18", "imagenet_mobilenet_v1"):
        model = create_model(name, 1000)
        assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(create_model("imagenet_resnet18", 1000)) == 11_689_512  # torchvision's figure
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m[1].weight.requires_grad_(False)
    assert count_parameters(m) == 15 + 8
    assert count_parameters(m, trainable_only=True) == 15 + 2


def test_count_flops_conv_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # 2 FLOPs per multiply-add: out channels x in channels x kernel x output pixels; bias not counted
    assert count_flops(conv, (3, 8, 8)) == 2 * 8 * 3 * 9 * 64
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_flops(lin, (3, 2, 2)) == 2 * 12 * 5
    conv.train()
    count_flops(conv, (3, 8, 8))
    assert conv.training  # mode restored


def test_resnet18_flops_known_value():
    # ResNet-18 at 224: 1.82 GMACs -> about 3.64 GFLOPs with 2 per multiply-add
    flops = count_flops(create_model("imagenet_resnet18", 1000), (3, 224, 224))
    assert 3.6e9 < flops < 3.7e9


def test_zoo_table_rows():
    rows = zoo_table(["imagenet_resnet18", "imagenet_mobilenet_v1"])
    r18, mbv1 = rows
    assert r18["family"] == "imagenet" and r18["parameters"] == 11_689_512
    assert r18["stages"] == 4 and r18["channels"] == (64, 128, 256, 512)
    assert 3600 < r18["MFLOPs"] < 3700
    assert mbv1["channels"] == (128, 256, 512, 1024)
    assert 1100 < mbv1["MFLOPs"] < 1200  # ~569 MMACs
    small = zoo_table(["imagenet_resnet18"], num_classes=10, input_size=(3, 32, 32))[0]
    assert small["parameters"] == 11_689_512 - 990 * 513
    assert small["MFLOPs"] < r18["MFLOPs"] / 40


def test_format_table_aligns_columns():
    rows = [
        {"name": "a", "params": 12, "mflops": 1.5, "channels": (16, 32)},
        {"name": "longer_name", "params": 1234567, "mflops": 123.456},
    ]
    text = format_table(rows, ["name", "params", "mflops", "channels"], formats={"mflops": ".1f", "params": ","})
    lines = text.splitlines()
    assert len(lines) == 4
    header, rule, first, second = lines
    assert header.split() == ["name", "params", "mflops", "channels"]
    assert set(rule.replace(" ", "")) == {"-"}
    # text left-aligned, numbers right-aligned: every column ends (numbers) or starts (text) at the same place
    assert first.startswith("a ") and second.startswith("longer_name ")
    assert first.index("12") + 2 == second.index("1,234,567") + len("1,234,567") == header.index("params") + len("params")
    assert first.index("1.5") + 3 == second.index("123.5") + 5
    assert first.rstrip().endswith("16,32")
    assert first.index("16,32") == header.index("channels")
    # default column order = first appearance; headers can be renamed; callables format
    text2 = format_table(rows, headers={"mflops": "MFLOPs"}, formats={"name": str.upper})
    assert text2.splitlines()[0].split() == ["name", "params", "MFLOPs", "channels"]
    assert "LONGER_NAME" in text2
