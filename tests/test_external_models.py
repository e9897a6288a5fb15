"""torchvision / timm / user models named in configs and in the Python API: name resolution,
stage discovery per family, specs written in YAML, errors that name the side, the README's examples,
and a training run on a tiny image folder."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from torchvision import models as tv_models
from torchvision.models import regnet as tv_regnet

import reviewkd as rk
from reviewkd.cli import main
from reviewkd.config import ConfigError, validate
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.features import FeatureSpec, FeatureTaps, Stage, Tap
from reviewkd.methods import RunContext
from reviewkd.models import (CheckpointMismatchError, ExternalModelError, StageError, TimmNotInstalledError,
                             create_model, find_feature_spec, load_weights, model_family)
from reviewkd.models.stages import prepare_stages
from reviewkd.tasks import get_task

README = Path(__file__).resolve().parents[1] / "README.md"


# ----------------------------------------------------------------------------- names
def test_torchvision_and_timm_names_build_without_weights():
    torch.manual_seed(0)
    tv = create_model("torchvision/resnet18", num_classes=7)
    tm = create_model("timm/resnet18", num_classes=7)
    assert tv.model_name == "torchvision/resnet18" and tm.model_name == "timm/resnet18"
    assert tv.fc.weight.shape == (7, 512) and tm.fc.weight.shape == (7, 512)
    assert type(tm).__module__ == "timm.models.resnet"
    assert (model_family("torchvision/resnet18"), model_family("timm/resnet18"), model_family("a.b:c")) == (
        "torchvision", "timm", "custom")
    assert create_model("torchvision/mobilenet_v3_small", num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_names_give_close_matches():
    with pytest.raises(ExternalModelError, match=r"torchvision has no classification model 'resnet19'\. Did you mean "
                                                 r"torchvision/resnet18"):
        create_model("torchvision/resnet19", 10)
    with pytest.raises(ExternalModelError, match=r"timm has no model 'resnet19'\. Did you mean timm/resnet18"):
        create_model("timm/resnet19", 10)
    # a bare name that exists outside the zoo: the spellings that would build it
    with pytest.raises(ValueError, match=r"unknown model 'resnet34'\. Did you mean .*torchvision/resnet34, timm/resnet34"):
        create_model("resnet34", 10)
    with pytest.raises(ValueError, match=r"Did you mean resnet8"):
        create_model("resnet9", 10)


def test_timm_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(TimmNotInstalledError) as info:
        create_model("timm/resnet18", 10)
    assert str(info.value) == "timm is not installed: pip install timm"
    # torchvision names and the zoo do not need it
    create_model("torchvision/resnet18", 10)
    with pytest.raises(ValueError, match="Did you mean resnet8"):
        create_model("resnet9", 10)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A folder with user modules as the working directory, sys.path / sys.modules restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("kdnets"):
            del sys.modules[name]


def test_user_builder_from_the_working_folder(user_package):
    (user_package / "kdnets_ok.py").write_text(textwrap.dedent("""
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(4, num_classes)

            def forward(self, x):
                return self.fc(self.pool(self.conv(x)).flatten(1))

        def tiny(num_classes):
            return Tiny(num_classes)

        def resnet(num_classes):
            import torchvision
            return torchvision.models.resnet18(num_classes=num_classes)

        def no_classes():
            return Tiny(3)

        def not_a_model(num_classes):
            return [num_classes]
    """))
    model = create_model("kdnets_ok:tiny", num_classes=5)
    assert model.model_name == "kdnets_ok:tiny" and model.fc.out_features == 5
    assert not hasattr(model, "feature_spec")  # unknown architecture: no guess
    # a builder that returns a torchvision model gets that family's stages
    assert create_model("kdnets_ok:resnet", 5).feature_spec.stages[0].post == Tap("layer1")
    # in the Python API, a model without stages is named with the ways to give them
    with pytest.raises(ValueError, match=r"^kdnets_ok:tiny does not declare its stages: pass a FeatureSpec .*"
                                         r"model.features / teacher.features"):
        rk.Distiller(model, create_model("resnet8", 5), "reviewkd")
    with pytest.raises(ExternalModelError, match=r"module 'kdnets_ok' has no 'tiyn'\. Did you mean tiny\?"):
        create_model("kdnets_ok:tiyn", 5)
    with pytest.raises(ExternalModelError, match=r"no_classes\(\) must accept num_classes="):
        create_model("kdnets_ok:no_classes", 5)
    with pytest.raises(ExternalModelError, match=r"returned a list, not a torch.nn.Module"):
        create_model("kdnets_ok:not_a_model", 5)


def test_user_builder_import_errors(user_package):
    with pytest.raises(ExternalModelError, match=r"no module named 'kdnets_nowhere' \(install it, or run from the "
                                                 r"folder that holds kdnets_nowhere.py\)"):
        create_model("kdnets_nowhere:net", 5)
    (user_package / "kdnets_dep.py").write_text("import kdnets_missing_dependency\n")
    with pytest.raises(ExternalModelError, match=r"importing 'kdnets_dep' failed: No module named "
                                                 r"'kdnets_missing_dependency'"):
        create_model("kdnets_dep:net", 5)
    with pytest.raises(ExternalModelError, match="package.module:function"):
        create_model("kdnets_dep:", 5)


# --------------------------------------------------------------------------- weights
def test_weight_files_of_torchvision_and_timm(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_model("torchvision/resnet18", 10)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    target = load_weights(create_model("torchvision/resnet18", 10), tmp_path / "tv.pth")
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    timm_source = create_model("timm/resnet18", 10)
    save_file({k: v.contiguous() for k, v in timm_source.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    timm_target = load_weights(create_model("timm/resnet18", 10), tmp_path / "timm.safetensors")
    assert torch.equal(timm_target.fc.weight, timm_source.fc.weight)

    # an ImageNet head (1000 classes) into a 10-class model: the existing one-line refusal
    torch.save({"state_dict": create_model("timm/resnet18", 1000).state_dict()}, tmp_path / "in1k.pth")
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes: fc.weight \(1000, 512\) vs model \(10, 512\)"):
        load_weights(create_model("timm/resnet18", 10), tmp_path / "in1k.pth")


# ---------------------------------------------------------------------- stage discovery
# Channels of each stage and of the pooled entry, written from the architectures' own tables, and
# the strides every family gives (VGG's stages sit before its pools: 2..16).
FAMILIES = {
    "torchvision/resnet18": ((64, 128, 256, 512), 512),
    "torchvision/mobilenet_v2": ((24, 32, 96, 320), 1280),
    "torchvision/mobilenet_v3_small": ((16, 24, 48, 96), 576),
    "torchvision/efficientnet_b0": ((24, 40, 112, 320), 1280),
    "torchvision/efficientnet_v2_s": ((48, 64, 160, 256), 1280),
    "torchvision/regnet_x_400mf": ((32, 64, 160, 400), 400),
    "torchvision/regnet_y_400mf": ((48, 104, 208, 440), 440),
    "torchvision/convnext_tiny": ((96, 192, 384, 768), 768),
    "torchvision/vgg11": ((128, 256, 512, 512), 4096),
    "torchvision/vgg11_bn": ((128, 256, 512, 512), 4096),
    "timm/resnet18": ((64, 128, 256, 512), 512),
    "timm/efficientnet_b0": ((24, 40, 112, 320), 1280),
    "timm/mobilenetv3_small_100": ((16, 24, 48, 576), 576),
    "timm/convnext_atto": ((40, 80, 160, 320), 320),
    "timm/regnetx_002": ((24, 56, 152, 368), 368),
}


def _on_meta(name: str, num_classes: int = 10) -> nn.Module:
    """The model on the meta device: shapes without memory or arithmetic (RegNet computes its
    widths with tensors, so those are computed on the CPU)."""
    original = tv_regnet.BlockParams.from_init_params.__func__

    def widths_on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    tv_regnet.BlockParams.from_init_params = classmethod(widths_on_cpu)
    try:
        with torch.device("meta"):
            return create_model(name, num_classes).eval()
    finally:
        tv_regnet.BlockParams.from_init_params = classmethod(original)


def _shapes(model: nn.Module, kind: str, size: int = 64) -> list[tuple[int, int]]:
    """(channels, stride) of every stage and the pooled entry's channels, through FeatureTaps."""
    device = next(model.parameters()).device
    taps = FeatureTaps(model, model.feature_spec, kind)
    _, feats = taps(torch.zeros(2, 3, size, size, device=device))
    taps.remove()
    assert feats[-1].shape[-2:] == (1, 1)
    return [(f.shape[1], size // f.shape[-1]) for f in feats[:-1]], feats[-1].shape[1]


def _check_family(name: str, model: nn.Module, channels, pooled) -> None:
    strides = [2, 4, 8, 16] if "vgg" in name else [4, 8, 16, 32]
    for kind in ("post", "pre"):
        stages, pooled_channels = _shapes(model, kind)
        assert stages == list(zip(channels, strides)), (name, kind)
        assert pooled_channels == pooled
    modules = dict(model.named_modules())
    for stage, c in zip(model.feature_spec.stages, channels):
        if stage.bn is not None:  # the declared BatchNorm normalises the stage's channels
            assert isinstance(modules[stage.bn], nn.modules.batchnorm._BatchNorm) and modules[stage.bn].num_features == c


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_stages_have_the_published_shapes(name):
    channels, pooled = FAMILIES[name]
    _check_family(name, _on_meta(name), channels, pooled)


# Every depth of each family (stage channels from the architectures' tables).
ALL_DEPTHS = {
    "torchvision/resnet34": ((64, 128, 256, 512), 512),
    "torchvision/resnet50": ((256, 512, 1024, 2048), 2048),
    "torchvision/resnet101": ((256, 512, 1024, 2048), 2048),
    "torchvision/resnet152": ((256, 512, 1024, 2048), 2048),
    "torchvision/resnext50_32x4d": ((256, 512, 1024, 2048), 2048),
    "torchvision/wide_resnet50_2": ((256, 512, 1024, 2048), 2048),
    "torchvision/mobilenet_v3_large": ((24, 40, 112, 160), 960),
    "torchvision/efficientnet_b1": ((24, 40, 112, 320), 1280),
    "torchvision/efficientnet_b2": ((24, 48, 120, 352), 1408),
    "torchvision/efficientnet_b3": ((32, 48, 136, 384), 1536),
    "torchvision/efficientnet_b4": ((32, 56, 160, 448), 1792),
    "torchvision/efficientnet_b5": ((40, 64, 176, 512), 2048),
    "torchvision/efficientnet_b6": ((40, 72, 200, 576), 2304),
    "torchvision/efficientnet_b7": ((48, 80, 224, 640), 2560),
    "torchvision/efficientnet_v2_m": ((48, 80, 176, 512), 1280),
    "torchvision/efficientnet_v2_l": ((64, 96, 224, 640), 1280),
    "torchvision/regnet_x_800mf": ((64, 128, 288, 672), 672),
    "torchvision/regnet_x_1_6gf": ((72, 168, 408, 912), 912),
    "torchvision/regnet_x_3_2gf": ((96, 192, 432, 1008), 1008),
    "torchvision/regnet_x_8gf": ((80, 240, 720, 1920), 1920),
    "torchvision/regnet_x_16gf": ((256, 512, 896, 2048), 2048),
    "torchvision/regnet_x_32gf": ((336, 672, 1344, 2520), 2520),
    "torchvision/regnet_y_800mf": ((64, 144, 320, 784), 784),
    "torchvision/regnet_y_1_6gf": ((48, 120, 336, 888), 888),
    "torchvision/regnet_y_3_2gf": ((72, 216, 576, 1512), 1512),
    "torchvision/regnet_y_8gf": ((224, 448, 896, 2016), 2016),
    "torchvision/regnet_y_16gf": ((224, 448, 1232, 3024), 3024),
    "torchvision/regnet_y_32gf": ((232, 696, 1392, 3712), 3712),
    "torchvision/regnet_y_128gf": ((528, 1056, 2904, 7392), 7392),
    "torchvision/convnext_small": ((96, 192, 384, 768), 768),
    "torchvision/convnext_base": ((128, 256, 512, 1024), 1024),
    "torchvision/convnext_large": ((192, 384, 768, 1536), 1536),
    "torchvision/vgg13": ((128, 256, 512, 512), 4096),
    "torchvision/vgg13_bn": ((128, 256, 512, 512), 4096),
    "torchvision/vgg16": ((128, 256, 512, 512), 4096),
    "torchvision/vgg16_bn": ((128, 256, 512, 512), 4096),
    "torchvision/vgg19": ((128, 256, 512, 512), 4096),
    "torchvision/vgg19_bn": ((128, 256, 512, 512), 4096),
    "timm/resnet34": ((64, 128, 256, 512), 512),
    "timm/resnet50": ((256, 512, 1024, 2048), 2048),
    "timm/resnet101": ((256, 512, 1024, 2048), 2048),
    "timm/efficientnet_b3": ((32, 48, 136, 384), 1536),
    "timm/convnext_tiny": ((96, 192, 384, 768), 768),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALL_DEPTHS))
def test_every_depth_of_each_family(name):
    channels, pooled = ALL_DEPTHS[name]
    _check_family(name, _on_meta(name), channels, pooled)


def _record(model: nn.Module, names: list[str], port: str) -> dict[str, torch.Tensor]:
    """The test's own hooks: the output (or the first input) of each named module."""
    got, handles = {}, []
    modules = dict(model.named_modules())
    for n in names:
        if port == "output":
            handles.append(modules[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.clone())))
        else:
            handles.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0].clone())))
    return got, handles


