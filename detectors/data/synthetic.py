"""The synthetic COCO-format set: a reproducible generator, and the on-disk cache runs share.

A detector a CPU can train in minutes needs a task that is learnable yet not trivial, with the
features Libra R-CNN is about: objects of COCO's three size ranges, some occlusion, and many
easy background regions plus a few hard look-alike negatives (the imbalance the IoU-balanced
sampler targets).

Classes (category id: form, typical colour). The ids skip like COCO's, so the id <-> label map
is always exercised:

    1  square    filled, near-square box              red
    3  disc      filled circle                        blue
    5  triangle  filled, apex up or down              green
    7  cross     plus sign, arms about 0.3 box wide   yellow
    9  ring      annulus, hole about half the width   purple
    11 ellipse   filled, about 2:1, lying or standing cyan

Colours are jittered per object; shape is the reliable cue. Distractors, never annotated, are
drawn in a class colour but with a non-class form: an outline-only square, a half disc, a
diamond and a thin bar.

Each image: a smooth two-colour gradient with faint stripes as background; 0 to 6 objects
(about 8% of images have none) and 0 to 3 distractors in random drawing order, so later shapes
occlude earlier ones. A placement that would hide more than 70% of an annotated object is
retried elsewhere (and abandoned after a few tries), so every annotated object stays
recognisable. As in COCO, an occluded object's box is its full extent and its `area` is its
visible pixel count. Box sides are drawn log-uniformly from 5% to 75% of the image side: at
256 px about half the objects are small (< 32^2 px of visible area), 40% medium and 10% large
(> 96^2). Gaussian pixel noise goes over everything.

Every image has its own random stream, `SeedSequence(seed, spawn_key=(split, index))`: the
same arguments give byte-identical JSON and identical pixels, train and val differ, and image
i of val does not depend on how many training images were asked for.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from detectors.config import SyntheticDataConfig

logger = logging.getLogger(__name__)

# Bump whenever the drawing or the JSON changes: it is part of the cache key, so old caches
# are not mistaken for the new set.
GENERATOR_VERSION = 1

# (category id, name, form, typical RGB colour)
CLASSES: tuple[tuple[int, str, str, tuple[int, int, int]], ...] = (
    (1, "square", "square", (215, 55, 45)),
    (3, "disc", "disc", (45, 85, 215)),
    (5, "triangle", "triangle", (50, 170, 60)),
    (7, "cross", "cross", (235, 200, 35)),
    (9, "ring", "ring", (165, 55, 195)),
    (11, "ellipse", "ellipse", (35, 195, 205)),
)
DISTRACTOR_FORMS = ("outline_square", "half_disc", "diamond", "bar")

_OBJECTS_PER_IMAGE_P = (0.08, 0.20, 0.22, 0.20, 0.14, 0.10, 0.06)  # P(0 objects) ... P(6)
_DISTRACTORS_PER_IMAGE_P = (0.35, 0.35, 0.2, 0.1)  # P(0 distractors) ... P(3)
_MIN_VISIBLE = 0.3  # an annotated object keeps at least this share of its pixels
_PLACEMENT_TRIES = 8
_SPLIT_CODES = {"train": 0, "val": 1}
_MARKER = ".complete"


# --------------------------------------------------------------------------------------------
# Drawing.
# --------------------------------------------------------------------------------------------
def _box_size(form: str, image_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a shape's box in pixels: the side is log-uniform in 5%..75% of the image."""
    low, high = max(6.0, 0.05 * image_size), 0.75 * image_size
    side = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if form == "ellipse":
        short = side * rng.uniform(0.4, 0.55)
        h, w = (side, short) if rng.random() < 0.5 else (short, side)
    elif form == "triangle":
        h, w = side * rng.uniform(0.8, 1.0), side
    elif form == "bar":
        h, w = (side * 0.15, side) if rng.random() < 0.5 else (side, side * 0.15)
    elif form == "square":
        h, w = side * rng.uniform(0.9, 1.1), side
    else:
        h, w = side, side
    return max(3, int(round(h))), max(3, int(round(w)))


