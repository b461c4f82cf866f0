"""Where the Balanced Feature Pyramid's time goes: torch.profiler over the neck alone.

Runs the neck (non-local refine) at the level sizes of a study's configuration, forward only
(inference) and forward + backward (training, with fixed upstream gradients so that no loss is
profiled), and prints the operators by their own CPU time, the way issue 17 asks ("profile the
rest of the BFP ... and fix what dominates").

    PYTHONPATH=. python scripts/profile_bfp.py                      # configs/cpu_small.yaml's sizes
    PYTHONPATH=. python scripts/profile_bfp.py --sizes quickstart --steps 50 --out /tmp/prof.md

Shapes: levels [N, C, H_l, W_l], finest first, refine level 2 (P4).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from detectors.bfp import BalancedFeaturePyramid

# name: (batch, channels, level sizes finest first), as in scripts/bench_bfp.py
SIZES = {
    "quickstart": (4, 32, [(48, 48), (24, 24), (12, 12), (6, 6), (3, 3)]),
    "cpu_small": (4, 64, [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]),
    "paper": (2, 256, [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="cpu_small")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, channels, sizes = SIZES[args.sizes]
    bfp = BalancedFeaturePyramid(channels, num_levels=len(sizes))
    for conv in (m for m in bfp.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.normal_(conv.weight, std=0.05)  # not the identity init: the block does work
    levels = [torch.randn(batch, channels, h, w, requires_grad=True) for h, w in sizes]
    upstream = [torch.randn(batch, channels, h, w) for h, w in sizes]

    def inference() -> None:
        with torch.no_grad():
            bfp(levels)

    def training() -> None:
        torch.autograd.backward(bfp(levels), upstream)

    sections = [f"# BFP profile: {args.sizes} (batch {batch}, {channels} channels, levels {sizes}), "
                f"{args.threads} thread(s), {args.steps} steps per mode\n"]
    for name, step in (("inference (forward, no grad)", inference), ("training (forward + backward)", training)):
        for _ in range(5):  # warm-up: allocator and kernel selection out of the profile
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
        total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.steps
        sections.append(f"## {name}: {total_ms:.2f} ms per step (self CPU, profiler overhead included)\n"
                        f"```\n{table}\n```\n")
    text = "\n".join(sections)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
