"""The balanced L1 loss of Libra R-CNN, the box-regression loss of the objective-level balance.

Paper (Pang et al., CVPR 2019, eq. 7-9), for a regression difference x in encoded-target units,
with b chosen so that the gradient is continuous at |x| = 1, i.e. alpha * ln(b + 1) = gamma:

    b = e^(gamma / alpha) - 1,    C = gamma / b - alpha
    L(x) = alpha / b * (b|x| + 1) * ln(b|x| + 1) - alpha|x|    if |x| < 1
         = gamma|x| + C                                       otherwise
    dL/dx = alpha * ln(b|x| + 1) * sign(x)                     if |x| < 1
          = gamma * sign(x)                                   otherwise

The paper sets the break point at |x| = 1. Two generalisations to a break point beta exist
(`formulation`): "scaled", ours, beta * L(x / beta); and "reference", the authors' code and
mmdetection, which keep b and put beta inside the log only:

    L(x) = alpha / b * (b|x| + 1) * ln(b|x| / beta + 1) - alpha|x|   if |x| < beta
         = gamma|x| + gamma / b - alpha * beta                      otherwise
    dL/dx = alpha * ln(b|x| / beta + 1) + alpha * (b|x| + 1) / (b|x| + beta) - alpha   (|x| < beta)

whose gradient is alpha * (1 / beta - 1) at x -> 0 and jumps at |x| = beta unless beta = 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["balanced_l1_loss"]

_REDUCTIONS = ("none", "mean", "sum")
FORMULATIONS = ("scaled", "reference")


def balanced_l1_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: str = "mean",
    formulation: str = "scaled",
) -> Tensor:
    """Balanced L1 loss between `input` and `target`, called like `F.smooth_l1_loss`.

    Args:
        input: [*] predicted box deltas, e.g. [num_pos, 4], in encoded-target units (torchvision's
            BoxCoder with weights (10, 10, 5, 5), the scale on which the paper's beta = 1 is set).
        target: [*] encoded regression targets, the same shape as `input` (no broadcasting: a
            shape mismatch is almost always a bug in the caller, so it raises ValueError).
        alpha: > 0, the inlier gradient scale: dL/dx = alpha * ln(b|x|/beta + 1) for |x| < beta.
            Smaller alpha raises the inliers' share of the gradient (paper Table 6: 0.5 best).
        gamma: > 0, the outliers' gradient, constant: dL/dx = gamma for |x| >= beta.
        beta: > 0, the break point between the two branches, in encoded-target units.
            The loss is L_beta(x) = beta * L(x / beta), the same way torch's smooth L1 with beta
            is beta * smooth_l1(x / beta): value and gradient are continuous at |x| = beta for
            every beta, the gradient goes from 0 at x = 0 up to gamma at |x| = beta and stays
            there. Smaller beta -> closer to gamma * |x| (an L1 loss); beta = 1 is the paper.
            This is not mmdetection's generalisation, whose gradient jumps at |x| = beta unless
            beta = 1 (about 1.70 -> 1.5 at beta = 0.11).
        reduction: "none" ([*], elementwise), "mean" (scalar, over all elements) or "sum".
        formulation: how beta enters. "scaled" (default): as described under `beta`.
            "reference": the authors' release and mmdetection (see the module docstring), for
            reproducing their runs at beta != 1 (Libra RetinaNet's beta = 0.11). Both are the
            paper's loss at beta = 1.

    Returns:
        The loss, [*] for "none", a scalar otherwise, in input's dtype.

    An empty input (e.g. no positive RoIs in the batch) gives 0 for "mean" as for "sum", not
    NaN as torch's own losses do: one image without boxes must not poison the whole step, and the
    0 still comes out of the graph (`sum` of the empty loss) so `backward()` works.
    """
    for name, value in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        if not value > 0:
            raise ValueError(f"balanced_l1_loss: {name} must be > 0, got {value}")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"balanced_l1_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    if formulation not in FORMULATIONS:
        raise ValueError(
            f"balanced_l1_loss: formulation must be one of {FORMULATIONS}, got {formulation!r}"
        )
    if input.shape != target.shape:
        raise ValueError(
            f"balanced_l1_loss: input and target must have the same shape, "
            f"got {tuple(input.shape)} and {tuple(target.shape)}"
        )

    b = math.exp(gamma / alpha) - 1.0
    if formulation == "reference":
        loss = _reference_balanced_l1(input, target, alpha, gamma, beta, b)
    else:
        loss = _scaled_balanced_l1(input, target, alpha, gamma, beta, b)

    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()


def _scaled_balanced_l1(input: Tensor, target: Tensor, alpha: float, gamma: float, beta: float, b: float) -> Tensor:
    """[*] elementwise beta * L(|input - target| / beta), the paper's L rescaled."""
    c = gamma / b - alpha
    x = (input - target).abs() / beta  # |x| in units of the break point
    # Clamp the inlier branch's argument so that huge (or infinite) outliers cannot turn its
    # discarded gradient into inf * 0 = NaN inside torch.where's backward.
    x_in = x.clamp(max=1.0)
    bx = b * x_in
    inlier = alpha / b * (bx + 1.0) * torch.log1p(bx) - alpha * x_in
    outlier = gamma * x + c
    return beta * torch.where(x < 1.0, inlier, outlier)


def _reference_balanced_l1(input: Tensor, target: Tensor, alpha: float, gamma: float, beta: float, b: float) -> Tensor:
    """[*] elementwise loss of the reference formulation (beta inside the log only)."""
    x = (input - target).abs()
    x_in = x.clamp(max=beta)  # same NaN guard as the scaled branch
    bx = b * x_in
    inlier = alpha / b * (bx + 1.0) * torch.log1p(bx / beta) - alpha * x_in
    outlier = gamma * x + (gamma / b - alpha * beta)
    return torch.where(x < beta, inlier, outlier)
