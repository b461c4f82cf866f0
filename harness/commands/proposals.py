"""Pre-compute proposals for Fast R-CNN (detector.arch: fast_rcnn, the paper's ablation
protocol): run a trained Faster R-CNN's RPN over CONFIG's train and val sets and write a
proposals folder, or import mmdetection's proposal pickles into one. Per image the folder
keeps the top proposals after NMS with their objectness, in the stored image's pixels:
CONFIG's rpn_post_nms_top_n_train for the train set and rpn_post_nms_top_n_test for val (the
reference: 2000 and 1000), plus manifest.json (the checkpoint, the dataset, the counts,
versions). Point a Fast R-CNN config at it with data.proposals: DIR.

examples:
  libra train configs/cpu_small.yaml --out runs/rpn                    # a Faster R-CNN first
  libra proposals configs/cpu_small.yaml --checkpoint runs/rpn/checkpoint.pt --out proposals/cpu_small
  libra train configs/cpu_small.yaml --set detector.arch=fast_rcnn --set data.proposals=proposals/cpu_small
  libra proposals studies/my_coco.yaml --import-train rpn_train2017.pkl --import-val rpn_val2017.pkl --out proposals/mmdet
"""
from __future__ import annotations

import argparse
import os
import sys

from harness.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml",
                        help="run configuration whose data and proposal counts the folder serves")
    parser.add_argument("--checkpoint", metavar="FILE", help="a Faster R-CNN checkpoint.pt of libra train")
    parser.add_argument("--import-train", metavar="PKL", help="mmdetection proposal pickle of the train set")
    parser.add_argument("--import-val", metavar="PKL", help="mmdetection proposal pickle of the val set")
    parser.add_argument("--out", required=True, metavar="DIR", help="the proposals folder to write (new or empty)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set detector.rpn_post_nms_top_n_train=2000")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per RPN forward pass")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from harness.overrides import load_train_config
    from harness import proposals_stage

    pickles = {split: path for split, path in (("train", args.import_train), ("val", args.import_val)) if path}
    if args.checkpoint and pickles:
        raise UserError("give --checkpoint (run an RPN) or --import-train/--import-val (mmdetection "
                        "pickles), not both")
    if not args.checkpoint and not pickles:
        raise UserError("give --checkpoint FILE (a Faster R-CNN of libra train) or --import-train PKL "
                        "and --import-val PKL")
    if pickles and len(pickles) != 2:
        raise UserError("give both --import-train and --import-val: a proposals folder serves both splits")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    for flag, path in (("--checkpoint", args.checkpoint), ("--import-train", args.import_train),
                       ("--import-val", args.import_val)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: " + ("is a folder; give the file" if os.path.isdir(path) else "no such file"))
    cfg = load_train_config(args.config, args.overrides)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if pickles:
        proposals_stage.import_pickles(cfg, pickles, args.out)
    else:
        proposals_stage.produce(cfg, args.checkpoint, args.out, device=args.device,
                                batch_size=args.batch_size, progress=progress)
    print(f"proposals written to {os.path.abspath(args.out)}; use it with "
          f"--set detector.arch=fast_rcnn --set data.proposals={args.out}")
    return 0