@pytest.mark.parametrize("name, identity_blocks", [
    ("torchvision/resnet18", {0: "layer1.1", 1: "layer2.1", 2: "layer3.1", 3: "layer4.1"}),
    ("timm/resnet18", {0: "layer1.1", 1: "layer2.1", 2: "layer3.1", 3: "layer4.1"}),
    # RegNet stages of a single block end in a block with a projection shortcut: left out
    ("torchvision/regnet_x_400mf", {1: "trunk_output.block2.block2-1", 2: "trunk_output.block3.block3-6",
                                    3: "trunk_output.block4.block4-11"}),
    ("timm/regnetx_002", {2: "s3.b4", 3: "s4.b7"}),
])
def test_residual_families_pre_activation_is_the_residual_sum(name, identity_blocks):
    """pre = the BN output of the last block's residual branch + the block's input (an identity
    shortcut), and post = ReLU(pre), at every stage."""
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    with torch.no_grad():  # timm starts each block's last BN at zero (zero_init_last): give them values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    stages = model.feature_spec.stages
    inputs, h1 = _record(model, list(identity_blocks.values()), "input")
    bn_out, h2 = _record(model, [stages[i].bn for i in identity_blocks], "output")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, pre = FeatureTaps(model, model.feature_spec, "pre")(x)
        _, post = FeatureTaps(model, model.feature_spec, "post")(x)
    for i, block in identity_blocks.items():
        torch.testing.assert_close(pre[i], bn_out[stages[i].bn] + inputs[block])
    for i in range(len(stages)):
        assert pre[i].min() < 0
        torch.testing.assert_close(F.relu(pre[i]), post[i])
    for h in h1 + h2:
        h.remove()


