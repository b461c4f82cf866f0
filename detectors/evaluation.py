"""COCO box evaluation: detections in; the twelve COCO numbers, per-class AP and the summary out.

Undefined numbers are NaN. COCOeval writes -1 where a number has no ground truth to be
measured against: an area range with no box of that size among the evaluated images (tiny
sets often have no small or no large objects), or a category absent from them. Reporting 0.0
there would read as "the detector failed", and averaging it into a table would drag means down
for no reason; NaN says "not measured", and pandas/numpy skip it with the nan-aware reductions.
A category or size range that does have ground truth but got no detections scores a real 0.0.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch

# The twelve numbers of COCOeval.stats, in its order.
METRIC_NAMES: tuple[str, ...] = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l",
)
BACKENDS: tuple[str, ...] = ("pycocotools", "faster")


class BoxEvalResult(dict):
    """What `coco_box_eval` returns: a plain dict, with its three parts also as attributes.

    Keys: the twelve METRIC_NAMES (floats), "per_class_AP" ({category name: float}) and
    "summary" (str). Attributes: `metrics` (the twelve floats, a new dict: what gets logged),
    `per_class_AP` and `summary`. Being a dict, it pickles and serialises to JSON as one.
    """

    @property
    def metrics(self) -> dict[str, float]:
        return {name: self[name] for name in METRIC_NAMES}

    @property
    def per_class_AP(self) -> dict[str, float]:  # noqa: N802 - the key's own spelling
        return self["per_class_AP"]

    @property
    def summary(self) -> str:
        return self["summary"]


def predictions_to_coco(
    image_id: int,
    boxes_xyxy: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_cat_id: Mapping[int, int],
) -> list[dict[str, Any]]:
    """One image's detections as COCO result records.

    Args:
        image_id: the image's COCO id.
        boxes_xyxy: [N, 4] boxes (x1, y1, x2, y2) in pixels of the original image.
        scores: [N] confidences.
        labels: [N] labels in 1..num_classes (0 is background and has no category).
        label_to_cat_id: the dataset's label -> category id map.

    Returns:
        [{"image_id": int, "category_id": int, "bbox": [x, y, w, h] floats, "score": float}].
    """
    boxes = boxes_xyxy.detach().to("cpu", torch.float64).reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    score_list = scores.detach().to("cpu", torch.float64).reshape(-1).tolist()
    label_list = labels.detach().to("cpu").reshape(-1).tolist()
    if not len(xywh) == len(score_list) == len(label_list):
        raise ValueError(f"boxes, scores and labels disagree in length: "
                         f"{len(xywh)}, {len(score_list)}, {len(label_list)}")
    records = []
    for bbox, score, label in zip(xywh, score_list, label_list):
        if label not in label_to_cat_id:
            raise ValueError(f"label {label} has no category id; labels run over "
                             f"{min(label_to_cat_id)}..{max(label_to_cat_id)} (0 is background)")
        records.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
                        "bbox": bbox, "score": score})
    return records


def backend_available(name: str) -> bool:
    """Whether backend `name` (one of BACKENDS) can be imported here."""
    try:
        coco_backend(name)
    except ValueError:
        return False
    return True


def coco_backend(name: str) -> tuple[type, Callable[[Any, Any], Any]]:
    """(COCO class, COCOeval factory for boxes) of an evaluation backend, one of BACKENDS.
    The one switch between backends: coco_box_eval and the COCOeval benchmark use it."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt: COCOeval(gt, dt, "bbox")
    if name == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise ValueError(
                "evaluation backend 'faster' needs faster-coco-eval, which is not installed: "
                "pip install 'libra-harness[fast-eval]', or use backend 'pycocotools'"
            ) from None
        # print_function=print: its messages then go to stdout, which is captured below.
        return COCO, lambda gt, dt: COCOeval_faster(gt, dt, "bbox", print_function=print)
    raise ValueError(f"unknown evaluation backend {name!r}; choose one of {', '.join(BACKENDS)}")


