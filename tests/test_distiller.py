"""Distiller: auto-configuration from a probe pass, the frozen teacher, and learning on real data."""
import pytest
import torch
import torchvision

import reviewkd as rk
from reviewkd.features import FeatureSpec, FeatureTaps, Tap
from reviewkd.methods import IncompatiblePairError

# teacher -> student pairs of the paper's CIFAR-100 table, with their review weights
PAPER_PAIRS = [
    ("resnet56", "resnet20", 0.6), ("resnet110", "resnet32", 1.0), ("wrn_40_2", "wrn_16_2", 5.0),
    ("wrn_40_2", "wrn_40_1", 5.0), ("resnet32x4", "resnet8x4", 5.0), ("vgg13", "vgg8", 5.0),
    ("wrn_40_2", "ShuffleV1", 5.0), ("resnet32x4", "ShuffleV1", 5.0), ("resnet32x4", "ShuffleV2", 8.0),
    ("ResNet50", "MobileNetV2", 7.0), ("vgg13", "MobileNetV2", 5.0),
]


@pytest.mark.parametrize("teacher_name,student_name,weight", PAPER_PAIRS)
def test_auto_configuration_for_paper_pairs(teacher_name, student_name, weight):
    torch.manual_seed(0)
    teacher = rk.create_model(teacher_name, num_classes=100)
    student = rk.create_model(student_name, num_classes=100)
    d = rk.Distiller(student, teacher, "reviewkd", weight=weight)  # no shape or channel given anywhere
    fusion = d.method.fusion
    x = torch.randn(2, 3, 32, 32)
    _, s_feats = FeatureTaps(student, student.feature_spec, "post")(x)
    with torch.no_grad():
        _, t_feats = FeatureTaps(teacher, teacher.feature_spec, "pre")(x)
    assert fusion.mid_channels == min(512, s_feats[-1].shape[1])
    # abfs.0 is the deepest entry (released naming); it alone has no attention conv
    assert fusion.abfs[0].att_conv is None and all(a.att_conv is not None for a in fusion.abfs[1:])
    d.train()
    fused = fusion(s_feats)
    assert [f.shape for f in fused] == [t.shape for t in t_feats]


def test_released_resnet_channels_are_found_by_the_probe():
    # build_review_kd of the released code: resnet student in [16,32,64,64], x4 teacher out [64,128,256,256]
    d = rk.Distiller(rk.create_model("resnet20", 100), rk.create_model("resnet56", 100), "reviewkd")
    abfs = list(d.method.fusion.abfs)[::-1]  # shallow -> deep
    assert [a.conv1[0].in_channels for a in abfs] == [16, 32, 64, 64]
    assert [a.conv2[0].out_channels for a in abfs] == [16, 32, 64, 64]
    d = rk.Distiller(rk.create_model("ShuffleV1", 100), rk.create_model("wrn_40_2", 100), "reviewkd")
    abfs = list(d.method.fusion.abfs)[::-1]
    assert [a.conv1[0].in_channels for a in abfs] == [240, 480, 960, 960]
    assert [a.conv2[0].out_channels for a in abfs] == [32, 64, 128, 128]


def test_different_stage_counts_give_a_clear_error_and_stage_selection_fixes_it():
    student, teacher = rk.create_model("resnet20", 10), rk.create_model("ResNet18", 10)
    with pytest.raises(IncompatiblePairError) as err:
        rk.Distiller(student, teacher, "reviewkd")
    msg = str(err.value)
    assert "resnet20 has 3 stages" in msg and "ResNet18 has 4" in msg and "teacher_stages=[2, 3, 4]" in msg
    d = rk.Distiller(student, teacher, "reviewkd", teacher_stages=[2, 3, 4])
    assert len(d.method.fusion.abfs) == 4


def test_teacher_is_frozen_in_eval_mode_and_its_statistics_do_not_move(fashion_batch):
    images, labels = fashion_batch
    student, teacher = rk.create_model("resnet8", 10), rk.create_model("resnet20", 10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = rk.Distiller(student, teacher, "reviewkd", warmup_epochs=0, kd_weight=1.0)
    d.train()
    assert not teacher.training and student.training and d.method.training
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        _, losses = d(images[:16], labels[:16], epoch=1)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"
    assert all(p.grad is not None for p in d.method.parameters())
    ids = {id(p) for p in d.trainable_parameters()}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in d.method.parameters()}


def test_probe_does_not_touch_student_batchnorm():
    student = rk.create_model("resnet8", 10)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rk.Distiller(student, rk.create_model("resnet20", 10), "reviewkd")
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_warmup_follows_released_schedule():
    d = rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet14", 10), "reviewkd", warmup_epochs=20)
    assert [d.method.warmup_factor(e) for e in (0, 5, 20, 30)] == [0.0, 0.25, 1.0, 1.0]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d(x, y, epoch=0)
    assert losses["reviewkd"].item() == 0.0 and set(losses) == {"ce", "reviewkd"}


def test_reviewkd_lowers_the_loss_on_real_fashion_mnist(fashion_batch):
    torch.manual_seed(0)
    images, labels = fashion_batch
    d = rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet20", 10), "reviewkd", warmup_epochs=0)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    totals = []
    for _ in range(8):
        _, losses = d(images, labels, epoch=1)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.85 * totals[0], totals


def test_any_module_can_be_tapped_by_naming_modules():
    # torchvision ResNets call one ReLU module twice per block: the pre-activation is its last call's input
    def spec(model, last):
        return FeatureSpec.from_names(
            post=[f"layer{i}" for i in range(1, 5)],
            pre=[Tap(f"layer{i}.{last}.relu", "input") for i in range(1, 5)], pooled="avgpool")

    student, teacher = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet34(num_classes=10)
    student.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, post = FeatureTaps(student, spec(student, 1), "post")(x)
        _, pre = FeatureTaps(student, spec(student, 1), "pre")(x)
    for a, b in zip(pre[:-1], post[:-1]):
        assert torch.equal(torch.relu(a), b) and (a < 0).any()
    d = rk.Distiller(student, teacher, "reviewkd", input_size=(3, 64, 64), student_spec=spec(student, 1),
                     teacher_spec=spec(teacher, 2))
    assert d.method.fusion.mid_channels == 512


def test_unnamed_model_and_bad_options_are_explained():
    with pytest.raises(ValueError, match="does not declare its stages"):
        rk.Distiller(torchvision.models.resnet18(num_classes=10), rk.create_model("resnet20", 10), "reviewkd",
                     input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="has no option"):
        rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet20", 10), "reviewkd", wieght=1.0)
    with pytest.raises(ValueError, match="unknown method 'reviewdk'.*reviewkd"):
        rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet20", 10), "reviewdk")
    with pytest.raises(ValueError, match="needs a teacher"):
        rk.Distiller(rk.create_model("resnet8", 10), None, "kd")
    with pytest.raises(ValueError, match="no module"):
        FeatureTaps(rk.create_model("resnet8", 10), FeatureSpec.from_names(["layer9"], "avgpool"))


def test_vanilla_needs_no_teacher(fashion_batch):
    images, labels = fashion_batch
    d = rk.Distiller(rk.create_model("resnet8", 10), None, "vanilla")
    logits, losses = d(images[:8], labels[:8])
    assert logits.shape == (8, 10) and set(losses) == {"ce"}
