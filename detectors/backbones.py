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
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from detectors.config import ConfigError

RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)
BACKBONES = RESNETS + ("tiny",)


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
    """Fill `body` from 'imagenet' (torchvision's download) or a local state-dict file."""
    if pretrained == "imagenet":
        if name == "tiny":
            raise ConfigError("detector.pretrained: 'imagenet' weights exist only for the ResNet family")
        weights = tv_resnet.__dict__[name](weights="DEFAULT").state_dict()  # downloads once
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


def build_backbone(
    name: str,
    *,
    fpn_channels: int = 256,
    pretrained: Optional[str] = None,
    trainable_layers: int = 5,
    returned_layers: tuple[int, ...] = (1, 2, 3, 4),
    extra_blocks: Optional[ExtraFPNBlock] = None,
) -> BackboneWithFPN:
    """A backbone + FPN returning one map per returned stage plus the extra block's maps.

    Args:
        name: one of BACKBONES.
        fpn_channels: channels of every FPN output map.
        pretrained: None for random initialisation (BatchNorm trains), 'imagenet', or a local
            state-dict file (BatchNorm is then frozen, as is usual for fine-tuning).
        trainable_layers: stages trained, counted from the top (5 = all, 0 = none).
        returned_layers: stages (1..4 = C2..C5) fed to the FPN.
        extra_blocks: torchvision's extra FPN block; default a max-pooled "pool" level (P6).
    """
    if name not in BACKBONES:
        raise ConfigError(f"detector.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    # Frozen statistics only make sense for weights that already have them.
    norm_layer = FrozenBatchNorm2d if pretrained is not None else nn.BatchNorm2d
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
