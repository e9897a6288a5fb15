"""Introspective learning (self-explanation distillation) and the teacher-free baselines: label
smoothing, the confidence penalty and PS-KD. Expected values are computed by hand here, on models
whose gradients are known in closed form."""
from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reviewkd import Distiller
from reviewkd.batch import Batch
from reviewkd.cli import main
from reviewkd.engine.checkpoint import load_checkpoint
from reviewkd.features import FeatureSpec
from reviewkd.methods import RunContext, Step, create_method
from reviewkd.methods.introspective import class_explanation

RECIPES = "fashion_mnist/resnet20_resnet8"  # shipped recipes, trained by name
TINY = ["data.subset=256", "data.batch_size=64", "data.eval_batch_size=256", "runtime.device=cpu",
        "runtime.precision=fp32", "runtime.deterministic=true", "--no-progress"]
K = 5  # classes of the tiny models


def linear_model(seed: int = 0) -> nn.Module:
    """z = W flatten(x) + b: the input gradient of class c is W_c, whatever x."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, K))


class TinyCNN(nn.Module):
    """A -> global average pool -> linear: dz_c / dA_k = V_ck / (H W) (Grad-CAM = CAM)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, K)
        self.feature_spec = FeatureSpec.from_names(post=["conv"], pooled="pool")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


def hand_softmax(values: list[float]) -> list[float]:
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def hand_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().tolist(), b.flatten().double().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def step_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    x = x.detach().requires_grad_(True)
    return Step(student_logits=model(x), targets=y, inputs={"image": x})


def introspective(model: nn.Module, x: torch.Tensor, **options):
    method = create_method("introspective", **options)
    method.setup(Step(student_logits=model(x).detach()))
    return method


# ---------------------------------------------------------------------------- explanations
def test_input_gradient_and_gradient_times_input_of_a_linear_model():
    model, x = linear_model(), torch.randn(4, 2, 3, 3)
    classes = torch.tensor([0, 3, 3, 1])
    step = step_of(model, x, classes)
    w = model[1].weight.detach()
    grad = class_explanation(step.student_logits, step.inputs["image"], classes, "input_gradient")
    times_input = class_explanation(step.student_logits, step.inputs["image"], classes, "gradient_input")
    for i, c in enumerate(classes.tolist()):
        torch.testing.assert_close(grad[i], w[c])
        torch.testing.assert_close(times_input[i], w[c] * x[i].flatten())
    assert grad.dtype == torch.float32 and step.inputs["image"].grad is None


def test_input_gradient_of_a_convolution_by_hand():
    """z_c = sum_k V_ck mean_hw (w_k * x)[h, w]: dz_c / dx[p, q] sums the kernel taps that reach (p, q)."""
    model = TinyCNN()
    x = torch.randn(2, 1, 4, 4)
    classes = torch.tensor([2, 4])
    step = step_of(model, x, classes)
    got = class_explanation(step.student_logits, step.inputs["image"], classes, "input_gradient").view(2, 4, 4)
    w, v = model.conv.weight.detach(), model.fc.weight.detach()
    for i, c in enumerate(classes.tolist()):
        for p in range(4):
            for q in range(4):
                total = 0.0
                for k in range(2):
                    for h in range(4):
                        for col in range(4):
                            u, t = p - h + 1, q - col + 1  # kernel tap linking output (h, col) to input (p, q)
                            if 0 <= u < 3 and 0 <= t < 3:
                                total += v[c, k].item() / 16 * w[k, 0, u, t].item()
                assert got[i, p, q].item() == pytest.approx(total, abs=1e-6)


def test_gradcam_on_the_last_stage_is_cam_for_a_pooled_linear_head():
    model = TinyCNN()
    x = torch.randn(3, 1, 4, 4)
    classes = torch.tensor([0, 1, 4])
    a = model.conv(x)
    logits = model.fc(torch.flatten(model.pool(a), 1))
    got = class_explanation(logits, a, classes, "gradcam").view(3, 4, 4)
    v = model.fc.weight.detach()
    for i, c in enumerate(classes.tolist()):
        cam = sum(v[c, k] / 16 * a[i, k].detach() for k in range(2)).clamp_min(0)
        torch.testing.assert_close(got[i], cam)


