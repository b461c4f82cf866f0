"""Train and evaluate one configuration (the same nested mapping as a study's base config:
detector, data, schedule). Writes metrics.json (final and per-epoch) and checkpoint.pt into
--out, and prints COCO mAP computed by pycocotools. No Ray, Optuna or MLflow involved."""
from __future__ import annotations

import argparse
import math
import os
import time

from harness.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="run configuration (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set schedule.epochs=4 (repeatable)")
    parser.add_argument("--out", help="output folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--eval-backend", choices=["pycocotools", "faster"], default="pycocotools",
                        help="COCOeval implementation (faster needs faster-coco-eval installed)")
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


def run(args: argparse.Namespace) -> int:
    from detectors.engine import CHECKPOINT_NAME, fit
    from harness.overrides import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    stem = os.path.splitext(os.path.basename(args.config))[0]
    out = os.path.abspath(args.out or os.path.join("runs", stem))
    if os.path.isfile(os.path.join(out, CHECKPOINT_NAME)) and not args.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")

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
