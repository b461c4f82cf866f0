"""Fast R-CNN: the second stage alone, trained and evaluated on given proposals (no RPN).

The paper's ablation protocol (Sec. 4.4: "the same pre-computed proposals for fair
comparisons"): every configuration of a study sees the same proposals, so a component changes
the R-CNN stage only. The tree, composed by detectors/build.py:

    FastRCNN(
        backbone  = ResNet/tiny + FPN  [+ BalancedFeaturePyramid],
        roi_heads = LibraRoIHeads(sampler, box_loss),      # the same head Faster R-CNN uses
        transform = resize to min_size/max_size + ImageNet normalisation)

Proposals come with each image in the stored image's pixels (the dataset reads them from
data.proposals and flips them with the image); the model scales them with the image and keeps
the best `num_proposals` of each (train and test counts differ, as for an RPN).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes


class FastRCNN(nn.Module):
    """torchvision's detector contract, with proposals given instead of made.

    Args:
        backbone: returns an ordered dict of feature maps; has `out_channels`.
        roi_heads: LibraRoIHeads (or torchvision's RoIHeads).
        transform: GeneralizedRCNNTransform (resize, normalise, batch).
        num_proposals: {"training": N, "testing": M}: proposals kept per image, best first.

    forward(images, targets=None, proposals=None):
        images: N tensors [3, H_i, W_i] in [0, 1].
        targets: N dicts, "boxes" [G_i, 4] xyxy, "labels" [G_i] (training), and, when
            `proposals` is not given, "proposals" [R_i, 4] xyxy in the same pixels as the image,
            best first.
        proposals: N tensors [R_i, 4] as above (evaluation passes them this way).
    Returns in train mode {"loss_classifier", "loss_box_reg"}; in eval mode per image
    {"boxes" [K, 4] in the input image's pixels, "labels" [K], "scores" [K]}.
    """

    def __init__(self, backbone: nn.Module, roi_heads: nn.Module, transform: GeneralizedRCNNTransform,
                 num_proposals: dict[str, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.transform = transform
        self.num_proposals = dict(num_proposals)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None,
                proposals: Optional[list[Tensor]] = None):
        if self.training and targets is None:
            raise ValueError("targets should not be None in training mode")
        if proposals is None:
            if targets is None or any("proposals" not in t for t in targets):
                raise ValueError("Fast R-CNN needs proposals: pass proposals=[...] or a "
                                 "'proposals' entry in every target")
            proposals = [t["proposals"] for t in targets]
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        keep = self.num_proposals["training" if self.training else "testing"]
        dtype = image_list.tensors.dtype
        # The transform resized each image; its proposals follow it into the resized frame.
        proposals = [resize_boxes(p[:keep].to(dtype), original, resized)
                     for p, original, resized in zip(proposals, original_sizes, image_list.image_sizes)]
        features = self.backbone(image_list.tensors)
        detections, losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