# ---------------------------------------------------------------------------- soft target
def test_soft_target_from_explanation_similarities_by_hand():
    model, x = linear_model(), torch.randn(6, 2, 3, 3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    w = model[1].weight.detach()
    for tau in (0.25, 1.0):
        q = introspective(model, x, temperature=tau).target(step_of(model, x, y))
        for i, gt in enumerate(y.tolist()):
            s = [1.0 if c == gt else hand_cosine(w[gt], w[c]) for c in range(K)]
            assert q[i].tolist() == pytest.approx(hand_softmax([v / tau for v in s]), abs=1e-6)
            assert q[i].argmax().item() == gt  # the ground truth keeps the largest mass
    sharp = introspective(model, x, temperature=0.1).target(step_of(model, x, y))
    flat = introspective(model, x, temperature=2.0).target(step_of(model, x, y))
    gt_mass = lambda q: q.gather(1, y[:, None]).squeeze(1)  # noqa: E731
    assert (gt_mass(sharp) > gt_mass(flat)).all() and (gt_mass(flat) > 1 / K).all()


def test_pearson_similarity_centres_the_maps():
    model, x = linear_model(), torch.randn(2, 2, 3, 3)
    y = torch.tensor([1, 3])
    w = model[1].weight.detach()
    q = introspective(model, x, similarity="pearson", temperature=0.5).target(step_of(model, x, y))
    for i, gt in enumerate(y.tolist()):
        s = [1.0 if c == gt else hand_cosine(w[gt] - w[gt].mean(), w[c] - w[c].mean()) for c in range(K)]
        assert q[i].tolist() == pytest.approx(hand_softmax([v / 0.5 for v in s]), abs=1e-6)


def test_top_k_explains_the_ground_truth_and_the_k_highest_other_classes_only():
    model, x = linear_model(), torch.randn(3, 2, 3, 3)
    y = torch.tensor([0, 2, 4])
    w = model[1].weight.detach()
    step = step_of(model, x, y)
    passes = []
    step.inputs["image"].register_hook(lambda g: passes.append(1))
    q = introspective(model, x, top_k=2, temperature=0.5).target(step)
    assert len(passes) == 3  # the ground truth + 2 classes, not 5
    logits = step.student_logits.detach()
    for i, gt in enumerate(y.tolist()):
        ranked = sorted((c for c in range(K) if c != gt), key=lambda c: -logits[i, c].item())[:2]
        s = [1.0 if c == gt else hand_cosine(w[gt], w[c]) if c in ranked else -1.0 for c in range(K)]
        assert q[i].tolist() == pytest.approx(hand_softmax([v / 0.5 for v in s]), abs=1e-6)


def test_the_target_is_a_constant_and_the_gradients_are_ce_plus_kl_to_it():
    """Linear model: d/dz [CE + lam T^2 KL(q || softmax(z/T))] = (p - onehot + lam T (p_T - q)) / B with q
    held fixed; a target that carried a graph would add terms through W (the explanation)."""
    model, x = linear_model(), torch.randn(4, 2, 3, 3)
    y = torch.tensor([3, 0, 1, 1])
    lam, t, tau = 0.5, 2.0, 0.5
    d = Distiller(model, None, "introspective", input_size=(2, 3, 3), weight=lam, temperature=tau,
                  student_temperature=t)
    _, losses = d(x, y)
    assert all(p.grad is None for p in model.parameters())  # explanations leave no gradient behind
    sum(losses.values()).backward()
    w = model[1].weight.detach()
    z = model(x).detach().double()
    grad_z = torch.zeros(4, K, dtype=torch.float64)
    for i, gt in enumerate(y.tolist()):
        q = hand_softmax([(1.0 if c == gt else hand_cosine(w[gt], w[c])) / tau for c in range(K)])
        p = hand_softmax(z[i].tolist())
        p_t = hand_softmax((z[i] / t).tolist())
        for c in range(K):
            grad_z[i, c] = (p[c] - (c == gt) + lam * t * (p_t[c] - q[c])) / 4
    torch.testing.assert_close(model[1].weight.grad.double(), grad_z.T @ x.flatten(1).double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model[1].bias.grad.double(), grad_z.sum(0), rtol=1e-5, atol=1e-7)
    assert x.grad is None


def test_weight_zero_is_plain_cross_entropy_without_explanation_passes():
    model, x, y = linear_model(), torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 3])
    step = step_of(model, x, y)
    passes = []
    step.inputs["image"].register_hook(lambda g: passes.append(1))
    assert introspective(model, x, weight=0.0)(step)["introspective"].item() == 0.0 and not passes


