"""COCOeval cost: the backends of detectors.evaluation (pycocotools, "faster" = faster-coco-eval)
on a COCO-val-sized synthetic result set, timed interleaved, with a check that all 12 numbers agree."""
from __future__ import annotations

import contextlib
import io
import time
from collections import namedtuple
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from detectors.evaluation import as_backend_coco, backend_available, coco_backend
from harness.bench.model import Progress, quiet

# COCO's 80 category ids (1..90 with ten unused).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class SyntheticEvalSet(namedtuple("SyntheticEvalSet", "image_sizes gt_image_index gt_boxes gt_categories gt_areas "
                                  "gt_iscrowd det_image_index det_boxes det_categories det_scores")):
    """A COCO-val-like problem as arrays: image_sizes [I, 2] (height, width); per gt box (G) its
    image index (0-based), box xywh [G, 4], COCO category id, "segmentation" area (below the box
    area, as in COCO), iscrowd 0/1; per detection (D) image index, box [D, 4], category, score."""

    @property
    def num_images(self) -> int:
        return int(self.image_sizes.shape[0])

    def records(self) -> tuple[dict, list[dict]]:
        """(the COCO ground-truth dataset, the result records)."""
        images = [{"id": i + 1, "height": h, "width": w, "file_name": f"{i + 1:012d}.jpg"}
                  for i, (h, w) in enumerate(self.image_sizes.tolist())]
        annotations = pd.DataFrame({"id": np.arange(1, len(self.gt_boxes) + 1), "image_id": self.gt_image_index + 1,
                                    "category_id": self.gt_categories, "bbox": self.gt_boxes.tolist(),
                                    "area": self.gt_areas, "iscrowd": self.gt_iscrowd}).to_dict("records")
        categories = [{"id": c, "name": f"class_{c}", "supercategory": "synthetic"} for c in COCO_CATEGORY_IDS]
        detections = pd.DataFrame({"image_id": self.det_image_index + 1, "category_id": self.det_categories,
                                   "bbox": self.det_boxes.tolist(), "score": self.det_scores}).to_dict("records")
        return {"images": images, "annotations": annotations, "categories": categories}, detections


def synthetic_eval_set(num_images: int = 5000, *, gt_per_image: float = 7.3, dets_per_image: int = 100,
                       crowd_fraction: float = 0.01, seed: int = 0) -> SyntheticEvalSet:
    """A COCO-val-sized evaluation problem, generated with NumPy in a second or two.

    COCO val2017: 5,000 images, 7.3 boxes per image, 80 categories, about 1% crowd, up to 100
    detections per image. Here Poisson(gt_per_image) boxes per image (log-uniform sizes, all
    three area ranges), and per image about three jittered copies of each gt box (80% with the
    right class, higher scores), the rest random boxes with random classes and low scores: a
    plausible AP, and every code path (matches, crowd ignores, area ranges, the cap) runs.
    """
    rng = np.random.default_rng(seed)
    cats = np.asarray(COCO_CATEGORY_IDS)
    sizes = np.stack([rng.choice([375, 427, 480, 512, 640], size=num_images), np.full(num_images, 640)], axis=1)
    counts = rng.poisson(gt_per_image, size=num_images)
    gt_img = np.repeat(np.arange(num_images), counts)
    g = gt_img.size
    h_img, w_img = sizes[gt_img, 0].astype(np.float64), sizes[gt_img, 1].astype(np.float64)
    side = np.exp(rng.uniform(np.log(6.0), np.log(450.0), g))
    aspect = np.exp(rng.uniform(-np.log(2.5), np.log(2.5), g))
    w, h = np.minimum(side * np.sqrt(aspect), w_img - 1), np.minimum(side / np.sqrt(aspect), h_img - 1)
    x, y = rng.uniform(0, 1, g) * (w_img - w), rng.uniform(0, 1, g) * (h_img - h)
    gt_boxes = np.round(np.stack([x, y, w, h], axis=1), 2)
    gt_cats = rng.choice(cats, size=g)
    gt_areas = np.round(w * h * rng.uniform(0.45, 0.9, g), 2)
    gt_crowd = (rng.random(g) < crowd_fraction).astype(np.int64)
    det_boxes, det_cats, det_scores = [], [], []
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in range(num_images):
        copies = np.repeat(np.arange(starts[i], starts[i + 1]), 3)[:dets_per_image]
        n_near, n_far = copies.size, dets_per_image - copies.size
        near = gt_boxes[copies] + rng.normal(0.0, 0.12, (n_near, 4)) * np.repeat(gt_boxes[copies, 2:], 2, axis=1)
        near[:, 2:] = np.maximum(near[:, 2:], 1.0)
        near_cats = np.where(rng.random(n_near) < 0.8, gt_cats[copies], rng.choice(cats, size=n_near))
        near_scores = rng.beta(4, 2, n_near)
        fh, fw = float(sizes[i, 0]), float(sizes[i, 1])
        fs = np.exp(rng.uniform(np.log(6.0), np.log(400.0), n_far))
        fwd, fhd = np.minimum(fs, fw - 1), np.minimum(fs * rng.uniform(0.5, 2.0, n_far), fh - 1)
        far = np.stack([rng.uniform(0, 1, n_far) * (fw - fwd), rng.uniform(0, 1, n_far) * (fh - fhd), fwd, fhd], 1)
        det_boxes.append(np.concatenate([near, far]))
        det_cats.append(np.concatenate([near_cats, rng.choice(cats, size=n_far)]))
        det_scores.append(np.concatenate([near_scores, rng.beta(1, 4, n_far)]))
    return SyntheticEvalSet(
        image_sizes=sizes, gt_image_index=gt_img, gt_boxes=gt_boxes, gt_categories=gt_cats, gt_areas=gt_areas,
        gt_iscrowd=gt_crowd, det_image_index=np.repeat(np.arange(num_images), dets_per_image),
        det_boxes=np.round(np.concatenate(det_boxes), 2), det_categories=np.concatenate(det_cats),
        det_scores=np.round(np.concatenate(det_scores), 4))