@pytest.mark.parametrize("name", ["torchvision/mobilenet_v3_small", "torchvision/efficientnet_b0", "timm/efficientnet_b0"])
def test_linear_bottleneck_families_pre_equals_post(name):
    """Blocks ending in a linear projection: no activation follows the stage, so its output takes
    negative values and is its own pre-activation."""
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    assert all(s.pre == s.post for s in model.feature_spec.stages)
    with torch.no_grad():
        _, post = FeatureTaps(model, model.feature_spec, "post")(torch.randn(2, 3, 64, 64))
    assert all(f.min() < 0 for f in post[:-1])


def test_vgg_stages_are_the_relus_before_the_pools():
    model = _on_meta("torchvision/vgg11_bn")
    # vgg11_bn.features: pools at 3, 7, 14, 21, 28; the ReLU before each, the BN before that
    assert [s.post for s in model.feature_spec.stages] == [Tap(f"features.{i}") for i in (6, 13, 20, 27)]
    assert [s.pre for s in model.feature_spec.stages] == [Tap(f"features.{i}", "input") for i in (6, 13, 20, 27)]
    assert [s.bn for s in model.feature_spec.stages] == [f"features.{i}" for i in (5, 12, 19, 26)]
    assert model.feature_spec.pooled == Tap("classifier.4")
    assert [s.bn for s in _on_meta("torchvision/vgg11").feature_spec.stages] == [None] * 4


