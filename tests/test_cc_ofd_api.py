"""CC's two loss forms and OFD's teacher BatchNorm mode against hand computations, and the
Distiller's Python API: ``epoch=`` for warm-up methods, state dicts without the frozen teacher,
and removing the feature taps (``remove()`` / ``with``) before evaluating or exporting the student."""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import reviewkd as rk
from reviewkd import FeatureSpec, Stage, Tap
from reviewkd.config import load_config
from reviewkd.methods import IncompatiblePairError, Step, create_method
from reviewkd.tasks import get_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pooled_step(student_pooled, teacher_pooled):
    s = torch.tensor(student_pooled)
    t = torch.tensor(teacher_pooled)
    n = s.shape[0]
    return Step(student_logits=torch.zeros(n, 3), student_features=[s.view(n, -1, 1, 1)],
                teacher_features=[t.view(n, -1, 1, 1)])


def _cc(step, **options):
    method = create_method("cc", **options)
    method.setup(step)
    return method


# ------------------------------------------------------------------------------------------- CC
def test_cc_benchmark_form_by_hand_without_embedding():
    step = _pooled_step([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    # |s - t| = [[1, 1], [2, 1], [2, 1]]; consecutive pairs: 1*2 + 1*1 = 3 and 2*2 + 1*1 = 5; mean 4
    got = _cc(step, embed_dim=None)(step)["cc"]
    assert math.isclose(got.item(), 0.02 * 4.0, rel_tol=1e-6)
    # the benchmark's loss compares neighbours in the batch, so the order of the samples matters
    swapped = _pooled_step([[3.0, 0.0], [1.0, 2.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    # |s - t| = [[2, 1], [1, 1], [2, 1]]; pairs 2 + 1 = 3 and 2 + 1 = 3
    assert math.isclose(_cc(swapped, embed_dim=None)(swapped)["cc"].item(), 0.02 * 3.0, rel_tol=1e-6)


def test_cc_benchmark_form_by_hand_with_linear_embeddings():
    step = _pooled_step([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    method = _cc(step, embed_dim=2, weight=0.5)
    assert isinstance(method.embed_s, nn.Linear) and isinstance(method.embed_t, nn.Linear)
    with torch.no_grad():
        method.embed_s.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        method.embed_s.bias.copy_(torch.tensor([0.0, 1.0]))
        method.embed_t.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
        method.embed_t.bias.copy_(torch.tensor([1.0, 0.0]))
    # student embeddings (no normalisation): [1, 1], [2, 3], [0, 4]
    # teacher embeddings: [1, 3], [2, 1], [2, 1]
    # |e_s - e_t| = [0, 2], [0, 2], [2, 3]; pairs 0 + 4 = 4 and 0 + 6 = 6; mean 5
    got = method(step)["cc"]
    assert math.isclose(got.item(), 0.5 * 5.0, rel_tol=1e-6)
    got.backward()
    assert method.embed_s.weight.grad.abs().sum() > 0 and method.embed_t.weight.grad.abs().sum() > 0


def test_cc_benchmark_form_of_one_sample_is_zero():
    step = _pooled_step([[1.0, 2.0]], [[0.0, 5.0]])
    assert _cc(step, embed_dim=None)(step)["cc"].item() == 0.0


def test_cc_kernel_form_by_hand():
    # unit rows: the student's are orthogonal (x.y = 0), the teacher's equal (x.y = 1)
    step = _pooled_step([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]])
    got = _cc(step, form="kernel", embed_dim=None, gamma=0.5, order=1)(step)["cc"]
    # k = exp(-2 gamma) (1 + 2 gamma x.y) = e^-1 (1 + x.y): off-diagonal student e^-1, teacher 2 e^-1;
    # diagonals equal; mean of squared differences over the 2 x 2 entries = 2 e^-2 / 4
    assert math.isclose(got.item(), 100.0 * math.exp(-2) / 2, rel_tol=1e-5)


def test_cc_defaults_and_option_errors():
    cc = create_method("cc")
    assert (cc.form, cc.weight, cc.embed_dim, cc.kd_weight, cc.ce_weight) == ("benchmark", 0.02, 128, 0.0, 1.0)
    kernel = create_method("cc", form="kernel")
    assert (kernel.weight, kernel.gamma, kernel.order) == (100.0, 0.4, 2)
    with pytest.raises(ValueError, match="form must be one of benchmark, kernel"):
        create_method("cc", form="rbf")
    with pytest.raises(ValueError, match="options of form 'kernel'"):
        create_method("cc", gamma=0.3)
    step = _pooled_step([[1.0, 2.0]], [[0.0, 5.0, 1.0]])
    with pytest.raises(IncompatiblePairError, match="keep embed_dim"):
        _cc(step, embed_dim=None)


def test_cifar_cc_recipes_state_the_benchmark_options():
    cfg = load_config("configs/cifar100/resnet32x4_resnet8x4/cc.yaml")
    assert cfg.method.name == "cc"
    assert cfg.method.options == {"form": "benchmark", "weight": 0.02, "embed_dim": 128}


# ------------------------------------------------------------------------------------------ OFD
SPEC = FeatureSpec((Stage(post=Tap("2"), pre=Tap("1"), bn="1"),), pooled=Tap("3"))


def _net(channels):
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


def _ofd_pair(**options):
    torch.manual_seed(0)
    student, teacher = _net(3), _net(4)
    bn = teacher[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 5.0]))
        bn.running_mean.copy_(torch.tensor([3.0, -2.0, 1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 9.0, 1.0]))
    d = rk.Distiller(student, teacher, "ofd", student_spec=SPEC, teacher_spec=SPEC, input_size=(3, 6, 6), **options)
    return d, teacher


def _teacher_preactivation(d, teacher, x):
    """The teacher's tapped pre-activation during one step of ``d``, recorded by a hook of our own."""
    seen = []
    handle = teacher[1].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        d(x, torch.tensor([0, 1, 2, 3]))
    finally:
        handle.remove()
    return seen[0]


def _bn_by_hand(y, mean, var, bn):
    shape = (1, -1, 1, 1)
    return (y - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def test_ofd_teacher_uses_batch_statistics_by_default_and_keeps_its_running_statistics():
    d, teacher = _ofd_pair()
    assert d.method.reads.teacher_bn == "train"
    bn = teacher[1]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(4, 3, 6, 6)
    d.train()
    got = _teacher_preactivation(d, teacher, x)
    with torch.no_grad():
        y = teacher[0](x)
        mean = y.mean(dim=(0, 2, 3))
        var = ((y - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased, as BatchNorm normalises
        expected = _bn_by_hand(y, mean, var, bn)
        with_running = _bn_by_hand(y, bn.running_mean, bn.running_var, bn)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - with_running).abs().max() > 0.1  # the two modes really differ here
    # the teacher is back in eval mode, tracking, and its statistics did not move
    assert not teacher.training and not bn.training and bn.track_running_stats
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # an evaluating Distiller (and the option 'eval') use the running statistics
    d.eval()
    torch.testing.assert_close(_teacher_preactivation(d, teacher, x), with_running, atol=1e-5, rtol=1e-5)
    d_eval, teacher_eval = _ofd_pair(teacher_bn="eval")
    d_eval.train()
    torch.testing.assert_close(_teacher_preactivation(d_eval, teacher_eval, x), with_running, atol=1e-5, rtol=1e-5)
    assert any("batch statistics" in line for line in d.describe())
    assert not any("batch statistics" in line for line in d_eval.describe())


def test_ofd_margins_come_from_the_bn_affine_parameters_in_both_modes():
    def margin(s, m):  # E[x | x < 0] for x ~ N(m, s^2), or -3 s when P(x < 0) <= 0.001 (the authors' rule)
        cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
        pdf = math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
        return m - s * pdf / cdf if cdf > 1e-3 else -3 * s

    expected = torch.tensor([margin(1.0, 0.0), margin(2.0, 1.0), margin(0.5, -1.0), margin(1.0, 5.0)])
    assert math.isclose(expected[0].item(), -math.sqrt(2 / math.pi), rel_tol=1e-6) and expected[3].item() == -3.0
    for mode in ("train", "eval"):
        d, _ = _ofd_pair(teacher_bn=mode)
        torch.testing.assert_close(d.method.margin0.flatten(), expected, atol=1e-6, rtol=1e-6)


def test_ofd_refuses_an_unknown_teacher_bn_mode():
    with pytest.raises(ValueError, match="teacher_bn must be 'train'"):
        create_method("ofd", teacher_bn="batch")


# ------------------------------------------------------------------------- Distiller Python API
def _images(n=2):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))


def test_warmup_methods_need_the_epoch():
    x, y = _images()
    teacher = rk.create_model("resnet8", 10)
    for method in ("reviewkd", "dkd"):
        d = rk.Distiller(rk.create_model("resnet8", 10), teacher, method)
        with pytest.raises(TypeError, match=r"pass the epoch, counted from 0, as distiller\(images, targets, epoch=e\)"):
            d(x, y)
        _, losses = d(x, y, epoch=25)
        assert losses[method].item() > 0  # past the warm-up: full weight
    # no dependence on the epoch: no epoch needed
    assert rk.Distiller(rk.create_model("resnet8", 10), teacher, "reviewkd", warmup_epochs=0)(x, y)[1]["reviewkd"] > 0
    assert rk.Distiller(rk.create_model("resnet8", 10), teacher, "at")(x, y)[1]["at"] > 0
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['epcoh'\]"):
        rk.Distiller(rk.create_model("resnet8", 10), teacher, "at")(x, y, epcoh=3)


def test_state_dict_holds_student_and_method_not_teacher():
    torch.manual_seed(0)
    d = rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet14", 10), "reviewkd")
    state = d.state_dict()
    assert {k.split(".")[0] for k in state} == {"student", "method"}
    assert len(state) == len(d.student.state_dict()) + len(d.method.state_dict())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = rk.Distiller(rk.create_model("resnet8", 10), rk.create_model("resnet14", 10), "reviewkd")
    other_teacher = {k: v.clone() for k, v in other.teacher.state_dict().items()}
    assert not torch.equal(other.student.conv1.weight, d.student.conv1.weight)
    other.load_state_dict(torch.load(buffer, weights_only=True))  # strict
    for k, v in d.student.state_dict().items():
        assert torch.equal(other.student.state_dict()[k], v), k
    for k, v in d.method.state_dict().items():
        assert torch.equal(other.method.state_dict()[k], v), k
    assert all(torch.equal(v, other_teacher[k]) for k, v in other.teacher.state_dict().items())
    # also inside another module, and a state dict that does carry teacher entries loads them
    outer = nn.ModuleDict({"d": d})
    assert not [k for k in outer.state_dict() if k.startswith("d.teacher.")]
    nn.ModuleDict({"d": other}).load_state_dict(outer.state_dict())
    full = {**d.state_dict(), **{f"teacher.{k}": v for k, v in d.teacher.state_dict().items()}}
    other.load_state_dict(full)
    assert torch.equal(other.teacher.conv1.weight, d.teacher.conv1.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k.startswith("student.")})


def _hooked(model):
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_with_block_removes_the_taps_and_the_student_exports_unchanged(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    student, teacher = rk.create_model("resnet8", 10), rk.create_model("resnet14", 10)
    x, y = _images(4)
    with rk.Distiller(student, teacher, "reviewkd") as d:
        assert _hooked(student) and _hooked(teacher)
        d.train()
        _, losses = d(x, y, epoch=5)
        sum(losses.values()).backward()
    assert _hooked(student) == [] and _hooked(teacher) == []
    with pytest.raises(RuntimeError, match="taps were removed"):
        d(x, y, epoch=5)
    d.remove()  # again: nothing left to remove
    student.eval()
    with torch.no_grad():
        expected = student(x)
    traced = get_task("classification").to_torchscript(student, x)
    torch.testing.assert_close(traced(x), expected)
    path = tmp_path / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (x,), str(path), dynamo=False, input_names=["images"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-4)


def test_remove_lets_torchscript_compile_a_scriptable_student():
    student, teacher = _net(3), _net(4)
    d = rk.Distiller(student, teacher, "at", student_spec=SPEC, teacher_spec=SPEC, input_size=(3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((RuntimeError, torch.jit.frontend.FrontendError)):
            torch.jit.script(student)  # the taps are Python hooks TorchScript cannot compile
        d.remove()
        scripted = torch.jit.script(student.eval())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(scripted(x), student(x))
