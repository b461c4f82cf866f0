"""Backbones with an FPN: torchvision's ResNet/ResNeXt family, and a tiny ConvNet for CPU runs.

Every builder returns torchvision's `BackboneWithFPN`: a module with `out_channels` whose forward
maps images [N, 3, H, W] to an ordered dict of feature maps [N, out_channels, H_l, W_l], finest
level first, which is the contract torchvision's detection heads expect.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from detectors.config import IMAGENET_PRETRAINED, ConfigError

RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)
BACKBONES = RESNETS + ("tiny",)
# pretrained names -> torchvision weight enums; "imagenet" keeps meaning torchvision's DEFAULT
# (IMAGENET1K_V2 where a V2 exists, as for ResNet-50; V1 for ResNet-18/34).
IMAGENET_WEIGHTS = dict(zip(IMAGENET_PRETRAINED, ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2")))
NORM_MODES = ("frozen", "frozen_stats")


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with its running statistics and never updates them, while
    its weight and bias stay trainable parameters: mmdetection's ResNet with `norm_eval=True`
    and `requires_grad=True`, the reference's backbone. Shapes: [N, C, H, W] -> same.

    torchvision's FrozenBatchNorm2d freezes the affine too (buffers, not parameters).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always the eval-mode formula, whatever model.train() says: batches of 2 images per GPU
        # give statistics too noisy to replace ImageNet's.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class TinyConvNet(nn.Module):
    """A narrow ResNet-like ConvNet (strides 4/8/16/32, widths 16/32/64/128) for CPU runs.

    Same stage names as torchvision's ResNet (`layer1`..`layer4`), so the FPN wiring is shared.
    About 0.3 M parameters against ResNet-18's 11 M: small enough to train from scratch on two
    CPU cores in minutes on the synthetic set, which is what it is for.
    """

    widths = (16, 32, 64, 128)

    def __init__(self, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()

        def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                norm_layer(c_out),
                nn.ReLU(inplace=True),
            )

        self.stem = conv_bn_relu(3, self.widths[0], stride=2)  # stride 2
        c_in = self.widths[0]
        for i, width in enumerate(self.widths):
            stride = 2  # layer1 -> stride 4, ..., layer4 -> stride 32
            stage = nn.Sequential(conv_bn_relu(c_in, width, stride), _ResidualBlock(width, norm_layer))
            self.add_module(f"layer{i + 1}", stage)
            c_in = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # used only through IntermediateLayerGetter
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm_layer(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _stage_channels(body: nn.Module) -> list[int]:
    """Output channels of layer1..layer4 (the C2..C5 maps)."""
    if isinstance(body, TinyConvNet):
        return list(body.widths)
    # torchvision ResNets: C2 has inplanes/8 * expansion; doubling per stage
    c5 = body.fc.in_features
    return [c5 // 8, c5 // 4, c5 // 2, c5]


def _load_weights(body: nn.Module, pretrained: str, name: str) -> None:
    """Fill `body` from torchvision's ImageNet weights (IMAGENET_WEIGHTS) or a local state-dict file."""
    if pretrained in IMAGENET_WEIGHTS:
        if name == "tiny":
            raise ConfigError(f"detector.pretrained: {pretrained!r} weights exist only for the ResNet family")
        weights = tv_resnet.__dict__[name](weights=imagenet_weights(name, pretrained)).state_dict()  # downloads once
    else:
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise ConfigError(
                f"detector.pretrained: {pretrained} is not a file; give a local weights file, "
                "'imagenet', or null for random initialisation"
            )
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (corrupt, truncated, or a pickle that could run code)
            # Never suggest weights_only=False (torch's advice): that would run the file's code.
            raise ConfigError(f"detector.pretrained: {pretrained} is not a readable weights file "
                              "holding only tensors; give a state-dict file, 'imagenet' or null") from None
        weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    missing, unexpected = body.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ConfigError(
            f"detector.pretrained: {pretrained} does not match backbone {name!r} "
            f"(missing {len(missing)} tensors, e.g. {missing[0]})"
        )


def imagenet_weights(name: str, pretrained: str):
    """The torchvision weights enum `pretrained` ('imagenet', 'imagenet_v1', 'imagenet_v2')
    names for backbone `name`; ConfigError when that version does not exist for it."""
    member = IMAGENET_WEIGHTS[pretrained]
    enum = get_model_weights(name)
    if member == "DEFAULT":
        return enum.DEFAULT
    if member not in enum.__members__:
        have = ", ".join(k for k, v in IMAGENET_WEIGHTS.items() if v in enum.__members__ or v == "DEFAULT")
        raise ConfigError(f"detector.pretrained: torchvision has no {member} weights for {name}; use one of {have}")
    return enum[member]


def build_backbone(
    name: str,
    *,
    fpn_channels: int = 256,
    pretrained: Optional[str] = None,
    norm: str = "frozen",
    trainable_layers: int = 5,
    returned_layers: tuple[int, ...] = (1, 2, 3, 4),
    extra_blocks: Optional[ExtraFPNBlock] = None,
) -> BackboneWithFPN:
    """A backbone + FPN returning one map per returned stage plus the extra block's maps.

    Args:
        name: one of BACKBONES.
        fpn_channels: channels of every FPN output map.
        pretrained: None for random initialisation (BatchNorm trains), 'imagenet' (torchvision's
            DEFAULT), 'imagenet_v1', 'imagenet_v2', or a local state-dict file (BatchNorm is then
            frozen as `norm` says, as is usual for fine-tuning).
        norm: with pretrained weights, "frozen" (FrozenBatchNorm2d: statistics and affine fixed)
            or "frozen_stats" (FrozenStatsBatchNorm2d: statistics fixed, affine trains).
        trainable_layers: stages trained, counted from the top (5 = all, 0 = none).
        returned_layers: stages (1..4 = C2..C5) fed to the FPN.
        extra_blocks: torchvision's extra FPN block; default a max-pooled "pool" level (P6).
    """
    if name not in BACKBONES:
        raise ConfigError(f"detector.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in NORM_MODES:
        raise ValueError(f"build_backbone: norm must be one of {NORM_MODES}, got {norm!r}")
    # Frozen statistics only make sense for weights that already have them.
    if pretrained is None:
        norm_layer = nn.BatchNorm2d
    else:
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else FrozenStatsBatchNorm2d
    body = TinyConvNet(norm_layer) if name == "tiny" else tv_resnet.__dict__[name](weights=None, norm_layer=norm_layer)
    if pretrained is not None:
        _load_weights(body, pretrained, name)

    # Freeze the lowest stages, as torchvision does when fine-tuning.
    trainable = ["layer4", "layer3", "layer2", "layer1", "stem" if name == "tiny" else "conv1"][:trainable_layers]
    if trainable_layers == 5 and name != "tiny":
        trainable.append("bn1")
    for param_name, param in body.named_parameters():
        if not any(param_name.startswith(prefix) for prefix in trainable):
            param.requires_grad_(False)

    channels = _stage_channels(body)
    return_layers = OrderedDict((f"layer{k}", str(i)) for i, k in enumerate(returned_layers))
    return BackboneWithFPN(
        body,
        return_layers=return_layers,
        in_channels_list=[channels[k - 1] for k in returned_layers],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
    )
