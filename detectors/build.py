"""`build_detector(cfg)`: the one place that reads the three switches and composes the model.

The model is composed explicitly from torchvision's parts and ours (constructor injection; no
registry, no monkeypatching), so the tree below reads top to bottom:

    GeneralizedRCNN(
        backbone   = ResNet/tiny + FPN            [+ BalancedFeaturePyramid if enabled],
        rpn        = torchvision's RPN (random sampling, as in the paper; optional neg_pos_ub
                     and allowed_border, the reference's, see detectors/rpn.py),
        roi_heads  = LibraRoIHeads(sampler = random | IoU-balanced,
                                   box_loss = smooth L1 | L1 | balanced L1, x weight),
        transform  = resize to min_size/max_size + ImageNet normalisation)

With every switch off this is torchvision's Faster R-CNN + FPN, parameter for parameter.
`arch: fast_rcnn` composes the same backbone and RoI head without the RPN, on given proposals
(detectors/fast_rcnn.py, the paper's ablation protocol).
`build_retinanet(cfg)` composes the one-stage variant the same way from the parts in
detectors/retinanet.py (whose docstring draws its tree). Imports run one way: this module
imports the components' modules, never the reverse.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detectors.backbones import TinyConvNet, build_backbone
from detectors.bfp import BackboneWithBFP, BalancedFeaturePyramid, xavier_init_
from detectors.config import DetectorConfig
from detectors.fast_rcnn import FastRCNN
from detectors.retinanet import (
    BalancedL1RetinaNetHead,
    BoxLossRetinaNetHead,
    LastLevelP6P7NoReLU,
    LibraRetinaNet,
    retinanet_anchor_sizes,
)
from detectors.roi_heads import (
    BoxLoss,
    LibraRoIHeads,
    ProposalSampler,
    l1_box_loss,
    make_balanced_l1_box_loss,
    make_smooth_l1_box_loss,
    random_draw,
    reference_box_head_init_,
    weighted_box_loss,
)
from detectors.rpn import LibraRPN
from detectors.sampling import instance_balanced_pos_sample, iou_balanced_neg_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
NUM_FPN_LEVELS = 5


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """A detector with torchvision's contract: train mode returns a dict of `loss_*` tensors,
    eval mode a list of {"boxes" [K, 4] xyxy in input pixels, "labels" [K], "scores" [K]}."""
    if cfg.arch == "retinanet":
        return build_retinanet(cfg)
    if cfg.arch == "fast_rcnn":
        return build_fast_rcnn(cfg)
    return build_faster_rcnn(cfg)


def with_balanced_pyramid(backbone: nn.Module, cfg: DetectorConfig) -> nn.Module:
    """Wrap the FPN backbone with the BFP neck when the switch is on; out_channels unchanged."""
    bfp_cfg = cfg.balanced_feature_pyramid
    if not bfp_cfg.enabled:
        return backbone
    # Initialised on a fork of the RNG, so the modules built after it (the RPN, the RoI head)
    # start from the same weights with the BFP on as off for one seed: an ablation's pair of
    # configurations then differs by the BFP alone, not also by a reshuffled initialisation.
    with torch.random.fork_rng(devices=[]):
        bfp = BalancedFeaturePyramid(
            backbone.out_channels, NUM_FPN_LEVELS, refine_level=bfp_cfg.refine_level, refine_type=bfp_cfg.refine_type
        )
        if bfp_cfg.init == "xavier":
            xavier_init_(bfp)  # the reference's init; "identity" keeps the module's own
    return BackboneWithBFP(backbone, bfp)


def build_rcnn_box_loss(cfg: DetectorConfig) -> BoxLoss:
    """The R-CNN box loss: balanced L1 when its switch is on, else `box_loss.type`; times
    `box_loss.loss_weight` either way (see BoxLossConfig for how the two keys relate)."""
    if cfg.rcnn_box_loss == "balanced_l1":
        bl1 = cfg.balanced_l1_loss
        loss = make_balanced_l1_box_loss(bl1.alpha, bl1.gamma, bl1.beta, bl1.formulation)
    elif cfg.rcnn_box_loss == "l1":
        loss = l1_box_loss
    else:
        loss = make_smooth_l1_box_loss(cfg.box_loss.beta)
    return weighted_box_loss(loss, cfg.box_loss.loss_weight)


def build_transform(cfg: DetectorConfig) -> GeneralizedRCNNTransform:
    return GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))


def build_rcnn_backbone(cfg: DetectorConfig) -> nn.Module:
    """ResNet/tiny + FPN (P2..P6), wrapped with the BFP when its switch is on."""
    backbone = build_backbone(
        cfg.backbone,
        fpn_channels=cfg.fpn_channels,
        pretrained=cfg.pretrained,
        norm=cfg.backbone_norm,
        trainable_layers=cfg.trainable_backbone_layers,
    )
    return with_balanced_pyramid(backbone, cfg)


def build_fast_rcnn(cfg: DetectorConfig) -> FastRCNN:
    """The second stage alone on given proposals: the backbone and RoI head of
    `build_faster_rcnn`, parameter for parameter, without the RPN."""
    backbone = build_rcnn_backbone(cfg)
    num_proposals = {"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test}
    return FastRCNN(backbone, build_roi_heads(cfg, backbone.out_channels), build_transform(cfg), num_proposals)


def build_faster_rcnn(cfg: DetectorConfig) -> GeneralizedRCNN:
    backbone = build_rcnn_backbone(cfg)
    channels = backbone.out_channels

    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in cfg.anchor_sizes),
        aspect_ratios=(ASPECT_RATIOS,) * NUM_FPN_LEVELS,
    )
    # torchvision's RPN defaults (they are also the paper's): IoU 0.7/0.3, 256 anchors per image,
    # half positives, NMS 0.7. The RPN keeps random sampling; Libra changes only the second stage.
    rpn = LibraRPN(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=0.7,
        allowed_border=cfg.rpn_allowed_border,  # < 0: every anchor, as torchvision
        neg_pos_ub=cfg.rpn_neg_pos_ub,  # < 0: no cap on negatives per positive, as torchvision
    )
    return GeneralizedRCNN(backbone, rpn, build_roi_heads(cfg, channels), build_transform(cfg))


def build_roi_heads(cfg: DetectorConfig, channels: int) -> LibraRoIHeads:
    """The R-CNN stage on `channels`-wide FPN maps: the Libra sampler and box loss as switched."""
    sampler_cfg = cfg.iou_balanced_sampling
    neg_draw = pos_draw = random_draw
    if sampler_cfg.enabled:
        neg_draw = partial(iou_balanced_neg_sample, num_bins=sampler_cfg.num_bins,
                           floor_thr=sampler_cfg.floor_thr, floor_fraction=sampler_cfg.floor_fraction,
                           bin_max=sampler_cfg.bin_max, zero_iou=sampler_cfg.zero_iou)
        if sampler_cfg.instance_balanced_pos:
            pos_draw = instance_balanced_pos_sample
    sampler = ProposalSampler(cfg.roi_batch_size_per_image, cfg.roi_positive_fraction,
                              pos_draw=pos_draw, neg_draw=neg_draw)
    box_loss = build_rcnn_box_loss(cfg)
    box_head = TwoMLPHead(channels * 7 * 7, cfg.representation_size)
    box_predictor = FastRCNNPredictor(cfg.representation_size, cfg.num_classes + 1)  # + background
    if cfg.box_head_init == "reference":
        reference_box_head_init_(box_head, box_predictor)
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    roi_heads = LibraRoIHeads(
        roi_pool,
        box_head,
        box_predictor,
        # torchvision's (and the paper's) matching: IoU >= 0.5 positive, below negative.
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        bbox_reg_weights=None,  # (10, 10, 5, 5): mmdetection's target stds, so beta = 1 carries over
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
        sampler=sampler,
        box_loss=box_loss,
        add_gt_as_proposals=cfg.add_gt_as_proposals,
    )
    return roi_heads


def build_retinanet(cfg: DetectorConfig) -> LibraRetinaNet:
    """RetinaNet on cfg.backbone with the BFP and the balanced L1 loss as cfg switches them.

    Train mode: model(images, targets) -> {"loss_classifier", "loss_box_reg"} (focal loss and
    box loss, each averaged over images). Eval mode: model(images) -> per image {"boxes" [K, 4]
    xyxy in input pixels, "labels" [K] in 1..num_classes, "scores" [K]}.
    """
    # FPN on C3..C5 (strides 8..32) plus P6/P7 (strides 64, 128), five levels as the BFP expects.
    # P6 comes from C5, as in the RetinaNet paper, mmdetection (Libra RetinaNet included) and
    # torchvision's retinanet_resnet50_fpn_v2 (its v1 takes P5).
    p6p7 = LastLevelP6P7 if cfg.retinanet_p7_relu else LastLevelP6P7NoReLU
    extra_blocks = p6p7(_c5_channels(cfg.backbone), cfg.fpn_channels)
    # torchvision's block switches to P5 when C5 happens to have the FPN's width; keep C5 always,
    # so the architecture does not change with fpn_channels.
    extra_blocks.use_P5 = False
    backbone = build_backbone(
        cfg.backbone,
        fpn_channels=cfg.fpn_channels,
        pretrained=cfg.pretrained,
        norm=cfg.backbone_norm,
        trainable_layers=cfg.trainable_backbone_layers,
        returned_layers=(2, 3, 4),
        extra_blocks=extra_blocks,
    )
    backbone = with_balanced_pyramid(backbone, cfg)  # refine_level as configured: 1 is P4 here

    anchors = AnchorGenerator(
        sizes=retinanet_anchor_sizes(cfg.anchor_sizes),
        aspect_ratios=(ASPECT_RATIOS,) * NUM_FPN_LEVELS,
    )
    num_anchors = anchors.num_anchors_per_location()[0]
    num_outputs = cfg.num_classes + 1  # column 0 is background, never a positive (see LibraRetinaNet)
    loss_cfg = cfg.balanced_l1_loss
    # GroupNorm(32) in the head's convs, as torchvision's v2 head: without it the head's small
    # initial weights pass almost no signal from a backbone trained from scratch.
    norm_layer = partial(nn.GroupNorm, 32) if cfg.head_norm == "group" else None
    if loss_cfg.enabled:
        head = BalancedL1RetinaNetHead(
            backbone.out_channels, num_anchors, num_outputs,
            alpha=loss_cfg.alpha, gamma=loss_cfg.gamma, beta=loss_cfg.beta, norm_layer=norm_layer,
            formulation=loss_cfg.formulation, box_loss_norm=cfg.retinanet_box_loss_norm,
        )
    elif cfg.retinanet_box_loss == "l1" and cfg.retinanet_box_loss_norm == "per_image":
        head = RetinaNetHead(backbone.out_channels, num_anchors, num_outputs, norm_layer=norm_layer)  # L1
    else:  # the reference's baseline: smooth L1 (beta 0.11) and/or the batch normalisation
        beta = cfg.retinanet_smooth_l1_beta
        box_loss = (partial(F.smooth_l1_loss, beta=beta, reduction="sum") if cfg.retinanet_box_loss == "smooth_l1"
                    else partial(F.l1_loss, reduction="sum"))
        head = BoxLossRetinaNetHead(backbone.out_channels, num_anchors, num_outputs, box_loss=box_loss,
                                    box_loss_norm=cfg.retinanet_box_loss_norm, norm_layer=norm_layer)

    # Matching stays torchvision's (and the paper's): IoU >= 0.5 foreground, < 0.4 background,
    # every gt box keeps its best anchors; 1000 candidates per level before NMS.
    return LibraRetinaNet(
        backbone,
        num_classes=num_outputs,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        anchor_generator=anchors,
        head=head,
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
    )


def _c5_channels(backbone_name: str) -> int:
    """Channels of the backbone's last stage (C5), which P6 is computed from."""
    if backbone_name == "tiny":
        return TinyConvNet.widths[-1]
    # torchvision's BasicBlock ResNets end in 512 channels, the Bottleneck ones (ResNeXt and
    # wide ResNets included) in 2048. An unknown name is build_backbone's ConfigError to raise.
    return 512 if backbone_name in ("resnet18", "resnet34") else 2048
