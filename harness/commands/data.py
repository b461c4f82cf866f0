"""Datasets. `libra data synth` writes the synthetic COCO-format set: images of several object
classes on textured backgrounds, with small/medium/large objects, occlusion and unannotated
look-alike distractors. The same arguments always give the same files."""
from __future__ import annotations

import argparse
import os
import time

from harness.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="generate the synthetic COCO-format dataset", description=__doc__)
    synth.add_argument("--out", required=True, help="folder to write train/, val/ and annotations/ into")
    synth.add_argument("--num-train", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--num-val", type=int, default=50, help="validation images (default 50)")
    synth.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from detectors.data.synthetic import generate_synthetic_coco

    if args.num_train < 1 or args.num_val < 1:
        raise UserError("--num-train and --num-val must be at least 1")
    if args.image_size < 64:
        raise UserError("--image-size must be at least 64 pixels")
    out = os.path.abspath(args.out)
    start = time.perf_counter()
    paths = generate_synthetic_coco(
        out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    print(f"wrote {args.num_train} training and {args.num_val} validation images to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0