def test_a_model_built_in_python_gets_its_spec():
    model = tv_models.mobilenet_v3_small(num_classes=3)
    assert not hasattr(model, "feature_spec")
    prepare_stages(model, "student", kind="post", input_size=(3, 32, 32))
    assert model.feature_spec == find_feature_spec(model) == rk.find_feature_spec(model)
    assert model.feature_spec.stages[0].post == Tap("features.1")


def test_unknown_architecture_is_not_guessed():
    with pytest.raises(StageError, match="the stages of DenseNet are not known"):
        find_feature_spec(_on_meta("torchvision/densenet121"))
    assert not hasattr(create_model("torchvision/squeezenet1_0", 10), "feature_spec")


# ------------------------------------------------------------------------- YAML spec
def _config(text: str, **overrides):
    data = yaml.safe_load(text)
    for key, value in overrides.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return validate(data, "test")


def test_features_in_yaml_build_the_spec():
    cfg = _config("""
        model:
          name: torchvision/densenet121
          features: {post: [features.denseblock1, features.denseblock2],
                     pre: [features.denseblock1, {module: features.transition2.relu, port: input}],
                     bn: [null, features.transition2.norm], pooled: {module: classifier, port: input}}
        method: {name: vanilla}
    """)
    model = get_task("classification").build_model(cfg.model.name, cfg, 10)
    assert model.feature_spec == FeatureSpec(
        (Stage(Tap("features.denseblock1"), Tap("features.denseblock1"), None),
         Stage(Tap("features.denseblock2"), Tap("features.transition2.relu", "input"), "features.transition2.norm")),
        Tap("classifier", "input"))
    # the saved config reads back the same
    assert validate(yaml.safe_load(cfg.to_yaml()), "again").model.features == cfg.model.features