def test_the_inputs_keep_no_gradient_after_the_training_backward():
    model, x = linear_model(), torch.randn(4, 2, 3, 3)
    d = Distiller(model, None, "introspective", input_size=(2, 3, 3))
    batch = Batch({"image": x}, torch.tensor([0, 1, 2, 3]), None)
    out = d.train_step(batch, d.stages()[0], 0.0)
    sum(out.losses["main"].values()).backward()
    assert batch.inputs["image"].requires_grad and batch.inputs["image"].grad is None
    assert model[1].weight.grad is not None


def test_gradcam_through_the_distiller_and_bf16_maps_are_float32():
    model, x, y = TinyCNN(), torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    d = Distiller(model, None, "introspective", input_size=(1, 4, 4), explanation="gradcam")
    assert not d.method.reads.input_grads and d.method.reads.student_features == "post"
    _, fp32 = d(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = d(x, y)
    assert bf16["introspective"].dtype == torch.float32
    assert bf16["introspective"].item() == pytest.approx(fp32["introspective"].item(), rel=0.05)


@pytest.mark.parametrize("options, message", [
    ({"explanation": "lrp"}, "explanation must be one of"),
    ({"similarity": "l1"}, "similarity must be one of"),
    ({"temperature": 0}, "must be > 0"),
    ({"top_k": 0}, "top_k must be a positive integer"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as err:
        create_method("introspective", **options)
    assert "\n" not in str(err.value)


def test_top_k_larger_than_the_other_classes_is_refused_at_set_up():
    with pytest.raises(ValueError, match="use at most 4"):
        Distiller(linear_model(), None, "introspective", input_size=(2, 3, 3), top_k=5)


# ---------------------------------------------------------------------------- baselines
def test_label_smoothing_is_cross_entropy_to_the_smoothed_labels():
    z, y, eps = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0], [0.1, 0.2, 3.0, -2.0, 0.0]]), torch.tensor([0, 3]), 0.2
    method = create_method("label_smoothing", epsilon=eps)
    total = method.ce_weight * F.cross_entropy(z, y) + method(Step(student_logits=z, targets=y))["smoothing"]
    expected = 0.0
    for i, gt in enumerate(y.tolist()):
        p = hand_softmax(z[i].tolist())
        expected -= sum(((1 - eps) * (c == gt) + eps / K) * math.log(p[c]) for c in range(K)) / 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert method.ce_weight == pytest.approx(0.8)


def test_confidence_penalty_subtracts_beta_times_the_entropy():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0], [0.1, 0.2, 3.0, -2.0, 0.0]])
    entropies = [-sum(p * math.log(p) for p in hand_softmax(row.tolist())) for row in z]
    plain = create_method("confidence_penalty", beta=0.3)(Step(student_logits=z))["confidence"]
    assert plain.item() == pytest.approx(-0.3 * sum(entropies) / 2, rel=1e-6)
    gamma = (entropies[0] + entropies[1]) / 2  # the hinge is active for the lower-entropy sample only
    hinged = create_method("confidence_penalty", beta=0.3, threshold=gamma)(Step(student_logits=z))["confidence"]
    assert hinged.item() == pytest.approx(0.3 * sum(max(0.0, gamma - h) for h in entropies) / 2, rel=1e-6)