def as_backend_coco(coco_gt: Any, coco_cls: type) -> Any:
    """`coco_gt` (a pycocotools or faster_coco_eval COCO, or a COCO dict) as a `coco_cls`."""
    if isinstance(coco_gt, coco_cls):
        return coco_gt
    dataset = coco_gt if isinstance(coco_gt, dict) else coco_gt.dataset
    gt = coco_cls()
    gt.dataset = dict(dataset)  # shallow: the records are shared, not copied
    gt.createIndex()
    return gt


def _empty_results(gt: Any, coco_cls: type) -> Any:
    """A results object with no detections (pycocotools' loadRes([]) raises an IndexError)."""
    dt = coco_cls()
    dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                  "categories": copy.deepcopy(gt.dataset["categories"])}
    dt.createIndex()
    return dt


def _check_results(results: list[dict], gt: Any) -> None:
    """Results must name known images and categories (loadRes only asserts on images)."""
    unknown_images = {r["image_id"] for r in results} - set(gt.imgs)
    if unknown_images:
        raise ValueError(f"{len(unknown_images)} result image ids are not in the ground truth, "
                         f"e.g. {sorted(unknown_images)[:5]}")
    unknown_cats = {r["category_id"] for r in results} - set(gt.cats)
    if unknown_cats:
        raise ValueError(f"result category ids {sorted(unknown_cats)} are not in the ground truth "
                         f"(known: {sorted(gt.cats)}); map labels with label_to_cat_id")


def _undefined_to_nan(value: float) -> float:
    return math.nan if value < 0 else float(value)


