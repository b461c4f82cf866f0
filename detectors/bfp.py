"""The Balanced Feature Pyramid neck of Libra R-CNN, its non-local refiner and a backbone wrapper.

The feature-level balance: every FPN level is rescaled to one middle level, the levels are
averaged, the average is refined, and the result is scaled back and added to every level, so
each level receives the same mix of low- and high-level information (paper Sec. 3.2, Table 5:
integration alone +0.4 AP, with the non-local refiner +0.9 AP).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NonLocalBlock2d", "BalancedFeaturePyramid", "BackboneWithBFP"]

REFINE_TYPES = ("non_local", "conv", "none")

Features = Union[Mapping[str, Tensor], Sequence[Tensor]]


class NonLocalBlock2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a residual connection.

    y = x + W_out * (softmax(theta(x)^T phi(x)) g(x)), where theta, phi, g and W_out are 1x1
    convolutions and the softmax runs over all H*W positions, without the 1/sqrt(d) scaling
    (as in Libra R-CNN). The attention is computed by `F.scaled_dot_product_attention` with
    scale=1, so a fused kernel runs (flash / memory-efficient on a GPU, the flash kernel on the
    CPU) and the [N, H*W, H*W] matrix (about 70 MB per image in fp32 at P4 of an 800x1333 image,
    50x84 positions) is never materialised in the forward pass.

    Args:
        channels: C, the input and output channels.
        inner_channels: channels of theta, phi and g; default C (reduction 1, as in Libra R-CNN).

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, channels: int, inner_channels: int | None = None) -> None:
        super().__init__()
        inner_channels = channels if inner_channels is None else inner_channels
        if channels < 1 or inner_channels < 1:
            raise ValueError(
                f"NonLocalBlock2d: channels and inner_channels must be >= 1, "
                f"got {channels} and {inner_channels}"
            )
        self.theta = nn.Conv2d(channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner_channels, kernel_size=1)
        self.g = nn.Conv2d(channels, inner_channels, kernel_size=1)
        self.out = nn.Conv2d(inner_channels, channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small embeddings keep the initial attention close to uniform, so early training does not
        # lock onto a few positions; the zero output conv makes the whole block the identity at
        # init, so inserting it leaves a pretrained pyramid's features unchanged at step 0.
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # SDPA wants [N, positions, channels] with unit stride on channels (a transposed view
        # sends it to the unfused math path), so the 1x1 convolutions run as linear maps on the
        # positions-first layout: one transpose in, one out, and no im2col for the convs.
        seq = x.flatten(2).transpose(1, 2).contiguous()  # [N, HW, C]
        theta, phi, g = (
            F.linear(seq, conv.weight.flatten(1), conv.bias)  # [N, HW, C']
            for conv in (self.theta, self.phi, self.g)
        )
        # scale=1.0: the paper's unscaled dot product (SDPA's default would divide by sqrt(C')).
        y = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)  # [N, HW (query), C']
        y = F.linear(y, self.out.weight.flatten(1), self.out.bias)  # [N, HW, C]
        return x + y.transpose(1, 2).reshape(n, c, h, w)  # [N, C, H, W]


class BalancedFeaturePyramid(nn.Module):
    """Balanced Feature Pyramid: rescale, integrate, refine, strengthen.

    Args:
        in_channels: C, the channels of every pyramid level (the FPN's out_channels).
        num_levels: L, how many levels the input has (5 for torchvision's FPN: "0".."3", "pool").
        refine_level: index in [0, L) of the level whose size the levels are integrated at;
            2 is P4 for Faster R-CNN's P2..P6 (1 is P4 for RetinaNet's P3..P7). Levels with a
            smaller index are the larger maps.
        refine_type: "non_local" (embedded-Gaussian non-local block), "conv" (3x3 conv + ReLU)
            or "none" (integration only).

    forward takes the ordered levels, an OrderedDict[str, Tensor] (torchvision's FPN output) or a
    list/tuple, each [N, C, H_l, W_l], finest first, and returns the same type with the same
    keys and shapes: level_l + resize(refine(mean_k resize(level_k))). Any map sizes work, odd
    ones included (e.g. 25x38, 13x19, 7x10, 4x5, 2x3): every resize goes to an exact size.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        refine_level: int = 2,
        refine_type: str = "non_local",
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"BalancedFeaturePyramid: in_channels must be >= 1, got {in_channels}")
        if num_levels < 1:
            raise ValueError(f"BalancedFeaturePyramid: num_levels must be >= 1, got {num_levels}")
        if not 0 <= refine_level < num_levels:
            raise ValueError(
                f"BalancedFeaturePyramid: refine_level must be in [0, {num_levels - 1}], "
                f"got {refine_level}"
            )
        if refine_type not in REFINE_TYPES:
            raise ValueError(
                f"BalancedFeaturePyramid: refine_type must be one of {REFINE_TYPES}, "
                f"got {refine_type!r}"
            )
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine_type = refine_type
        if refine_type == "non_local":
            self.refine: nn.Module = NonLocalBlock2d(in_channels)
        elif refine_type == "conv":
            conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
            # Xavier rather than Kaiming: the refined map is added to every level, and a gain of
            # 1 keeps that residual at about the features' own scale instead of amplifying it.
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.refine = nn.Sequential(conv, nn.ReLU(inplace=True))
        else:
            self.refine = nn.Identity()

    def forward(self, features: Features) -> Features:
        if isinstance(features, Mapping):
            names = list(features.keys())
            levels = list(features.values())
        elif isinstance(features, (list, tuple)):
            names = None
            levels = list(features)
        else:
            raise TypeError(
                f"BalancedFeaturePyramid: expected an OrderedDict or a list of tensors, "
                f"got {type(features).__name__}"
            )
        if len(levels) != self.num_levels:
            raise ValueError(
                f"BalancedFeaturePyramid: built for {self.num_levels} levels, got {len(levels)}"
            )

        # 1. Gather (rescale): bring every level to the refine level's size; the larger (finer)
        # levels by max-pooling, which keeps their strongest responses, the smaller by nearest.
        # 2. Integrate: the balanced semantic features, an unweighted mean over levels, summed
        # level by level (no stacked copy), the nearest-upsampled levels by broadcasting.
        target = levels[self.refine_level]
        total = None
        for index, level in enumerate(levels):
            if index < self.refine_level:
                gathered = _resize(level, target.shape[-2:], shrink=True)
                total = gathered if total is None else total + gathered
            elif index == self.refine_level:
                total = level if total is None else total + level
            else:
                total = _add_upsampled(total, level)
        balanced = total / len(levels)  # [N, C, H_r, W_r]
        # 3. Refine.
        balanced = self.refine(balanced)
        # 4. Scatter (strengthen): the reverse resize back to each level, added as a residual.
        outputs = [
            _add_upsampled(level, balanced)
            if index < self.refine_level
            else level + _resize(balanced, level.shape[-2:], shrink=index > self.refine_level)
            for index, level in enumerate(levels)
        ]

        if names is not None:
            return OrderedDict(zip(names, outputs))
        return tuple(outputs) if isinstance(features, tuple) else outputs

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_levels={self.num_levels}, "
            f"refine_level={self.refine_level}, refine_type={self.refine_type!r}"
        )


