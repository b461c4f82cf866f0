"""Datasets. `libra data synth` writes the synthetic COCO-format set: images of several object
classes on textured backgrounds, with small/medium/large objects, occlusion and unannotated
look-alike distractors. The same arguments always give the same files.

examples:
  libra data synth --out data/synth
  libra data synth --out data/synth-small --num-train 40 --num-val 10 --image-size 128 --seed 1
"""
from __future__ import annotations

import argparse
import time

from harness.errors import UserError
from harness.preflight import writable_dir

MIN_SIDE, MAX_SIDE = 64, 4096  # below 64 px the objects are a few pixels; above, hours per set
MAX_SEED = 2**32 - 1  # NumPy's seed range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="generate the synthetic COCO-format dataset", description=__doc__)
    synth.add_argument("--out", required=True, metavar="DIR",
                       help="folder to write train/, val/ and annotations/ into")
    synth.add_argument("--num-train", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--num-val", type=int, default=50, help="validation images (default 50)")
    synth.add_argument("--image-size", type=int, default=256,
                       help=f"side of the square images in pixels, {MIN_SIDE} to {MAX_SIDE} (default 256)")
    synth.add_argument("--seed", type=int, default=0, help=f"random seed, 0 to {MAX_SEED} (default 0)")


def run(args: argparse.Namespace) -> int:
    from detectors.data.synthetic import generate_synthetic_coco

    if args.num_train < 1 or args.num_val < 1:
        raise UserError("--num-train and --num-val must be at least 1")
    if not MIN_SIDE <= args.image_size <= MAX_SIDE:
        raise UserError(f"--image-size must be {MIN_SIDE} to {MAX_SIDE} pixels, got {args.image_size}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be 0 to {MAX_SEED}, got {args.seed}")
    out = writable_dir("--out", args.out)
    start = time.perf_counter()
    paths = generate_synthetic_coco(
        out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    print(f"wrote {args.num_train} training and {args.num_val} validation images to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0