def _shape_mask(form: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask [h, w] of `form` filling an h x w box (evaluated at pixel centres)."""
    v = ((np.arange(h) + 0.5) / h * 2.0 - 1.0)[:, None]  # [h, 1], -1 top .. 1 bottom
    u = ((np.arange(w) + 0.5) / w * 2.0 - 1.0)[None, :]  # [1, w], -1 left .. 1 right
    r2 = u * u + v * v
    if form in ("square", "bar"):
        return np.ones((h, w), dtype=bool)
    if form in ("disc", "ellipse"):
        return r2 <= 1.0
    if form == "triangle":
        apex_down = rng.random() < 0.5
        depth = (1.0 - v) / 2.0 if apex_down else (v + 1.0) / 2.0  # 0 at the apex, 1 at the base
        return np.abs(u) <= depth
    if form == "cross":
        arm = rng.uniform(0.28, 0.36)
        return (np.abs(u) <= arm) | (np.abs(v) <= arm)
    if form == "ring":
        hole = rng.uniform(0.45, 0.6)
        return (r2 <= 1.0) & (r2 >= hole * hole)
    if form == "outline_square":
        stroke = max(1, int(round(0.08 * min(h, w))))
        mask = np.zeros((h, w), dtype=bool)
        mask[:stroke], mask[-stroke:], mask[:, :stroke], mask[:, -stroke:] = True, True, True, True
        return mask
    if form == "half_disc":
        side = int(rng.integers(4))  # which half survives: top, bottom, left, right
        half = (v <= 0, v >= 0, u <= 0, u >= 0)[side]
        return (r2 <= 1.0) & half
    if form == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown form {form!r}")  # a bug in this file


def _jittered_colour(base: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A class colour with brightness and per-channel jitter, RGB float [3]."""
    colour = np.asarray(base, dtype=np.float64) * rng.uniform(0.8, 1.12) + rng.normal(0.0, 14.0, 3)
    return np.clip(colour, 0.0, 255.0)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth two-colour gradient plus faint stripes, float [size, size, 3] in 0..255."""
    t = (np.arange(size) + 0.5) / size
    yy, xx = t[:, None], t[None, :]
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)  # [size, size]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = rng.uniform(30.0, 225.0, 3), rng.uniform(30.0, 225.0, 3)
    image = c0 + (c1 - c0) * ramp[..., None]
    stripe_angle, cycles = rng.uniform(0.0, np.pi), rng.uniform(2.0, 14.0)
    phase = xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle)
    stripes = np.sin(2.0 * np.pi * cycles * phase + rng.uniform(0.0, 2.0 * np.pi))
    return image + rng.uniform(0.0, 18.0) * stripes[..., None]


def _draw_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One image, uint8 [size, size, 3], and its objects [{category_id, bbox, area}] (xywh px)."""
    image = _background(size, rng)
    num_objects = int(rng.choice(len(_OBJECTS_PER_IMAGE_P), p=_OBJECTS_PER_IMAGE_P))
    num_distractors = int(rng.choice(len(_DISTRACTORS_PER_IMAGE_P), p=_DISTRACTORS_PER_IMAGE_P))
    # Items in drawing order: (class index or -1 for a distractor).
    items = [int(k) for k in rng.integers(len(CLASSES), size=num_objects)] + [-1] * num_distractors
    rng.shuffle(items)

    owner = np.full((size, size), -1, dtype=np.int32)  # which drawn shape each pixel shows
    shapes: list[dict] = []  # every drawn shape, in drawing order
    for class_index in items:
        annotated = class_index >= 0
        if annotated:
            cat_id, _, form, base = CLASSES[class_index]
        else:
            cat_id, form = 0, DISTRACTOR_FORMS[int(rng.integers(len(DISTRACTOR_FORMS)))]
            base = CLASSES[int(rng.integers(len(CLASSES)))][3]  # a class colour: a hard negative
        h, w = _box_size(form, size, rng)
        h, w = min(h, size), min(w, size)
        mask = _shape_mask(form, h, w, rng)
        for _ in range(_PLACEMENT_TRIES):
            y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            covered = owner[y0:y0 + h, x0:x0 + w][mask]  # owners of the pixels this would cover
            hidden = np.bincount(covered[covered >= 0], minlength=len(shapes))
            if all(s["visible"] - hidden[i] >= _MIN_VISIBLE * s["pixels"]
                   for i, s in enumerate(shapes) if s["annotated"] and hidden[i]):
                break
        else:
            continue  # nowhere to put it without burying an annotated object: leave it out
        for i in np.nonzero(hidden)[0]:
            shapes[i]["visible"] -= int(hidden[i])
        patch = image[y0:y0 + h, x0:x0 + w]
        patch[mask] = _jittered_colour(base, rng)
        owner[y0:y0 + h, x0:x0 + w][mask] = len(shapes)
        rows, cols = np.nonzero(mask)
        shapes.append({
            "annotated": annotated, "category_id": cat_id,
            "pixels": int(mask.sum()), "visible": int(mask.sum()),
            # The full extent of what was drawn, occluded or not (COCO's convention).
            "bbox": [float(x0 + cols.min()), float(y0 + rows.min()),
                     float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)],
        })

    image += rng.normal(0.0, rng.uniform(3.0, 9.0), image.shape)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objects = [{"category_id": s["category_id"], "bbox": s["bbox"], "area": float(s["visible"])}
               for s in shapes if s["annotated"]]
    return pixels, objects


