"""Run a trained Faster R-CNN's RPN over a dataset and write its proposals (detectors.proposals).

What `libra proposals` does: the model in eval mode (no flips, the test-time resize), each
image's top proposals after NMS with their objectness, mapped back to the stored image's
pixels, written split by split with a progress bar.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes

from detectors.data.coco import CocoDetection
from detectors.data.loader import collate_detection
from detectors.proposals import SplitWriter


@torch.no_grad()
def rpn_proposals(model: nn.Module, images: list[Tensor], *, pre_nms_top_n: int,
                  post_nms_top_n: int) -> list[tuple[Tensor, Tensor]]:
    """Per image: (boxes [R, 4] xyxy in the input image's pixels, objectness [R] in [0, 1]),
    best first, R <= post_nms_top_n.

    `model` is a Faster R-CNN of detectors.build (GeneralizedRCNN). torchvision's RPN forward
    drops the scores, so this runs its parts (head, anchors, decoding, filter_proposals) the
    same way, in eval mode, with the given top-N counts.
    """
    model.eval()
    rpn = model.rpn
    # filter_proposals reads its counts from these (torchvision keeps them per mode).
    rpn._pre_nms_top_n = {"training": pre_nms_top_n, "testing": pre_nms_top_n}
    rpn._post_nms_top_n = {"training": post_nms_top_n, "testing": post_nms_top_n}
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(image_list, features)
    num_anchors_per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    decoded = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(decoded, objectness, image_list.image_sizes, num_anchors_per_level)
    out = []
    for b, s, resized, original in zip(boxes, scores, image_list.image_sizes, original_sizes):
        order = torch.argsort(s, descending=True, stable=True)
        out.append((resize_boxes(b[order], resized, original), s[order]))
    return out


def write_split(model: nn.Module, dataset: CocoDetection, folder: str, split: str, *, pre_nms_top_n: int,
                post_nms_top_n: int, device: torch.device, batch_size: int = 2,
                progress: Optional[Callable[[Iterator, int, str], Iterator]] = None) -> dict:
    """Write `split` of `folder` from `model`'s RPN over `dataset` (no augmentation).

    progress: wraps the batch iterator (e.g. a tqdm), given the iterator, its length and a label.
    Returns {"num_images", "num_proposals", "seconds"}.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    batches = iter(loader)
    if progress is not None:
        batches = progress(batches, len(loader), f"proposals {split}")
    start = time.perf_counter()
    num_images = num_proposals = 0
    with SplitWriter(folder, split) as writer:
        for images, targets in batches:
            results = rpn_proposals(model, [img.to(device) for img in images],
                                    pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n)
            for target, (boxes, scores) in zip(targets, results):
                writer.add(int(target["image_id"]), boxes.float().cpu().numpy(), scores.float().cpu().numpy())
                num_images += 1
                num_proposals += int(boxes.shape[0])
    return {"num_images": num_images, "num_proposals": num_proposals, "seconds": time.perf_counter() - start}
