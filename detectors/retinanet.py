"""Libra RetinaNet's parts, the one-stage variant of the paper's Table 1; the builder that
composes them, `build_retinanet(cfg)`, is in detectors/build.py beside the two-stage one.

A one-stage detector has no sampling step, so only two of the three components apply: the
Balanced Feature Pyramid after the FPN, and the balanced L1 loss for box regression. The model
reads top to bottom as nested constructor calls:

    LibraRetinaNet(                                  (torchvision's RetinaNet, see below)
        backbone  = ResNet/tiny + FPN on C3..C5, P6/P7 from C5   [+ BalancedFeaturePyramid],
        anchors   = 3 scales x 3 aspect ratios per level, torchvision's RetinaNet convention,
        head      = RetinaNetHead (focal loss + L1) | BalancedL1RetinaNetHead (focal loss + balanced L1),
        transform = resize to min_size/max_size + ImageNet normalisation)

With both switches off this is torchvision's RetinaNet class, parameter for parameter and loss
for loss; the neck is that of its retinanet_resnet50_fpn_v2 builder (P6 from C5), the head that of
its v1 builder (no normalisation, L1 box loss).

Settings that differ from the two-stage detector, and that a user must set (the builder never
changes a configured value behind the user's back):
- `balanced_feature_pyramid.refine_level`: the levels here are P3..P7, so the config's default 2 is
  P5; the reference (mmdetection's Libra RetinaNet) integrates at P4, which is `refine_level: 1`.
- `balanced_l1_loss.beta`: RetinaNet encodes box targets with weights (1, 1, 1, 1), ten times
  coarser for the centre than the R-CNN head's (10, 10, 5, 5); the reference uses beta = 0.11
  (see BalancedL1RetinaNetHead), where the two-stage detector uses 1.0.
- Classes: `num_classes + 1` classifier outputs (see LibraRetinaNet).
The RPN and R-CNN settings (rpn_*, roi_*, representation_size) have no meaning here and are unused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detectors.losses import balanced_l1_loss

__all__ = ["LibraRetinaNet", "LOSS_NAMES", "BalancedL1RetinaNetHead", "BoxLossRetinaNetHead",
           "LastLevelP6P7NoReLU", "retinanet_anchor_sizes"]

# Anchor scales per level, relative to the level's base size: 2^0, 2^(1/3), 2^(2/3) (RetinaNet paper).
ANCHOR_SCALES = (1.0, 2 ** (1.0 / 3), 2 ** (2.0 / 3))


# torchvision's RetinaNet names its losses "classification" and "bbox_regression"; the project's
# contract (and the engine's logs) want `loss_*` keys, named like the two-stage head's.
LOSS_NAMES = {"classification": "loss_classifier", "bbox_regression": "loss_box_reg"}


class LibraRetinaNet(RetinaNet):
    """torchvision's RetinaNet with `loss_*` loss names and no background detections.

    Train mode returns {"loss_classifier" (focal loss), "loss_box_reg"}, torchvision's
    "classification" and "bbox_regression" under the project's names (LOSS_NAMES).

    Our datasets label objects 1..num_classes and keep 0 for background, as the R-CNN head
    needs. torchvision's RetinaNet uses the label directly as the column of a sigmoid
    (one-vs-all) classifier, so the model is built with num_classes + 1 outputs, as torchvision's
    own COCO models are (91 outputs, some never used). Column 0 is only ever trained as a
    negative, so its scores stay near zero; but nothing forbids one from passing score_thresh,
    and a detection labelled 0 has no category to be evaluated as. So those are dropped here,
    after torchvision's per-class NMS, which they cannot have influenced (NMS is per class).
    Everything else, training included, is torchvision's code path.
    """

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        result = super().forward(images, targets)
        if self.training:
            return {LOSS_NAMES.get(name, f"loss_{name}"): loss for name, loss in result.items()}
        return result

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        detections = super().postprocess_detections(head_outputs, anchors, image_shapes)
        return [{key: value[det["labels"] > 0] for key, value in det.items()} for det in detections]


class BoxLossRetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNetHead with an injected box-regression loss and normalisation.

    Parameters, initialisation, forward and the focal loss are RetinaNetHead's, so checkpoints
    load across box-loss settings and one seed gives the same initial weights for all of them.

    Args:
        in_channels, num_anchors, num_classes, norm_layer: RetinaNetHead's.
        box_loss: maps [P, 4] predicted and target deltas of the foreground anchors to the SUM
            of the per-element losses (e.g. L1, smooth L1 with beta 0.11, balanced L1).
        box_loss_norm: "per_image" (torchvision): per image, sum / max(1, #foreground), then
            the mean over images; "batch" (the reference, mmdetection's avg_factor =
            num_total_pos): the batch's sum / max(1, the batch's #foreground) -- an anchor in a
            sparse image then weighs as much as one in a crowded image.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        box_loss: Callable[[Tensor, Tensor], Tensor],
        box_loss_norm: str = "per_image",
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        if box_loss_norm not in ("per_image", "batch"):
            raise ValueError(f"box_loss_norm must be 'per_image' or 'batch', got {box_loss_norm!r}")
        self.box_loss = box_loss
        self.box_loss_norm = box_loss_norm

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        return {
            "classification": self.classification_head.compute_loss(targets, head_outputs, matched_idxs),
            "bbox_regression": self.box_regression_loss(
                targets, head_outputs["bbox_regression"], anchors, matched_idxs
            ),
        }

    def box_regression_loss(
        self,
        targets: list[dict[str, Tensor]],
        pred_deltas: Tensor,
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> Tensor:
        """The box loss over the foreground anchors, normalised as `box_loss_norm` says.

        Args:
            targets: per image {"boxes": [G, 4] xyxy, ...} in the transformed image's pixels.
            pred_deltas: [N, A_total, 4] predicted deltas for every anchor of every image.
            anchors: per image [A_total, 4] xyxy.
            matched_idxs: per image [A_total], the matched gt index, < 0 for background/ignored.

        An image without foreground contributes exactly 0 either way.
        """
        box_coder = self.regression_head.box_coder
        sums, counts = [], []
        for targets_per_image, pred_per_image, anchors_per_image, matched_per_image in zip(
            targets, pred_deltas, anchors, matched_idxs
        ):
            foreground = torch.where(matched_per_image >= 0)[0]  # [P]
            gt_boxes = targets_per_image["boxes"][matched_per_image[foreground]]  # [P, 4]
            target_deltas = box_coder.encode_single(gt_boxes, anchors_per_image[foreground])  # [P, 4]
            sums.append(self.box_loss(pred_per_image[foreground], target_deltas))
            counts.append(foreground.numel())
        if self.box_loss_norm == "batch":
            return sum(sums) / max(1, sum(counts))
        return sum(loss / max(1, n) for loss, n in zip(sums, counts)) / max(1, len(targets))


class BalancedL1RetinaNetHead(BoxLossRetinaNetHead):
    """torchvision's RetinaNetHead with the box-regression loss replaced by the balanced L1 loss.

    Parameters, initialisation and forward are RetinaNetHead's (the regression sub-head is
    torchvision's own), so a checkpoint loads with the switch on or off, and the same seed gives
    the same initial weights either way: an ablation compares the loss and nothing else.

    Args:
        in_channels: channels of every pyramid level.
        num_anchors: anchors per location (9: three scales times three aspect ratios).
        num_classes: classifier outputs, background column included (see LibraRetinaNet).
        alpha, gamma, beta, formulation: the balanced L1 loss's settings
            (detectors.losses.balanced_l1_loss).
        box_loss_norm: see BoxLossRetinaNetHead ("per_image", torchvision's, by default).

    Units of beta. The loss sees the deltas of torchvision's RetinaNet box coder, weights
    (1, 1, 1, 1): dx = (x_gt - x_anchor) / w_anchor (likewise dy with the height) and
    dw = ln(w_gt / w_anchor) (likewise dh). beta is the residual at which the loss turns from
    the log-shaped inlier branch to the linear outlier branch: beta = 0.11, the reference's
    value (mmdetection's Libra RetinaNet, whose RetinaNet targets also have stds 1), means a
    centre off by 11% of the anchor's side, or a side off by a factor e^0.11 = 1.12. In the R-CNN
    head's units (weights 10, 10, 5, 5) that centre error is 1.1, so beta = 0.11 here sits where
    beta = 1 sits for the two-stage detector. With the config's default beta = 1 nearly every
    residual is an inlier and the loss's bounded outlier gradient never comes into play.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        alpha: float = 0.5,
        gamma: float = 1.5,
        beta: float = 0.11,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        formulation: str = "scaled",
        box_loss_norm: str = "per_image",
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer,
                         box_loss=self._balanced_l1, box_loss_norm=box_loss_norm)
        self.alpha = alpha
        self.gamma = gamma
        self.beta = beta
        self.formulation = formulation  # "reference": the authors' beta-inside-the-log form

    def _balanced_l1(self, pred: Tensor, target: Tensor) -> Tensor:
        """[P, 4] deltas -> the summed balanced L1 loss with this head's settings."""
        return balanced_l1_loss(pred, target, alpha=self.alpha, gamma=self.gamma, beta=self.beta,
                                reduction="sum", formulation=self.formulation)

    def extra_repr(self) -> str:
        return (f"box_loss_norm={self.box_loss_norm}, balanced_l1: alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, "
                f"formulation={self.formulation}")


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """torchvision's P6/P7 block without the ReLU before P7's conv: P7 = conv(P6), as the CVPR
    release's and mmdetection v1's FPN (`retinanet_p7_relu: false`). Same parameters and init."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


def retinanet_anchor_sizes(base_sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per level (x, x * 2^(1/3), x * 2^(2/3)) for each base size x, truncated to ints as
    torchvision's RetinaNet does: (32, 64, ...) -> ((32, 40, 50), (64, 80, 101), ...)."""
    return tuple(tuple(int(x * scale) for scale in ANCHOR_SCALES) for x in base_sizes)