def coco_box_eval(
    coco_gt: Any,
    results: list[dict],
    *,
    image_ids: Optional[Iterable[int]] = None,
    backend: str = "pycocotools",
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> BoxEvalResult:
    """COCOeval (bbox) of `results` against `coco_gt`.

    Args:
        coco_gt: the ground truth: a pycocotools COCO (`CocoDetection.coco`), a faster_coco_eval
            COCO, or a COCO-format dict.
        results: COCO result records, e.g. from `predictions_to_coco`; may be empty. Not modified.
        image_ids: evaluate on these images only (e.g. `val_dataset.image_ids` under
            `max_val_images`); None evaluates every image of `coco_gt`.
        backend: "pycocotools", or "faster" for faster_coco_eval's C++ COCOeval (same numbers,
            about 10x faster on COCO val).
        bootstrap: with B > 0, also "bbox_mAP_boot_sd": the standard deviation of AP@[.5:.95]
            over B bootstrap resamples of the evaluated images (`bootstrap_map`), i.e. how far
            this AP would move on another validation set of the same size. pycocotools only
            (faster_coco_eval keeps its per-image matches in C++); NaN with "faster".
        bootstrap_seed: the resampling's seed (the same seed gives the same resamples).

    Returns:
        A BoxEvalResult: a dict with the twelve floats of METRIC_NAMES (fractions in [0, 1], NaN
        where undefined: see the module docstring), "per_class_AP": {category name:
        AP@[.5:.95] over all areas at 100 detections, NaN for a category with no ground truth
        in the evaluated images; in the ground truth's sorted category-id order, i.e. label
        order}, and "summary": COCOeval's printed table as a string. `result.metrics` (or
        `scalar_metrics(result)`) gives the twelve floats alone.

    Raises:
        ValueError: an unknown or uninstalled backend, unknown image or category ids.
    """
    coco_cls, make_eval = coco_backend(backend)
    log = io.StringIO()  # pycocotools prints progress on every call: keep it out of the logs
    with contextlib.redirect_stdout(log):
        gt = as_backend_coco(coco_gt, coco_cls)
        _check_results(results, gt)
        # loadRes writes id/area/segmentation into the records: hand it copies.
        dt = gt.loadRes([dict(r) for r in results]) if results else _empty_results(gt, coco_cls)
        evaluator = make_eval(gt, dt)
        if image_ids is not None:
            ids = sorted({int(i) for i in image_ids})
            if not ids:
                raise ValueError("image_ids is empty: nothing to evaluate")
            unknown = sorted(set(ids) - set(gt.imgs))
            if unknown:
                raise ValueError(f"{len(unknown)} of image_ids are not in the ground truth, "
                                 f"e.g. {unknown[:5]}")
            evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()

    result = BoxEvalResult(
        (name, _undefined_to_nan(value)) for name, value in zip(METRIC_NAMES, evaluator.stats[:12]))
    result["per_class_AP"] = _per_class_ap(evaluator, gt)
    result["summary"] = summary.getvalue()
    if bootstrap > 0:
        sd = math.nan
        if backend == "pycocotools":
            with contextlib.redirect_stdout(io.StringIO()):
                replicates = bootstrap_map(evaluator, bootstrap, bootstrap_seed)
            finite = replicates[np.isfinite(replicates)]
            sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        result["bbox_mAP_boot_sd"] = sd
    return result


def resampled_map(evaluator: Any, positions: np.ndarray) -> float:
    """AP@[.5:.95] (area all, 100 detections: COCOeval.stats[0]) of an evaluated pycocotools
    COCOeval on the images at `positions` ([I] indices into its params.imgIds, repeats allowed):
    the per-image matches COCOeval.evaluate() computed are reused, only accumulate() runs again,
    on a copy (the evaluator is not changed). Identity positions give stats[0] exactly; a
    position listed twice counts that image twice, as if the set held two copies of it."""
    params = evaluator._paramsEval
    num_images, num_areas = len(params.imgIds), len(params.areaRng)
    num_cats = len(params.catIds) if params.useCats else 1
    area_all = list(evaluator.params.areaRngLbl).index("all")
    positions = np.asarray(positions, dtype=np.int64)
    # evalImgs is ordered category-major, then area range, then image (COCOeval.evaluate); the
    # replica keeps the "all" area's blocks only and accumulates at 100 detections only: the
    # one cell stats[0] reads, a twelfth of accumulate's work, with the same numbers in it.
    blocks = (np.arange(num_cats) * num_areas * num_images + area_all * num_images)[:, None]
    order = (blocks + positions[None, :]).ravel()
    replica = copy.copy(evaluator)
    replica.params = copy.copy(evaluator.params)
    replica.params.imgIds = [params.imgIds[i] for i in positions]
    replica.params.areaRng = [evaluator.params.areaRng[area_all]]
    replica.params.areaRngLbl = ["all"]
    replica.params.maxDets = [100]
    replica._paramsEval = copy.copy(replica.params)
    replica.evalImgs = [evaluator.evalImgs[i] for i in order]
    replica.accumulate()
    precision = replica.eval["precision"][:, :, :, 0, 0]  # [T, R, K]
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else math.nan


def bootstrap_map(evaluator: Any, reps: int, seed: int = 0) -> np.ndarray:
    """[reps] AP@[.5:.95] of `reps` bootstrap resamples (images drawn with replacement, as many
    as were evaluated) of an evaluated pycocotools COCOeval; see `resampled_map`. Their spread
    is the evaluation noise of one run's AP: what another validation set of the same size would
    change (Efron's bootstrap over the images, the unit COCO's sampling is made of)."""
    num_images = len(evaluator._paramsEval.imgIds)
    rng = np.random.default_rng(seed)
    return np.array([resampled_map(evaluator, rng.integers(0, num_images, num_images))
                     for _ in range(reps)])


def _per_class_ap(evaluator: Any, gt: Any) -> dict[str, float]:
    """AP@[.5:.95] per category, area "all", 100 detections; NaN with no ground truth."""
    precision = evaluator.eval["precision"]  # [T iou thresholds, R recall points, K, A areas, M]
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        defined = values[values > -1]
        name = str(gt.cats[cat_id].get("name", cat_id))
        if name in per_class:
            name = f"{name} (id {cat_id})"  # two categories share a name: keep both
        per_class[name] = float(defined.mean()) if defined.size else math.nan
    return per_class


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The twelve flat floats of a `coco_box_eval` result (what gets logged as metrics)."""
    return {name: result[name] for name in METRIC_NAMES}
