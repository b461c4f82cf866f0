"""Balanced L1 loss: closed-form values, gradients, continuity at the break point, reductions."""
import math

import pytest
import torch
import torch.nn.functional as F

from detectors.losses import balanced_l1_loss

# Defaults alpha = 0.5, gamma = 1.5: b = e^3 - 1 = 19.085537, C = 1.5 / b - 0.5 = -0.421406.
B = math.exp(3.0) - 1.0
C = 1.5 / B - 0.5


def _loss_at(x, **kwargs):
    """Elementwise loss and its gradient at the differences x (float64, target 0)."""
    inp = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(inp, torch.zeros_like(inp), reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), inp)
    return loss.detach(), grad


def test_constants_of_the_paper():
    assert B == pytest.approx(19.0855, abs=1e-4)
    assert C == pytest.approx(-0.4214, abs=1e-4)


def test_closed_form_values_with_defaults():
    loss, _ = _loss_at([0.0, 0.1, 0.5, 1.0, 2.0])
    expected = [
        # x = 0: alpha / b * 1 * ln(1) - 0 = 0
        0.0,
        # x = 0.1: b x + 1 = 2.908554, ln = 1.067656; 0.5 / b * 2.908554 * 1.067656 - 0.05
        0.0313530857,
        # x = 0.5: b x + 1 = 10.542768, ln = 2.355440; 0.5 / b * 10.542768 * 2.355440 - 0.25
        0.4005675069,
        # x = 1 (outlier branch): 1.5 * 1 + C = 1.5 - 0.421406
        1.0785935447,
        # x = 2: 1.5 * 2 + C = 3 - 0.421406
        2.5785935447,
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


def test_value_is_continuous_at_one_by_construction():
    # Inlier branch at |x| -> 1: alpha / b * (b + 1) * ln(b + 1) - alpha = 0.5 / b * e^3 * 3 - 0.5,
    # which equals gamma + C = 1.5 + 1.5 / b - 0.5 since e^3 = b + 1.
    inner_limit = 0.5 / B * (B + 1.0) * 3.0 - 0.5
    assert inner_limit == pytest.approx(1.5 + C, abs=1e-12)
    loss, _ = _loss_at([1.0 - 1e-9, 1.0])
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-8)


@pytest.mark.parametrize("alpha, gamma", [(0.5, 1.5), (0.2, 1.0)])
def test_gradient_matches_the_paper(alpha, gamma):
    b = math.exp(gamma / alpha) - 1.0
    x = torch.tensor([-3.0, -1.0, -0.7, -0.1, 0.05, 0.1, 0.3, 0.9, 1.0, 1.5, 10.0], dtype=torch.float64)
    _, grad = _loss_at(x.tolist(), alpha=alpha, gamma=gamma)
    inside = alpha * torch.log(b * x.abs() + 1.0) * x.sign()
    expected = torch.where(x.abs() < 1.0, inside, gamma * x.sign())
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_inliers_get_a_larger_gradient_than_smooth_l1():
    # 0.5 * ln(19.0855 * 0.1 + 1) = 0.5 * 1.067656 = 0.533828; smooth L1 (beta 1) gives x = 0.1.
    _, grad = _loss_at([0.1])
    assert grad.item() == pytest.approx(0.5338279723, abs=1e-9)
    inp = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    F.smooth_l1_loss(inp, torch.zeros_like(inp), beta=1.0, reduction="sum").backward()
    assert inp.grad.item() == pytest.approx(0.1)


def test_gradient_at_zero_is_zero():
    _, grad = _loss_at([0.0])
    assert grad.item() == 0.0


@pytest.mark.parametrize("beta", [1.0, 0.11, 2.0])
def test_value_and_gradient_continuous_at_beta(beta):
    eps = 1e-9
    loss, grad = _loss_at([beta - eps, beta, beta + eps, -beta + eps, -beta], beta=beta)
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-7)
    assert loss[2].item() == pytest.approx(loss[1].item(), abs=1e-7)
    assert loss[3].item() == pytest.approx(loss[4].item(), abs=1e-7)
    # The gradient reaches gamma from below on the inlier side and stays gamma beyond.
    assert grad[0].item() == pytest.approx(1.5, abs=1e-6)
    assert grad[1].item() == pytest.approx(1.5, abs=1e-12)
    assert grad[2].item() == pytest.approx(1.5, abs=1e-12)
    assert grad[3].item() == pytest.approx(-1.5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.11, 2.0])
def test_beta_rescales_the_unit_loss(beta):
    # L_beta(x) = beta * L_1(x / beta): at x = 0.5 beta the inlier value is beta * 0.400568, and
    # the gradient is alpha * ln(b * 0.5 + 1) = 0.5 * ln(10.542768) = 1.177720 for any beta.
    # At x = 2 beta: beta * (1.5 * 2 + C).
    loss, grad = _loss_at([0.5 * beta, 2.0 * beta], beta=beta)
    assert loss[0].item() == pytest.approx(beta * 0.4005675069, abs=1e-9)
    assert grad[0].item() == pytest.approx(1.1777200855, abs=1e-9)
    assert loss[1].item() == pytest.approx(beta * (3.0 + C), abs=1e-9)
    assert grad[1].item() == pytest.approx(1.5, abs=1e-12)


