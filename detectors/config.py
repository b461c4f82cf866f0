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
    instance_balanced_pos: bool = False  # draw about equally many positives per ground-truth box

    def validate(self, where: str) -> None:
        if self.num_bins < 1:
            raise ConfigError(f"{where}.num_bins must be >= 1, got {self.num_bins}")
        if not (self.floor_thr == -1.0 or 0.0 <= self.floor_thr < 1.0):
            raise ConfigError(f"{where}.floor_thr must be -1 or in [0, 1), got {self.floor_thr}")
        if not 0.0 <= self.floor_fraction <= 1.0:
            raise ConfigError(f"{where}.floor_fraction must be in [0, 1], got {self.floor_fraction}")


@dataclass(frozen=True)
class BalancedFeaturePyramidConfig:
    enabled: bool = True
    refine_level: int = 2  # index into the FPN levels; 2 is P4 for Faster R-CNN (P2..P6)
    refine_type: Literal["non_local", "conv", "none"] = "non_local"


@dataclass(frozen=True)
class BalancedL1LossConfig:
    enabled: bool = True
    alpha: float = 0.5  # inlier gradient scale: dL/dx = alpha * ln(b|x| + 1) for |x| < beta
    gamma: float = 1.5  # outlier gradient bound: dL/dx = gamma for |x| >= beta
    beta: float = 1.0  # break point between the two branches, in encoded-target units

    def validate(self, where: str) -> None:
        for name in ("alpha", "gamma", "beta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be > 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------
# The detector.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorConfig:
    arch: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    # torchvision's ResNet/ResNeXt family ("resnet18" ... "resnext101_64x4d"), or "tiny":
    # a narrow four-stage ConvNet for CPU runs (see detectors/backbones.py).
    backbone: str = "resnet50"
    pretrained: Optional[str] = None  # None: random init | path to a local weights file | "imagenet"
    trainable_backbone_layers: int = 5  # of the backbone's 5 stages, counted from the top
    num_classes: int = 80  # without background
    min_size: int = 800  # images are resized by the model so the short side is this ...
    max_size: int = 1333  # ... unless the long side would exceed this
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per FPN level, smallest first
    # Region proposal network: proposals kept before and after NMS, per image.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    # Second stage (R-CNN): RoIs sampled per image and the box head's hidden width.
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    representation_size: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    # RetinaNet only: "group" puts GroupNorm(32) in the head's convs (torchvision's v2 head),
    # which a backbone trained from scratch needs; "none" is the original RetinaNet head.
    head_norm: Literal["none", "group"] = "none"
    iou_balanced_sampling: IoUBalancedSamplingConfig = field(default_factory=IoUBalancedSamplingConfig)
    balanced_feature_pyramid: BalancedFeaturePyramidConfig = field(
        default_factory=BalancedFeaturePyramidConfig
    )
    balanced_l1_loss: BalancedL1LossConfig = field(default_factory=BalancedL1LossConfig)

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
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ConfigError(f"{where}.trainable_backbone_layers must be in [0, 5]")
        if self.arch == "retinanet" and self.iou_balanced_sampling.enabled:
            raise ConfigError(
                f"{where}.iou_balanced_sampling.enabled: RetinaNet has no sampling step; "
                "set it to false (only the pyramid and the balanced L1 loss apply)"
            )
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

    @property
    def component_flags(self) -> dict[str, bool]:
        """The three switches, by short name: what an ablation table's check marks show."""
        return {
            "iou_balanced_sampling": self.iou_balanced_sampling.enabled,
            "balanced_feature_pyramid": self.balanced_feature_pyramid.enabled,
            "balanced_l1_loss": self.balanced_l1_loss.enabled,
        }


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
        for name in ("root", "train_images", "train_annotations", "val_images", "val_annotations"):
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

    def validate(self, where: str) -> None:
        for name in ("epochs", "batch_size", "base_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
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