def pskd(run_epochs: float | None = 4.0, **options):
    method = create_method("pskd", **options)
    method.setup(Step(student_logits=torch.zeros(2, K)), RunContext(num_samples=4, epochs=run_epochs))
    return method


def test_pskd_mixes_the_label_with_last_epochs_prediction_by_hand():
    method = pskd(final_alpha=0.8)
    assert [method.alpha(e) for e in (0, 1, 3, 7)] == pytest.approx([0.2, 0.4, 0.8, 0.8])  # 0.8 (t + 1) / 4
    y = torch.tensor([1, 2, 0, 4])
    z0 = torch.tensor([[0.5, 1.0, -1.0, 0.0, 0.2], [2.0, 0.0, 1.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    first = method(Step(student_logits=z0[:3], targets=y[:3], index=torch.tensor([0, 1, 2]), epoch=0.0))["pskd"]
    assert first.item() == pytest.approx(F.cross_entropy(z0[:3], y[:3]).item(), rel=1e-6)  # epoch 0: the labels
    z1 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0, 0.0],
                       [0.3, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
    second = method(Step(student_logits=z1, targets=y, index=torch.tensor([0, 1, 2, 3]), epoch=1.0))["pskd"]
    alpha, expected = 0.4, 0.0
    for i, gt in enumerate(y.tolist()):
        previous = hand_softmax(z0[i].tolist()) if i < 3 else [float(c == gt) for c in range(K)]  # 3: not seen yet
        p = hand_softmax(z1[i].tolist())
        expected -= sum(((1 - alpha) * (c == gt) + alpha * previous[c]) * math.log(p[c]) for c in range(K)) / 4
    assert second.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(method.predictions, F.softmax(z1, dim=1))  # the newest predictions are kept
    method.eval()
    method(Step(student_logits=z0, targets=y, index=torch.tensor([0, 1, 2, 3]), epoch=2.0))
    torch.testing.assert_close(method.predictions, F.softmax(z1, dim=1))  # evaluation stores nothing


def test_pskd_needs_its_ramp_length_and_the_dataset_size():
    with pytest.raises(ValueError, match="num_samples"):
        create_method("pskd").setup(Step(student_logits=torch.zeros(2, K)), RunContext())
    with pytest.raises(ValueError, match="method.options.epochs"):
        pskd(run_epochs=None).alpha(0)
    assert pskd(run_epochs=None, epochs=10).alpha(0) == pytest.approx(0.08)  # the option, when the run has none
    assert pskd(run_epochs=4, epochs=10).alpha(0) == pytest.approx(0.08)  # the option wins


# ---------------------------------------------------------------------------- command line
def train(argv: list) -> int:
    return main(["train", *[str(a) for a in argv]])


@pytest.mark.parametrize("method", ["introspective", "label_smoothing", "confidence_penalty", "pskd"])
def test_each_recipe_trains_from_the_command_line_without_a_teacher(method, tmp_path):
    extra = ["method.options.top_k=2"] if method == "introspective" else []
    assert train([f"{RECIPES}/{method}", f"output_dir={tmp_path}", "name=run", "solver.epochs=1", *TINY,
                  *extra]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["method_name"] == method and ckpt["teacher_metrics"] is None and ckpt["epoch"] == 1


def test_pskd_resumes_exactly(tmp_path):
    """--stop-after 1 then --resume ends with the same student and stored predictions as one run."""
    args = [f"{RECIPES}/pskd", f"output_dir={tmp_path}", "solver.epochs=2", *TINY]
    assert train([*args, "name=whole"]) == 0
    assert train([*args, "name=split", "--stop-after", "1"]) == 0
    assert train([*args, "name=split", "--resume"]) == 0
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["method"]["seen"].all() and a["method"]["predictions"].sum(1).allclose(torch.ones(256))
    for part in ("student", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
