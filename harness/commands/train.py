"""Train and evaluate one configuration (the same nested mapping as a study's base config:
detector, data, schedule). Writes metrics.json (final and per-epoch) and checkpoint.pt into
--out, and prints COCO mAP computed by pycocotools. No Ray, Optuna or MLflow involved.

--dry-run checks the configuration (every key, type and range a run would reject), the data
paths and the --out folder, prints what would run, and trains nothing.

examples:
  libra train configs/cpu_small.yaml --dry-run
  libra train configs/cpu_small.yaml --out runs/cpu_small
  libra train configs/cpu_small.yaml --set schedule.epochs=2 --set schedule.lr=0.01 --out runs/short
  libra train configs/cpu_small.yaml --out runs/cpu_small --resume     # after an interruption
"""
from __future__ import annotations

import argparse
import math
import os
import time

from harness.errors import UserError
from harness.preflight import writable_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="run configuration (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set schedule.epochs=4 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--eval-backend", choices=["pycocotools", "faster"], default="pycocotools",
                        help="COCOeval implementation (faster needs faster-coco-eval installed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, its data paths and --out; train nothing")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def format_metric(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def epoch_line(metrics: dict, num_epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{num_epochs}", f"loss {metrics['loss']:.4f}",
             f"lr {metrics['lr']:.2g}", f"{metrics['sec_per_iter']:.2f} s/it"]
    if "bbox_mAP" in metrics:
        parts.append(f"mAP {format_metric(metrics['bbox_mAP'])} (AP50 {format_metric(metrics['bbox_mAP_50'])})")
    parts.append(f"{metrics['epoch_seconds']:.0f} s")
    return "  ".join(parts)


def describe(cfg, stem: str, out: str) -> str:
    """The --dry-run text: what the run would train, on what data, for how long, where to."""
    from detectors.data.loader import check_data_paths
    from detectors.engine import check_proposals_given, resolve_device

    resolve_device(cfg.schedule.device)  # asking for a GPU this machine lacks
    check_proposals_given(cfg)
    data = cfg.data
    if data.kind == "coco":
        check_data_paths(data)  # the same check (and message) the run would make first
        source = f"COCO-format set {data.train_images} (val {data.val_images})"
    else:
        syn = data.synthetic
        source = (f"synthetic set, {syn.num_train} train + {syn.num_val} val images of "
                  f"{syn.image_size} px, seed {syn.seed} (generated on first use)")
    sched = cfg.schedule
    flags = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in cfg.detector.component_flags.items())
    return "\n".join([
        f"config {stem}: valid",
        f"  model     {cfg.detector.arch} {cfg.detector.backbone}, {cfg.detector.num_classes} classes; {flags}",
        f"  data      {source}" + (f"; proposals {data.proposals}" if data.proposals else ""),
        f"  schedule  {sched.epochs} epochs, batch {sched.batch_size}, lr {sched.learning_rate():g}, "
        f"seed {sched.seed}, device {sched.device}"
        + (f", at most {sched.max_iters_per_epoch} iterations per epoch" if sched.max_iters_per_epoch else ""),
        f"  output    {out}",
        "dry run: nothing trained",
    ])


def run(args: argparse.Namespace) -> int:
    from detectors.engine import CHECKPOINT_NAME, fit
    from harness.overrides import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    stem = os.path.splitext(os.path.basename(args.config))[0]
    out = writable_dir("--out", args.out or os.path.join("runs", stem), create=not args.dry_run)
    if os.path.isfile(os.path.join(out, CHECKPOINT_NAME)) and not args.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if args.dry_run:
        print(describe(cfg, stem, out))
        return 0

    print(f"training {stem}: {cfg.detector.arch} {cfg.detector.backbone}, components "
          + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in cfg.detector.component_flags.items())
          + f"; output {out}", flush=True)
    start = time.perf_counter()
    result = fit(
        cfg, out, resume=args.resume, progress=args.progress, eval_backend=args.eval_backend,
        callbacks=[lambda m: print(epoch_line(m, cfg.schedule.epochs), flush=True)],
    )
    final = result["final"]
    print(f"done in {time.perf_counter() - start:.0f} s: bbox_mAP {format_metric(final.get('bbox_mAP'))}, "
          f"AP50 {format_metric(final.get('bbox_mAP_50'))}, AP75 {format_metric(final.get('bbox_mAP_75'))}, "
          f"APs/m/l {format_metric(final.get('bbox_mAP_s'))}/{format_metric(final.get('bbox_mAP_m'))}/"
          f"{format_metric(final.get('bbox_mAP_l'))}")
    print(f"metrics: {os.path.join(out, 'metrics.json')}\ncheckpoint: {result['checkpoint']}")
    return 0