# --------------------------------------------------------------------------------------------
# Writing a set.
# --------------------------------------------------------------------------------------------
def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        seed, spawn_key=(_SPLIT_CODES[split], index))))


def _write_split(out_dir: Path, split: str, num_images: int, image_size: int, seed: int,
                 progress: bool) -> dict:
    """Draw and save one split's images; returns its COCO dict (images, annotations, ...)."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synthetic {split}", unit="img")
    for index in indices:
        pixels, objects = _draw_image(image_size, _image_rng(seed, split, index))
        image_id = index + 1
        file_name = f"{split}_{image_id:06d}.png"
        # compress_level=1: noise barely compresses anyway, and level 6 triples the time.
        Image.fromarray(pixels, mode="RGB").save(image_dir / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name,
                       "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj["category_id"], "bbox": obj["bbox"],
                                "area": obj["area"], "iscrowd": 0})
    return {
        "info": {"description": f"libra synthetic shapes, {split}", "version": str(GENERATOR_VERSION),
                 "seed": seed, "image_size": image_size},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name, _, _ in CLASSES],
    }


def generate_synthetic_coco(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int,
    progress: bool = False,
) -> dict[str, str]:
    """Write a synthetic COCO-format set into `out_dir` (see the module docstring for content).

    Layout: out_dir/train/*.png, out_dir/val/*.png, out_dir/annotations/instances_train.json
    and instances_val.json. Images are `image_size` x `image_size` RGB PNGs.

    Returns the absolute paths {"train_images", "train_annotations", "val_images",
    "val_annotations"}. Same arguments -> byte-identical JSON and identical pixels.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    out = Path(out_dir).absolute()
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    paths = _paths(out)
    for split, num_images in (("train", num_train), ("val", num_val)):
        coco = _write_split(out, split, num_images, image_size, seed, progress)
        with open(paths[f"{split}_annotations"], "w", encoding="utf-8") as f:
            json.dump(coco, f, separators=(",", ":"))
    return paths


def _paths(folder: Path) -> dict[str, str]:
    return {
        "train_images": str(folder / "train"),
        "train_annotations": str(folder / "annotations" / "instances_train.json"),
        "val_images": str(folder / "val"),
        "val_annotations": str(folder / "annotations" / "instances_val.json"),
    }


# --------------------------------------------------------------------------------------------
# The cache.
# --------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """$LIBRA_DATA_DIR if set, else ~/.cache/libra/data."""
    env = os.environ.get("LIBRA_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "libra" / "data"


def synthetic_cache_key(cfg: SyntheticDataConfig) -> str:
    """The folder-name part that pins a set: generator version and every setting."""
    return (f"v{GENERATOR_VERSION}-train{cfg.num_train}-val{cfg.num_val}"
            f"-{cfg.image_size}px-seed{cfg.seed}")


def ensure_synthetic(root: Optional[str], synthetic_cfg: SyntheticDataConfig) -> dict[str, str]:
    """The cached synthetic set for these settings, generated on first use.

    Folder: (root or `default_data_dir()`) / f"synthetic-{synthetic_cache_key(cfg)}"; it counts
    as complete once it holds the marker file, which is written last. A missing set is
    generated into a temporary folder beside it and renamed into place in one step, so
    concurrent callers (Ray trials on one machine) never see half a set: the loser of the
    rename race discards its copy and uses the winner's.

    Returns the same four absolute paths as `generate_synthetic_coco`.
    """
    base = Path(root).expanduser() if root else default_data_dir()
    base = base.absolute()
    final = base / f"synthetic-{synthetic_cache_key(synthetic_cfg)}"
    if (final / _MARKER).is_file():
        return _paths(final)

    base.mkdir(parents=True, exist_ok=True)
    logger.info("generating the synthetic set in %s", final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
    try:
        generate_synthetic_coco(
            tmp, num_train=synthetic_cfg.num_train, num_val=synthetic_cfg.num_val,
            image_size=synthetic_cfg.image_size, seed=synthetic_cfg.seed)
        settings = {"generator_version": GENERATOR_VERSION, **vars(synthetic_cfg)}
        (tmp / _MARKER).write_text(json.dumps(settings, sort_keys=True) + "\n")
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, unless a complete `final` got there first."""
    try:
        os.rename(tmp, final)  # atomic; fails if `final` exists and is not empty
        return
    except OSError:
        if (final / _MARKER).is_file():
            return  # another process won the race: its set is identical, use it
    # `final` exists without a marker: not made by this function (a copy interrupted halfway,
    # say). Move it aside and try once more.
    stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
    try:
        os.rename(final, stale)
    except OSError:
        pass  # someone else moved or completed it meanwhile
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / _MARKER).is_file():
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
