"""Pre-computed proposals for the paper's protocol: `libra proposals` and a study's first stage.

`produce` runs a trained Faster R-CNN's RPN over a config's train and val sets and writes a
proposals folder (detectors/proposals.py) with its manifest; `import_pickles` writes one from
mmdetection's proposal pickles. A study whose trials are Fast R-CNN can name the checkpoint
(`proposals: {checkpoint: ...}`): `libra run` then produces the folder once, before any trial,
under the work dir in a folder named by a hash of what determines it (the checkpoint's bytes,
the data, the counts), records that as an MLflow run of its own (role "proposals"), and on a
re-run finds the folder and reuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from typing import Any, Optional, TextIO

from harness.errors import UserError

ROLE_PROPOSALS = "proposals"


# ------------------------------------------------------------------------------ the folder
def _versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    from importlib import metadata

    try:
        libra = metadata.version("libra-harness")
    except metadata.PackageNotFoundError:
        libra = "source tree"
    return {"libra": libra, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _counts(cfg) -> dict[str, dict[str, int]]:
    """Proposals per image for each split, from the config that will read them."""
    det = cfg.detector
    return {"train": {"pre_nms_top_n": det.rpn_pre_nms_top_n_train, "post_nms_top_n": det.rpn_post_nms_top_n_train},
            "val": {"pre_nms_top_n": det.rpn_pre_nms_top_n_test, "post_nms_top_n": det.rpn_post_nms_top_n_test}}


def _proposal_datasets(cfg):
    """Both splits without augmentation and without image filters: the folder serves any
    trial on this set (flips, skip_images_without_boxes and max_val_images apply when read)."""
    from detectors.data.coco import CocoDetection
    from detectors.data.loader import dataset_paths

    paths = dataset_paths(dataclasses.replace(cfg.data, proposals=None))
    return {"train": CocoDetection(paths["train_images"], paths["train_annotations"], train=False),
            "val": CocoDetection(paths["val_images"], paths["val_annotations"], train=False)}


def _fresh_folder(out: str) -> str:
    """A temporary sibling of `out` to write into; `out` must not hold anything yet."""
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file; give a folder for the proposals")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} is not empty; choose a new folder (proposals are never overwritten)")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{out}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror or err}); choose a "
                        "writable place") from None
    return tmp


def _publish(tmp: str, out: str) -> None:
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked by _fresh_folder
    os.replace(tmp, out)


def produce(cfg, checkpoint: str, out: str, *, device: str = "auto", batch_size: int = 2,
            progress: bool = False, stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Write proposals folder `out` from `checkpoint`'s RPN over `cfg`'s train and val sets.

    cfg: the TrainConfig whose data and counts (rpn_*_top_n_train for train, _test for val)
    the folder serves; checkpoint: a Faster R-CNN checkpoint.pt of `libra train`. Returns the
    manifest. Raises UserError / CheckpointError / DatasetError (one line) for bad inputs.
    """
    from detectors.engine import load_model_from_checkpoint, resolve_device
    from detectors.proposals import write_manifest
    from detectors.propose import write_split

    stream = stream or sys.stdout
    if not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: no such file"
                        + ("; give the checkpoint.pt inside the folder" if os.path.isdir(checkpoint) else ""))
    where = resolve_device(device, where="--device")
    model, ckpt_cfg = load_model_from_checkpoint(checkpoint, where)
    if ckpt_cfg.detector.arch != "faster_rcnn":
        raise UserError(f"--checkpoint {checkpoint} is a {ckpt_cfg.detector.arch} model, which has no "
                        "RPN; give a Faster R-CNN checkpoint (detector.arch: faster_rcnn)")
    datasets = _proposal_datasets(cfg)
    if datasets["train"].num_classes != ckpt_cfg.detector.num_classes:
        raise UserError(f"--checkpoint {checkpoint} predicts {ckpt_cfg.detector.num_classes} classes but "
                        f"{datasets['train'].annotations_file} has {datasets['train'].num_classes}; "
                        "give a checkpoint trained on this set's categories")
    tmp = _fresh_folder(out)
    counts = _counts(cfg)
    wrap = _tqdm if progress else None
    splits = {}
    try:
        for split, dataset in datasets.items():
            print(f"proposals {split}: {len(dataset)} images, top {counts[split]['post_nms_top_n']} "
                  f"per image after NMS of {counts[split]['pre_nms_top_n']}", file=stream, flush=True)
            done = write_split(model, dataset, tmp, split, device=where, batch_size=batch_size,
                               progress=wrap, **counts[split])
            splits[split] = {"images": dataset.images_dir, "annotations": dataset.annotations_file,
                             **counts[split], **done}
            print(f"proposals {split}: {done['num_images']} images, {done['num_proposals']} proposals "
                  f"in {done['seconds']:.0f} s", file=stream, flush=True)
        manifest = {"source": "rpn", "checkpoint": os.path.abspath(checkpoint),
                    "checkpoint_sha256": file_sha256(checkpoint), "splits": splits,
                    "versions": _versions(), "device": str(where),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_manifest(tmp, manifest)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def import_pickles(cfg, pickles: dict[str, str], out: str, stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Write proposals folder `out` from mmdetection pickles {"train": PKL, "val": PKL}, each a
    list of [N, 5] arrays in its annotation file's image order. Returns the manifest."""
    from detectors.proposals import import_mmdet_split, write_manifest

    stream = stream or sys.stdout
    datasets = _proposal_datasets(cfg)
    tmp = _fresh_folder(out)
    splits = {}
    try:
        for split, path in pickles.items():
            dataset = datasets[split]
            file_order = [int(img["id"]) for img in dataset.coco.dataset["images"]]
            num = import_mmdet_split(path, tmp, split, file_order)
            splits[split] = {"images": dataset.images_dir, "annotations": dataset.annotations_file,
                             "pickle": os.path.abspath(path), "pickle_sha256": file_sha256(path),
                             "num_images": num}
            print(f"proposals {split}: {num} images from {path}", file=stream, flush=True)
        write_manifest(tmp, {"source": "mmdetection_pickle", "splits": splits, "versions": _versions(),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits


def _tqdm(items, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="batch", dynamic_ncols=True)


# ------------------------------------------------------------------------------ the study stage
def stage_config(study):
    """The TrainConfig the stage serves: the study's `proposals.config` file if given, else
    the study's base configuration (its data and its proposal counts)."""
    from detectors.config import TrainConfig

    from harness.overrides import load_train_config

    stage = study.spec.proposals
    if stage.config is not None:
        return load_train_config(_resolve(study, stage.config))
    base_dir = os.path.dirname(study.path)
    cfg = TrainConfig.from_dict(study.base)
    return dataclasses.replace(cfg, data=cfg.data.resolved(base_dir))


def _resolve(study, path: str) -> str:
    return os.path.abspath(os.path.join(os.path.dirname(study.path), os.path.expanduser(path)))


def stage_checkpoint(study) -> str:
    return _resolve(study, study.spec.proposals.checkpoint)


def stage_dir(study, work_dir: str) -> str:
    """Where the stage's folder lives: work_dir/proposals/<hash of what determines it>.

    The hash covers the checkpoint's size and modification time (cheap to read on every
    resume; a retrained checkpoint gets a new folder), the data paths and the counts.
    """
    cfg = stage_config(study)
    checkpoint = stage_checkpoint(study)
    stat = os.stat(checkpoint)
    material = json.dumps({"checkpoint": checkpoint, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                           "data": dataclasses.asdict(dataclasses.replace(cfg.data, proposals=None)),
                           "counts": _counts(cfg)}, sort_keys=True, default=str)
    return os.path.join(os.path.abspath(work_dir), "proposals", hashlib.sha1(material.encode()).hexdigest()[:12])


def with_proposals(study, folder: str):
    """The same study with every trial reading `folder` (data.proposals in the base)."""
    import copy

    base = copy.deepcopy(study.base)
    base.setdefault("data", {})["proposals"] = folder
    return dataclasses.replace(study, base=base)


def check_stage(study) -> None:
    """--dry-run's check: the checkpoint is a file (its contents are checked when it runs)."""
    checkpoint = stage_checkpoint(study)
    if not os.path.isfile(checkpoint):
        what = "is a folder; name the checkpoint.pt in it" if os.path.isdir(checkpoint) else "does not exist"
        raise UserError(f"{study.path}: proposals.checkpoint {checkpoint} {what}")
    stage_config(study)


def run_stage(study, work_dir: str, tracker, stream: TextIO) -> Any:
    """Produce the study's proposals once (a Ray task with one trial worker's CPUs and at
    most one GPU), record it in MLflow, and return the study with data.proposals set.

    A folder already in place (an earlier run) is reused as it is: no second MLflow run.
    """
    import ray

    folder = stage_dir(study, work_dir)
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        print(f"  proposals {folder} (produced earlier, reused)", file=stream, flush=True)
        return with_proposals(study, folder)
    cfg = stage_config(study)
    checkpoint = stage_checkpoint(study)
    res = study.spec.resources
    device = "cuda" if res.gpus_per_worker > 0 else "cpu"
    print(f"  proposals: producing {folder} from {checkpoint} on {device} before the trials",
          file=stream, flush=True)
    run_id = tracker.client.create_run(
        tracker.experiment_id, run_name=f"proposals {os.path.basename(folder)}",
        tags={"libra.role": ROLE_PROPOSALS, "libra.study": study.name, "libra.proposals_dir": folder,
              "libra.checkpoint": checkpoint}).info.run_id
    start = time.perf_counter()
    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=min(1.0, res.gpus_per_worker))(_stage_task)
    try:
        manifest = ray.get(task.remote(cfg.to_dict(), checkpoint, folder, device, study.spec.proposals.batch_size))
    except ray.exceptions.RayTaskError as err:
        tracker.client.set_terminated(run_id, "FAILED")
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):  # a bad checkpoint or data: the one-line error it is
            raise cause from None
        raise
    except BaseException:
        tracker.client.set_terminated(run_id, "KILLED")
        raise
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric("proposals_seconds", time.perf_counter() - start, now, 0)]
    for split, info in manifest["splits"].items():
        metrics += [Metric(f"{split}_images", float(info["num_images"]), now, 0),
                    Metric(f"{split}_proposals", float(info["num_proposals"]), now, 0)]
    tracker.client.log_batch(run_id, metrics=metrics)
    tracker.client.log_dict(run_id, manifest, "manifest.json")
    tracker.client.set_terminated(run_id, "FINISHED")
    return with_proposals(study, folder)


def _stage_task(cfg_dict: dict, checkpoint: str, folder: str, device: str, batch_size: int) -> dict:
    """In a Ray worker: `produce` with its messages dropped (the driver prints the outcome)."""
    import io

    from detectors.config import TrainConfig

    cfg = TrainConfig.from_dict(cfg_dict)
    if cfg.schedule.num_threads is not None:
        import torch

        torch.set_num_threads(cfg.schedule.num_threads)
    return produce(cfg, checkpoint, folder, device=device, batch_size=batch_size, stream=io.StringIO())