def test_smaller_beta_approaches_gamma_times_l1():
    x = torch.tensor([0.3, 0.8, 2.0], dtype=torch.float64)
    loss = balanced_l1_loss(x, torch.zeros_like(x), beta=1e-4, reduction="none")
    torch.testing.assert_close(loss, 1.5 * x, rtol=0, atol=1e-4)


def test_symmetric_and_depends_on_difference_only():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 2
    gt = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 2
    forward = balanced_l1_loss(pred, gt, reduction="none")
    torch.testing.assert_close(forward, balanced_l1_loss(gt, pred, reduction="none"))
    torch.testing.assert_close(forward, balanced_l1_loss(pred - gt, torch.zeros_like(gt), reduction="none"))
    assert forward.shape == (6, 4)
    assert (forward >= 0).all()


def test_reductions():
    pred = torch.tensor([[0.0, 0.1, 0.5, 2.0]], dtype=torch.float64)
    elementwise = balanced_l1_loss(pred, torch.zeros_like(pred), reduction="none")
    total = 0.0 + 0.0313530857 + 0.4005675069 + 2.5785935447
    assert balanced_l1_loss(pred, torch.zeros_like(pred), reduction="sum").item() == pytest.approx(total)
    assert balanced_l1_loss(pred, torch.zeros_like(pred)).item() == pytest.approx(total / 4)
    assert elementwise.sum().item() == pytest.approx(total)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_input_gives_zero_and_backward_works(reduction):
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = balanced_l1_loss(pred, torch.zeros(0, 4), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0, 4)
        loss.sum().backward()
    else:
        assert loss.shape == ()
        assert loss.item() == 0.0  # not NaN, unlike F.smooth_l1_loss(..., reduction="mean")
        loss.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 4)


def test_huge_outliers_give_finite_gradients():
    pred = torch.tensor([1e30, float("inf"), -1e30], requires_grad=True)
    balanced_l1_loss(pred, torch.zeros(3), reduction="sum").backward()
    assert torch.isfinite(pred.grad).all()
    torch.testing.assert_close(pred.grad, torch.tensor([1.5, 1.5, -1.5]))


def test_float32_matches_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 4, generator=gen, dtype=torch.float64) * 1.5
    torch.testing.assert_close(
        balanced_l1_loss(x.float(), torch.zeros(100, 4), reduction="none"),
        balanced_l1_loss(x, torch.zeros_like(x), reduction="none").float(),
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0.0}, {"gamma": -1.0}, {"beta": 0.0}, {"beta": float("nan")}, {"reduction": "avg"}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(4))


# ------------------------------------------------------------------ the reference formulation
# The authors' release and mmdetection put beta inside the log only (module docstring):
#   |x| < beta: alpha / b * (b|x| + 1) * ln(b|x| / beta + 1) - alpha|x|
#   else:       gamma|x| + gamma / b - alpha * beta
# with b = e^(gamma / alpha) - 1 = e^3 - 1 for the defaults. Libra RetinaNet uses beta = 0.11.
def _reference_closed_form(x, alpha=0.5, gamma=1.5, beta=1.0):
    b = math.exp(gamma / alpha) - 1.0
    if x < beta:
        value = alpha / b * (b * x + 1) * math.log(b * x / beta + 1) - alpha * x
        grad = alpha * math.log(b * x / beta + 1) + alpha * (b * x + 1) / (b * x + beta) - alpha
    else:
        value = gamma * x + gamma / b - alpha * beta
        grad = gamma
    return value, grad


@pytest.mark.parametrize("x", [0.005, 0.02, 0.05, 0.10999, 0.11001, 0.5, 2.0])
def test_reference_formulation_closed_form_at_beta_0_11(x):
    loss, grad = _loss_at([x], beta=0.11, formulation="reference")
    value, slope = _reference_closed_form(x, beta=0.11)
    assert loss.item() == pytest.approx(value, rel=1e-12, abs=1e-14)
    assert grad.item() == pytest.approx(slope, rel=1e-12)


def test_reference_formulation_gradients_both_sides_of_beta():
    # The audit's figures (fidelity-audit.md exp. 1): 1.6537 at |x| = 0.02, about 1.70 just below
    # beta = 0.11 and exactly gamma = 1.5 above it: the reference's gradient jumps at beta.
    _, grad = _loss_at([1e-9, 0.02, 0.11 - 1e-9, 0.11 + 1e-9], beta=0.11, formulation="reference")
    # x -> 0: alpha * (b * 0 + 1) / (0 + beta) - alpha = 0.5 / 0.11 - 0.5 = 4.04545...
    assert grad[0].item() == pytest.approx(0.5 / 0.11 - 0.5, rel=1e-6)
    assert grad[1].item() == pytest.approx(1.6537, abs=1e-4)
    # just below beta: alpha * ln(b + 1) + alpha * (b*beta + 1) / (b*beta + beta) - alpha
    below = 1.5 + 0.5 * (B * 0.11 + 1) / (B * 0.11 + 0.11) - 0.5
    assert grad[2].item() == pytest.approx(below, rel=1e-6)
    assert below == pytest.approx(1.7014, abs=1e-4)
    assert grad[3].item() == 1.5
    # ... while its value is continuous there: gamma*beta + gamma/b - alpha*beta on both sides.
    loss, _ = _loss_at([0.11 - 1e-12, 0.11 + 1e-12], beta=0.11, formulation="reference")
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-10)