# One backend's figures: seconds are medians over repeats (total = index + loadRes + evaluate +
# accumulate + summarize); speedup = pycocotools' total / this; stats the 12 COCO numbers; identical:
# all 12 bit for bit; agrees: all within 1e-12 (at most float summation order apart).
CocoEvalResult = namedtuple("CocoEvalResult", "backend num_images num_gt num_detections repeats total_s load_s "
                            "evaluate_s accumulate_summarize_s speedup stats max_abs_diff_vs_pycocotools "
                            "identical_to_pycocotools agrees_with_pycocotools")


def _evaluate_once(backend: str, data: SyntheticEvalSet) -> tuple[np.ndarray, dict[str, float]]:
    """One backend end to end; returns (12 stats, seconds per phase)."""
    gt_dataset, detections = data.records()  # fresh: both COCO APIs write into them; not timed
    times = {}
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        coco_cls, make_eval = coco_backend(backend)
        gt = as_backend_coco(gt_dataset, coco_cls)
        evaluator = make_eval(gt, gt.loadRes(detections))
        times["load_s"] = time.perf_counter() - start
        evaluator.evaluate()
        times["evaluate_s"] = time.perf_counter() - start - times["load_s"]
        evaluator.accumulate()
        evaluator.summarize()
        times["total_s"] = time.perf_counter() - start
    times["accumulate_summarize_s"] = times["total_s"] - times["load_s"] - times["evaluate_s"]
    return np.asarray(evaluator.stats[:12], dtype=np.float64), times


def run_cocoeval_bench(num_images: int = 5000, *, repeats: int = 1, seed: int = 0,
                       backends: Optional[Sequence[str]] = None, progress: Progress = quiet) -> list[CocoEvalResult]:
    """Time COCO box evaluation per backend on `synthetic_eval_set(num_images)`: `repeats`
    interleaved runs each, medians. Backends default to pycocotools (the reference) and "faster"
    when it is installed."""
    backends = backends or ["pycocotools"] + (["faster"] if backend_available("faster") else [])
    if "pycocotools" not in backends:
        raise ValueError("the COCOeval benchmark needs pycocotools as the reference backend")
    start = time.perf_counter()
    data = synthetic_eval_set(num_images, seed=seed)
    progress(f"[cocoeval] {num_images} images, {len(data.gt_boxes)} gt boxes, {len(data.det_boxes)} detections "
             f"generated in {time.perf_counter() - start:.1f} s")
    runs, stats = [], {}  # runs: a backend's phase times per evaluation; stats: its 12 numbers
    for r in range(repeats):
        for backend in list(backends[r % len(backends):]) + list(backends[: r % len(backends)]):
            progress(f"[cocoeval] repeat {r + 1}/{repeats}: {backend} ...")
            values, times = _evaluate_once(backend, data)
            if backend in stats and not np.array_equal(stats[backend], values, equal_nan=True):
                raise RuntimeError(f"{backend} gave different numbers on a repeat")
            stats[backend] = values
            runs.append({"backend": backend, **times})
            progress(f"[cocoeval] repeat {r + 1}/{repeats}: {backend} {times['total_s']:.1f} s")
    medians, reference = pd.DataFrame(runs).groupby("backend").median(), stats["pycocotools"]  # [backend, phase]
    results = []
    for backend in backends:
        diff = float(np.nanmax(np.abs(stats[backend] - reference))) if np.isfinite(reference).any() else 0.0
        results.append(CocoEvalResult(
            backend=backend, num_images=data.num_images, num_gt=len(data.gt_boxes), num_detections=len(data.det_boxes),
            repeats=repeats, **medians.loc[backend].astype(float).to_dict(),
            speedup=float(medians.total_s["pycocotools"] / medians.total_s[backend]),
            stats=tuple(stats[backend].tolist()), max_abs_diff_vs_pycocotools=diff,
            identical_to_pycocotools=bool(np.array_equal(stats[backend], reference, equal_nan=True)),
            agrees_with_pycocotools=bool(np.allclose(stats[backend], reference, rtol=0, atol=1e-12, equal_nan=True))))
    return results
