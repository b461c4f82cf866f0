"""Measure what Libra's components cost against the baseline, side by side in one run.

Parts: model (the baseline, each component alone and all on, built from one configuration with
one seed and fed one synthetic batch, taking turns round after round: training step time,
inference images/s, peak memory, as medians, IQRs and paired ratios to the baseline); sampler
(the vectorised IoU-balanced sampler against a per-bin loop, and its share of a training step);
cocoeval (pycocotools against faster-coco-eval on a COCO-val-sized synthetic set, numbers
compared); harness (the quick-start study run end to end, its wall time taken apart against the
ideal of its training and evaluation time over the parallel slots).

Presets: cpu-quickstart (the detector of configs/cpu_small.yaml) and paper (ResNet-50-FPN,
800x1333, batch 2: the paper's setting, for a GPU). Writes <out>/<name>.md and .csv files.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import time
from pathlib import Path

from harness.errors import UserError

PRESETS = ("cpu-quickstart", "paper")
QUICKSTART_CONFIG = "configs/cpu_small.yaml"
QUICKSTART_STUDY = "studies/quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  libra bench --preset cpu-quickstart --device cpu        # all four parts: results/bench/cpu-quickstart-cpu.md\n"
        "  libra bench --preset paper --device cuda --amp          # the paper's setting on a GPU\n"
        "  libra bench --what cocoeval --cocoeval-images 5000      # COCOeval backends only\n"
        "  libra bench --what harness --study-set schedule.epochs=2  # the harness's own cost, shorter study\n"
        "  libra bench --preset paper --backbone resnet101 --batch-size 4 --iters 30\n")
    what = parser.add_argument_group("what to measure")
    detector = what.add_mutually_exclusive_group()  # both choose the detector
    detector.add_argument("--preset", choices=PRESETS, help=f"detector and input settings: cpu-quickstart = "
                          f"{QUICKSTART_CONFIG}'s detector, images and batch; paper = R-50-FPN at 800x1333, batch 2 "
                          "(default: paper on CUDA, cpu-quickstart on the CPU)")
    detector.add_argument("--config", metavar="CONFIG.yaml", help="take the detector, image size and batch from "
                          "this run configuration instead of a preset")
    what.add_argument("--what", metavar="PARTS", help="comma-separated parts: model (component costs), sampler "
                      "(IoU-balanced sampler micro-benchmark), cocoeval (COCOeval backends), harness (the quick-start "
                      "study's wall time taken apart, several minutes); default: all four with cpu-quickstart, "
                      "model,sampler with paper")
    model = parser.add_argument_group("model settings (override the preset)")
    model.add_argument("--backbone", help="e.g. resnet50, resnet18, tiny")
    model.add_argument("--min-size", type=int, help="short side the model resizes images to")
    model.add_argument("--max-size", type=int, help="cap on the long side")
    model.add_argument("--image-size", metavar="HxW",
                       help="input image size, e.g. 800x1333 (default: the preset's; paper: min-size x max-size)")
    model.add_argument("--batch-size", type=int, help="images per training step and per inference batch")
    run = parser.add_argument_group("how to run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--amp", action="store_true", help="float16 autocast and GradScaler (CUDA only)")
    run.add_argument("--iters", type=int, default=50,
                     help="timed rounds; each variant runs one training step and one inference batch per round")
    run.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    run.add_argument("--threads", type=int,
                     help="torch CPU threads (default: the config's schedule.num_threads, else torch's)")
    run.add_argument("--memory", choices=("auto", "off"), default="auto", help="peak memory: auto = CUDA "
                     "allocator on a GPU, a fresh process per variant on the CPU (about 10 s each); off = skip")
    run.add_argument("--sampler-reps", type=int, default=300, help="timed calls per sampler")
    run.add_argument("--cocoeval-images", type=int, default=5000,
                     help="images in the synthetic COCOeval set, 100 detections each (5000 = COCO val)")
    run.add_argument("--cocoeval-repeats", type=int, default=3, help="evaluations per backend, interleaved; the "
                     "median is reported (pycocotools takes about a minute per run at COCO-val size)")
    run.add_argument("--study", metavar="STUDY.yaml", help=f"the study the harness part runs (default {QUICKSTART_STUDY})")
    run.add_argument("--study-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of that study, as libra run --set does (repeatable)")
    run.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="results/bench", help="output folder")
    out.add_argument("--name", help="file name stem (default: <preset>-<device>[-amp], or cocoeval-<images> "
                     "for --what cocoeval)")


def _repo_file(relative: str) -> str:
    """`relative` in the working directory, else in this package's source tree."""
    for candidate in (Path.cwd() / relative, Path(__file__).resolve().parents[2] / relative):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"{relative} was not found (run from the repository, or pass a file: --config / --study)")


def _image_size(text: str) -> tuple[int, int]:
    from detectors.config import MAX_IMAGE_SIDE

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--image-size {text!r}: expected HEIGHTxWIDTH, e.g. 800x1333") from None
    if min(h, w) < 32 or max(h, w) > MAX_IMAGE_SIDE:
        raise UserError(f"--image-size {text!r}: each side must be 32 to {MAX_IMAGE_SIDE} pixels")
    return h, w