def test_features_in_yaml_are_validated():
    with pytest.raises(ConfigError, match=r"model.features.pooled: Field required"):
        _config("model: {name: resnet8, features: {post: [layer1]}}")
    with pytest.raises(ConfigError, match=r"features.pre has 1 entries, post 2"):
        _config("model: {name: resnet8, features: {post: [layer1, layer2], pre: [layer1], pooled: avgpool}}")
    with pytest.raises(ConfigError, match=r"teacher.features.post.0"):
        _config("teacher: {name: resnet8, features: {post: [{module: layer1, port: side}], pooled: avgpool}}")


# ------------------------------------------------------------------------- errors per side
def _task_cfg(student: str, teacher_name: str, method: str = "reviewkd", image_size: int = 32, **sections):
    data = {"data": {"name": "imagefolder", "root": "unused", "image_size": image_size},
            "model": {"name": student}, "teacher": {"name": teacher_name, "checkpoint": "t.pth"}, "method": {"name": method}}
    for key, value in sections.items():
        data[key].update(value)
    return validate(data, "test")


def test_unknown_stages_name_the_side_and_suggest_a_spec():
    cfg = _task_cfg("resnet8", "torchvision/shufflenet_v2_x0_5")
    task = get_task("classification")
    with pytest.raises(StageError) as info:
        task.build_teacher(cfg.teacher.name, cfg, 10, None)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("teacher torchvision/shufflenet_v2_x0_5: the stages of ShuffleNetV2 are not known")
    # shufflenet_v2: maxpool ends at stride 4, stage2/3 at 8/16, conv5 at 32; fc reads the pooled feature
    assert "teacher: {features: {post: [maxpool, stage2, stage3, conv5], pooled: {module: fc, port: input}}}" in msg
    assert "stage2 (48 ch, stride 8)" in msg and "conv5 (1024 ch, stride 32)" in msg
    # the suggestion works as it is
    suggested = yaml.safe_load(re.search(r"teacher: (\{features: .*?\}\}\})", msg).group(1))
    cfg = _task_cfg("resnet8", "torchvision/shufflenet_v2_x0_5", teacher=suggested)
    teacher = task.build_teacher(cfg.teacher.name, cfg, 10, None)
    assert [s.post.module for s in teacher.feature_spec.stages] == ["maxpool", "stage2", "stage3", "conv5"]
    # a method without features does not need stages
    task.build_teacher("torchvision/shufflenet_v2_x0_5", _task_cfg("resnet8", "resnet8", "kd"), 10, None)


