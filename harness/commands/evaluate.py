"""Evaluate a checkpoint with COCO box mAP (pycocotools) on its own validation set, or on
another COCO-format set given with --val-images/--val-annotations.

Checkpoints load with torch's weights_only=True: a file holding anything but tensors and plain
containers (which could run code when unpickled) is refused, never loaded another way.

examples:
  libra eval --checkpoint runs/cpu_small/checkpoint.pt
  libra eval --checkpoint runs/cpu_small/checkpoint.pt --out runs/cpu_small/eval.json
  libra eval --checkpoint runs/x/checkpoint.pt --val-images data/other/val \\
      --val-annotations data/other/annotations/instances_val.json --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from harness.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint.pt written by libra train")
    parser.add_argument("--val-images", metavar="DIR", help="image folder of another COCO-format set")
    parser.add_argument("--val-annotations", metavar="FILE", help="instances JSON of that set")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=2, metavar="N",
                        help="images per forward pass (default 2)")
    parser.add_argument("--batch", dest="batch_size", type=int, help=argparse.SUPPRESS)  # as libra bench's old name
    parser.add_argument("--eval-backend", choices=["pycocotools", "faster"], default="pycocotools",
                        help="COCOeval implementation (faster needs faster-coco-eval installed)")
    parser.add_argument("--out", metavar="FILE", help="also write the metrics as JSON here")


def run(args: argparse.Namespace) -> int:
    from detectors.data.coco import CocoDetection
    from detectors.data.loader import build_datasets, check_not_empty
    from detectors.engine import evaluate, load_model_from_checkpoint, resolve_device
    from harness.preflight import writable_file

    if os.path.isdir(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint} is a folder; give the checkpoint.pt file in it")
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    if (args.val_images is None) != (args.val_annotations is None):
        raise UserError("give both --val-images and --val-annotations, or neither")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out:
        writable_file("--out", args.out)  # before the evaluation, not after it
    device = resolve_device(args.device, where="--device")
    model, cfg = load_model_from_checkpoint(args.checkpoint, device)
    if args.val_images and cfg.detector.arch == "fast_rcnn":
        raise UserError(f"--checkpoint {args.checkpoint} is a Fast R-CNN, which evaluates on the proposals of "
                        "its config's data.proposals; --val-images has none: evaluate without it")
    if args.val_images:
        # Any COCO-format set; the checkpoint's training data need not exist on this machine.
        for flag, path, is_dir in (("--val-images", args.val_images, True),
                                   ("--val-annotations", args.val_annotations, False)):
            if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
                wrong = "is a file, not a folder" if is_dir else "is a folder, not a file"
                raise UserError(f"{flag} {path} {wrong}" if os.path.exists(path) else
                                f"{flag} {path}: no such {'folder' if is_dir else 'file'}")
        val_set = CocoDetection(os.path.abspath(args.val_images), os.path.abspath(args.val_annotations), train=False)
        check_not_empty(val_set, "validation")
        if val_set.num_classes != cfg.detector.num_classes:
            raise UserError(f"{args.val_annotations} has {val_set.num_classes} categories but the checkpoint's "
                            f"model predicts {cfg.detector.num_classes}; evaluate on a set with the same categories")
    else:
        _, val_set = build_datasets(cfg.data)
    result = evaluate(model, val_set, device=device, batch_size=args.batch_size, backend=args.eval_backend,
                      progress=sys.stderr.isatty())
    print(result["summary"].rstrip())
    metrics = result["metrics"]
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"metrics": metrics, "per_class_AP": result["per_class_AP"]}, f, indent=2)
    return 0
