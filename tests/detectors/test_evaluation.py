"""COCO box evaluation: closed-form cases, undefined numbers, id mapping, subsets and backends."""
import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.data import CocoDetection
from detectors.evaluation import METRIC_NAMES, coco_box_eval, predictions_to_coco, scalar_metrics

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 42, "name": "emu"}]
# Three 200 x 200 images; areas chosen to cover COCO's small (< 32^2), medium and large (> 96^2).
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 50, 50], "area": 2500.0, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 42, "bbox": [0, 0, 150, 120], "area": 18000.0, "iscrowd": 0},
    {"id": 4, "image_id": 2, "category_id": 3, "bbox": [160, 160, 35, 35], "area": 1225.0, "iscrowd": 0},
    {"id": 5, "image_id": 3, "category_id": 7, "bbox": [5, 5, 10, 10], "area": 100.0, "iscrowd": 0},
    {"id": 6, "image_id": 3, "category_id": 42, "bbox": [100, 100, 50, 50], "area": 2500.0, "iscrowd": 1},
]


def gt_dict():
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2, 3)],
            "annotations": [dict(a) for a in ANNOTATIONS], "categories": CATEGORIES}


def gt_as_detections(image_ids=(1, 2, 3)):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0} for a in ANNOTATIONS if not a["iscrowd"] and a["image_id"] in image_ids]


def test_ground_truth_as_detections_scores_one():
    result = coco_box_eval(gt_dict(), gt_as_detections())
    # pycocotools divides by tp + fp + eps, so a perfect precision is 1 - 2e-16, not 1.
    assert scalar_metrics(result) == pytest.approx({name: 1.0 for name in METRIC_NAMES}, abs=1e-12)
    assert result["per_class_AP"] == pytest.approx({"cat": 1.0, "dog": 1.0, "emu": 1.0}, abs=1e-12)
    first_line = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
    assert result["summary"].splitlines()[0] == first_line
    # The same parts as attributes; and it travels like a dict (pickle for DDP/Ray, JSON).
    assert result.metrics == scalar_metrics(result) and list(result.metrics) == list(METRIC_NAMES)
    assert result.per_class_AP is result["per_class_AP"] and result.summary is result["summary"]
    assert pickle.loads(pickle.dumps(result)) == result and json.loads(json.dumps(result)) == result


