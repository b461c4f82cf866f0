"""From a DataConfig to the train and val datasets, and the collate function detection needs."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from detectors.config import DataConfig
from detectors.data.coco import CocoDetection
from detectors.data.errors import DatasetError
from detectors.data.synthetic import ensure_synthetic

_PATH_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Batch as lists: images differ in size, and the detector's transform batches them itself.

    [(image [3, H_i, W_i], target_i), ...] -> ([image_0, image_1, ...], [target_0, ...]).
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def _coco_paths(data_cfg: DataConfig, where: str) -> dict[str, str]:
    """The four user paths, each checked to exist; the error names the config key."""
    paths = {}
    for key in _PATH_KEYS:
        value = getattr(data_cfg, key)
        if value is None:
            raise DatasetError(f"{where}.{key} is required when {where}.kind is coco")
        must_be_dir = key.endswith("_images")
        exists = os.path.isdir(value) if must_be_dir else os.path.isfile(value)
        if not exists:
            kind = "folder" if must_be_dir else "file"
            problem = "is not a " + kind if os.path.exists(value) else "does not exist"
            raise DatasetError(f"{where}.{key}: {value} {problem}; point it at the {kind} "
                               "(relative paths are resolved against the study or config file)")
        paths[key] = value
    return paths


def check_data_paths(data_cfg: DataConfig, where: str = "data") -> None:
    """Raise DatasetError naming the key when a coco set's four paths are not there."""
    if data_cfg.kind == "coco":
        _coco_paths(data_cfg, where)


def check_not_empty(dataset: CocoDetection, split: str) -> None:
    """A split with no images, or no boxes to learn or score, fails late and obscurely; say so now."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.annotations_file} lists no images; the {split} split needs "
                           "at least one image record")
    if not dataset.num_boxes:
        raise DatasetError(f"{dataset.annotations_file} has no annotated boxes on its "
                           f"{len(dataset)} image(s); the {split} split needs at least one "
                           "(check that the annotations' image_id values match the images' id)")


def dataset_paths(data_cfg: DataConfig, where: str = "data") -> dict[str, str]:
    """The four paths (train/val images and annotations) of the set a DataConfig describes;
    a synthetic set is generated on first use."""
    if data_cfg.kind == "coco":
        return _coco_paths(data_cfg, where)
    if data_cfg.kind == "synthetic":
        return ensure_synthetic(data_cfg.root, data_cfg.synthetic)
    raise DatasetError(f"{where}.kind must be coco or synthetic, got {data_cfg.kind!r}")


def build_datasets(data_cfg: DataConfig, where: str = "data") -> tuple[CocoDetection, CocoDetection]:
    """The (train, val) datasets a DataConfig describes.

    kind "coco": the four paths as given (absolute after `DataConfig.resolved`). kind
    "synthetic": the cached synthetic set for `data_cfg.synthetic` under `data_cfg.root`,
    generated on first use. `max_val_images` keeps the first N validation images (sorted ids);
    the val dataset's `image_ids` then lists them, and evaluation must pass them on
    (`coco_box_eval(val.coco, results, image_ids=val.image_ids)`).

    With `data_cfg.proposals` each split carries its proposals (detectors.proposals), checked
    against its images.

    `where` is the dotted prefix used in error messages. Raises DatasetError naming the key or
    file on a missing path or a malformed annotation file (ProposalsError, a DatasetError, for
    a proposals folder that does not fit).
    """
    if data_cfg.max_val_images is not None and data_cfg.max_val_images < 1:
        raise DatasetError(f"{where}.max_val_images must be >= 1 or null, got {data_cfg.max_val_images}")
    paths = dataset_paths(data_cfg, where)
    train = CocoDetection(paths["train_images"], paths["train_annotations"],
                          train=True, horizontal_flip=data_cfg.horizontal_flip,
                          skip_images_without_boxes=data_cfg.skip_images_without_boxes)
    val = CocoDetection(paths["val_images"], paths["val_annotations"],
                        train=False, max_images=data_cfg.max_val_images)
    check_not_empty(train, "training")
    check_not_empty(val, "validation")
    if data_cfg.proposals is not None:
        # Checked now against every image, so a folder made for another set fails before training.
        from detectors.proposals import open_split

        train.proposals = open_split(data_cfg.proposals, "train", train.image_sizes())
        val.proposals = open_split(data_cfg.proposals, "val", val.image_sizes())
    if (train.label_to_cat_id, train.category_names) != (val.label_to_cat_id, val.category_names):
        # Labels are positions in the sorted category ids: differing lists would silently
        # evaluate class A's detections as class B.
        raise DatasetError(
            f"{paths['train_annotations']} and {paths['val_annotations']} list different "
            "categories; both splits need the same category ids and names"
        )
    return train, val
