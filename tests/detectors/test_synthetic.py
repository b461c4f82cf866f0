"""The synthetic generator (reproducible, valid COCO, all size ranges) and its shared cache."""
import contextlib
import io
import json
import os
import threading
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detectors.config import SyntheticDataConfig
from detectors.data import CocoDetection, synthetic
from detectors.data.synthetic import ensure_synthetic, generate_synthetic_coco

TINY = dict(num_train=8, num_val=4, image_size=96)


def _pixels(paths, split):
    folder = paths[f"{split}_images"]
    return {name: np.asarray(Image.open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_same_seed_same_bytes_and_pixels(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", seed=3, **TINY)
    b = generate_synthetic_coco(tmp_path / "b", seed=3, **TINY)
    for key in ("train_annotations", "val_annotations"):
        assert _read(a[key]) == _read(b[key])
    for split in ("train", "val"):
        pa, pb = _pixels(a, split), _pixels(b, split)
        assert list(pa) == list(pb) and len(pa) == TINY[f"num_{split}"]
        assert all(np.array_equal(pa[name], pb[name]) for name in pa)


def test_other_seed_and_other_split_differ(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", seed=3, **TINY)
    c = generate_synthetic_coco(tmp_path / "c", seed=4, **TINY)
    assert _read(a["train_annotations"]) != _read(c["train_annotations"])
    first_a, first_c = next(iter(_pixels(a, "train").values())), next(iter(_pixels(c, "train").values()))
    assert not np.array_equal(first_a, first_c)
    first_val = next(iter(_pixels(a, "val").values()))
    assert not np.array_equal(first_a, first_val)  # train and val draw from different streams


def test_valid_coco_with_non_contiguous_ids(tmp_path):
    paths = generate_synthetic_coco(tmp_path, seed=0, **TINY)
    assert sorted(paths) == ["train_annotations", "train_images", "val_annotations", "val_images"]
    for split in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(paths[f"{split}_annotations"])
        assert coco.getCatIds() == [1, 3, 5, 7, 9, 11]
        assert all(c["name"] and c["supercategory"] for c in coco.loadCats(coco.getCatIds()))
        assert len(coco.getImgIds()) == TINY[f"num_{split}"]
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img["width"], img["height"]) == (96, 96)
            with Image.open(os.path.join(paths[f"{split}_images"], img["file_name"])) as im:
                assert im.size == (96, 96) and im.mode == "RGB"
        for a in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["area"] > 0 and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        # Boxes lie inside their images, so the dataset neither clips nor drops any.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            CocoDetection(paths[f"{split}_images"], paths[f"{split}_annotations"], train=False)


def test_sizes_span_small_medium_and_large(tmp_path):
    paths = generate_synthetic_coco(tmp_path, num_train=50, num_val=0, image_size=256, seed=0)
    data = json.loads(_read(paths["train_annotations"]))
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas <= 96**2)).any()
    assert (areas > 96**2).any()
    annotated = {a["image_id"] for a in data["annotations"]}
    assert len(annotated) < 50  # some images hold no object at all
    assert {a["category_id"] for a in data["annotations"]} == {1, 3, 5, 7, 9, 11}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_coco("unused", num_train=1, num_val=1, image_size=8, seed=0)


# --------------------------------------------------------------------------------------------
# The cache.
# --------------------------------------------------------------------------------------------
CFG = SyntheticDataConfig(num_train=3, num_val=2, image_size=64, seed=5)


def test_ensure_synthetic_reuses_a_complete_set(tmp_path, monkeypatch):
    first = ensure_synthetic(str(tmp_path), CFG)
    folder = os.path.dirname(first["train_images"])
    assert os.path.basename(folder) == f"synthetic-{synthetic.synthetic_cache_key(CFG)}"
    marker = os.path.join(folder, ".complete")
    stamp = os.stat(marker).st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(synthetic, "generate_synthetic_coco", must_not_run)
    assert ensure_synthetic(str(tmp_path), CFG) == first
    assert os.stat(marker).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]  # no temp folders left


def test_ensure_synthetic_uses_libra_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBRA_DATA_DIR", str(tmp_path / "cache"))
    paths = ensure_synthetic(None, CFG)
    assert paths["val_annotations"].startswith(str(tmp_path / "cache") + os.sep)
    assert os.path.isfile(paths["val_annotations"])


def test_ensure_synthetic_replaces_an_incomplete_folder(tmp_path):
    stale = tmp_path / f"synthetic-{synthetic.synthetic_cache_key(CFG)}"
    stale.mkdir()
    (stale / "half-written.png").write_bytes(b"")
    paths = ensure_synthetic(str(tmp_path), CFG)
    assert not (stale / "half-written.png").exists()
    assert os.path.isfile(paths["train_annotations"])
    assert sorted(os.listdir(tmp_path)) == [stale.name]


def test_concurrent_callers_both_succeed(tmp_path, monkeypatch):
    barrier, both_generated = threading.Barrier(2), threading.Barrier(2, timeout=30)
    results, errors = [None, None], []
    generate = synthetic.generate_synthetic_coco

    def generate_then_wait(*args, **kwargs):
        # Both callers finish generating before either publishes: one must lose the rename.
        paths = generate(*args, **kwargs)
        both_generated.wait()
        return paths

    monkeypatch.setattr(synthetic, "generate_synthetic_coco", generate_then_wait)

    def call(slot):
        try:
            barrier.wait()
            results[slot] = ensure_synthetic(str(tmp_path), CFG)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(slot,)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1]
    assert os.path.isfile(os.path.join(os.path.dirname(results[0]["train_images"]), ".complete"))
    assert len(os.listdir(tmp_path)) == 1  # the loser's temporary copy is gone
    assert len(os.listdir(results[0]["train_images"])) == CFG.num_train
