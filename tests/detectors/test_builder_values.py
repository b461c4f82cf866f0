"""Every value a study can vary reaches the built detector, and changes what it does.

A sweep (Table 4's K, Table 5's refine, Table 6's alpha/gamma, a search over them) is worthless if
the builder drops the value: every trial would train the same model. So for each key: build with
a non-default value, check the module holds it, and check the behaviour the value should change,
against a closed form or an exact count, on inputs where the default gives a different answer.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors import build_detector
from detectors.bfp import NonLocalBlock2d
from detectors.config import ScheduleConfig, TrainConfig
from detectors.engine import lr_factor
from detectors.roi_heads import random_draw
from detectors.sampling import instance_balanced_pos_sample, iou_balanced_neg_sample

TINY = {
    "backbone": "tiny", "num_classes": 3, "min_size": 64, "max_size": 64, "fpn_channels": 16,
    "representation_size": 32, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 30,
    "rpn_pre_nms_top_n_test": 30, "rpn_post_nms_top_n_test": 20,
    # 60 RoIs per image, no positives below: 60 negatives, divisible by K = 3 and K = 5 so every
    # bin's quota is exact and no random fill is needed (the counts below are deterministic).
    "roi_batch_size_per_image": 60,
}


def build(**detector):
    """Build the detector from a study-style nested mapping (the path a trial's values take)."""
    mapping = dict(TINY)
    for key, value in detector.items():
        mapping[key] = dict(mapping.get(key, {}), **value) if isinstance(value, dict) else value
    torch.manual_seed(0)
    return build_detector(TrainConfig.from_dict({"detector": mapping}).detector)


# ------------------------------------------------------------------------------- the sampler
# Negatives' max IoUs on a 0.03 grid: 15 cells centred at 0.015 + 0.03 j, plus the maximum 0.45.
# The grid is fine enough that every bin edge used below (K = 3: 0.15, 0.30; K = 5: 0.09 ...
# 0.36; floor 0.09 with K = 3 above it: 0.21, 0.33) falls between cells. The first three cells
# (IoU < 0.09) hold 80 easy negatives each, the other twelve 8 each: random sampling would draw
# about 71% of its negatives below 0.09; the balanced sampler gives each bin its exact quota.
CELL = 0.03
CELL_COUNTS = [80, 80, 80] + [8] * 12


def negatives_on_grid():
    ious = [CELL / 2 + CELL * j for j, n in enumerate(CELL_COUNTS) for _ in range(n)] + [0.45]
    return torch.tensor(ious)


def sample_negatives(model, max_ious):
    """The RoIs the built second stage keeps from an image whose proposals are all negatives."""
    labels = torch.zeros(max_ious.numel(), dtype=torch.int64)
    torch.manual_seed(0)
    keep = model.roi_heads.sample_proposals(labels, torch.zeros_like(labels), max_ious)
    return max_ious[keep]


def negative_draw_settings(model):
    """The IoU-balanced settings the built sampler's negative draw holds; None for random draws."""
    draw = model.roi_heads.sampler.neg_draw
    return draw.keywords if getattr(draw, "func", None) is iou_balanced_neg_sample else None


def histogram(values, edges):
    """Counts per [edges[i], edges[i + 1]), the last bin closed."""
    counts = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        counts.append(int(((values >= low) & ((values <= high) if last else (values < high))).sum()))
    return counts


@pytest.mark.parametrize("num_bins,expected", [
    (3, [20, 20, 20]),  # 60 // 3 per bin of width 0.15
    (5, [12] * 5),      # 60 // 5 per bin of width 0.09
    (2, [30, 30]),      # 60 // 2 per bin of width 0.225
])
def test_num_bins_reaches_the_sampler_and_sets_the_bin_counts(num_bins, expected):
    model = build(iou_balanced_sampling={"enabled": True, "num_bins": num_bins})
    assert negative_draw_settings(model)["num_bins"] == num_bins
    drawn = sample_negatives(model, negatives_on_grid())
    edges = [0.45 * i / num_bins for i in range(num_bins + 1)]
    assert histogram(drawn, edges) == expected


def test_random_sampling_when_the_switch_is_off_gives_other_counts():
    # The data above is not balanced by chance: plain random sampling draws mostly easy ones.
    model = build(iou_balanced_sampling={"enabled": False, "num_bins": 5})
    assert negative_draw_settings(model) is None and model.roi_heads.sampler.neg_draw is random_draw
    drawn = sample_negatives(model, negatives_on_grid())
    assert histogram(drawn, [0.0, 0.09, 0.45])[0] > 30  # balanced: 12; random: about 43


@pytest.mark.parametrize("floor_thr,floor_fraction,expected", [
    # Floor set IoU < 0.09 (240 negatives); bins over [0.09, 0.45], width 0.12, 32 or 33 each.
    (0.09, 0.0, [0, 20, 20, 20]),   # no budget for the floor: it is drawn only to fill
    (0.09, 0.5, [30, 10, 10, 10]),  # int(60 * 0.5) = 30 from the floor, 30 // 3 per bin
    (0.09, 0.25, [15, 15, 15, 15]),  # 15 from the floor, 45 // 3 per bin
])
def test_floor_settings_reach_the_sampler_and_set_the_counts(floor_thr, floor_fraction, expected):
    model = build(iou_balanced_sampling={"enabled": True, "num_bins": 3, "floor_thr": floor_thr,
                                         "floor_fraction": floor_fraction})
    settings = negative_draw_settings(model)
    assert (settings["floor_thr"], settings["floor_fraction"]) == (floor_thr, floor_fraction)
    drawn = sample_negatives(model, negatives_on_grid())
    assert histogram(drawn, [0.0, 0.09, 0.21, 0.33, 0.45]) == expected


def test_instance_balanced_positives_reach_the_sampler():
    # 100 positives: 90 match gt 0, 10 match gt 1; budget int(60 * 0.25) = 15 positives.
    # Instance-balanced: 15 // 2 = 7 per gt, then 1 at random -> gt 1 gets 7 or 8.
    # Random: gt 1 gets 15 * 10 / 100 = 1.5 on average (8 or more with probability < 1e-4).
    gt_of_positive = torch.tensor([0] * 90 + [1] * 10)
    labels = torch.ones(100, dtype=torch.int64)
    counts = {}
    for balanced in (False, True):
        model = build(iou_balanced_sampling={"enabled": True, "instance_balanced_pos": balanced})
        pos_draw = model.roi_heads.sampler.pos_draw
        assert pos_draw is (instance_balanced_pos_sample if balanced else random_draw)
        torch.manual_seed(0)
        keep = model.roi_heads.sample_proposals(labels, gt_of_positive, torch.full((100,), 0.7))
        assert keep.numel() == 15
        counts[balanced] = int((gt_of_positive[keep] == 1).sum())
    assert counts[True] in (7, 8)
    assert counts[False] < 7


# ------------------------------------------------------------------------------- the pyramid
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("refine_level", [0, 1, 3, 4])
def test_refine_level_sets_where_the_levels_are_integrated(arch, refine_level):
    sampling = {"enabled": False} if arch == "retinanet" else {}
    model = build(arch=arch, iou_balanced_sampling=sampling,
                  balanced_feature_pyramid={"enabled": True, "refine_level": refine_level})
    bfp = model.backbone.bfp
    assert bfp.refine_level == refine_level
    seen = {}

    def record_input_size(module, args, output):
        seen["size"] = args[0].shape[-2:]

    bfp.refine.register_forward_hook(record_input_size)
    with torch.no_grad():
        levels = model.backbone.backbone(torch.rand(1, 3, 64, 64))  # the FPN's levels, finest first
        bfp(levels)
    assert seen["size"] == list(levels.values())[refine_level].shape[-2:]


@pytest.mark.parametrize("refine_type,module", [("non_local", NonLocalBlock2d), ("conv", nn.Sequential),
                                                ("none", nn.Identity)])
def test_refine_type_sets_the_refiner(refine_type, module):
    model = build(balanced_feature_pyramid={"enabled": True, "refine_type": refine_type})
    bfp = model.backbone.bfp
    assert bfp.refine_type == refine_type and type(bfp.refine) is module
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        if refine_type == "none":
            assert torch.equal(bfp.refine(x), x)
        elif refine_type == "conv":  # 3x3 conv + ReLU: non-negative, not the input
            conv = bfp.refine[0]
            assert conv.kernel_size == (3, 3)
            torch.testing.assert_close(bfp.refine(x), F.relu(conv(x)))
        else:  # the non-local block is a residual: x + out(attention); its out conv starts at 0
            nn.init.normal_(bfp.refine.out.weight)
            assert not torch.allclose(bfp.refine(x), x)


# ------------------------------------------------------------------------------- the box loss
def balanced_l1_closed_form(x: float, alpha: float, gamma: float, beta: float) -> float:
    """Paper eq. 8 with b = e^(gamma/alpha) - 1, scaled to the break point beta:
    L_beta(x) = beta * L(|x| / beta)."""
    b = math.exp(gamma / alpha) - 1.0
    u = abs(x) / beta
    if u < 1.0:
        value = alpha / b * (b * u + 1.0) * math.log(b * u + 1.0) - alpha * u
    else:
        value = gamma * u + gamma / b - alpha
    return beta * value


# Residuals on both branches for every beta below (0.05 to 0.9 inliers up to beta 1; 2.5 an
# outlier for all; 0.4 changes branch between beta 0.3 and 1.0).
RESIDUALS = [0.05, -0.4, 0.9, -2.5]
SETTINGS = [(0.5, 1.5, 1.0), (0.3, 1.5, 1.0), (0.5, 1.0, 1.0), (0.5, 1.5, 0.3), (0.25, 2.0, 0.11)]


@pytest.mark.parametrize("alpha,gamma,beta", SETTINGS)
def test_balanced_l1_settings_reach_the_rcnn_box_loss(alpha, gamma, beta):
    model = build(balanced_l1_loss={"enabled": True, "alpha": alpha, "gamma": gamma, "beta": beta})
    pred = torch.tensor([RESIDUALS], dtype=torch.float64)  # [1, 4] deltas
    target = torch.zeros_like(pred)
    # The R-CNN head's box loss is the SUM over the positives' deltas (the head normalises).
    value = model.roi_heads.box_loss(pred, target).item()
    expected = sum(balanced_l1_closed_form(x, alpha, gamma, beta) for x in RESIDUALS)
    assert value == pytest.approx(expected, rel=1e-12)
    default = sum(balanced_l1_closed_form(x, 0.5, 1.5, 1.0) for x in RESIDUALS)
    if (alpha, gamma, beta) != (0.5, 1.5, 1.0):
        assert abs(expected - default) > 1e-3  # the inputs tell the settings apart


def test_box_loss_switched_off_is_smooth_l1():
    model = build(balanced_l1_loss={"enabled": False, "alpha": 0.3})
    pred = torch.tensor([RESIDUALS], dtype=torch.float64)
    expected = sum(0.5 * x * x * 9 if abs(x) < 1 / 9 else abs(x) - 0.5 / 9 for x in RESIDUALS)
    assert model.roi_heads.box_loss(pred, torch.zeros_like(pred)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha,gamma,beta", SETTINGS)
def test_balanced_l1_settings_reach_the_retinanet_head(alpha, gamma, beta):
    model = build(arch="retinanet", iou_balanced_sampling={"enabled": False},
                  balanced_l1_loss={"enabled": True, "alpha": alpha, "gamma": gamma, "beta": beta})
    head = model.head
    assert (head.alpha, head.gamma, head.beta) == (alpha, gamma, beta)
    # One image, one foreground anchor equal to its gt box: the target deltas are 0, so the loss
    # is the closed form at the predicted deltas, summed over 4 and divided by 1 anchor, 1 image.
    anchors = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [30.0, 30.0, 40.0, 40.0]], dtype=torch.float64)]
    targets = [{"boxes": anchors[0][:1].clone(), "labels": torch.tensor([1])}]
    pred = torch.tensor([[RESIDUALS, [7.0, 7.0, 7.0, 7.0]]], dtype=torch.float64)  # [1, 2, 4]
    matched = [torch.tensor([0, -1])]  # the second anchor is background: not in the box loss
    value = head.box_regression_loss(targets, pred, anchors, matched).item()
    expected = sum(balanced_l1_closed_form(x, alpha, gamma, beta) for x in RESIDUALS)
    assert value == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("changes,iteration,iters_per_epoch,expected_lr", [
    ({"lr": 0.003, "warmup_iters": 0}, 5, 10, 0.003),
    ({"lr": 0.003, "warmup_iters": 10, "warmup_ratio": 0.2}, 5, 10, 0.003 * (0.2 + 0.8 * 0.5)),
    ({"lr": 0.003, "warmup_iters": 0, "lr_steps": [1], "lr_gamma": 0.5}, 10, 10, 0.0015),
    ({"base_lr": 0.04, "batch_size": 4, "warmup_iters": 0}, 0, 10, 0.04 * 4 / 16),
])
def test_schedule_values_set_the_learning_rate(changes, iteration, iters_per_epoch, expected_lr):
    schedule = TrainConfig.from_dict({"schedule": changes}).schedule
    for key, value in changes.items():
        assert getattr(schedule, key) == (tuple(value) if isinstance(value, list) else value)
    lr = schedule.learning_rate(world_size=1) * lr_factor(iteration, iters_per_epoch, schedule)
    assert lr == pytest.approx(expected_lr, rel=1e-12)
    assert lr != pytest.approx(ScheduleConfig().learning_rate(1) * lr_factor(iteration, iters_per_epoch, ScheduleConfig()))