def plan_from_args(args: argparse.Namespace):
    """(The harness.bench.plan.Plan the options ask for, the torch thread count); every mistake is
    a one-line UserError or ConfigError, which cli.main reports alike."""
    from detectors.backbones import BACKBONES
    from detectors.config import DetectorConfig
    from detectors.engine import resolve_device
    from harness.bench.model import ModelBenchSettings
    from harness.bench.plan import PARTS, Plan, input_size
    from harness.overrides import load_train_config

    device = resolve_device(args.device, where="--device")
    for dest in ("iters", "warmup", "sampler_reps", "cocoeval_images", "cocoeval_repeats", "batch_size",
                 "min_size", "max_size", "threads"):
        value, low = getattr(args, dest), 0 if dest == "warmup" else 1
        if value is not None and value < low:
            raise UserError(f"--{dest.replace('_', '-')} must be at least {low}, got {value}")
    if args.amp and device.type != "cuda":
        raise UserError(f"--amp needs a CUDA device (the device is {device}); drop --amp on the CPU")
    preset = args.preset or ("paper" if device.type == "cuda" and not args.config else "cpu-quickstart")
    what = args.what if args.what is not None else ("model,sampler" if preset == "paper" else ",".join(PARTS))
    parts = [p.strip() for p in what.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS] or ([] if parts else ["(none)"])
    if unknown:
        raise UserError(f"--what {what!r}: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}, comma-separated")
    if preset == "paper" and not args.config:
        # torchvision's fasterrcnn_resnet50_fpn sizes; 3 trainable stages as when fine-tuning from
        # ImageNet (mmdetection freezes the stem and stage 1 likewise).
        detector, threads, batch = DetectorConfig(backbone="resnet50", trainable_backbone_layers=3), None, 2
        image_hw, source = None, "paper preset: torchvision's Faster R-CNN R-50-FPN defaults, 800x1333, batch 2"
    else:
        cfg = load_train_config(args.config or _repo_file(QUICKSTART_CONFIG))
        detector, threads, batch = cfg.detector, cfg.schedule.num_threads, cfg.schedule.batch_size
        image_hw, preset = input_size(cfg), Path(args.config).stem if args.config else preset
        source = f"detector, images and batch from {args.config or QUICKSTART_CONFIG}"
    changes = {k: v for k, v in (("backbone", args.backbone), ("min_size", args.min_size),
                                 ("max_size", args.max_size)) if v is not None}
    if changes:
        detector = dataclasses.replace(detector, **changes)
        source += "; overridden: " + ", ".join(f"{k}={v}" for k, v in changes.items())
    detector.validate("detector")
    if detector.arch != "faster_rcnn":
        raise UserError(f"the benchmark covers Faster R-CNN; the configuration's arch is {detector.arch!r}")
    if detector.backbone not in BACKBONES:
        raise UserError(f"--backbone {detector.backbone!r}: choose one of {', '.join(BACKBONES)}")
    h, w = _image_size(args.image_size) if args.image_size else image_hw or (detector.min_size, detector.max_size)
    study = None
    if "harness" in parts:
        from harness.spec import load_study

        study = args.study or _repo_file(QUICKSTART_STUDY)
        load_study(study, args.study_set, flag="--study-set")  # its mistakes now, not minutes in
    parts = [p for p in PARTS if p in parts]
    name = args.name or (f"{preset}-{device.type}" + ("-amp" if args.amp else "") if {"model", "sampler"} & set(parts)
                         else f"cocoeval-{args.cocoeval_images}" if "cocoeval" in parts else f"harness-{Path(study).stem}")
    settings = ModelBenchSettings(image_height=h, image_width=w, batch_size=args.batch_size or batch or 2,
                                  iters=args.iters, warmup=args.warmup, device=str(device), amp=args.amp,
                                  seed=args.seed, memory=args.memory)
    return Plan(tuple(parts), settings, detector, preset, source, name, args.sampler_reps, args.cocoeval_images,
                args.cocoeval_repeats, study, tuple(args.study_set)), args.threads or threads


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.bench.plan import measure
    from harness.bench.render import machine_info, sections, write_report

    plan, threads = plan_from_args(args)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    start, started_at = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    progress(f"bench {plan.name}: {', '.join(plan.parts)} on {plan.settings.device}"
             + (" with AMP" if args.amp else "") + f"; {plan.source}")
    machine = machine_info(plan.settings.device)
    results = measure(plan, progress)
    elapsed = time.perf_counter() - start
    header = (f"# Benchmark `{plan.name}`\n\nGenerated {started_at:%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s by:\n\n"
              f"```\nlibra {shlex.join(args._argv)}\n```")
    files = write_report(out_dir, plan, results, machine=machine, header=header)
    print(f"\n{sections(plan, results)}")
    print(f"done in {elapsed:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return 0
