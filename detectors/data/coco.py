"""The COCO-format detection dataset: a validated annotation file and its images in, tensors out.

Everything a user can get wrong in the annotation file (not JSON, missing sections, a malformed
record, a listed image that is not on disk) is found while the dataset is built, and reported as
one `DatasetError` line that names the file, the record and the fix: before training starts,
never from inside a DataLoader worker. Only a corrupt image file can still fail later, when it
is read; that error names the file too.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detectors.data.errors import DatasetError
from detectors.data.transforms import training_transforms

_REQUIRED_SECTIONS = ("images", "annotations", "categories")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_coco_json(annotations_file: str) -> dict:
    """Read a COCO annotation file; a missing, non-JSON or section-less file raises DatasetError."""
    if not os.path.isfile(annotations_file):
        raise DatasetError(
            f"annotation file {annotations_file} does not exist; check the path "
            "(a COCO-format JSON such as annotations/instances_val2017.json)"
        )
    try:
        with open(annotations_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{annotations_file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix or re-export the annotation file"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {annotations_file}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{annotations_file} holds a JSON {type(data).__name__}, not an object; a COCO "
            "annotation file is an object with 'images', 'annotations' and 'categories'"
        )
    missing = [key for key in _REQUIRED_SECTIONS if key not in data]
    if missing:
        raise DatasetError(
            f"{annotations_file} lacks {', '.join(repr(k) for k in missing)}; a COCO detection "
            "file needs the lists 'images', 'annotations' and 'categories' (an image-info file "
            "without annotations cannot be trained or evaluated on)"
        )
    for key in _REQUIRED_SECTIONS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{annotations_file}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


class CocoDetection(Dataset):
    """Any COCO-format detection set (COCO 2017 as is, or a user's own) as (image, target) pairs.

    Category ids need not be contiguous: the sorted category ids become labels 1..num_classes,
    and 0 stays background (torchvision's convention).

    Args:
        images_dir: folder the records' `file_name`s are relative to.
        annotations_file: the COCO JSON.
        train: apply the training augmentation (horizontal flip).
        horizontal_flip: flip probability when `train` is true.
        max_images: keep only the first N images in dataset order (sorted image ids); None
            keeps all. `image_ids` then lists exactly the kept images, which is what
            evaluation must restrict itself to.
        skip_images_without_boxes: leave out images with no box left after crowd regions and
            degenerate boxes are dropped (the reference, for training); False keeps them.
        proposals: this split's pre-computed proposals (detectors.proposals.SplitProposals,
            checked against the images); each target then carries them, see below.

    Attributes:
        coco: the pycocotools COCO object over the whole file (evaluation needs it).
        image_ids: the dataset's image ids, in dataset order.
        cat_id_to_label / label_to_cat_id: the category id <-> label maps.
        num_classes: number of categories, without background.
        category_names: names in label order: `category_names[label - 1]`.

    Item `i` is ``(image, target)``: image float32 [3, H, W] RGB in [0, 1] at its stored size;
    target {"boxes": float32 [N, 4] xyxy in pixels, "labels": int64 [N] in 1..num_classes,
    "image_id": int}. Crowd regions (iscrowd=1) are left out of the targets (COCOeval handles
    them itself); images without boxes are kept, with boxes of shape [0, 4]. With `proposals`
    the target also holds "proposals": float32 [R, 4] xyxy in the same pixels (flipped with the
    image), best first.
    """

    def __init__(
        self,
        images_dir: str,
        annotations_file: str,
        *,
        train: bool,
        horizontal_flip: float = 0.5,
        max_images: Optional[int] = None,
        skip_images_without_boxes: bool = False,
        proposals: Any = None,
    ) -> None:
        self.images_dir = str(images_dir)
        self.annotations_file = str(annotations_file)
        self.train = train
        self._transforms = training_transforms(horizontal_flip) if train else None
        self.proposals = proposals

        data = load_coco_json(self.annotations_file)
        categories = self._validate_categories(data["categories"])
        images = self._validate_images(data["images"])
        self._validate_annotations(data["annotations"], images, categories)

        cat_ids = sorted(categories)
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.num_classes: int = len(cat_ids)
        self.category_names: list[str] = [categories[cid] for cid in cat_ids]

        # Validated first, so pycocotools' asserts and KeyErrors cannot fire; its prints go nowhere.
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()

        image_ids = sorted(images)
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
            image_ids = image_ids[:max_images]
        self.image_ids: list[int] = image_ids
        self._image_info = {i: images[i] for i in image_ids}
        self._check_files_exist()
        self._targets = self._build_targets()
        if skip_images_without_boxes:
            # The reference trains only on images with at least one non-crowd box (mmdetection's
            # _filter_imgs, then `if len(gt_bboxes) == 0: return None`): about 1% of train2017.
            self.image_ids = [i for i in self.image_ids if len(self._targets[i][0])]

    # ----------------------------------------------------------------------------------------
    # Validation of the JSON records.
    # ----------------------------------------------------------------------------------------
    def _fail(self, record: str, problem: str) -> DatasetError:
        return DatasetError(f"{record} in {self.annotations_file}: {problem}; fix or remove the record")

    def _validate_categories(self, records: list) -> dict[int, str]:
        """{category id: name}; a record without an integer id raises DatasetError."""
        categories: dict[int, str] = {}
        for index, cat in enumerate(records):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise self._fail(f"categories[{index}]", "a category needs an integer 'id'")
            if cat["id"] in categories:
                raise self._fail(f"category id {cat['id']}", "the id is used twice")
            categories[cat["id"]] = str(cat.get("name", cat["id"]))
        if not categories:
            raise DatasetError(f"{self.annotations_file} has no categories; add at least one")
        return categories

    def _validate_images(self, records: list) -> dict[int, dict]:
        """{image id: record}; each needs id, file_name, and positive width and height."""
        images: dict[int, dict] = {}
        for index, img in enumerate(records):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise self._fail(f"images[{index}]", "an image record needs an integer 'id'")
            where = f"image id {img['id']}"
            if img["id"] in images:
                raise self._fail(where, "the id is used twice")
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise self._fail(where, "an image record needs a 'file_name'")
            for key in ("width", "height"):
                if not _is_number(img.get(key)) or img[key] <= 0:
                    raise self._fail(where, f"an image record needs a positive '{key}' in pixels")
            images[img["id"]] = img
        return images

    def _validate_annotations(self, records: list, images: dict, categories: dict) -> None:
        """Check every record; fill in `area` and `iscrowd` where absent (COCOeval reads both)."""
        seen_ids: set[int] = set()
        for index, ann in enumerate(records):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                raise self._fail(f"annotations[{index}]", "an annotation needs an integer 'id'")
            where = f"annotation id {ann['id']}"
            if ann["id"] == 0:
                # COCOeval marks an unmatched box with id 0, so id 0 would silently never match.
                raise self._fail(where, "annotation ids must be >= 1 (COCOeval reserves 0)")
            if ann["id"] in seen_ids:
                raise self._fail(where, "the id is used twice")
            seen_ids.add(ann["id"])
            if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
                raise self._fail(where, f"image_id {ann.get('image_id')!r} is not in 'images'")
            if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
                raise self._fail(
                    where, f"category_id {ann.get('category_id')!r} is not in 'categories' "
                    f"(known: {sorted(categories)})")
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise self._fail(where, f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
            if bbox[2] < 0 or bbox[3] < 0:
                raise self._fail(where, f"bbox width and height must be >= 0, got {bbox!r}")
            iscrowd = ann.setdefault("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise self._fail(where, f"iscrowd must be 0 or 1, got {iscrowd!r}")
            if "area" not in ann:
                ann["area"] = float(bbox[2] * bbox[3])
            elif not _is_number(ann["area"]):
                raise self._fail(where, f"area must be a number, got {ann['area']!r}")

    def _check_files_exist(self) -> None:
        """Every listed image must be on disk: the error comes now, not hours into training."""
        missing = [i for i in self.image_ids if not os.path.isfile(self._image_path(i))]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(self.image_ids)})" if len(missing) > 1 else ""
            raise DatasetError(
                f"image file {self._image_path(missing[0])} (image id {missing[0]} in "
                f"{self.annotations_file}) does not exist{more}; check that the images folder "
                f"{self.images_dir} holds the records' file_name entries"
            )

    def _build_targets(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per image id: boxes float32 [N, 4] xyxy clipped to the image, labels int64 [N].

        Done once from the JSON, so the count of clipped and dropped boxes is known up front
        and reported in one warning.
        """
        targets = {}
        num_boxes = num_clipped = num_dropped = 0
        for image_id in self.image_ids:
            info = self._image_info[image_id]
            width, height = float(info["width"]), float(info["height"])
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann["iscrowd"]:
                    continue
                num_boxes += 1
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
                x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
                if x2 <= x1 or y2 <= y1:
                    num_dropped += 1  # zero-area, or entirely outside the image
                    continue
                if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                    num_clipped += 1
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_id_to_label[ann["category_id"]])
            targets[image_id] = (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
            )
        self.num_boxes: int = num_boxes - num_dropped  # usable boxes over the kept images
        if num_dropped or num_clipped:
            warnings.warn(
                f"dropped {num_dropped} and clipped {num_clipped} boxes of {num_boxes} in "
                f"{self.annotations_file} (zero-area or outside the image)",
                stacklevel=3,
            )
        return targets

    # ----------------------------------------------------------------------------------------
    # Items.
    # ----------------------------------------------------------------------------------------
    def image_sizes(self) -> dict[int, tuple[float, float]]:
        """Image id -> (width, height) in pixels, for every image of the dataset, in order."""
        return {i: (float(self._image_info[i]["width"]), float(self._image_info[i]["height"]))
                for i in self.image_ids}

    def _image_path(self, image_id: int) -> str:
        return os.path.join(self.images_dir, self._image_info[image_id]["file_name"])

    def _read_image(self, image_id: int) -> torch.Tensor:
        """The image as uint8 [3, H, W] RGB (grayscale, palette and RGBA are converted)."""
        path = self._image_path(image_id)
        try:
            with Image.open(path) as img:
                rgb = np.array(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        except (OSError, ValueError, SyntaxError) as e:
            # PIL raises OSError for truncated files, UnidentifiedImageError (an OSError) for
            # non-images, and occasionally ValueError/SyntaxError for broken headers.
            raise DatasetError(
                f"cannot read image {path} (image id {image_id} in {self.annotations_file}): "
                f"{e}; replace the file or remove its record"
            ) from None
        info = self._image_info[image_id]
        if rgb.shape[:2] != (int(info["height"]), int(info["width"])):
            # The boxes are in the JSON's pixel frame: a different stored size would misplace them.
            raise DatasetError(
                f"image {path} is {rgb.shape[1]}x{rgb.shape[0]} pixels but image id {image_id} in "
                f"{self.annotations_file} says {info['width']}x{info['height']}; fix the record"
            )
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        image = self._read_image(image_id)  # uint8 [3, H, W]
        boxes_np, labels_np = self._targets[image_id]
        boxes = torch.from_numpy(boxes_np.copy())  # [N, 4] xyxy pixels
        labels = torch.from_numpy(labels_np.copy())  # [N]
        extra = {}
        if self.proposals is not None:
            extra["proposals"] = torch.from_numpy(self.proposals[image_id][0])  # [R, 4] best first
        if self._transforms is not None:
            height, width = image.shape[-2:]
            # One call, so the proposals are flipped exactly when the image and its boxes are.
            image, boxes, extra = self._transforms(
                tv_tensors.Image(image),
                tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                {k: tv_tensors.BoundingBoxes(v, format="XYXY", canvas_size=(height, width))
                 for k, v in extra.items()},
            )
            # Plain tensors out: tv_tensor subclasses would leak into the model and collate.
            image = image.as_subclass(torch.Tensor)
            boxes = boxes.as_subclass(torch.Tensor)
            extra = {k: v.as_subclass(torch.Tensor) for k, v in extra.items()}
        image = image.to(torch.float32).div_(255.0)
        return image, {"boxes": boxes, "labels": labels, "image_id": image_id, **extra}

    def __repr__(self) -> str:
        return (f"CocoDetection({len(self)} images, {self.num_classes} classes, "
                f"{self.annotations_file}, train={self.train})")
