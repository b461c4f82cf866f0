"""Which attention kernel the non-local block runs, and its peak memory, fused against explicit.

Runs `NonLocalBlock2d` once forward + backward under torch.profiler at one refine-level size
and prints the attention kernels that ran (on the CPU the aten op, on CUDA the device kernel
names: flash / memory-efficient / cuDNN / math), then the peak memory of the fused block and of
the explicit softmax(theta^T phi) g (CUDA allocator peak; not measured on the CPU).

    PYTHONPATH=. python scripts/sdpa_backend.py --device cuda --amp --size 50x84 --channels 256 --batch 2
    PYTHONPATH=. python scripts/sdpa_backend.py --device cpu --size 8x12 --channels 16

Shapes: the block's input [batch, channels, H, W].
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from detectors.bfp import NonLocalBlock2d

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_bfp import explicit_non_local  # noqa: E402  (the same explicit form as the bench)

ATTENTION_WORDS = ("attention", "flash", "fmha", "efficient", "sdpa", "softmax")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="50x84", help="HxW of the refine level")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    args = parser.parse_args(argv)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"sdpa_backend: --size must be HxW, e.g. 50x84, got {args.size!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    block = NonLocalBlock2d(args.channels).to(device)
    torch.nn.init.normal_(block.out.weight, std=0.01)  # so backward reaches theta, phi and g
    x = torch.randn(args.batch, args.channels, h, w, device=device, requires_grad=True)
    autocast = (torch.autocast(device.type, dtype=torch.float16) if args.amp
                else contextlib.nullcontext())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", input {list(x.shape)}, amp {args.amp}")
    for name, fn in (("fused", block), ("explicit", lambda t: explicit_non_local(block, t))):
        with autocast:
            fn(x).float().sum().backward()  # warm-up (kernel selection, cuDNN autotune)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with profile(activities=activities) as prof:
            with autocast:
                fn(x).float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        kernels = sorted({e.key for e in prof.key_averages()
                          if any(word in e.key.lower() for word in ATTENTION_WORDS)})
        print(f"[{name}] attention kernels: {kernels}")
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            print(f"[{name}] peak CUDA memory above the inputs, forward+backward: {peak:.1f} MiB")
        else:
            print(f"[{name}] peak memory: not measured on the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