def test_scaled_formulation_differs_from_reference_below_beta():
    # Ours at |x| = 0.02, beta = 0.11: alpha * ln(b * 0.02 / 0.11 + 1) = 0.5 * ln(4.4701) = 0.7487.
    _, grad = _loss_at([0.02], beta=0.11)
    assert grad.item() == pytest.approx(0.5 * math.log(B * 0.02 / 0.11 + 1), rel=1e-12)
    assert grad.item() == pytest.approx(0.7487, abs=1e-4)


def test_formulations_agree_at_beta_1():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    scaled, grad_scaled = _loss_at(x.tolist())
    reference, grad_reference = _loss_at(x.tolist(), formulation="reference")
    torch.testing.assert_close(scaled, reference, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_scaled, grad_reference, rtol=0, atol=1e-14)


def test_reference_formulation_survives_infinite_outliers():
    pred = torch.tensor([float("inf"), 0.01], dtype=torch.float64, requires_grad=True)
    balanced_l1_loss(pred, torch.zeros(2, dtype=torch.float64), beta=0.11, reduction="none",
                     formulation="reference")[1].backward()
    assert torch.isfinite(pred.grad).all()


def test_unknown_formulation_is_rejected():
    with pytest.raises(ValueError, match="formulation"):
        balanced_l1_loss(torch.zeros(2), torch.zeros(2), formulation="mmdet")


@pytest.mark.parametrize("alpha, gamma, expected", [
    # alpha 0.2, gamma 1: b = e^5 - 1 = 147.413159, C = 1 / b - 0.2 = -0.193216.
    #   x = 0.1: b x + 1 = 15.741316, ln = 2.756289; 0.2 / b * 15.741316 * 2.756289 - 0.02
    #   x = 0.5: b x + 1 = 74.706580, ln = 4.313568; 0.2 / b * 74.706580 * 4.313568 - 0.1
    #   x = 2 (outlier): 1 * 2 + C
    (0.2, 1.0, [0.0388653193, 0.3372091684, 1.8067836549]),
    # alpha 1, gamma 1.5: b = e^1.5 - 1 = 3.481689, C = 1.5 / b - 1 = -0.569175.
    #   x = 0.1: b x + 1 = 1.348169, ln = 0.298747; 1 / b * 1.348169 * 0.298747 - 0.1
    #   x = 0.5: b x + 1 = 2.740845, ln = 1.008266; 1 / b * 2.740845 * 1.008266 - 0.5
    #   x = 2 (outlier): 1.5 * 2 + C
    (1.0, 1.5, [0.0156800110, 0.2937241285, 2.4308253752]),
])
def test_closed_form_values_with_other_alpha_and_gamma(alpha, gamma, expected):
    # alpha enters the value on both branches (the inlier curve, and C = gamma / b - alpha on the
    # outlier line); the gradient test alone would not see a wrong constant C.
    loss, _ = _loss_at([0.1, 0.5, 2.0], alpha=alpha, gamma=gamma)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    default, _ = _loss_at([0.1, 0.5, 2.0])
    assert (loss - default).abs().min() > 1e-3  # every point tells these settings from the defaults


# ------------------------------------------------------------------ found by mutation testing
@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ({"gamma": -1.0}, "gamma must be > 0, got -1.0"),
    ({"beta": float("nan")}, "beta must be > 0, got nan"),
    ({"reduction": "avg"}, r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"),
])
def test_bad_arguments_name_the_argument_and_its_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), **kwargs)


@pytest.mark.parametrize("formulation", ["scaled", "reference"])
@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_the_loss_depends_only_on_the_difference(formulation, beta):
    # Every other test uses target 0, where |input - target| and |input + target| coincide.
    diff = torch.tensor([-2.0, -0.3, -0.05, 0.0, 0.04, 0.2, 0.9, 1.5], dtype=torch.float64)
    target = torch.tensor([0.7, -1.2, 3.0, 0.5, -0.25, 2.0, -0.6, 0.1], dtype=torch.float64)
    shifted = balanced_l1_loss(target + diff, target, beta=beta, reduction="none", formulation=formulation)
    at_zero = balanced_l1_loss(diff, torch.zeros_like(diff), beta=beta, reduction="none",
                               formulation=formulation)
    torch.testing.assert_close(shifted, at_zero, rtol=1e-12, atol=1e-12)
    assert (at_zero[diff != 0] > 0).all()  # not trivially equal