def test_wrong_module_name_names_the_student():
    cfg = _task_cfg("timm/resnet18", "resnet8", model={"features": {"post": ["layer1", "layer9"], "pooled": "global_pool"}})
    with pytest.raises(StageError, match=r"^student timm/resnet18: ResNet has no module\(s\) \['layer9'\].*"
                                         r"e\.g\. model: \{features: \{post: \[layer1, layer2, layer3, layer4\]"):
        get_task("classification").build_model(cfg.model.name, cfg, 10)


def test_fixed_input_size_and_token_features_are_refused_at_set_up():
    task = get_task("classification")
    cfg = _task_cfg("timm/vit_tiny_patch16_224", "resnet8")
    with pytest.raises(StageError, match=r"^student timm/vit_tiny_patch16_224: a forward pass at input size 3x32x32 "
                                         r"failed \(AssertionError: .*\); the model takes 224x224 inputs only: set "
                                         r"data.image_size=224"):
        task.build_model(cfg.model.name, cfg, 10)
    cfg = _task_cfg("resnet8", "timm/vit_tiny_patch16_224", image_size=224)
    with pytest.raises(StageError, match=r"^teacher timm/vit_tiny_patch16_224: stage tap 'blocks.11' gives "
                                         r"\(2, 197, 192\) \(tokens, N x L x C\), not N x C x H x W"):
        task.build_teacher(cfg.teacher.name, cfg, 10, None)
    # the same refusal without the task: the recipe's probe, not a step
    with pytest.raises(ValueError, match=r"probe forward .* failed .*not N x C x H x W"):
        rk.Distiller(create_model("resnet8", 10), create_model("timm/vit_tiny_patch16_224", 10), "reviewkd",
                     input_size=(3, 224, 224))
    with pytest.raises(StageError, match=r"^student timm/swin_tiny_patch4_window7_224: its features are NHWC"):
        prepare_stages(_on_meta("timm/swin_tiny_patch4_window7_224"), "student", kind="post", input_size=(3, 224, 224))


# ------------------------------------------------------------------------- distillation
def test_timm_student_torchvision_teacher_reviewkd_step():
    torch.manual_seed(0)
    student, teacher = create_model("timm/resnet18", 3), create_model("torchvision/resnet34", 3)
    distiller = rk.Distiller(student, teacher, method="reviewkd", input_size=(3, 32, 32))
    # student post-activation, teacher pre-activation (the residual sums) at strides 4..32 and pooled
    probe = distiller.probe_step
    assert [tuple(f.shape[1:]) for f in probe.teacher_features] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1),
                                                                   (512, 1, 1)]
    assert probe.teacher_features[0].min() < 0 and probe.student_features[0].min() >= 0
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    _, losses = distiller(x, y, epoch=20)  # past the warm-up: the full HCL weight
    assert set(losses) == {"ce", "reviewkd"} and losses["reviewkd"] > 0
    sum(losses.values()).backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.method.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Your own models")
    return text[start:text.index("\n## ", start + 1)]


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _readme_section(), re.S)


def _one_step(cfg, num_classes: int = 3, size: int = 32):
    """Both models built as a run builds them, then one ReviewKD step with backward."""
    task = get_task("classification")
    torch.manual_seed(0)
    student = task.build_model(cfg.model.name, cfg, num_classes)
    teacher = task.build_teacher(cfg.teacher.name, cfg, num_classes, None)
    context = RunContext(num_samples=8, train_targets=torch.arange(8) % num_classes, num_classes=num_classes)
    recipe = task.build_recipe(cfg, student, teacher, (3, size, size), context)
    _, losses = recipe(torch.randn(4, 3, size, size), torch.arange(4) % num_classes, epoch=100)
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["reviewkd"] > 0
    total.backward()
    return recipe


