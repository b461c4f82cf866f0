"""The COCO-format dataset, its augmentation and the loader: targets, edges, and user mistakes."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.config import DataConfig, SyntheticDataConfig
from detectors.data import CocoDetection, DatasetError, build_datasets, collate_detection


def write_set(root, images, annotations, categories=None, *, pixels=None):
    """Write a COCO JSON and its images under `root`; returns (images_dir, annotations_file).

    `images`: [(id, width, height)]; `pixels`: {id: PIL image} overrides the default grey image.
    """
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"},
                                {"id": 42, "name": "emu"}]
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, width, height in images:
        name = f"{image_id:04d}.png"
        img = (pixels or {}).get(image_id) or Image.new("RGB", (width, height), (90, 90, 90))
        img.save(images_dir / name)
        records.append({"id": image_id, "file_name": name, "width": width, "height": height})
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": records, "annotations": annotations,
                                    "categories": categories}))
    return str(images_dir), str(ann_file)


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}


def test_targets_ids_crowd_and_empty_images(tmp_path):
    images_dir, ann_file = write_set(
        tmp_path, [(1, 40, 30), (2, 20, 20)],
        [ann(1, 1, 7, [2, 3, 10, 5]), ann(2, 1, 3, [0, 0, 30, 20], iscrowd=1)])
    ds = CocoDetection(images_dir, ann_file, train=False)

    assert ds.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 42}
    assert ds.num_classes == 3 and ds.category_names == ["cat", "dog", "emu"]
    assert ds.image_ids == [1, 2] and len(ds) == 2 and ds.coco.getCatIds() == [3, 7, 42]

    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    # The crowd box is gone; [x, y, w, h] = [2, 3, 10, 5] -> xyxy [2, 3, 12, 8]; dog -> label 2.
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2]
    assert target["image_id"] == 1

    _, empty = ds[1]  # no annotations: kept, with well-shaped empty targets
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["image_id"] == 2


def test_clipping_and_dropping_counted_in_one_warning(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(1, 50, 40)], [
        ann(1, 1, 3, [1, 1, 5, 5]),      # inside: kept as is
        ann(2, 1, 3, [45, 30, 10, 20]),  # past the right and bottom edges: clipped
        ann(3, 1, 7, [-5, 0, 10, 10]),   # past the left edge: clipped
        ann(4, 1, 7, [60, 10, 5, 5]),    # entirely outside: dropped
        ann(5, 1, 42, [10, 10, 0, 5]),   # zero width: dropped
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(images_dir, ann_file, train=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "dropped 2 and clipped 2 boxes of 5" in message and ann_file in message

    _, target = ds[0]
    assert target["boxes"].tolist() == [[1, 1, 6, 6], [45, 30, 50, 40], [0, 0, 5, 10]]
    assert target["labels"].tolist() == [1, 1, 2]


def test_clean_set_gives_no_warning(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(1, 50, 40)], [ann(1, 1, 3, [0, 0, 50, 40])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(images_dir, ann_file, train=False)


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    palette = Image.new("P", (8, 6))
    palette.putpalette([200, 100, 50] * 256)
    pixels = {1: Image.new("L", (8, 6), 128), 2: Image.new("RGBA", (8, 6), (10, 20, 30, 40)),
              3: palette}
    images_dir, ann_file = write_set(tmp_path, [(1, 8, 6), (2, 8, 6), (3, 8, 6)], [],
                                     pixels=pixels)
    ds = CocoDetection(images_dir, ann_file, train=False)
    expected = {0: (128, 128, 128), 1: (10, 20, 30), 2: (200, 100, 50)}
    for index, rgb in expected.items():
        image, _ = ds[index]
        assert image.shape == (3, 6, 8) and image.dtype == torch.float32
        assert torch.allclose(image[:, 0, 0], torch.tensor(rgb) / 255.0)


def test_flip_mirrors_boxes_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    images_dir, ann_file = write_set(tmp_path, [(1, 100, 60)], [ann(1, 1, 3, [10, 20, 20, 20])],
                                     pixels={1: noise})
    plain_image, plain = CocoDetection(images_dir, ann_file, train=False, horizontal_flip=1.0)[0]
    flipped_image, flipped = CocoDetection(images_dir, ann_file, train=True, horizontal_flip=1.0)[0]
    # x' = W - x: [10, 30] mirrored in a 100 px wide image is [70, 90]; y stays.
    assert plain["boxes"].tolist() == [[10, 20, 30, 40]]
    assert flipped["boxes"].tolist() == [[70, 20, 90, 40]]
    assert type(flipped["boxes"]) is torch.Tensor and type(flipped_image) is torch.Tensor
    assert torch.equal(flipped_image, plain_image.flip(-1))
    assert flipped["labels"].tolist() == plain["labels"].tolist()

    unflipped_image, unflipped = CocoDetection(images_dir, ann_file, train=True,
                                               horizontal_flip=0.0)[0]
    assert torch.equal(unflipped_image, plain_image) and unflipped["boxes"].tolist() == [[10, 20, 30, 40]]


# --------------------------------------------------------------------------------------------
# User mistakes: one DatasetError naming the file (and the record).
# --------------------------------------------------------------------------------------------
def _base_json():
    return {"images": [{"id": 1, "file_name": "0001.png", "width": 20, "height": 10}],
            "annotations": [ann(17, 1, 3, [1, 1, 4, 4])],
            "categories": [{"id": 3, "name": "cat"}]}


def _set(key, value):
    def mutate(data):
        record, field = key
        data[record][0][field] = value
        return data
    return mutate


@pytest.mark.parametrize("mutate, fragments", [
    (_set(("annotations", "bbox"), [1, 2, 3]),
     ["annotation id 17 in", "bbox must be 4 numbers [x, y, w, h]"]),
    (_set(("annotations", "bbox"), [1, 2, "3", 4]), ["annotation id 17 in", "bbox must be 4 numbers"]),
    (_set(("annotations", "bbox"), [1, 2, -3, 4]), ["annotation id 17 in", "width and height"]),
    (_set(("annotations", "category_id"), 99), ["annotation id 17 in", "category_id 99"]),
    (_set(("annotations", "image_id"), 5), ["annotation id 17 in", "image_id 5"]),
    (_set(("annotations", "id"), 0), ["annotation id 0 in", ">= 1"]),
    (_set(("images", "width"), None), ["image id 1 in", "'width'"]),
    (lambda d: {**d, "images": [{"id": 1, "width": 20, "height": 10}]}, ["image id 1 in", "file_name"]),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, ["lacks 'categories'"]),
    (lambda d: [d], ["not an object"]),
])
def test_malformed_records_name_file_and_record(tmp_path, mutate, fragments):
    Image.new("RGB", (20, 10)).save(tmp_path / "0001.png")
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(mutate(_base_json())))
    with pytest.raises(DatasetError) as info:
        CocoDetection(str(tmp_path), str(ann_file), train=True)
    message = str(info.value)
    assert str(ann_file) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"instances\.json is not valid JSON \(line 1"):
        CocoDetection(str(tmp_path), str(bad), train=False)
    with pytest.raises(DatasetError, match=r"nope\.json does not exist"):
        CocoDetection(str(tmp_path), str(tmp_path / "nope.json"), train=False)


def test_missing_image_fails_at_construction(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(1, 20, 10), (2, 20, 10), (3, 20, 10)], [])
    (tmp_path / "images" / "0002.png").unlink()
    (tmp_path / "images" / "0003.png").unlink()
    with pytest.raises(DatasetError) as info:
        CocoDetection(images_dir, ann_file, train=False)
    message = str(info.value)
    assert "0002.png" in message and "image id 2" in message and "does not exist" in message
    assert "1 more" in message


def test_corrupt_or_mis_sized_image_fails_when_read_naming_the_file(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(1, 20, 10), (2, 20, 10)], [])
    (tmp_path / "images" / "0001.png").write_bytes(b"this is not a png")
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "0002.png")
    ds = CocoDetection(images_dir, ann_file, train=False)  # existence is all construction checks
    with pytest.raises(DatasetError, match=r"cannot read image .*0001\.png \(image id 1"):
        ds[0]
    with pytest.raises(DatasetError, match=r"0002\.png is 10x10 pixels but image id 2"):
        ds[1]


# --------------------------------------------------------------------------------------------
# The loader.
# --------------------------------------------------------------------------------------------
def test_build_datasets_names_the_missing_key(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(1, 20, 10)], [])
    cfg = DataConfig(kind="coco", train_images=images_dir, train_annotations=ann_file,
                     val_images=images_dir, val_annotations=str(tmp_path / "missing.json"))
    with pytest.raises(DatasetError, match=r"^data\.val_annotations: .*missing\.json does not exist"):
        build_datasets(cfg)
    cfg = DataConfig(kind="coco", train_images=ann_file, train_annotations=ann_file,
                     val_images=images_dir, val_annotations=ann_file)
    with pytest.raises(DatasetError, match=r"^data\.train_images: .* is not a folder"):
        build_datasets(cfg)


def test_build_datasets_coco_and_max_val_images(tmp_path):
    images_dir, ann_file = write_set(tmp_path, [(5, 20, 10), (2, 20, 10), (9, 20, 10)],
                                     [ann(1, 9, 3, [1, 1, 4, 4]), ann(2, 2, 3, [1, 1, 4, 4])])  # a box in the kept val images
    cfg = DataConfig(kind="coco", train_images=images_dir, train_annotations=ann_file,
                     val_images=images_dir, val_annotations=ann_file, max_val_images=2,
                     horizontal_flip=0.25)
    train, val = build_datasets(cfg)
    assert train.train and not val.train
    assert train.image_ids == [2, 5, 9]
    assert val.image_ids == [2, 5] and len(val) == 2  # the first N ids, in sorted order
    with pytest.raises(DatasetError, match=r"data\.max_val_images must be >= 1"):
        build_datasets(DataConfig(kind="coco", train_images=images_dir, train_annotations=ann_file,
                                  val_images=images_dir, val_annotations=ann_file,
                                  max_val_images=0))


def test_build_datasets_synthetic(tmp_path):
    cfg = DataConfig(kind="synthetic", root=str(tmp_path),
                     synthetic=SyntheticDataConfig(num_train=3, num_val=4, image_size=64, seed=1),
                     max_val_images=3)
    train, val = build_datasets(cfg)
    assert len(train) == 3 and len(val) == 3 and val.image_ids == [1, 2, 3]
    assert train.cat_id_to_label == {1: 1, 3: 2, 5: 3, 7: 4, 9: 5, 11: 6}
    image, target = train[0]
    assert image.shape == (3, 64, 64) and target["boxes"].shape[1] == 4


def test_collate_keeps_lists_of_differently_sized_images():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 2), {"image_id": 2})]
    images, targets = collate_detection(batch)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 2)]
    assert [t["image_id"] for t in targets] == [1, 2]
