"""Proposals folders: written, read back by image id, checked against the dataset (one error
naming the file and the first bad image id), carried and flipped by the dataset, and
mmdetection pickles imported through an unpickler that runs no code."""
import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from detectors.config import TrainConfig
from detectors.data.coco import CocoDetection
from detectors.data.loader import build_datasets
from detectors.data.synthetic import ensure_synthetic
from detectors.proposals import (
    ProposalsError,
    SplitWriter,
    import_mmdet_split,
    load_mmdet_pickle,
    open_split,
    split_files,
    write_manifest,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cfg = TrainConfig.from_dict({"data": {"synthetic": {"num_train": 4, "num_val": 2, "image_size": 64}}})
    return ensure_synthetic(str(tmp_path_factory.mktemp("data")), cfg.data.synthetic)


def sizes(synth, split="train"):
    return CocoDetection(synth[f"{split}_images"], synth[f"{split}_annotations"], train=False).image_sizes()


def write_folder(folder, image_sizes, num=5, seed=0, mutate=None):
    """A valid folder (both splits from the same sizes), optionally edited per image."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        with SplitWriter(str(folder), split) as writer:
            for image_id, (w, h) in image_sizes.items():
                xy = rng.uniform(0, [w / 2, h / 2], size=(num, 2))
                boxes = np.concatenate([xy, xy + rng.uniform(1, [w / 2, h / 2], size=(num, 2))], axis=1)
                scores = rng.uniform(size=num)
                if mutate is not None:
                    boxes, scores = mutate(image_id, boxes, scores)
                writer.add(image_id, boxes, scores)
    write_manifest(str(folder), {"source": "test"})
    return str(folder)


def test_round_trip_by_image_id_best_first(synth, tmp_path):
    image_sizes = sizes(synth)
    folder = write_folder(tmp_path / "p", image_sizes)
    split = open_split(folder, "train", image_sizes)
    for image_id in image_sizes:
        boxes, scores = split[image_id]
        assert boxes.shape == (5, 4) and boxes.dtype == np.float32
        assert (np.diff(scores) <= 0).all()  # the writer sorted them best first
    # Pickled for a DataLoader worker: paths travel, arrays are mapped again on the other side.
    again = pickle.loads(pickle.dumps(split))
    first = next(iter(image_sizes))
    np.testing.assert_array_equal(again[first][0], split[first][0])


def _bad(image_id_to_break):
    def mutate(image_id, boxes, scores):
        return (boxes, scores) if image_id != image_id_to_break else BREAKS[mutate.kind](boxes, scores)
    return mutate


BREAKS = {
    "nan": lambda b, s: (np.where(np.arange(4) == 2, np.nan, b), s),
    "outside": lambda b, s: (b + np.array([0, 0, 500, 0]), s),
    "negative": lambda b, s: (b[:, [2, 1, 0, 3]], s),
    "unsorted": lambda b, s: (b, s),  # the writer sorts; unsorted files are made by hand below
}


@pytest.mark.parametrize("kind,problem", [("nan", "NaN or infinite"), ("outside", "outside the image"),
                                          ("negative", "x2 < x1")])
def test_a_bad_box_names_the_file_and_the_first_bad_image(synth, tmp_path, kind, problem):
    image_sizes = sizes(synth)
    second = list(image_sizes)[1]
    mutate = _bad(second)
    mutate.kind = kind
    folder = write_folder(tmp_path / kind, image_sizes, mutate=mutate)
    with pytest.raises(ProposalsError) as err:
        open_split(folder, "train", image_sizes)
    message = str(err.value)
    assert split_files(folder, "train")["boxes"] in message and f"image id {second} " in message
    assert problem in message and "\n" not in message


def test_a_missing_image_id_is_named(synth, tmp_path):
    image_sizes = sizes(synth)
    folder = write_folder(tmp_path / "p", dict(list(image_sizes.items())[:-1]))
    missing = list(image_sizes)[-1]
    with pytest.raises(ProposalsError, match=f"no proposals for image id {missing} of the train set"):
        open_split(folder, "train", image_sizes)


def test_wrong_shapes_and_unsorted_scores_are_named(synth, tmp_path):
    image_sizes = sizes(synth)
    folder = write_folder(tmp_path / "p", image_sizes)
    files = split_files(folder, "train")
    boxes = np.load(files["boxes"])
    np.save(files["boxes"], boxes[:, :3])
    with pytest.raises(ProposalsError, match=r"train.boxes.npy holds a float32 array of shape \[20, 3\]"):
        open_split(folder, "train", image_sizes)
    np.save(files["boxes"], boxes[:-1])
    with pytest.raises(ProposalsError, match="counts 20 proposals but"):
        open_split(folder, "train", image_sizes)
    np.save(files["boxes"], boxes)
    scores = np.load(files["scores"])
    scores[6] = 2.0  # the second image's second row beats its first
    np.save(files["scores"], scores)
    second = list(image_sizes)[1]
    with pytest.raises(ProposalsError, match=f"image id {second}'s proposals are not sorted"):
        open_split(folder, "train", image_sizes)
    np.save(files["scores"], np.array([object()] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(ProposalsError, match="not a plain numeric .npy"):
        open_split(folder, "train", image_sizes)


def test_a_folder_without_manifest_is_not_a_proposals_folder(tmp_path):
    with pytest.raises(ProposalsError, match="manifest.json does not exist"):
        open_split(str(tmp_path), "train", {})


def test_the_dataset_carries_and_flips_the_proposals(synth, tmp_path):
    image_sizes = sizes(synth)
    folder = write_folder(tmp_path / "p", image_sizes)
    base = TrainConfig.from_dict({"detector": {"arch": "fast_rcnn"}, "data": {
        "kind": "coco", "train_images": synth["train_images"], "train_annotations": synth["train_annotations"],
        # val is the train set without flips: the same images and proposals, unflipped
        "val_images": synth["train_images"], "val_annotations": synth["train_annotations"],
        "proposals": folder, "horizontal_flip": 1.0}})
    train, val = build_datasets(base.data)
    image_id = train.image_ids[0]
    stored, _ = open_split(folder, "train", image_sizes)[image_id]
    width = image_sizes[image_id][0]
    _, flipped = train[0]
    _, plain = val[0]
    stored_val, _ = open_split(folder, "val", image_sizes)[image_id]  # val reads the val split
    torch.testing.assert_close(plain["proposals"], torch.from_numpy(stored_val))
    mirrored = torch.from_numpy(stored)[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    torch.testing.assert_close(flipped["proposals"], mirrored)
    partial = write_folder(tmp_path / "partial", dict(list(image_sizes.items())[:2]))
    with pytest.raises(ProposalsError, match="train.index.npy has no proposals"):  # checked before training
        build_datasets(dataclasses.replace(base.data, proposals=partial))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_mmdet_pickles_import_and_foreign_pickles_run_nothing(synth, tmp_path):
    image_sizes = sizes(synth)
    ids = list(image_sizes)
    arrays = [np.array([[1, 2, 10, 12, 0.5], [3, 3, 20, 20, 0.9]], dtype=np.float32) for _ in ids]
    good = tmp_path / "rpn.pkl"
    good.write_bytes(pickle.dumps(arrays))
    folder = tmp_path / "imported"
    os.makedirs(folder)
    assert import_mmdet_split(str(good), str(folder), "train", ids) == len(ids)
    write_manifest(str(folder), {"source": "test"})
    boxes, scores = open_split(str(folder), "train", image_sizes)[ids[0]]
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.5]))  # best first
    np.testing.assert_array_equal(boxes[0], [3, 3, 20, 20])

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([arrays[0], _RunsCode(str(marker))]))
    with pytest.raises(ProposalsError, match="evil.pkl holds objects other than numpy arrays"):
        load_mmdet_pickle(str(evil))
    assert not marker.exists()
    short = tmp_path / "short.pkl"
    short.write_bytes(pickle.dumps(arrays[:-1]))
    with pytest.raises(ProposalsError, match=f"holds {len(ids) - 1} arrays but the train annotation file lists {len(ids)}"):
        import_mmdet_split(str(short), str(tmp_path / "x"), "train", ids)
    shaped = tmp_path / "shaped.pkl"
    shaped.write_bytes(pickle.dumps([np.zeros((3, 7), np.float32)] * len(ids)))
    with pytest.raises(ProposalsError, match=r"element 0 is \[3, 7\]"):
        load_mmdet_pickle(str(shaped))
