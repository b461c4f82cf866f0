"""The bad-input corpus: every command x every kind of bad value, file, path and server.

Each case is a command line a user could type. It must end with exit code 2 and exactly one
line on stderr (no traceback) that names what is wrong: the file, the key, the record or the
flag. They run in-process through `harness.cli.main` (the same code path as the `libra`
script, without paying torch's import per case); the Ray address cases and a smoke case run
the real `python -m harness.cli` in a subprocess. docs/errors.md keeps the count.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from harness.cli import main

# The smallest model that builds (seconds on one core): the corpus never trains it far.
TINY_BASE = {
    "detector": {"backbone": "tiny", "num_classes": 6, "min_size": 64, "max_size": 64,
                 "fpn_channels": 16, "representation_size": 32, "roi_batch_size_per_image": 32,
                 "anchor_sizes": [8, 16, 32, 64, 128],
                 "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                 "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30},
    "data": {"kind": "synthetic"},
    "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "lr_steps": [],
                 "amp": False, "device": "cpu"},
}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()


class _RunsCode:
    """Unpickling this would create `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_train_config(data_root: str) -> dict:
    cfg = {k: json.loads(json.dumps(TINY_BASE[k])) for k in ("detector", "data", "schedule")}
    cfg["data"]["root"] = data_root
    cfg["data"]["synthetic"] = {"num_train": 2, "num_val": 2, "image_size": 64, "seed": 0}
    cfg["schedule"]["epochs"] = 1
    return cfg


def _coco_set(folder, images: list, annotations: list) -> tuple[str, str]:
    os.makedirs(folder / "img", exist_ok=True)
    ann = folder / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return str(folder / "img"), str(ann)


def _proposal_corpus(tmp, cfg: dict, p: dict, write) -> None:
    """Proposals folders for the corpus's synthetic set, each broken one way, and pickles."""
    import numpy as np

    from detectors import TrainConfig, build_detector
    from detectors.data.coco import CocoDetection
    from detectors.data.synthetic import ensure_synthetic
    from detectors.proposals import SplitWriter, write_manifest

    train_cfg = TrainConfig.from_dict(cfg)
    paths = ensure_synthetic(train_cfg.data.root, train_cfg.data.synthetic)
    sizes = {split: CocoDetection(paths[f"{split}_images"], paths[f"{split}_annotations"], train=False).image_sizes()
             for split in ("train", "val")}
    breaks = {
        "good": lambda i, b: b,
        "missing": None,  # the last train image left out
        "nan": lambda i, b: np.where(np.arange(4) == 1, np.nan, b) if i == 1 else b,
        "outside": lambda i, b: b + np.array([0, 0, 300, 0]) if i == 1 else b,
    }
    for name, edit in breaks.items():
        folder = tmp / f"proposals_{name}"
        os.makedirs(folder)
        for split, image_sizes in sizes.items():
            ids = list(image_sizes)
            if edit is None and split == "train":
                ids = ids[:-1]
            with SplitWriter(str(folder), split) as writer:
                for image_id in ids:
                    boxes = np.array([[2.0, 2.0, 30.0, 30.0], [10.0, 5.0, 40.0, 50.0]])
                    writer.add(image_id, boxes if edit is None else edit(image_id, boxes), np.array([0.9, 0.4]))
        write_manifest(str(folder), {"source": "corpus"})
        p[f"proposals_{name}"] = str(folder)
    p["missing_image_id"] = str(list(sizes["train"])[-1])
    np.save(tmp / "proposals_good" / "val.boxes.npy", np.zeros((len(sizes["val"]) * 2, 3), np.float32))
    p["proposals_shape"] = str(tmp / "proposals_good")  # its val boxes are [N, 3]
    (tmp / "proposals_nomanifest").mkdir()
    p["proposals_nomanifest"] = str(tmp / "proposals_nomanifest")
    arrays = [np.array([[1, 1, 20, 20, 0.5]], np.float32)]
    write("short.pkl", pickle.dumps(arrays))  # one array: the sets have two images
    write("evil.pkl", pickle.dumps([arrays[0], _RunsCode(p["marker"])]))
    fast = TrainConfig.from_dict(dict(cfg, detector=dict(cfg["detector"], arch="fast_rcnn")))
    torch.save({"model": build_detector(fast.detector).state_dict(), "config": fast.to_dict()}, tmp / "fast.pt")
    p["fast_pt"] = str(tmp / "fast.pt")
    study = dict(cfg, name="stage", detector=dict(cfg["detector"], arch="fast_rcnn"),
                 grid={"detector.balanced_l1_loss.enabled": [False, True]},
                 proposals={"checkpoint": "nope/checkpoint.pt"})
    write("study_stage.yaml", yaml.safe_dump(study, sort_keys=False))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every bad file the cases point at, made once; {name: path}."""
    from PIL import Image

    from detectors import TrainConfig, build_detector

    tmp = tmp_path_factory.mktemp("corpus")
    p: dict[str, str] = {"tmp": str(tmp)}

    def write(name: str, content) -> str:
        path = tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        p[name.replace(".", "_")] = str(path)
        return str(path)

    # A valid run config and a valid study, the base of the value cases.
    cfg = _tiny_train_config(str(tmp / "data"))
    write("config.yaml", yaml.safe_dump(cfg))
    study = dict(cfg, name="corpus", resources={"workers": 1, "cpus_per_worker": 1},
                 grid={"detector.balanced_l1_loss.enabled": [False, True]})
    write("study.yaml", yaml.safe_dump(study, sort_keys=False))

    # Files that are not YAML, or YAML that the loader's limits refuse.
    write("binary.yaml", bytes(range(256)) * 8)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp / "image.png")
    p["image_png"] = str(tmp / "image.png")
    write("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    write("dup_config.yaml", "detector:\n  backbone: tiny\n  backbone: resnet50\n")
    write("dup_study.yaml", "name: a\ndescription: x\nname: b\n")
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        laughs.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    write("bomb.yaml", "\n".join(laughs) + "\n")
    write("deep.yaml", "name: " + "[" * 200 + "]" * 200 + "\n")
    write("big.yaml", "name: big\ndescription: " + "x" * (2 * 1024 * 1024) + "\n")
    write("list.yaml", "- 1\n- 2\n")
    os.makedirs(tmp / "folder.yaml")
    p["folder"] = str(tmp / "folder.yaml")
    write("plain.txt", "a file, not a folder\n")

    # Checkpoints: a real one, and every way one goes wrong.
    train_cfg = TrainConfig.from_dict(cfg)
    model = build_detector(train_cfg.detector)
    good = {"model": model.state_dict(), "config": train_cfg.to_dict()}
    torch.save(good, tmp / "good.pt")
    raw = (tmp / "good.pt").read_bytes()
    write("truncated.pt", raw[: len(raw) // 2])
    write("corrupt.pt", os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    torch.save([1, 2, 3], tmp / "list.pt")
    p["marker"] = str(tmp / "PWNED")
    with open(tmp / "malicious.pkl.pt", "wb") as fh:  # protocol 2: the one torch's reader parses
        pickle.dump({"model": {}, "config": _RunsCode(p["marker"])}, fh, protocol=2)
    with open(tmp / "malicious4.pkl.pt", "wb") as fh:  # protocol 4: refused before parsing
        pickle.dump({"model": {}, "config": _RunsCode(p["marker"])}, fh, protocol=4)
    p["malicious4_pkl_pt"] = str(tmp / "malicious4.pkl.pt")
    torch.save({"model": {}, "config": _RunsCode(p["marker"])}, tmp / "malicious.pt")
    bad_config = dict(good, config=dict(good["config"], schedule=dict(good["config"]["schedule"], lr=-1.0)))
    torch.save(bad_config, tmp / "bad_config.pt")
    other = TrainConfig.from_dict(dict(cfg, detector=dict(cfg["detector"], num_classes=2)))
    torch.save(dict(good, model=build_detector(other.detector).state_dict()), tmp / "mismatch.pt")
    for name in ("good", "foreign", "list", "malicious_pkl", "malicious", "bad_config", "mismatch"):
        p[f"{name}_pt"] = str(tmp / f"{name.replace('_pkl', '.pkl')}.pt")
    os.makedirs(tmp / "ckpt_dir")
    p["ckpt_dir"] = str(tmp / "ckpt_dir")
    os.makedirs(tmp / "resume_out")
    (tmp / "resume_out" / "checkpoint.pt").write_bytes(os.urandom(512))
    p["resume_out"] = str(tmp / "resume_out")

    # COCO-format sets that cannot train: no images; images but no boxes.
    img_dir, ann = _coco_set(tmp / "empty", [], [])
    p["empty_images"], p["empty_ann"] = img_dir, ann
    Image.new("RGB", (64, 64)).save(tmp / "empty" / "img" / "a.png")
    img_dir, ann = _coco_set(tmp / "unannotated", [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], [])
    Image.new("RGB", (64, 64)).save(tmp / "unannotated" / "img" / "a.png")
    p["bare_images"], p["bare_ann"] = img_dir, ann
    for name, (images, annotations) in {"empty": (p["empty_images"], p["empty_ann"]),
                                        "bare": (p["bare_images"], p["bare_ann"])}.items():
        coco = dict(cfg, data={"kind": "coco", "train_images": images, "train_annotations": annotations,
                               "val_images": images, "val_annotations": annotations})
        write(f"coco_{name}.yaml", yaml.safe_dump(coco))
    coco_missing = dict(study, data={"kind": "coco", "train_images": "nope/img", "train_annotations": "nope.json",
                                     "val_images": "nope/img", "val_annotations": "nope.json"})
    write("study_coco_missing.yaml", yaml.safe_dump(coco_missing, sort_keys=False))

    # Proposals (detector.arch fast_rcnn): folders that do not fit the corpus's synthetic set,
    # pickles that are not mmdetection's, a checkpoint without an RPN.
    _proposal_corpus(tmp, cfg, p, write)

    # A port on loopback with nothing listening: bound (so no one else takes it), never listen()ed.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    p["port"] = str(holder.getsockname()[1])
    yield p
    holder.close()


C, S = "{config_yaml}", "{study_yaml}"
CASES = [
    # ---- libra train: the file
    ("train/missing", "train {tmp}/nope.yaml", ["nope.yaml", "no such file"]),
    ("train/folder", "train {folder}", ["folder.yaml", "is a folder"]),
    ("train/binary", "train {binary_yaml}", ["binary.yaml", "binary"]),
    ("train/image", "train {image_png}", ["image.png", "binary"]),
    ("train/not-utf8", "train {latin1_yaml}", ["latin1.yaml", "UTF-8"]),
    ("train/duplicate-key", "train {dup_config_yaml}", ["dup_config.yaml", "duplicate key 'backbone'", "line 3"]),
    ("train/alias-bomb", "train {bomb_yaml}", ["bomb.yaml", "aliases"]),
    ("train/deep", "train {deep_yaml}", ["deep.yaml", "nested"]),
    ("train/oversize", "train {big_yaml}", ["big.yaml", "MB"]),
    ("train/not-a-mapping", "train {list_yaml}", ["list.yaml", "mapping"]),
    # ---- libra train: values (each also under --dry-run, which must reject the same)
    ("train/negative-lr", f"train {C} --set schedule.lr=-0.1", ["schedule.lr", "> 0", "-0.1"]),
    ("train/nan-lr", f"train {C} --set schedule.lr=.nan --dry-run", ["schedule.lr"]),
    ("train/negative-base-lr", f"train {C} --set schedule.base_lr=-1 --dry-run", ["schedule.base_lr"]),
    ("train/momentum", f"train {C} --set schedule.momentum=1.5 --dry-run", ["schedule.momentum", "[0.0, 1.0)"]),
    ("train/weight-decay", f"train {C} --set schedule.weight_decay=-1 --dry-run", ["schedule.weight_decay"]),
    ("train/max-iters-0", f"train {C} --set schedule.max_iters_per_epoch=0", ["schedule.max_iters_per_epoch", ">= 1"]),
    ("train/negative-seed", f"train {C} --set schedule.seed=-1", ["schedule.seed", "-1"]),
    ("train/huge-seed", f"train {C} --set schedule.seed=99999999999 --dry-run", ["schedule.seed"]),
    ("train/batch-size-0", f"train {C} --set schedule.batch_size=0 --dry-run", ["schedule.batch_size"]),
    ("train/epochs-0", f"train {C} --set schedule.epochs=0 --dry-run", ["schedule.epochs"]),
    ("train/grad-clip-0", f"train {C} --set schedule.grad_clip=0 --dry-run", ["schedule.grad_clip"]),
    ("train/threads-0", f"train {C} --set schedule.num_threads=0 --dry-run", ["schedule.num_threads"]),
    ("train/device-unknown", f"train {C} --set schedule.device=tpu", ["schedule.device", "'tpu'"]),
    ("train/synthetic-image-size-0", f"train {C} --set data.synthetic.image_size=0", ["data.synthetic.image_size"]),
    ("train/synthetic-num-train-0", f"train {C} --set data.synthetic.num_train=0", ["data.synthetic.num_train"]),
    ("train/synthetic-negative-seed", f"train {C} --set data.synthetic.seed=-3", ["data.synthetic.seed"]),
    ("train/absurd-min-size", f"train {C} --set detector.min_size=100000 --dry-run", ["detector.min_size", "8192"]),
    ("train/nms-thresh", f"train {C} --set detector.box_nms_thresh=0 --dry-run", ["detector.box_nms_thresh"]),
    ("train/num-workers", f"train {C} --set data.num_workers=-1 --dry-run", ["data.num_workers"]),
    ("train/max-val-images-0", f"train {C} --set data.max_val_images=0 --dry-run", ["data.max_val_images"]),
    ("train/unknown-key", f"train {C} --set detector.bogus=1", ["detector.bogus"]),
    ("train/bad-set", f"train {C} --set schedule.epochs", ["--set", "KEY=VALUE"]),
    ("train/unknown-flag", f"train {C} --bogus", ["--bogus"]),
    ("train/corrupt-pretrained", f"train {C} --set detector.pretrained={{corrupt_pt}}", ["detector.pretrained", "corrupt.pt"]),
    ("train/malicious-pretrained", f"train {C} --set detector.pretrained={{malicious_pt}}", ["detector.pretrained"]),
    # ---- libra train: paths and data
    ("train/out-is-a-file", f"train {C} --out {{plain_txt}}", ["--out", "plain.txt", "is a file"]),
    ("train/out-under-a-file", f"train {C} --out {{plain_txt}}/run", ["--out", "plain.txt"]),
    ("train/out-virtual-fs", f"train {C} --out /proc/libra-run", ["--out", "/proc/libra-run"]),
    ("train/dry-run-out-virtual-fs", f"train {C} --out /proc/libra-run --dry-run", ["--out", "/proc/libra-run"]),
    ("train/resume-corrupt", f"train {C} --out {{resume_out}} --resume", ["checkpoint", "resume_out", "corrupt"]),
    ("train/empty-dataset", "train {coco_empty_yaml}", ["empty/instances.json", "no images"]),
    ("train/unannotated-dataset", "train {coco_bare_yaml}", ["unannotated/instances.json", "no annotated boxes"]),
    # ---- libra eval: the checkpoint
    ("eval/missing", "eval --checkpoint {tmp}/none.pt", ["--checkpoint", "none.pt", "no such file"]),
    ("eval/folder", "eval --checkpoint {ckpt_dir}", ["--checkpoint", "ckpt_dir", "is a folder"]),
    ("eval/corrupt", "eval --checkpoint {corrupt_pt}", ["corrupt.pt", "corrupt"]),
    ("eval/truncated", "eval --checkpoint {truncated_pt}", ["truncated.pt", "truncated"]),
    ("eval/foreign", "eval --checkpoint {foreign_pt}", ["foreign.pt", "'model' and 'config'", "weights"]),
    ("eval/not-a-mapping", "eval --checkpoint {list_pt}", ["list.pt", "list"]),
    ("eval/malicious-pickle", "eval --checkpoint {malicious_pkl_pt}", ["malicious.pkl.pt", "can run code"]),
    ("eval/malicious-pickle-4", "eval --checkpoint {malicious4_pkl_pt}", ["malicious4.pkl.pt", "not loaded"]),
    ("eval/malicious-torch-save", "eval --checkpoint {malicious_pt}", ["malicious.pt", "can run code"]),
    ("eval/bad-config", "eval --checkpoint {bad_config_pt}", ["bad_config.pt", "schedule.lr"]),
    ("eval/weights-mismatch", "eval --checkpoint {mismatch_pt}", ["mismatch.pt", "do not fit"]),
    # ---- libra eval: flags
    ("eval/device-unknown", "eval --checkpoint {good_pt} --device tpu", ["--device", "'tpu'"]),
    ("eval/device-garbage", "eval --checkpoint {good_pt} --device cuda:x", ["--device"]),
    ("eval/batch-size-0", "eval --checkpoint {good_pt} --batch-size 0", ["--batch-size", "0"]),
    ("eval/batch-size-text", "eval --checkpoint {good_pt} --batch-size two", ["--batch-size", "two"]),
    ("eval/out-is-a-folder", "eval --checkpoint {good_pt} --out {ckpt_dir}", ["--out", "is a folder"]),
    ("eval/out-virtual-fs", "eval --checkpoint {good_pt} --out /proc/libra/eval.json", ["--out", "/proc/libra"]),
    ("eval/val-images-a-file", "eval --checkpoint {good_pt} --val-images {plain_txt} --val-annotations {empty_ann}",
     ["--val-images", "is a file"]),
    ("eval/val-annotations-a-folder", "eval --checkpoint {good_pt} --val-images {empty_images} "
     "--val-annotations {ckpt_dir}", ["--val-annotations", "is a folder"]),
    ("eval/half-val-set", "eval --checkpoint {good_pt} --val-images {empty_images}", ["--val-annotations"]),
    ("eval/empty-val-set", "eval --checkpoint {good_pt} --val-images {empty_images} --val-annotations {empty_ann}",
     ["empty/instances.json", "no images"]),
    # ---- libra run: the file
    ("run/missing", "run {tmp}/nope.yaml", ["nope.yaml", "not found"]),
    ("run/folder", "run {folder}", ["folder.yaml", "is a folder"]),
    ("run/binary", "run {binary_yaml}", ["binary.yaml", "binary"]),
    ("run/image", "run {image_png} --dry-run", ["image.png", "binary"]),
    ("run/duplicate-key", "run {dup_study_yaml} --dry-run", ["dup_study.yaml", "duplicate key 'name'", "line 3"]),
    ("run/alias-bomb", "run {bomb_yaml} --dry-run", ["bomb.yaml", "aliases"]),
    ("run/deep", "run {deep_yaml} --dry-run", ["deep.yaml", "nested"]),
    ("run/oversize", "run {big_yaml} --dry-run", ["big.yaml", "MB"]),
    ("run/not-a-mapping", "run {list_yaml} --dry-run", ["list.yaml", "mapping"]),
    # ---- libra run: values a trial would reject, caught by --dry-run
    ("run/num-train-0", f"run {S} --dry-run --set data.synthetic.num_train=0", ["study.yaml", "data.synthetic.num_train"]),
    ("run/image-size-0", f"run {S} --dry-run --set data.synthetic.image_size=0", ["study.yaml", "data.synthetic.image_size"]),
    ("run/negative-lr", f"run {S} --dry-run --set schedule.lr=-0.02", ["study.yaml", "schedule.lr"]),
    ("run/max-iters-0", f"run {S} --dry-run --set schedule.max_iters_per_epoch=0", ["study.yaml", "schedule.max_iters_per_epoch"]),
    ("run/grid-negative-lr", f"run {S} --dry-run --set grid.schedule.lr=[0.01,-1]", ["study.yaml", "grid.schedule.lr[1]"]),
    ("run/negative-seed", f"run {S} --dry-run --set seeds=[0,-1]", ["study.yaml", "seeds"]),
    ("run/device-unknown", f"run {S} --dry-run --set schedule.device=tpu", ["study.yaml", "schedule.device"]),
    ("run/unknown-key", f"run {S} --dry-run --set detector.bogus=1", ["study.yaml", "detector.bogus"]),
    ("run/bad-set", f"run {S} --dry-run --set seeds", ["--set", "KEY=VALUE"]),
    ("run/max-retries", f"run {S} --dry-run --max-retries -1", ["--max-retries"]),
    ("run/missing-data", "run {study_coco_missing_yaml} --dry-run", ["data.train_images", "does not exist"]),
    # ---- libra run: paths and servers
    ("run/work-dir-is-a-file", f"run {S} --dry-run --work-dir {{plain_txt}}", ["--work-dir", "is a file"]),
    ("run/work-dir-virtual-fs", f"run {S} --dry-run --work-dir /proc/libra-work", ["--work-dir", "/proc/libra-work"]),
    ("run/tracking-unknown-scheme", f"run {S} --dry-run --tracking-uri bogus://x", ["--tracking-uri", "unknown scheme"]),
    ("run/tracking-scheme-from-set", f"run {S} --dry-run --set tracking.uri=bogus://x", ["--set tracking.uri", "unknown scheme"]),
    ("run/tracking-sqlite-virtual-fs", f"run {S} --dry-run --tracking-uri sqlite:////proc/x/mlflow.db", ["--tracking-uri"]),
    ("run/tracking-server-down", f"run {S} --dry-run --tracking-uri http://127.0.0.1:{{port}}", ["cannot reach MLflow tracking server", "given by --tracking-uri"]),
    ("run/optuna-not-a-url", f"run {S} --dry-run --optuna-storage not-a-url", ["--optuna-storage", "not a database URL"]),
    ("run/optuna-no-driver", f"run {S} --dry-run --optuna-storage nosuchdb://u@h/db", ["--optuna-storage", "driver"]),
    ("run/optuna-from-set", f"run {S} --dry-run --set tracking.optuna_storage=not-a-url", ["--set tracking.optuna_storage"]),
    ("run/address-ray-client", f"run {S} --address ray://127.0.0.1:{{port}}", ["--address", "ray://127.0.0.1:", "nothing answers"]),
    ("run/address-malformed", f"run {S} --address head-node", ["--address", "head-node", "HOST:PORT"]),
    ("run/address-bad-port", f"run {S} --address head:99999", ["--address", "head:99999"]),
    # ---- libra proposals, and Fast R-CNN on proposals that do not fit
    ("proposals/no-source", f"proposals {C} --out {{tmp}}/p0", ["--checkpoint", "--import-train"]),
    ("proposals/both-sources", f"proposals {C} --out {{tmp}}/p0 --checkpoint {{good_pt}} --import-train "
     "{short_pkl} --import-val {short_pkl}", ["not both"]),
    ("proposals/half-import", f"proposals {C} --out {{tmp}}/p0 --import-train {{short_pkl}}", ["--import-val"]),
    ("proposals/missing-checkpoint", f"proposals {C} --out {{tmp}}/p0 --checkpoint {{tmp}}/none.pt",
     ["--checkpoint", "none.pt", "no such file"]),
    ("proposals/malicious-checkpoint", f"proposals {C} --out {{tmp}}/p0 --checkpoint {{malicious_pt}}",
     ["malicious.pt", "can run code"]),
    ("proposals/no-rpn", f"proposals {C} --out {{tmp}}/p0 --checkpoint {{fast_pt}}", ["fast.pt", "fast_rcnn", "no RPN"]),
    ("proposals/out-not-empty", f"proposals {C} --out {{resume_out}} --checkpoint {{good_pt}}",
     ["--out", "resume_out", "not empty"]),
    ("proposals/foreign-pickle", f"proposals {C} --out {{tmp}}/p1 --import-train {{evil_pkl}} --import-val "
     "{evil_pkl}", ["evil.pkl", "other than numpy arrays", "not loaded"]),
    ("proposals/pickle-wrong-length", f"proposals {C} --out {{tmp}}/p2 --import-train {{short_pkl}} "
     "--import-val {short_pkl}", ["short.pkl", "holds 1 arrays", "lists 2 images"]),
    ("train/fast-rcnn-without-proposals", f"train {C} --set detector.arch=fast_rcnn", ["data.proposals is not set"]),
    ("train/proposals-for-faster-rcnn", f"train {C} --set data.proposals={{proposals_good}} --dry-run",
     ["data.proposals", "makes its own proposals"]),
    ("train/proposals-image-missing", f"train {C} --set detector.arch=fast_rcnn --set data.proposals={{proposals_missing}}",
     ["proposals_missing/train.index.npy", "image id {missing_image_id}"]),
    ("train/proposals-nan", f"train {C} --set detector.arch=fast_rcnn --set data.proposals={{proposals_nan}}",
     ["proposals_nan/train.boxes.npy", "image id 1 ", "NaN"]),
    ("train/proposals-outside", f"train {C} --set detector.arch=fast_rcnn --set data.proposals={{proposals_outside}}",
     ["proposals_outside/train.boxes.npy", "image id 1 ", "outside the image"]),
    ("train/proposals-shape", f"train {C} --set detector.arch=fast_rcnn --set data.proposals={{proposals_shape}}",
     ["proposals_good/val.boxes.npy", "shape [4, 3]"]),
    ("train/proposals-not-a-folder", f"train {C} --set detector.arch=fast_rcnn --set data.proposals={{proposals_nomanifest}}",
     ["proposals_nomanifest", "manifest.json does not exist"]),
    ("run/fast-rcnn-without-proposals", f"run {S} --dry-run --set detector.arch=fast_rcnn",
     ["study.yaml", "fast_rcnn trials need proposals"]),
    ("run/stage-checkpoint-missing", "run {study_stage_yaml} --dry-run", ["proposals.checkpoint", "does not exist"]),
    # ---- libra data synth
    ("data/image-size-absurd", "data synth --out {tmp}/s --image-size 100000", ["--image-size", "100000"]),
    ("data/image-size-small", "data synth --out {tmp}/s --image-size 8", ["--image-size"]),
    ("data/negative-seed", "data synth --out {tmp}/s --seed -1", ["--seed", "-1"]),
    ("data/num-train-0", "data synth --out {tmp}/s --num-train 0", ["--num-train"]),
    ("data/out-is-a-file", "data synth --out {plain_txt}", ["--out", "is a file"]),
    ("data/out-virtual-fs", "data synth --out /proc/libra-synth", ["--out", "/proc/libra-synth"]),
    ("data/no-action", "data", ["ACTION"]),
    # ---- libra report
    ("report/binary", "report {binary_yaml}", ["binary.yaml", "binary"]),
    ("report/folder", "report {folder}", ["folder.yaml", "is a folder"]),
    ("report/neither", "report", ["--study"]),
    ("report/out-is-a-file", f"report {S} --out {{plain_txt}}", ["--out", "is a file"]),
    ("report/tracking-unknown-scheme", f"report {S} --tracking-uri bogus://x", ["--tracking-uri", "unknown scheme"]),
    ("report/top-0", f"report {S} --top 0", ["--top"]),
    # ---- libra bench (flags checked before anything is measured)
    ("bench/device-unknown", "bench --device tpu", ["--device", "'tpu'"]),
    ("bench/image-size-absurd", "bench --image-size 100000x100000 --what model", ["--image-size", "8192"]),
    ("bench/batch-size-0", "bench --batch-size 0 --what model", ["--batch-size"]),
    ("bench/study-set-syntax", f"bench --what harness --study {S} --study-set schedule.epochs", ["--study-set", "KEY=VALUE"]),
    ("bench/study-set-value", f"bench --what harness --study {S} --study-set schedule.lr=-1", ["study.yaml", "schedule.lr"]),
    ("bench/study-binary", "bench --what harness --study {binary_yaml}", ["binary.yaml", "binary"]),
    # ---- libra itself
    ("libra/unknown-command", "frobnicate", ["frobnicate"]),
]
ALWAYS_WRONG = ["Traceback", "weights_only=False"]
# On a machine without a GPU, asking for one is the user's mistake (and --device is named as such).
CUDA_CASES = [
    ("eval/device-cuda-absent", "eval --checkpoint {good_pt} --device cuda", ["--device", "'cuda'", "no CUDA device"]),
    ("train/device-cuda-absent", f"train {C} --set schedule.device=cuda --dry-run", ["schedule.device", "no CUDA"]),
]
PARAMS = CASES + ([] if HAS_CUDA else CUDA_CASES)


def _argv(template: str, corpus: dict) -> list[str]:
    return [part.format(**corpus) for part in template.split()]


@pytest.mark.parametrize("template,expected", [c[1:] for c in PARAMS], ids=[c[0] for c in PARAMS])
def test_bad_input_is_one_line_exit_2(template, expected, corpus, capsys, monkeypatch):
    monkeypatch.chdir(corpus["tmp"])  # default output folders (runs/, libra-work/) land here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = _argv(template, corpus)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err[-2000:]
    line = lines[0]
    assert line.startswith("libra"), line
    for text in ALWAYS_WRONG:
        assert text not in line
    for text in expected:
        assert text.format(**corpus) in line, line
    if "--device" in template:
        assert "schedule.device" not in line, line  # the flag the user typed, not a config key
    if "--study-set" in template:
        assert "--set " not in line, line
    if "malicious" in template or "evil" in template:
        assert not os.path.exists(corpus["marker"]), "loading the checkpoint ran its code"


def test_the_docs_count_the_corpus():
    """docs/errors.md states how many bad inputs the corpus holds; keep it true."""
    with open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8") as fh:
        text = fh.read()
    count = len(CASES) + len(CUDA_CASES) + len(ADDRESS_CASES)
    assert f"**{count} bad inputs**" in text, f"docs/errors.md should say **{count} bad inputs**"


# --------------------------------------------------------------------------------------------
# Real processes: a Ray address with nothing behind it must fail fast, quietly, in one line.
# --------------------------------------------------------------------------------------------
ADDRESS_CASES = [
    ("host-port", ["--address", "127.0.0.1:{port}"], ["--address", "127.0.0.1:{port}", "nothing answers"]),
    ("env", [], ["RAY_ADDRESS", "127.0.0.1:{port}", "nothing answers"]),
]


@pytest.mark.parametrize("flags,expected", [c[1:] for c in ADDRESS_CASES], ids=[c[0] for c in ADDRESS_CASES])
def test_address_with_nothing_listening_fails_fast(flags, expected, corpus, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    if not flags:
        env["RAY_ADDRESS"] = f"127.0.0.1:{corpus['port']}"
    argv = [sys.executable, "-m", "harness.cli", "run", corpus["study_yaml"],
            "--work-dir", str(tmp_path / "work"), *[f.format(**corpus) for f in flags]]
    start = time.monotonic()
    # 15 s: the promise, including the interpreter's start; the probe itself waits at most 5 s,
    # and is refused at once here. A hang would be Ray's minute of retries.
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    elapsed = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]  # Ray's connection log stays hidden
    for text in expected:
        assert text.format(**corpus) in lines[0], lines[0]
    assert elapsed < 15, f"took {elapsed:.0f} s"


def test_the_libra_entry_point_as_a_process(corpus):
    """The real `python -m harness.cli`: --version, and one corpus case end to end."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    version = subprocess.run([sys.executable, "-m", "harness.cli", "--version"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("libra ")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "eval", "--checkpoint", corpus["malicious_pt"]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "malicious.pt" in proc.stderr and "weights_only=False" not in proc.stderr
    assert not os.path.exists(corpus["marker"])


# --------------------------------------------------------------------------------------------
# Help that teaches.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "report", "train", "eval", "data synth", "bench", "proposals"])
def test_every_help_has_an_example_and_shows_defaults(command, capsys):
    from harness.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"libra {command}" in text.split("example", 1)[1]
    # Every option with a default value says it.
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices[command.split()[1]]
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and action.help != argparse.SUPPRESS:
            shown = sub.formatter_class(sub.prog)._get_help_string(action)
            assert "default" in shown, f"libra {command} {action.option_strings[0]}: no default shown"


def test_libra_help_states_the_exit_codes_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.count("exit codes") == 1
    for code in ("0 ", "1 ", "2 ", "130"):
        assert f"\n  {code}" in text


def test_train_dry_run_trains_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", corpus["config_yaml"], "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "valid" in printed and "nothing trained" in printed
    assert not out.exists()
