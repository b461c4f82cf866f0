"""torchvision's RPN with the reference's two sampling options: a cap on negatives per positive
(`neg_pos_ub`) and ignoring anchors that cross the image border (`allowed_border`).

With neg_pos_ub < 0 and allowed_border < 0 (the defaults) this is torchvision's RPN, draw for
draw: the sampler then draws exactly as torchvision's BalancedPositiveNegativeSampler does and
the forward is the parent's own.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

__all__ = ["CappedNegativeSampler", "LibraRPN"]


class CappedNegativeSampler(BalancedPositiveNegativeSampler):
    """torchvision's anchor sampler with mmdetection's `neg_pos_ub`: at most
    int(neg_pos_ub * max(1, #positives drawn)) negatives per image (the Libra configs use 5).

    Args:
        batch_size_per_image: anchors drawn per image (256 for the RPN).
        positive_fraction: the largest share of positives (0.5).
        neg_pos_ub: the cap's ratio; < 0 leaves no cap (torchvision, the baseline config).

    Called like the parent on a list of [A] label tensors (-1 ignored, 0 negative, >= 1
    positive); returns per image the [A] uint8 masks of the drawn positives and negatives.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float, neg_pos_ub: float = -1.0) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.neg_pos_ub = neg_pos_ub

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.neg_pos_ub < 0:
            return super().__call__(matched_idxs)
        pos_masks, neg_masks = [], []
        for labels in matched_idxs:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos,
                          int(self.neg_pos_ub * max(1, num_pos)))
            pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
            pos_mask[positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]] = 1
            neg_mask[negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


class LibraRPN(RegionProposalNetwork):
    """RegionProposalNetwork whose training ignores anchors crossing the border by more than
    `allowed_border` pixels (mmdetection's `allowed_border`; < 0 uses all anchors, as torchvision).

    Args: RegionProposalNetwork's, plus (keywords) allowed_border in pixels, and neg_pos_ub for
    the anchor sampler (CappedNegativeSampler).

    An anchor [x1, y1, x2, y2] counts when x1 >= -b, y1 >= -b, x2 < W + b and y2 < H + b for the
    image's size (H, W) before padding. The reference drops the others before matching; here they
    are matched, then ignored (label -1), so they are never sampled and carry no loss. The one
    difference: a gt box whose best anchor lies outside keeps that as its low-quality match
    instead of the best inside one.
    """

    def __init__(self, *args, allowed_border: int = -1, neg_pos_ub: float = -1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_border = allowed_border
        parent = self.fg_bg_sampler
        self.fg_bg_sampler = CappedNegativeSampler(parent.batch_size_per_image, parent.positive_fraction, neg_pos_ub)

    def forward(self, images: ImageList, features: dict[str, Tensor], targets=None):
        if self.allowed_border < 0 or not self.training:
            return super().forward(images, features, targets)
        # The parent's forward, with the border check between matching and the loss.
        levels = list(features.values())
        objectness, pred_bbox_deltas = self.head(levels)
        anchors = self.anchor_generator(images, levels)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        if targets is None:
            raise ValueError("targets should not be None")
        labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        labels = [
            torch.where(self.inside(a, size), lbl, torch.full_like(lbl, -1))
            for a, size, lbl in zip(anchors, images.image_sizes, labels)
        ]
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}

    def inside(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """[A] bool: which of the [A, 4] anchors lie within the image (H, W) plus the border."""
        h, w = image_size
        b = self.allowed_border
        return (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)
