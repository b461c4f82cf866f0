"""Training-time augmentation: the transforms that move boxes together with the image.

Resizing is not here: the detector's own `GeneralizedRCNNTransform` resizes and normalises, so
the dataset hands it images at their stored size.
"""
from __future__ import annotations

from typing import Callable, Optional

from torchvision.transforms import v2


def training_transforms(horizontal_flip: float) -> Optional[Callable]:
    """The training augmentation: a horizontal flip with probability `horizontal_flip`.

    The returned callable takes and returns the same structure, e.g.
    ``(tv_tensors.Image [3, H, W], {"boxes": tv_tensors.BoundingBoxes [N, 4] XYXY, ...})``;
    transforms.v2 recognises the BoundingBoxes (and their canvas size) and mirrors them with
    the pixels, leaving plain tensors such as labels untouched. Returns None when the
    probability is 0, so the dataset skips the tv_tensor wrapping altogether.
    """
    if not 0.0 <= horizontal_flip <= 1.0:
        raise ValueError(f"horizontal_flip must be a probability in [0, 1], got {horizontal_flip}")
    if horizontal_flip == 0.0:
        return None
    return v2.Compose([v2.RandomHorizontalFlip(p=horizontal_flip)])
