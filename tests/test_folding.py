"""BatchNorm folding of the frozen teacher: which pairs fold, exactness, and the Distiller's use of it."""
import pytest
import torch
from torch import nn

import reviewkd as rk
from reviewkd.models.folding import fold_batchnorms, foldable_pairs


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class _ReadsConvOutputTwice(nn.Module):
    """conv_a's output feeds bn_a AND the residual sum, so bn_a must not fold into conv_a."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a = self.conv_a(x)
        y = torch.relu(self.bn_a(a)) + a
        y = torch.relu(self.bn_b(self.conv_b(y)))
        return self.head(y.mean(dim=(2, 3)))


def test_folded_resnet_matches_the_original_and_has_no_batchnorm_left():
    model = _randomise_batchnorms(rk.create_model("resnet20", num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    folded, count = fold_batchnorms(model, x[:2])
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_convolution_read_elsewhere_keeps_its_batchnorm():
    model = _randomise_batchnorms(_ReadsConvOutputTwice())
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x) == [("conv_b", "bn_b")]
    folded, count = fold_batchnorms(model, x)
    assert count == 1 and isinstance(folded.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_b, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_protected_modules_and_training_mode():
    model = _randomise_batchnorms(_ReadsConvOutputTwice())
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x, protected=["conv_b"]) == []
    assert fold_batchnorms(model, x, protected=["bn_b"]) == (model, 0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(model.train(), x)


def test_a_fold_that_would_change_the_outputs_is_refused():
    model = _randomise_batchnorms(_ReadsConvOutputTwice())
    x = torch.randn(2, 3, 8, 8)
    # a check that sees every output differ (as a wrongly folded network would) keeps the original
    calls = []

    def outputs(net, inputs):
        calls.append(net)
        return [net(inputs) + (len(calls) - 1)]

    assert fold_batchnorms(model, x, outputs=outputs) == (model, 0)


@pytest.mark.parametrize("method", ["reviewkd", "fitnet", "kd"])
def test_distiller_with_a_folded_teacher_gives_the_same_losses(method):
    torch.manual_seed(0)
    teacher = _randomise_batchnorms(rk.create_model("resnet20", num_classes=10))
    student = rk.create_model("resnet8", num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = {}
    for fold in (False, True):
        torch.manual_seed(1)
        d = rk.Distiller(student, teacher, method, fold_teacher_bn=fold)
        assert d.folded_teacher_batchnorms == (21 if fold else 0)
        assert (d.teacher is teacher) != fold
        _, losses[fold] = d(x, y, epoch=5.0)
        d.remove()
    for name, value in losses[False].items():
        torch.testing.assert_close(losses[True][name], value, rtol=1e-4, atol=1e-6)
    # the network passed in keeps its BatchNorms and no hook
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == 21
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_a_teacher_on_batch_statistics_is_not_folded():
    teacher = _randomise_batchnorms(rk.create_model("resnet20", num_classes=10))
    d = rk.Distiller(rk.create_model("resnet8", num_classes=10), teacher, "ofd", fold_teacher_bn=True)
    assert d.folded_teacher_batchnorms == 0 and d.teacher is teacher


def test_a_batchnorm_subclass_that_does_more_is_left_alone():
    class BatchNormAct(nn.BatchNorm2d):  # as timm's: normalise, then an activation
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = _randomise_batchnorms(model)
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x) == [("2", "3")]
    folded, count = fold_batchnorms(model, x)
    assert count == 1 and isinstance(folded[1], BatchNormAct)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