def _readme_config(**teacher):
    data = yaml.safe_load(_readme_blocks("yaml")[0])
    data["data"].update(image_size=32)  # small input, same models
    data["teacher"].update(teacher)
    return validate(data, "README")


def test_readme_config_trains_one_step():
    cfg = _readme_config()
    assert (cfg.model.name, cfg.teacher.name, cfg.method.name) == ("timm/resnet18", "torchvision/resnet34", "reviewkd")
    _one_step(cfg)


README_STUDENTS = ["timm/resnet18", "timm/resnet34", "timm/resnet50"]
README_TEACHERS = ["torchvision/resnet34", "torchvision/resnet50", "torchvision/resnet101"]


def test_readme_names_the_tested_depths():
    section = " ".join(_readme_section().split())
    assert "students " + ", ".join(f"`{n}`" for n in README_STUDENTS) in section
    assert "teachers " + ", ".join(f"`{n}`" for n in README_TEACHERS) in section


@pytest.mark.slow
@pytest.mark.parametrize("student", README_STUDENTS)
@pytest.mark.parametrize("teacher", README_TEACHERS)
def test_readme_config_every_suggested_depth(student, teacher):
    cfg = _readme_config(name=teacher)
    cfg.model.name = student
    _one_step(cfg)


def test_readme_own_model_with_yaml_features(user_package):
    code = _readme_blocks("python")[0]
    (user_package / "mynets.py").write_text(code)
    spec_yaml = yaml.safe_load(_readme_blocks("yaml")[1])
    assert spec_yaml["model"]["name"] == "mynets:small_net"
    # the same model and features as student (post read) and as teacher (pre read)
    data = {"data": {"name": "imagefolder", "root": "unused", "image_size": 32}, "model": spec_yaml["model"],
            "teacher": dict(spec_yaml["model"], checkpoint="t.pth"), "method": {"name": "reviewkd"}}
    try:
        recipe = _one_step(validate(data, "README"))
        probe = recipe.probe_step
        # strides 2, 4, 8 at 32x32, then the pooled entry; the teacher's entries are before the ReLUs
        assert [tuple(f.shape[1:]) for f in probe.teacher_features] == [(32, 16, 16), (64, 8, 8), (128, 4, 4),
                                                                       (128, 1, 1)]
        assert all(f.min() < 0 for f in probe.teacher_features[:-1])
        # the tapped BatchNorms are folded into their convolutions for training (same values, Identity left)
        teacher = recipe.frozen_teacher()
        assert [type(m) for m in (teacher.stage1[1], teacher.stage2[1], teacher.stage3[1])] == [nn.Identity] * 3
        assert recipe.folded_teacher_batchnorms == 3
    finally:
        sys.modules.pop("mynets", None)


# ------------------------------------------------------------------------- command line
def _image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=4, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_cli_trains_a_timm_student_from_a_torchvision_teacher(tmp_path, capsys):
    _image_folder(tmp_path / "images")
    torch.manual_seed(0)
    torch.save(create_model("torchvision/resnet18", 3).state_dict(), tmp_path / "teacher.pth")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ext", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 32, "batch_size": 4,
                 "eval_batch_size": 6, "workers": 0, "subset": 12},
        "model": {"name": "timm/resnet18"},
        "teacher": {"name": "torchvision/resnet18", "checkpoint": str(tmp_path / "teacher.pth")},
        "method": {"name": "reviewkd"},
        "solver": {"epochs": 1, "lr": 0.01},
        "runtime": {"device": "cpu", "precision": "fp32"},
    }))
    assert main(["train", str(config)]) == 0
    ckpt = load_checkpoint(tmp_path / "runs" / "ext" / "last.pt")
    assert ckpt["done"] and ckpt["model_name"] == "timm/resnet18"
    # the checkpoint rebuilds through create_model(meta["model_name"]) for export
    assert main(["export", str(tmp_path / "runs" / "ext" / "last.pt"), "--formats", "pt"]) == 0
    capsys.readouterr()
    # a fixed-size student at 32x32: one line naming the side and the setting
    assert main(["train", str(config), "name=vit", "model.name=timm/vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reviewkd train: error: student timm/vit_tiny_patch16_224: ")
    assert "set data.image_size=224" in err[0]
    assert not (tmp_path / "runs" / "vit").exists()
