"""The review mechanism against the released implementation's worked cases and hand computations."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reviewkd.review import ABF, HCL_LEVELS, ReviewFusion, hcl_loss, pooled_pyramid

# Two worked cases computed by the released implementation (copied from the reference data).
GOLDEN = Path(__file__).parent / "data" / "review_golden.pt"


def _golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("case", ["same_sizes", "student_smaller_than_teacher"])
def test_matches_released_implementation(case):
    g = _golden()[case]
    cfg = g["config"]
    teacher_sizes = [(s, s) for s in cfg["teacher_sizes_shallow_to_deep"]]
    fusion = ReviewFusion(cfg["in_channels"], cfg["out_channels"], teacher_sizes)
    assert fusion.mid_channels == cfg["mid_channel"]
    fusion.load_state_dict(g["review_state_dict"], strict=True)
    fusion.train()  # the cases were computed with BatchNorm in training mode

    student = [f.clone().requires_grad_(True) for f in g["student_features"]]
    outputs = fusion(student)
    for out, expected in zip(outputs, g["expected_outputs"], strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    loss = hcl_loss(outputs, g["teacher_features"])
    torch.testing.assert_close(loss, g["expected_hcl"], rtol=1e-5, atol=1e-6)
    loss.backward()
    for feat, expected in zip(student, g["expected_student_feature_grads"], strict=True):
        # float32 sums in another order (other CPUs' kernels) move the smallest entries by ~3e-7
        scale = expected.abs().max().item()
        torch.testing.assert_close(feat.grad, expected, rtol=1e-4, atol=1e-5 * scale)


def _mse(a, b):
    return ((a - b) ** 2).mean()


def _pool(x, level):
    # adaptive average pooling for sizes divisible by ``level``: mean over equal blocks
    n, c, h, w = x.shape
    return x.reshape(n, c, level, h // level, level, w // level).mean(dim=(3, 5))


def test_hcl_hand_computation_with_skipped_levels():
    torch.manual_seed(0)
    s8, t8 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    s2, t2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    s1, t1 = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    # h=8: levels 4, 2, 1 used, weights 1, 1/2, 1/4, 1/8 -> sum 1.875
    e8 = (_mse(s8, t8) + _mse(_pool(s8, 4), _pool(t8, 4)) / 2 + _mse(_pool(s8, 2), _pool(t8, 2)) / 4
          + _mse(_pool(s8, 1), _pool(t8, 1)) / 8) / 1.875
    # h=2: 4 and 2 skipped (L >= h), only L=1 used and it gets the first halved weight 1/2 -> sum 1.5
    e2 = (_mse(s2, t2) + _mse(_pool(s2, 1), _pool(t2, 1)) / 2) / 1.5
    # h=1: every level skipped, plain MSE
    e1 = _mse(s1, t1)
    got = hcl_loss([s8, s2, s1], [t8, t2, t1])
    torch.testing.assert_close(got, e8 + e2 + e1)


def test_hcl_tiny_numbers():
    # one 2x2 map, one channel: MSE = mean of squared differences; pooled = difference of means
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.zeros_like(s)
    full = (1 + 4 + 9 + 16) / 4  # 7.5
    pooled = 2.5 ** 2  # 6.25
    assert math.isclose(hcl_loss([s], [t]).item(), (full + pooled / 2) / 1.5, rel_tol=1e-6)


def test_hcl_non_square_levels():
    s, t = torch.randn(2, 4, 6, 10), torch.randn(2, 4, 6, 10)
    expected = _mse(s, t)
    w, total = 1.0, 1.0
    for level in (4, 2, 1):
        w /= 2
        expected = expected + w * _mse(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += w
    torch.testing.assert_close(hcl_loss([s], [t]), expected / total)


def test_abf_resizes_to_teacher_size_and_fuses():
    abf = ABF(8, 16, 32, fuse=True)
    x, residual = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)
    out, res = abf(x, residual, (8, 8))
    assert out.shape == (2, 32, 8, 8) and res.shape == (2, 16, 8, 8)
    deepest = ABF(8, 16, 32, fuse=False)
    assert deepest.att_conv is None
    assert deepest(torch.randn(2, 8, 1, 1), None, (1, 1))[0].shape == (2, 32, 1, 1)


@pytest.mark.parametrize("size", [(8, 8), (12, 12), (6, 6), (7, 7), (6, 10), (12, 8), (3, 3)])
def test_pooled_pyramid_equals_direct_adaptive_pooling_with_gradients(size):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size, requires_grad=True)
    levels = [level for level in HCL_LEVELS if level < size[0]]
    got = pooled_pyramid(x, levels)
    direct = [F.adaptive_avg_pool2d(x, level) for level in levels]
    assert len(got) == len(direct)
    for g, d in zip(got, direct):
        torch.testing.assert_close(g, d, rtol=1e-6, atol=1e-7)
    weights = [torch.randn_like(d) for d in direct]
    grad_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), x)[0]
    grad_direct = torch.autograd.grad(sum((d * w).sum() for d, w in zip(direct, weights)), x)[0]
    torch.testing.assert_close(grad_got, grad_direct, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("residual_size", [(4, 4), (8, 8)])
def test_abf_fusion_equals_the_concatenated_attention_of_the_released_block(residual_size):
    torch.manual_seed(2)
    abf = ABF(8, 16, 32, fuse=True)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    residual = torch.randn(2, 16, *residual_size, requires_grad=True)
    up = F.interpolate(residual, size=(8, 8), mode="nearest")
    z = torch.sigmoid(F.conv2d(torch.cat([x, up], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    expected = x * z[:, 0:1] + up * z[:, 1:2]
    got = abf._fuse(x, residual)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    w = torch.randn_like(expected)
    params = (x, residual, abf.att_conv[0].weight, abf.att_conv[0].bias)
    for a, b in zip(torch.autograd.grad((got * w).sum(), params), torch.autograd.grad((expected * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
