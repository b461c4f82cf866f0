"""Frozen configuration of one training run: the detector, the data and the schedule.

A run is described by the same nested mapping that study files use::

    detector: {arch: faster_rcnn, backbone: resnet50, ..., balanced_l1_loss: {enabled: true, ...}}
    data:     {kind: coco, train_images: ..., ...}
    schedule: {epochs: 12, batch_size: 2, ...}

`TrainConfig.from_dict` validates such a mapping: an unknown key or a wrong type raises
`ConfigError` naming the dotted key, so a user learns exactly what to fix.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message names the dotted key and the fix."""


# `detector.pretrained` values that name torchvision's ImageNet weights rather than a file.
IMAGENET_PRETRAINED = ("imagenet", "imagenet_v1", "imagenet_v2")


MAX_SEED = 2**32 - 1  # NumPy's seed range (the synthetic generator); torch accepts it too
MAX_IMAGE_SIDE = 8192  # pixels; a larger side cannot be trained on any current accelerator
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_range(where: str, value: Any, low: Any = None, high: Any = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """ConfigError `<where> must be in [low, high], got value` unless low <= value <= high.

    Open ends use ( and ); `optional` lets None through. NaN fails every range.
    """
    if value is None and optional:
        return
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if not (above and below):
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            allowed = f"{'<' if high_open else '<='} {high}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        suffix = " or null" if optional else ""
        raise ConfigError(f"{where} must be {allowed}{suffix}, got {value!r}")


def check_device(where: str, value: str) -> None:
    """ConfigError unless `value` is auto, cpu, cuda or cuda:N."""
    if not _DEVICE.fullmatch(value):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, got {value!r}")


# --------------------------------------------------------------------------------------------
# The three Libra components, each with its own switch and settings.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IoUBalancedSamplingConfig:
    enabled: bool = True
    num_bins: int = 3  # K in the paper; Table 4 finds 2, 3 and 5 within 0.1 AP
    floor_thr: float = -1.0  # -1: every negative goes into the bins; >= 0: IoU below it is the "floor" set
    floor_fraction: float = 0.0  # share of the negative budget drawn from the floor set
    # Top edge of the bins. None: the negatives' own max IoU (ours: K bins all hold negatives).
    # 1.0: the reference (max over all proposals incl. gts, edges 0, 1/3, 2/3, 1 at K = 3).
    bin_max: Optional[float] = None
    # IoU = 0 negatives: "in_bins" (ours; CVPR release 387fdb3: members of bin 0) or
    # "fill_only" (authors' code from Dec 2019, mmdetection v2: drawn only to fill shortfalls).
    zero_iou: Literal["in_bins", "fill_only"] = "in_bins"
    instance_balanced_pos: bool = False  # draw about equally many positives per ground-truth box

    def validate(self, where: str) -> None:
        if self.num_bins < 1:
            raise ConfigError(f"{where}.num_bins must be >= 1, got {self.num_bins}")
        if not (self.floor_thr == -1.0 or 0.0 <= self.floor_thr < 1.0):
            raise ConfigError(f"{where}.floor_thr must be -1 or in [0, 1), got {self.floor_thr}")
        if not 0.0 <= self.floor_fraction <= 1.0:
            raise ConfigError(f"{where}.floor_fraction must be in [0, 1], got {self.floor_fraction}")
        if self.bin_max is not None and not max(self.floor_thr, 0.0) < self.bin_max <= 1.0:
            raise ConfigError(
                f"{where}.bin_max must be null or in (max(floor_thr, 0), 1], got {self.bin_max}; "
                "1.0 is the reference's top edge"
            )


@dataclass(frozen=True)
class BalancedFeaturePyramidConfig:
    enabled: bool = True
    refine_level: int = 2  # index into the FPN levels; 2 is P4 for Faster R-CNN (P2..P6)
    refine_type: Literal["non_local", "conv", "none"] = "non_local"
    # "identity" (ours): the non-local block starts as the identity (zero output conv), so the
    # neck leaves a pretrained pyramid unchanged at step 0. "xavier": the reference (CVPR
    # release and mmdetection's BFP.init_weights): xavier-uniform on every conv of the BFP,
    # the non-local block's included, which then does not start as the identity.
    init: Literal["identity", "xavier"] = "identity"


@dataclass(frozen=True)
class BalancedL1LossConfig:
    enabled: bool = True
    alpha: float = 0.5  # inlier gradient scale: dL/dx = alpha * ln(b|x| + 1) for |x| < beta
    gamma: float = 1.5  # outlier gradient bound: dL/dx = gamma for |x| >= beta
    beta: float = 1.0  # break point between the two branches, in encoded-target units
    # How beta enters (detectors.losses.balanced_l1_loss): "scaled" is beta * L(x / beta),
    # continuous in value and gradient (ours); "reference" puts beta inside the log as the
    # authors' code and mmdetection do (its gradient jumps at |x| = beta unless beta = 1).
    # The two agree exactly at beta = 1, the R-CNN setting; RetinaNet's beta 0.11 tells them apart.
    formulation: Literal["scaled", "reference"] = "scaled"

    def validate(self, where: str) -> None:
        for name in ("alpha", "gamma", "beta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class BoxLossConfig:
    """Faster R-CNN's second-stage box loss when `balanced_l1_loss.enabled` is false (RetinaNet: retinanet_*).

    `balanced_l1_loss.enabled` stays the one switch an ablation flips (Table 2's grid): on, the
    R-CNN head uses balanced L1 with that section's alpha, gamma, beta; off, it uses `type` here.
    `type: balanced_l1` only restates the switch, so it is an error unless the switch is on.
    `loss_weight` scales whichever loss is active (Table 6's "loss weight 1.5 / 2.0" rows).
    """

    # smooth_l1: torchvision's default at beta 1/9; the CVPR release / mmdet v1 use beta 1.0.
    # l1: mmdetection v2's baseline. balanced_l1: see the class docstring.
    type: Literal["smooth_l1", "l1", "balanced_l1"] = "smooth_l1"
    beta: float = 1.0 / 9.0  # smooth L1's break point (encoded-target units); unused by l1
    loss_weight: float = 1.0  # multiplies the R-CNN box loss (the lambda of the paper's eq. 6)

    def validate(self, where: str) -> None:
        if not self.beta > 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        if not self.loss_weight > 0:
            raise ConfigError(f"{where}.loss_weight must be > 0, got {self.loss_weight}")


# --------------------------------------------------------------------------------------------
# The detector.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorConfig:
    # faster_rcnn: end to end (RPN + R-CNN). fast_rcnn: the paper's ablation protocol, the R-CNN
    # stage alone on proposals read from data.proposals (no RPN built). retinanet: one-stage.
    arch: Literal["faster_rcnn", "fast_rcnn", "retinanet"] = "faster_rcnn"
    # torchvision's ResNet/ResNeXt family ("resnet18" ... "resnext101_64x4d"), or "tiny":
    # a narrow four-stage ConvNet for CPU runs (see detectors/backbones.py).
    backbone: str = "resnet50"
    # None: random init | a local weights file | "imagenet": torchvision's DEFAULT weights
    # (IMAGENET1K_V2 for ResNet-50, 80.9% top-1) | "imagenet_v1": IMAGENET1K_V1 (76.1%, what the
    # reference and torchvision's own detectors start from) | "imagenet_v2": IMAGENET1K_V2.
    pretrained: Optional[str] = None
    # BatchNorm of a pretrained backbone: "frozen" (ours: statistics and affine frozen,
    # torchvision's FrozenBatchNorm2d) | "frozen_stats" (the reference: statistics frozen,
    # weight and bias train, mmdetection's norm_eval with requires_grad). A randomly
    # initialised backbone always trains its BatchNorm.
    backbone_norm: Literal["frozen", "frozen_stats"] = "frozen"
    trainable_backbone_layers: int = 5  # of the backbone's 5 stages, counted from the top
    num_classes: int = 80  # without background
    min_size: int = 800  # images are resized by the model so the short side is this ...
    max_size: int = 1333  # ... unless the long side would exceed this
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per FPN level, smallest first
    # Region proposal network: proposals kept before and after NMS, per image. Under fast_rcnn
    # the post-NMS numbers are the proposals per image read from data.proposals (the best
    # scored first; the reference: 2000 train, 1000 test) and the pre-NMS ones are unused;
    # `libra proposals` writes that many per image.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    # RPN sampling, the reference's options (detectors/rpn.py). neg_pos_ub: at most this many
    # negatives per positive drawn (< 0: no cap, torchvision and the reference's baseline; 5 in
    # every Libra config). allowed_border: anchors crossing the image border by more than this
    # many pixels are ignored in training (< 0: all anchors, torchvision and the Libra configs;
    # 0 in the CVPR release's / mmdet v1's baseline config).
    rpn_neg_pos_ub: float = -1.0
    rpn_allowed_border: int = -1
    # Second stage (R-CNN): RoIs sampled per image and the box head's hidden width.
    roi_batch_size_per_image: int = 512
    # The ground-truth boxes join the proposals in training (the reference's add_gt_as_proposals,
    # torchvision's fixed behaviour); false trains on the given proposals alone.
    add_gt_as_proposals: bool = True
    roi_positive_fraction: float = 0.25
    representation_size: int = 1024
    # Box head init: "torchvision" (nn.Linear defaults) | "reference" (CVPR release: xavier-
    # uniform fc6/fc7, classifier normal(0, 0.01), regressor normal(0, 0.001), biases 0).
    box_head_init: Literal["torchvision", "reference"] = "torchvision"
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    # RetinaNet only: "group" puts GroupNorm(32) in the head's convs (torchvision's v2 head),
    # which a backbone trained from scratch needs; "none" is the original RetinaNet head.
    head_norm: Literal["none", "group"] = "none"
    # RetinaNet only, the reference's details (docs/fidelity.md, R2-R4). The box loss when
    # balanced_l1_loss is off: "l1" (torchvision, mmdet v2) or "smooth_l1" at
    # retinanet_smooth_l1_beta (mmdet v1 / the paper's RetinaNet baseline: 0.11).
    retinanet_box_loss: Literal["l1", "smooth_l1"] = "l1"
    retinanet_smooth_l1_beta: float = 0.11
    # "per_image" (torchvision: sum / #fg per image, mean over images) | "batch" (the reference:
    # sum / #fg over the whole batch).
    retinanet_box_loss_norm: Literal["per_image", "batch"] = "per_image"
    # P7 = conv(relu(P6)) (torchvision) when true; false: conv(P6), the CVPR release / mmdet v1.
    retinanet_p7_relu: bool = True
    iou_balanced_sampling: IoUBalancedSamplingConfig = field(default_factory=IoUBalancedSamplingConfig)
    balanced_feature_pyramid: BalancedFeaturePyramidConfig = field(
        default_factory=BalancedFeaturePyramidConfig
    )
    balanced_l1_loss: BalancedL1LossConfig = field(default_factory=BalancedL1LossConfig)
    box_loss: BoxLossConfig = field(default_factory=BoxLossConfig)  # R-CNN baseline box loss and weight

    def validate(self, where: str) -> None:
        positive = ("num_classes", "min_size", "max_size", "fpn_channels", "representation_size",
                    "roi_batch_size_per_image", "box_detections_per_img")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_size", "max_size"):
            check_range(f"{where}.{name}", getattr(self, name), 1, MAX_IMAGE_SIDE)
        for name in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                     "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"):
            check_range(f"{where}.{name}", getattr(self, name), 1)
        for i, size in enumerate(self.anchor_sizes):
            check_range(f"{where}.anchor_sizes[{i}]", size, 1)
        check_range(f"{where}.box_score_thresh", self.box_score_thresh, 0.0, 1.0)
        check_range(f"{where}.box_nms_thresh", self.box_nms_thresh, 0.0, 1.0, low_open=True)
        if not 0.0 < self.roi_positive_fraction <= 1.0:
            raise ConfigError(f"{where}.roi_positive_fraction must be in (0, 1]")
        if not (self.rpn_neg_pos_ub == -1.0 or self.rpn_neg_pos_ub > 0):
            raise ConfigError(f"{where}.rpn_neg_pos_ub must be -1 (no cap) or > 0, got {self.rpn_neg_pos_ub}")
        if self.rpn_allowed_border < -1:
            raise ConfigError(
                f"{where}.rpn_allowed_border must be -1 (every anchor) or >= 0 pixels, got {self.rpn_allowed_border}"
            )
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ConfigError(f"{where}.trainable_backbone_layers must be in [0, 5]")
        if self.arch == "retinanet" and self.iou_balanced_sampling.enabled:
            raise ConfigError(
                f"{where}.iou_balanced_sampling.enabled: RetinaNet has no sampling step; "
                "set it to false (only the pyramid and the balanced L1 loss apply)"
            )
        if self.backbone_norm == "frozen_stats" and self.pretrained is None:
            raise ConfigError(
                f"{where}.backbone_norm: frozen_stats freezes pretrained statistics, but "
                f"{where}.pretrained is null; set pretrained, or backbone_norm: frozen"
            )
        if not self.retinanet_smooth_l1_beta > 0:
            raise ConfigError(f"{where}.retinanet_smooth_l1_beta must be > 0, got {self.retinanet_smooth_l1_beta}")
        if self.head_norm == "group" and self.fpn_channels % 32:
            raise ConfigError(f"{where}.head_norm: group needs fpn_channels divisible by 32, got {self.fpn_channels}")
        num_levels = 5  # P2..P6 for Faster R-CNN, P3..P7 for RetinaNet
        if len(self.anchor_sizes) != num_levels:
            raise ConfigError(f"{where}.anchor_sizes needs {num_levels} sizes, one per FPN level")
        if not 0 <= self.balanced_feature_pyramid.refine_level < num_levels:
            raise ConfigError(
                f"{where}.balanced_feature_pyramid.refine_level must be in [0, {num_levels - 1}]"
            )
        self.iou_balanced_sampling.validate(f"{where}.iou_balanced_sampling")
        self.balanced_l1_loss.validate(f"{where}.balanced_l1_loss")
        self.box_loss.validate(f"{where}.box_loss")
        if self.box_loss.type == "balanced_l1" and not self.balanced_l1_loss.enabled:
            raise ConfigError(
                f"{where}.box_loss.type is balanced_l1 but {where}.balanced_l1_loss.enabled is false; "
                "the switch decides: set balanced_l1_loss.enabled: true, or box_loss.type to the "
                "baseline loss (smooth_l1 or l1)"
            )

    @property
    def rcnn_box_loss(self) -> str:
        """The R-CNN box loss this config trains with: "balanced_l1", "smooth_l1" or "l1"."""
        return "balanced_l1" if self.balanced_l1_loss.enabled else self.box_loss.type

    @property
    def component_flags(self) -> dict[str, bool]:
        """Each component's switch, by name (detectors/components.py): the table's check marks."""
        from detectors.components import components

        return {c.name: c.enabled(self) for c in components()}


# --------------------------------------------------------------------------------------------
# Data and schedule.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticDataConfig:
    """The synthetic COCO-format set, generated once into `DataConfig.root` and reused."""

    num_train: int = 200
    num_val: int = 50
    image_size: int = 256
    seed: int = 0

    def validate(self, where: str) -> None:
        check_range(f"{where}.num_train", self.num_train, 1)
        check_range(f"{where}.num_val", self.num_val, 1)
        check_range(f"{where}.image_size", self.image_size, 32, 4096)  # the generator's floor; 4K px
        check_range(f"{where}.seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True)
class DataConfig:
    # coco: the four paths below point at any COCO-format set (COCO 2017 or a user's own).
    # synthetic: the set is generated under `root` (default: a cache folder) from `synthetic`.
    kind: Literal["coco", "synthetic"] = "synthetic"
    root: Optional[str] = None
    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    horizontal_flip: float = 0.5  # probability, training only
    num_workers: int = 0  # DataLoader worker processes
    max_val_images: Optional[int] = None  # evaluate on the first N validation images only
    # Pre-computed proposals of both splits (a folder written by `libra proposals`), keyed by
    # image id; read by detector.arch fast_rcnn only.
    proposals: Optional[str] = None
    # Training leaves out images without a (non-crowd) box, as the reference does; false keeps
    # them (ours: the RPN and R-CNN then learn pure background from them). Validation keeps all.
    skip_images_without_boxes: bool = False

    def validate(self, where: str) -> None:
        if self.kind == "coco":
            for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
                if getattr(self, name) is None:
                    raise ConfigError(f"{where}.{name} is required when {where}.kind is coco")
        if not 0.0 <= self.horizontal_flip <= 1.0:
            raise ConfigError(f"{where}.horizontal_flip must be a probability in [0, 1]")
        check_range(f"{where}.num_workers", self.num_workers, 0)
        check_range(f"{where}.max_val_images", self.max_val_images, 1, optional=True)
        if self.kind == "synthetic":
            self.synthetic.validate(f"{where}.synthetic")

    def resolved(self, base_dir: str) -> "DataConfig":
        """The same config with every relative path made absolute against `base_dir`.

        Ray workers change their working directory, so paths must be absolute before a run
        leaves the process that read the file.
        """
        changes = {}
        for name in ("root", "train_images", "train_annotations", "val_images", "val_annotations", "proposals"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training recipe. Defaults are the paper's 1x schedule (mmdetection v1)."""

    epochs: int = 12
    batch_size: int = 2  # images per worker per step
    # Learning rate: `lr` if given, else base_lr scaled linearly by the total batch
    # (batch_size * workers) over base_batch_size -- the linear scaling rule.
    lr: Optional[float] = None
    base_lr: float = 0.02
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: Optional[float] = 35.0  # max gradient norm; None disables clipping
    amp: bool = True  # mixed precision; only takes effect on CUDA
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default
    max_iters_per_epoch: Optional[int] = None  # cut epochs short (benchmarks, smoke tests)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    # Images per evaluation batch; None: batch_size. The reference tests one image per GPU:
    # in larger batches the padding to the largest image enters the BFP's global pooling.
    eval_batch_size: Optional[int] = None
    # Bootstrap resamples of the validation images at the last evaluation (0: none): logs
    # bbox_mAP_boot_sd, the evaluation noise `libra report` sets beside the seed-to-seed noise.
    eval_bootstrap: int = 0
    # torch.use_deterministic_algorithms (warn-only) and cuDNN's deterministic mode. CPU runs
    # here are bit-identical without it; on CUDA it removes what it can (cuDNN's algorithm
    # choice, index ops) and warns on ops with no deterministic kernel (roi_align backward).
    deterministic: bool = False

    def validate(self, where: str) -> None:
        for name in ("epochs", "batch_size", "base_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"{where}.eval_batch_size must be >= 1 or null, got {self.eval_batch_size}")
        if self.warmup_iters < 0:
            raise ConfigError(f"{where}.warmup_iters must be >= 0")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"{where}.lr_steps must be increasing, got {list(self.lr_steps)}")
        # Every range a trial would otherwise trip over mid-run (a NaN loss, NumPy's seed check,
        # an empty epoch), checked here so `libra run --dry-run` and `libra train --dry-run` see it.
        check_range(f"{where}.lr", self.lr, 0.0, low_open=True, optional=True)
        check_range(f"{where}.base_lr", self.base_lr, 0.0, low_open=True)
        check_range(f"{where}.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range(f"{where}.weight_decay", self.weight_decay, 0.0)
        check_range(f"{where}.warmup_ratio", self.warmup_ratio, 0.0, 1.0, low_open=True)
        check_range(f"{where}.lr_gamma", self.lr_gamma, 0.0, low_open=True)
        for i, step in enumerate(self.lr_steps):
            check_range(f"{where}.lr_steps[{i}]", step, 0)
        check_range(f"{where}.grad_clip", self.grad_clip, 0.0, low_open=True, optional=True)
        check_range(f"{where}.seed", self.seed, 0, MAX_SEED)
        check_device(f"{where}.device", self.device)
        check_range(f"{where}.num_threads", self.num_threads, 1, optional=True)
        check_range(f"{where}.max_iters_per_epoch", self.max_iters_per_epoch, 1, optional=True)
        check_range(f"{where}.eval_bootstrap", self.eval_bootstrap, 0, 10000)

    @property
    def evaluation_batch_size(self) -> int:
        """Images per evaluation batch: eval_batch_size, else the training batch_size."""
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    def learning_rate(self, world_size: int = 1) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size * world_size / self.base_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs: what a study trial hands to `detectors.engine.fit`."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "") -> "TrainConfig":
        """Validate a nested mapping (e.g. parsed YAML) into a config; raises ConfigError."""
        cfg = from_mapping(cls, mapping, where)
        detector_map = mapping.get("detector") or {}
        sampling_map = detector_map.get("iou_balanced_sampling") or {}
        if cfg.detector.arch == "retinanet" and "enabled" not in sampling_map:
            # The sampler's default is on for Faster R-CNN; a RetinaNet has no sampling step,
            # so only an explicit `enabled: true` is a mistake worth an error.
            cfg = dataclasses.replace(cfg, detector=dataclasses.replace(
                cfg.detector,
                iou_balanced_sampling=dataclasses.replace(
                    cfg.detector.iou_balanced_sampling, enabled=False)))
        cfg.detector.validate(_join(where, "detector"))
        cfg.data.validate(_join(where, "data"))
        if cfg.data.proposals is not None and cfg.detector.arch != "fast_rcnn":
            raise ConfigError(
                f"{_join(where, 'data.proposals')} is set but {_join(where, 'detector.arch')} is "
                f"{cfg.detector.arch}, which makes its own proposals; set detector.arch: fast_rcnn "
                "to train on the files, or remove data.proposals")
        cfg.schedule.validate(_join(where, "schedule"))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A plain nested mapping (tuples become lists) that `from_dict` reads back."""
        return to_plain(self)


# --------------------------------------------------------------------------------------------
# Mapping <-> dataclass with type checks that name the key.
# --------------------------------------------------------------------------------------------
def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this file, not user error


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `mapping`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        key = _join(where, str(unknown[0]))
        raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in mapping.items()}
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Dotted keys ("detector.min_size"): how study files and --set name a setting.
# --------------------------------------------------------------------------------------------
def unwrap_optional(tp: Any) -> Any:
    """Optional[X] -> X; any other type unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config dataclass -> its type ("detector.min_size" -> int)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        inner = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            out.update(config_keys(inner, key + "."))
        else:
            out[key] = hints[f.name]
    return out


def config_sections(cls: type = TrainConfig, prefix: str = "") -> set[str]:
    """The dotted names of the nested blocks ("detector", "detector.balanced_l1_loss", ...)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            out.add(prefix + f.name)
            out |= config_sections(inner, prefix + f.name + ".")
    return out


def check_dotted_key(key: Any) -> Optional[str]:
    """Why `key` is not a settable TrainConfig key (one line naming the valid ones), or None."""
    if not isinstance(key, str):
        return f"keys are dotted config names like detector.min_size, got {key!r}"
    keys = config_keys()
    if key in keys:
        return None
    if key in config_sections():
        first = next(k for k in keys if k.startswith(key + "."))
        return f"{key} is a section; name one of its settings, e.g. {first}"
    parent = key.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    if siblings:
        return f"unknown key; valid keys under {parent}: {', '.join(siblings)}"
    return "unknown key; dotted keys start with detector., data. or schedule."


def type_word(tp: Any) -> str:
    """A setting's type in words, for messages: "float", "one of 'conv', 'none'"."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