def _resize(x: Tensor, size: Sequence[int], shrink: bool) -> Tensor:
    """[N, C, H, W] -> [N, C, *size]: max-pooling when `shrink`, else nearest.

    Shrinking by whole factors fh x fw is a max over fh x fw blocks (other ratios go to
    F.adaptive_max_pool2d, whose values and gradient, ties included, the whole-factor paths
    match). With gradients on the CPU it runs as _BlockMax, on a GPU as F.max_pool2d. Without
    gradients (inference) it runs as two reductions over views, the rows of each block first:
    the CPU's pooling kernels are scalar, and this is about 5x faster at P2 of the CPU
    configuration (its inner loop runs over a contiguous row of W values).
    """
    size = tuple(int(s) for s in size)
    height, width = x.shape[-2:]
    if (height, width) == size:
        return x
    if not shrink:
        return F.interpolate(x, size=size, mode="nearest")
    h, w = size
    if height % h or width % w:
        return F.adaptive_max_pool2d(x, size)
    fh, fw = height // h, width // w
    if torch.is_grad_enabled() and x.requires_grad:
        if x.device.type == "cpu":
            return _BlockMax.apply(x, fh, fw)
        return F.max_pool2d(x, kernel_size=(fh, fw), stride=(fh, fw))
    return x.unflatten(2, (h, fh)).amax(3).unflatten(3, (w, fw)).amax(4)


class _BlockMax(torch.autograd.Function):
    """F.max_pool2d(x, kernel = stride = (fh, fw)) on the CPU, about 2x faster forward + backward.

    The CPU's max-pooling kernel for contiguous (NCHW) maps is scalar; the one for channels-last
    maps is vectorised over channels, so the forward pools a channels-last copy (about 2x
    faster at P2 of the CPU configuration, the copy included). Its backward kernel is the slow
    one, so the backward is the contiguous kernel, given the forward's indices (flat positions
    in each H x W plane, the same in both layouts). Both kernels scan a window row by row and
    keep the first maximum (a NaN wins), so values, indices and gradients, ties included,
    equal F.max_pool2d's exactly (tests/detectors/test_bfp.py).
    Shapes: x [N, C, h*fh, w*fw] -> [N, C, h, w].
    """

    @staticmethod
    def forward(ctx, x: Tensor, fh: int, fw: int) -> Tensor:
        pooled, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), (fh, fw), (fh, fw),
                                       return_indices=True)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.factors = (fh, fw)
        return pooled.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        kernel = list(ctx.factors)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, kernel, kernel, [0, 0], [1, 1], False, indices)
        return grad_x, None, None