def test_no_detections_scores_zero_not_a_crash(capsys):
    result = coco_box_eval(gt_dict(), [])
    assert scalar_metrics(result) == {name: 0.0 for name in METRIC_NAMES}
    assert result["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "emu": 0.0}
    assert capsys.readouterr().out == ""  # COCOeval's chatter is captured, not printed


def test_closed_form_precision_and_undefined_is_nan():
    # Image 1 only. cat: a false positive (0.95) ranks above the exact hit (0.9), so precision is
    # 1/2 at recall 1 and the interpolated precision is 0.5 at every recall point: AP 0.5.
    # dog: exact, AP 1. emu: no ground truth in image 1, so undefined: NaN, left out of the mean.
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [150, 150, 20, 20], "score": 0.95},
        {"image_id": 1, "category_id": 7, "bbox": [50, 50, 50, 50], "score": 1.0},
    ]
    result = coco_box_eval(gt_dict(), results, image_ids=[1])
    assert result["per_class_AP"]["cat"] == pytest.approx(0.5)
    assert result["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert math.isnan(result["per_class_AP"]["emu"])
    assert result["bbox_mAP"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["bbox_mAP_s"] == pytest.approx(0.5)  # only the cat box is small
    assert result["bbox_mAP_m"] == pytest.approx(1.0)  # only the dog box is medium
    assert math.isnan(result["bbox_mAP_l"]) and math.isnan(result["bbox_AR_l"])  # no large box


def test_image_ids_restrict_the_evaluation():
    results = gt_as_detections(image_ids=(1, 3))  # image 2's two boxes are missed
    everything = coco_box_eval(gt_dict(), results)
    subset = coco_box_eval(gt_dict(), results, image_ids=[3, 1])
    # Recall is per category, then averaged: cat 1/2, dog 2/2, emu 0/1 -> 0.5.
    assert everything["bbox_mAP"] < 1.0 and everything["bbox_AR_100"] == pytest.approx(0.5)
    assert subset["bbox_mAP"] == pytest.approx(1.0) and subset["bbox_AR_100"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_box_eval(gt_dict(), results, image_ids=[1, 99])
    with pytest.raises(ValueError, match="empty"):
        coco_box_eval(gt_dict(), results, image_ids=[])


def test_results_are_checked_and_left_untouched():
    results = gt_as_detections()
    before = json.dumps(results)
    coco_box_eval(gt_dict(), results)
    assert json.dumps(results) == before  # loadRes adds id/area/segmentation to what it gets
    with pytest.raises(ValueError, match="image ids are not in the ground truth"):
        coco_box_eval(gt_dict(), [{"image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match=r"category ids \[2\]"):
        coco_box_eval(gt_dict(), [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1}])


def test_predictions_to_coco_converts_boxes_and_ids():
    records = predictions_to_coco(
        5, torch.tensor([[10.0, 20.0, 40.0, 60.0]]), torch.tensor([0.5]), torch.tensor([3]),
        {1: 3, 2: 7, 3: 42})
    assert records == [{"image_id": 5, "category_id": 42, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}]
    assert all(type(v) is float for v in records[0]["bbox"]) and type(records[0]["score"]) is float
    assert predictions_to_coco(5, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                               {1: 3}) == []
    with pytest.raises(ValueError, match="label 0 has no category"):
        predictions_to_coco(5, torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.int64), {1: 3})


def test_dataset_labels_round_trip_to_category_ids(tmp_path):
    for image in gt_dict()["images"]:
        Image.new("RGB", (200, 200)).save(tmp_path / image["file_name"])
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict()))
    ds = CocoDetection(str(tmp_path), str(tmp_path / "gt.json"), train=False)
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in (3, 7, 42))

    results = []
    for index in range(len(ds)):
        _, target = ds[index]
        boxes = target["boxes"]
        results += predictions_to_coco(target["image_id"], boxes, torch.ones(len(boxes)),
                                       target["labels"], ds.label_to_cat_id)
    assert sorted({r["category_id"] for r in results}) == [3, 7, 42]
    result = coco_box_eval(ds.coco, results, image_ids=ds.image_ids)
    assert result["bbox_mAP"] == pytest.approx(1.0)
    assert list(result["per_class_AP"]) == ds.category_names  # per-class keys in label order


def _random_results(seed=0):
    """Jittered copies of the ground truth plus false positives, with distinct random scores."""
    rng = np.random.default_rng(seed)
    results = []
    for a in ANNOTATIONS:
        for _ in range(3):
            x, y, w, h = (np.asarray(a["bbox"], float) + rng.normal(0, 3, 4)).tolist()
            results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                            "bbox": [x, y, abs(w), abs(h)], "score": float(rng.random())})
    for _ in range(20):
        x, y = rng.uniform(0, 150, 2).tolist()
        w, h = rng.uniform(4, 80, 2).tolist()
        results.append({"image_id": int(rng.integers(1, 4)), "category_id": int(rng.choice([3, 7, 42])),
                        "bbox": [x, y, w, h], "score": float(rng.random())})
    return results


def _same(a, b):
    # The C++ accumulation rounds differently in the last bit (0.9333333333333332 against
    # ...33), so "identical" means equal to 1e-12: far below the 3 decimals anyone reports.
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12


def test_faster_backend_gives_identical_numbers():
    pytest.importorskip("faster_coco_eval")
    results = _random_results()
    for image_ids in (None, [1, 2]):
        reference = coco_box_eval(gt_dict(), results, image_ids=image_ids, backend="pycocotools")
        faster = coco_box_eval(gt_dict(), results, image_ids=image_ids, backend="faster")
        assert 0.0 < reference["bbox_mAP"] < 1.0  # a non-trivial case
        for name in METRIC_NAMES:
            assert _same(reference[name], faster[name]), name
        assert reference["per_class_AP"].keys() == faster["per_class_AP"].keys()
        for name, value in reference["per_class_AP"].items():
            assert _same(value, faster["per_class_AP"][name]), name
    empty = coco_box_eval(gt_dict(), [], backend="faster")
    assert scalar_metrics(empty) == {name: 0.0 for name in METRIC_NAMES}


def test_unknown_or_missing_backend_is_a_clear_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown evaluation backend 'fast'"):
        coco_box_eval(gt_dict(), [], backend="fast")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    with pytest.raises(ValueError, match="needs faster-coco-eval, which is not installed"):
        coco_box_eval(gt_dict(), [], backend="faster")


