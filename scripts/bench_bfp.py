"""Micro-benchmark of the Balanced Feature Pyramid's pieces: fused against explicit, interleaved.

Two parts, each timed side by side in one process with torch.utils.benchmark.Timer, the
variants taking turns round by round (the order rotated every round) so that load from other
work on the machine falls on both alike; the median over rounds is reported:

- nonlocal: `NonLocalBlock2d` (F.scaled_dot_product_attention) against the explicit
  softmax(theta^T phi) g with the same weights, at the refine level of every size the studies
  use: the quick-start (studies/quickstart.yaml: 192 px, 32 channels -> P4 12x12), the CPU
  configuration (configs/cpu_small.yaml: 256 px, 64 channels -> 16x16) and 800x1333's P4
  (50x84, 256 channels, batch 2), forward (no grad) and forward + backward.
- neck: the whole `BalancedFeaturePyramid` against the form it had before (every level resized
  with F.interpolate / adaptive max-pooling, stacked and averaged, the explicit non-local).

    PYTHONPATH=. python scripts/bench_bfp.py --threads 1 --rounds 7 --out results/bench/bfp-fused-cpu-micro.md
    PYTHONPATH=. python scripts/bench_bfp.py --device cuda --sizes paper   # on a GPU

Shapes: every level [N, C, H_l, W_l]; the non-local block [N, C, H, W] -> [N, C, H, W].
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from detectors.bfp import BalancedFeaturePyramid, NonLocalBlock2d

# name: (batch, channels, level sizes finest first, refine level 2 = P4)
SIZES = {
    "quickstart": (4, 32, [(48, 48), (24, 24), (12, 12), (6, 6), (3, 3)]),
    "cpu_small": (4, 64, [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]),
    "paper": (2, 256, [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]),
}


def explicit_non_local(block: NonLocalBlock2d, x: torch.Tensor) -> torch.Tensor:
    """The block before this change: the [N, HW, HW] attention built, softmaxed and applied."""
    n, _, h, w = x.shape
    theta, phi, g = (conv(x).flatten(2) for conv in (block.theta, block.phi, block.g))  # [N, C', HW]
    attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # [N, HW (query), HW (key)]
    return x + block.out((g @ attention.transpose(1, 2)).reshape(n, -1, h, w))


def previous_neck(bfp: BalancedFeaturePyramid, levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """The neck before this change: resize every level, stack, mean, refine, resize back, add."""
    r = bfp.refine_level
    target = levels[r].shape[-2:]
    gathered = [F.adaptive_max_pool2d(lv, target) if i < r else
                F.interpolate(lv, size=target, mode="nearest") if i > r else lv
                for i, lv in enumerate(levels)]
    balanced = explicit_non_local(bfp.refine, torch.stack(gathered).mean(dim=0))
    return [lv + (F.interpolate(balanced, size=lv.shape[-2:], mode="nearest") if i < r else
                  F.adaptive_max_pool2d(balanced, lv.shape[-2:]) if i > r else balanced)
            for i, lv in enumerate(levels)]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                min_time: float) -> dict[str, float]:
    """Median seconds per call of each fn, timed in turns (order rotated every round)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    numbers = {}
    for name, fn in fns.items():  # warm-up, and how many calls make one timed sample
        fn(); sync()
        start = time.perf_counter(); fn(); sync()
        numbers[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timer = Timer("fn(); sync()", globals={"fn": fns[name], "sync": sync})
            samples[name].append(timer.timeit(numbers[name]).mean)
    return {name: statistics.median(values) for name, values in samples.items()}


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    # Trained-like weights: at init the out conv is zero and the block would be the identity.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return module


def bench_size(name: str, device: torch.device, rounds: int, min_time: float, parts: set[str]):
    batch, channels, sizes = SIZES[name]
    gen = torch.Generator().manual_seed(0)
    levels = [torch.randn(batch, channels, h, w, generator=gen).to(device) for h, w in sizes]
    rows = []
    bfp = _randomised(BalancedFeaturePyramid(channels, num_levels=5, refine_level=2)).to(device)
    block = bfp.refine
    x = levels[2].clone().requires_grad_()
    leaves = [lv.clone().requires_grad_() for lv in levels]

    def fwd(fn, *args):
        def run():
            with torch.no_grad():
                fn(*args)
        return run

    def fwd_bwd(fn, *args, total=lambda out: out.sum()):
        def run():
            total(fn(*args)).backward()
        return run

    def level_sum(outs):
        return sum(out.sum() for out in outs)

    if "nonlocal" in parts:
        with torch.no_grad():
            err = (block(levels[2]) - explicit_non_local(block, levels[2])).abs().max().item()
        for mode, wrap in (("forward", fwd), ("forward+backward", fwd_bwd)):
            times = interleaved({"explicit": wrap(explicit_non_local, block, x),
                                 "fused": wrap(block, x)}, rounds, device, min_time)
            rows.append(("non-local", name, f"{tuple(sizes[2])} C={channels} N={batch}", mode,
                         times["explicit"], times["fused"], err))
    if "neck" in parts:
        with torch.no_grad():
            err = max((a - b).abs().max().item()
                      for a, b in zip(bfp(levels), previous_neck(bfp, levels)))
        for mode, wrap in (("forward", fwd), ("forward+backward", fwd_bwd)):
            extra = {} if mode == "forward" else {"total": level_sum}
            times = interleaved({"explicit": wrap(previous_neck, bfp, leaves, **extra),
                                 "fused": wrap(bfp, leaves, **extra)}, rounds, device, min_time)
            rows.append(("whole neck", name, f"levels {sizes[0]}..{sizes[-1]} C={channels} N={batch}",
                         mode, times["explicit"], times["fused"], err))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="quickstart,cpu_small,paper",
                        help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--parts", default="nonlocal,neck", help="nonlocal, neck or both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, "
                        "as configs/cpu_small.yaml's schedule.num_threads)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds per timed sample (a sample is at least one call)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"bench_bfp: unknown size {unknown[0]!r}; choose from {list(SIZES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    lines = [f"torch {torch.__version__}, device {device}, threads {args.threads}, "
             f"{args.rounds} interleaved rounds, median ms per call; ratio = fused / explicit",
             "",
             "| what | size | shape | pass | explicit ms | fused ms | ratio | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in sizes:
        for what, size, shape, mode, explicit, fused, err in bench_size(
                name, device, args.rounds, args.min_time, parts):
            line = (f"| {what} | {size} | {shape} | {mode} | {explicit * 1e3:.2f} | "
                    f"{fused * 1e3:.2f} | {fused / explicit:.3f}x | {err:.1e} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