class _AddNearestUpsampled(torch.autograd.Function):
    """base + small repeated in fh x fw blocks, with a hand-written backward.

    Autograd's backward of a broadcast add reduces the gradient over two strided dimensions at
    once, the slowest reduction the CPU has; the hand-written block sum (rows, then strided
    columns) is about 6x faster than that at P2 of the CPU configuration, and 2x faster than
    avg_pool2d with divisor 1; base's gradient passes through uncopied.
    Shapes: base [N, C, h*fh, w*fw], small [N, C, h, w] -> [N, C, h*fh, w*fw].
    """

    @staticmethod
    def forward(ctx, base: Tensor, small: Tensor, fh: int, fw: int) -> Tensor:
        ctx.factors = (fh, fw)
        n, c, h, _ = small.shape
        # Repeat along the width first (a small copy, [N, C, h, W]), then broadcast over the fh
        # rows of each block: the add's inner loop runs over a contiguous W, about 4x faster on
        # the CPU than broadcasting a [N, C, h, fh, w, fw] view, where it runs over fw entries.
        rows = small.repeat_interleave(fw, dim=3)  # [N, C, h, W]
        blocks = base.reshape(n, c, h, fh, base.shape[-1]) + rows[:, :, :, None, :]
        return blocks.reshape(base.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        fh, fw = ctx.factors
        # The sum over each fh x fw block, the gradient of the repeat: the fh rows of each block
        # first (contiguous rows of W), then the fw columns as strided slices.
        rows = grad.unflatten(2, (grad.shape[2] // fh, fh)).sum(3)  # [N, C, h, W]
        grad_small = rows[..., 0::fw]
        for column in range(1, fw):
            grad_small = grad_small + rows[..., column::fw]  # [N, C, h, w]
        return grad, grad_small, None, None


def _add_upsampled(base: Tensor, small: Tensor) -> Tensor:
    """base + nearest-upsample(small to base's size): [N, C, H, W] + [N, C, h, w] -> [N, C, H, W].

    When H and W are whole multiples of h and w, nearest upsampling repeats each pixel in an
    fh x fw block, so the sum is a broadcast add (_AddNearestUpsampled): the upsampled map is
    never built (on the CPU F.interpolate's nearest alone costs more than the whole sum, forward
    and backward). Other ratios fall back to F.interpolate.
    """
    big_h, big_w = base.shape[-2:]
    h, w = small.shape[-2:]
    if big_h % h or big_w % w:
        return base + F.interpolate(small, size=(big_h, big_w), mode="nearest")
    if base.shape[:2] != small.shape[:2]:
        raise ValueError(f"_add_upsampled: {tuple(base.shape)} and {tuple(small.shape)} differ in N or C")
    return _AddNearestUpsampled.apply(base, small, big_h // h, big_w // w)


class BackboneWithBFP(nn.Module):
    """A torchvision backbone followed by a Balanced Feature Pyramid, usable as a backbone.

    Args:
        backbone: a module returning an OrderedDict[str, Tensor] of pyramid levels with an
            `out_channels` attribute (e.g. torchvision's BackboneWithFPN).
        bfp: a BalancedFeaturePyramid with in_channels == backbone.out_channels.

    Exposes the same `out_channels`, so torchvision's FasterRCNN and RetinaNet accept it.
    Shapes: images [N, 3, H, W] -> the backbone's OrderedDict, same keys and shapes.
    """

    def __init__(self, backbone: nn.Module, bfp: BalancedFeaturePyramid) -> None:
        super().__init__()
        out_channels = getattr(backbone, "out_channels", None)
        if out_channels is None:
            raise ValueError("BackboneWithBFP: the backbone has no `out_channels` attribute")
        if bfp.in_channels != out_channels:
            raise ValueError(
                f"BackboneWithBFP: bfp.in_channels ({bfp.in_channels}) must equal "
                f"backbone.out_channels ({out_channels})"
            )
        self.backbone = backbone
        self.bfp = bfp
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.bfp(self.backbone(x))


def xavier_init_(bfp: nn.Module) -> nn.Module:
    """Re-initialise every Conv2d under `bfp` with xavier-uniform weights and zero biases, the
    non-local block's included (`balanced_feature_pyramid.init: xavier`), and return `bfp`.

    This is the reference's init (the CVPR release's and mmdetection's BFP.init_weights run it
    over all of the neck's convs, overriding the non-local block's own zero output conv), so the
    block does not start as the identity there. Ours (NonLocalBlock2d.reset_parameters) does.
    """
    for module in bfp.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return bfp