# ------------------------------------------------------------------------------------------
# The bootstrap over validation images (the report's evaluation noise).
# ------------------------------------------------------------------------------------------
def _population(num_images, seed, id_offset=0):
    """A synthetic detector on `num_images` images: 1-4 boxes of 3 categories each, every box
    found with probability 0.7 at a jittered position, plus false positives; the same generator
    for every call, so independent calls are independent validation sets of one population."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for n in range(num_images):
        image_id = id_offset + n + 1
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 200, "height": 200})
        for _ in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(0, 140, 2)
            w, h = rng.uniform(12, 60, 2)
            category = int(rng.choice([3, 7, 42]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
            if rng.uniform() < 0.7:
                jitter = rng.normal(0, 0.12 * min(w, h), 2)
                detections.append({"image_id": image_id, "category_id": category,
                                   "bbox": [x + jitter[0], y + jitter[1], w, h],
                                   "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 160, 2)
            detections.append({"image_id": image_id, "category_id": int(rng.choice([3, 7, 42])),
                               "bbox": [x, y, 30.0, 30.0], "score": float(rng.uniform(0.0, 0.8))})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, detections


def _evaluated(gt, detections):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_resampled_map_reuses_the_matches_exactly():
    """Identity positions give COCOeval's own AP; positions with repeats give the AP COCOeval
    computes on a set that holds those copies of the images (new ids, same boxes)."""
    import contextlib
    import io

    from detectors.evaluation import resampled_map

    gt, detections = _population(12, seed=1)
    evaluator = _evaluated(gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        assert resampled_map(evaluator, np.arange(12)) == pytest.approx(evaluator.stats[0], abs=1e-12)
        positions = np.array([0, 0, 0, 3, 5, 5, 7, 8, 8, 8, 11, 2])
        ids = evaluator.params.imgIds
        got = resampled_map(evaluator, positions)
    # The same multiset of images as a real dataset: copy j of image i gets id 1000 * (j + 1) + i.
    images, annotations, copied = [], [], []
    seen = {}
    for position in positions:
        image_id = ids[position]
        seen[image_id] = seen.get(image_id, 0) + 1
        new_id = 1000 * seen[image_id] + image_id
        images.append({"id": new_id, "file_name": f"{new_id}.png", "width": 200, "height": 200})
        annotations += [{**a, "id": len(annotations) + k + 1, "image_id": new_id}
                        for k, a in enumerate(x for x in gt["annotations"] if x["image_id"] == image_id)]
        copied += [{**d, "image_id": new_id} for d in detections if d["image_id"] == image_id]
    twin = _evaluated({"images": images, "annotations": annotations, "categories": CATEGORIES}, copied)
    assert got == pytest.approx(twin.stats[0], abs=1e-12)
    assert evaluator.params.imgIds == ids and len(evaluator.evalImgs) == 3 * 4 * 12  # untouched


def test_bootstrap_sd_estimates_the_spread_over_independent_validation_sets():
    """What bbox_mAP_boot_sd claims, by simulation: the SD of AP over 40 independent validation
    sets of 40 images from one population, against the bootstrap SD computed on single sets
    (mean over 4 sets): within 25% (measured here: 0.0281 against 0.0295)."""
    import contextlib
    import io

    from detectors.evaluation import bootstrap_map

    aps = [_evaluated(*_population(40, seed=100 + s)).stats[0] for s in range(40)]
    true_sd = float(np.std(aps, ddof=1))
    with contextlib.redirect_stdout(io.StringIO()):
        boot = [float(np.std(bootstrap_map(_evaluated(*_population(40, seed=900 + s)), 150, seed=s),
                             ddof=1)) for s in range(4)]
    assert true_sd > 0.01  # 40 images do make AP noisy: the check has something to measure
    assert np.mean(boot) == pytest.approx(true_sd, rel=0.25)


def test_coco_box_eval_logs_the_bootstrap_sd_seeded_and_only_where_it_can():
    gt, detections = _population(15, seed=3)
    first = coco_box_eval(gt, detections, bootstrap=40, bootstrap_seed=5)
    again = coco_box_eval(gt, detections, bootstrap=40, bootstrap_seed=5)
    other = coco_box_eval(gt, detections, bootstrap=40, bootstrap_seed=6)
    assert 0.0 < first["bbox_mAP_boot_sd"] < 0.5
    assert first["bbox_mAP_boot_sd"] == again["bbox_mAP_boot_sd"] != other["bbox_mAP_boot_sd"]
    assert scalar_metrics(first) == scalar_metrics(coco_box_eval(gt, detections))  # AP unchanged
    assert "bbox_mAP_boot_sd" not in coco_box_eval(gt, detections)
    if "faster_coco_eval" in sys.modules or _has_faster():
        assert math.isnan(coco_box_eval(gt, detections, backend="faster", bootstrap=10)["bbox_mAP_boot_sd"])


def _has_faster():
    from detectors.evaluation import backend_available

    return backend_available("faster")
