"""The second stage (R-CNN) with Libra's sampler and box loss injected into torchvision's RoIHeads.

torchvision's `RoIHeads` matches proposals to ground truth, throws the IoU matrix away, samples
with labels only, and hard-wires smooth L1 (beta 1/9) in a module-level function. This subclass
keeps the max IoU of every proposal from the matching step, hands it to an injected sampler
(one callable, as torchvision's fg_bg_sampler), and computes the box loss with an injected function. With the random sampler and
smooth L1 it reproduces torchvision's losses exactly (same random draws in the same order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from detectors.losses import balanced_l1_loss

# A box loss maps predicted and target deltas [P, 4] (encoded with weights 10, 10, 5, 5) to the
# SUM of the per-element losses; the caller normalises.
BoxLoss = Callable[[Tensor, Tensor], Tensor]


def smooth_l1_box_loss(pred: Tensor, target: Tensor) -> Tensor:
    """torchvision's Faster R-CNN box loss: smooth L1 with beta 1/9, summed."""
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")


def make_smooth_l1_box_loss(beta: float) -> BoxLoss:
    """Smooth L1 with break point `beta`, summed: 1/9 is torchvision's, 1.0 the CVPR release's
    and mmdetection v1's baseline (paper Sec. 3.3: gradient clipped at 1)."""

    def box_loss(pred: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")

    return box_loss


def l1_box_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1, summed: mmdetection v2's R-CNN baseline and the paper's Table 6 "L1 loss" row."""
    return F.l1_loss(pred, target, reduction="sum")


def make_balanced_l1_box_loss(alpha: float, gamma: float, beta: float, formulation: str = "scaled") -> BoxLoss:
    """The balanced L1 loss with the given settings, summed (see detectors.losses)."""

    def box_loss(pred: Tensor, target: Tensor) -> Tensor:
        return balanced_l1_loss(
            pred, target, alpha=alpha, gamma=gamma, beta=beta, reduction="sum", formulation=formulation
        )

    return box_loss


def weighted_box_loss(box_loss: BoxLoss, loss_weight: float) -> BoxLoss:
    """`box_loss` times `loss_weight` (the regression term's lambda); weight 1 returns it as is."""
    if loss_weight == 1.0:
        return box_loss

    def weighted(pred: Tensor, target: Tensor) -> Tensor:
        return loss_weight * box_loss(pred, target)

    return weighted


def reference_box_head_init_(box_head: nn.Module, box_predictor: nn.Module) -> None:
    """The reference's box-head init (`box_head_init: reference`), in place: xavier-uniform fc6
    and fc7, classifier normal(0, 0.01), regressor normal(0, 0.001), all biases 0 (CVPR release
    convfc_bbox_head / bbox_head). torchvision keeps nn.Linear's default (kaiming-uniform).

    box_head: torchvision's TwoMLPHead (fc6, fc7); box_predictor: FastRCNNPredictor
    (cls_score, bbox_pred).
    """
    for fc in (box_head.fc6, box_head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    for layer, std in ((box_predictor.cls_score, 0.01), (box_predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


# A draw picks `num` of a pool from one value per member ([M]: the negatives' max IoU, or the
# positives' matched gt index) and returns indices [min(num, M)] into the pool.
Draw = Callable[[Tensor, int], Tensor]


def random_draw(values: Tensor, num: int) -> Tensor:
    """torchvision's draw: the first `num` of a random permutation of the pool [M]."""
    return torch.randperm(values.numel(), device=values.device)[:num]


@dataclass(frozen=True)
class ProposalSampler:
    """How the second stage picks its RoIs per image: one callable, as torchvision's fg_bg_sampler.

    batch_size_per_image RoIs, of which at most positive_fraction positives; `pos_draw` picks the
    positives (from their matched gt index), `neg_draw` the negatives (from their max IoU).
    With both `random_draw` it draws exactly as torchvision's BalancedPositiveNegativeSampler
    (a randperm of the positives, then of the negatives), so the all-off model reproduces
    torchvision's losses draw for draw. detectors/build.py injects IoU-balanced negatives
    (detectors.sampling.iou_balanced_neg_sample) and instance-balanced positives.
    """

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    pos_draw: Draw = random_draw
    neg_draw: Draw = random_draw

    def __call__(self, labels: Tensor, matched_idxs: Tensor, max_ious: Tensor) -> Tensor:
        """Indices [S] (sorted) of the RoIs one image trains on.

        Args:
            labels: [R] class of each proposal, 0 background, -1 ignored.
            matched_idxs: [R] index of the matched gt box (meaningful for positives).
            max_ious: [R] max IoU of each proposal with any gt box.
        """
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_keep = self.pos_draw(matched_idxs[positive], num_pos)
        neg_keep = self.neg_draw(max_ious[negative], num_neg)
        keep = torch.cat([positive[pos_keep], negative[neg_keep]])
        return keep.sort().values


class LibraRoIHeads(RoIHeads):
    """torchvision's RoIHeads with an injectable proposal sampler and box-regression loss.

    Args (beyond RoIHeads' own, which are passed through unchanged):
        sampler: (labels [R], matched gt index [R], max IoU [R]) of one image -> the sorted
            indices [S] of the RoIs it trains on (ProposalSampler).
        box_loss: maps [P, 4] predicted and target deltas of the positives to a summed loss;
            normalised here by the number of sampled RoIs, like torchvision's fastrcnn_loss.
        add_gt_as_proposals: the ground-truth boxes join each image's proposals in training
            (torchvision always, the reference's `add_gt_as_proposals=True`); False samples
            from the given proposals alone.
    """

    def __init__(self, *args, sampler: ProposalSampler, box_loss: BoxLoss = smooth_l1_box_loss,
                 add_gt_as_proposals: bool = True, **kwargs):
        # torchvision's own fg_bg_sampler is built from these and never called: sampling goes
        # through select_training_samples below, which needs the max IoU torchvision drops.
        super().__init__(
            *args,
            batch_size_per_image=getattr(sampler, "batch_size_per_image", 512),
            positive_fraction=getattr(sampler, "positive_fraction", 0.25),
            **kwargs,
        )
        self.sampler = sampler
        self.box_loss = box_loss
        self.add_gt_as_proposals = add_gt_as_proposals

    # ---------------------------------------------------------------- matching and sampling
    def match_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: matched gt index [R] (clamped to >= 0), label [R] (0 background, -1 ignored),
        and the max IoU of each proposal with any gt box [R] (0 for images without boxes)."""
        matched_idxs, labels, max_ious = [], [], []
        for props, gts, gt_lbls in zip(proposals, gt_boxes, gt_labels):
            num_props = props.shape[0]
            if gts.numel() == 0:
                matched_idxs.append(torch.zeros(num_props, dtype=torch.int64, device=props.device))
                labels.append(torch.zeros(num_props, dtype=torch.int64, device=props.device))
                max_ious.append(torch.zeros(num_props, dtype=props.dtype, device=props.device))
                continue
            iou = box_ops.box_iou(gts, props)  # [G, R]
            matched = self.proposal_matcher(iou)
            lbls = gt_lbls[matched.clamp(min=0)].to(torch.int64)
            lbls[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
            lbls[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(matched.clamp(min=0))
            labels.append(lbls)
            max_ious.append(iou.max(dim=0).values)
        return matched_idxs, labels, max_ious

    def sample_proposals(self, labels: Tensor, matched_idxs: Tensor, max_ious: Tensor) -> Tensor:
        """Indices [S] (sorted) of the RoIs one image trains on: the injected sampler's choice."""
        return self.sampler(labels, matched_idxs, max_ious)

    def select_training_samples(self, proposals, targets):
        """Add gt boxes as proposals, match, sample; returns torchvision's 4-tuple.

        Returns per image: sampled proposals [S, 4], matched gt index [S], labels [S],
        and regression targets [S, 4] encoded with the head's box coder.
        """
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        if self.add_gt_as_proposals:
            proposals = self.add_gt_proposals(proposals, gt_boxes)  # the paper adds gt as proposals
        matched_idxs, labels, max_ious = self.match_proposals(proposals, gt_boxes, gt_labels)

        matched_gt_boxes = []
        for i in range(len(proposals)):
            keep = self.sample_proposals(labels[i], matched_idxs[i], max_ious[i])
            proposals[i], labels[i], matched_idxs[i] = proposals[i][keep], labels[i][keep], matched_idxs[i][keep]
            gts = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(gts[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    # ---------------------------------------------------------------- loss
    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)  # [S, C+1], [S, (C+1)*4]
        loss_classifier, loss_box_reg = self.fast_rcnn_loss(class_logits, box_regression, labels, regression_targets)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def fast_rcnn_loss(
        self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy over all sampled RoIs, and the box loss over the positives.

        The box loss is summed over positives and divided by the number of sampled RoIs (not of
        positives), as torchvision and mmdetection do: the regression weight then does not swing
        with how many positives an image happens to have.
        """
        labels_all = torch.cat(labels)  # [S]
        targets_all = torch.cat(regression_targets)  # [S, 4]
        loss_classifier = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        num_rois = class_logits.shape[0]
        deltas = box_regression.reshape(num_rois, -1, 4)[pos, labels_all[pos]]  # [P, 4] of each RoI's class
        loss_box_reg = self.box_loss(deltas, targets_all[pos]) / max(labels_all.numel(), 1)
        return loss_classifier, loss_box_reg
