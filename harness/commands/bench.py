"""Measure what Libra's components cost against the baseline, side by side in one run.

Model: the baseline, each component alone and all three together are built from one detector
configuration with the same seed and fed the same synthetic batch; after warm-up they take
turns (one training step and one inference batch each per round, the order rotated every
round), and the report gives medians, IQRs and ratios to the baseline of the training step
time, the inference images/s and the peak memory (CUDA allocator peak on a GPU; on the CPU the
peak resident set of a fresh process per variant). Sampler: the vectorised IoU-balanced sampler
against a per-bin loop and against its share of a training step. COCOeval: pycocotools against
faster-coco-eval (when installed) on a COCO-val-sized synthetic result set, numbers compared.
Harness: runs the quick-start study (libra run) in a fresh work dir and splits its wall time
into Ray start, trial start, training, evaluation and tracking, against the ideal of the trials'
training and evaluation time divided by the parallel slots.

Presets: cpu-quickstart (the detector of configs/cpu_small.yaml, read at run time) and paper
(ResNet-50-FPN, 800x1333, batch 2: the paper's and mmdetection's setting; use it on a GPU,
e.g. `libra bench --preset paper --device cuda --amp`). Writes <out>/<name>.md and .csv files.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from harness.errors import UserError

PRESETS = ("cpu-quickstart", "paper")
PARTS = ("model", "sampler", "cocoeval", "harness")
DEFAULT_PARTS = {"cpu-quickstart": PARTS, "paper": ("model", "sampler")}
QUICKSTART_CONFIG = "configs/cpu_small.yaml"
QUICKSTART_STUDY = "studies/quickstart.yaml"
TARGET_HARNESS_RATIO = 1.15  # the quick-start study: wall time within 15% of the ideal
TARGET_TRAIN_RATIO = 1.05  # all three components: at most 5% more training step time ...
TARGET_INFER_RATIO = 0.95  # ... and at most 5% less inference throughput (GPU, paper settings)
TARGET_SAMPLER_SHARE_PCT = 1.0  # the IoU-balanced sampler: under 1% of a training step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  libra bench --preset cpu-quickstart --device cpu        # all four parts: results/bench/cpu-quickstart-cpu.md\n"
        "  libra bench --preset paper --device cuda --amp          # the paper's setting on a GPU\n"
        "  libra bench --what cocoeval --cocoeval-images 5000      # COCOeval backends only\n"
        "  libra bench --what harness --study-set schedule.epochs=2  # the harness's own cost, shorter study\n"
        "  libra bench --preset paper --backbone resnet101 --batch-size 4 --iters 30\n"
    )
    what = parser.add_argument_group("what to measure")
    what.add_argument("--preset", choices=PRESETS, default=None,
                      help="detector and input settings: cpu-quickstart = " + QUICKSTART_CONFIG
                      + "'s detector, images and batch; paper = R-50-FPN at 800x1333, batch 2 "
                      "(default: paper on CUDA, cpu-quickstart on the CPU)")
    what.add_argument("--config", metavar="CONFIG.yaml", default=None,
                      help="take the detector, image size and batch from this run configuration instead of a preset")
    what.add_argument("--what", default=None, metavar="PARTS",
                      help="comma-separated parts: model (component costs), sampler (IoU-balanced "
                      "sampler micro-benchmark), cocoeval (COCOeval backends), harness (the quick-start "
                      "study's wall time taken apart, several minutes); default: all four with "
                      "cpu-quickstart, model,sampler with paper")
    model = parser.add_argument_group("model settings (override the preset)")
    model.add_argument("--backbone", help="e.g. resnet50, resnet18, tiny")
    model.add_argument("--min-size", type=int, help="short side the model resizes images to")
    model.add_argument("--max-size", type=int, help="cap on the long side")
    model.add_argument("--image-size", metavar="HxW",
                       help="input image size, e.g. 800x1333 (default: the preset's; paper: min-size x max-size)")
    model.add_argument("--batch-size", dest="batch", type=int,
                       help="images per training step and per inference batch")
    model.add_argument("--batch", dest="batch", type=int, help=argparse.SUPPRESS)  # the old name
    run = parser.add_argument_group("how to run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--amp", action="store_true", help="float16 autocast and GradScaler (CUDA only)")
    run.add_argument("--iters", type=int, default=50,
                     help="timed rounds; each variant runs one training step and one inference batch per round (default 50)")
    run.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: the config's schedule.num_threads, else torch's)")
    run.add_argument("--memory", choices=("auto", "off"), default="auto",
                     help="peak memory: auto = CUDA allocator on a GPU, a fresh process per variant on "
                     "the CPU (about 10 s each); off = skip")
    run.add_argument("--sampler-reps", type=int, default=300, help="timed calls per sampler (default 300)")
    run.add_argument("--cocoeval-images", type=int, default=5000,
                     help="images in the synthetic COCOeval set, 100 detections each (default 5000 = COCO val)")
    run.add_argument("--cocoeval-repeats", type=int, default=3,
                     help="evaluations per backend, interleaved; the median is reported (default 3; "
                     "pycocotools takes about a minute per run at COCO-val size)")
    run.add_argument("--study", default=None, metavar="STUDY.yaml",
                     help=f"the study the harness part runs (default {QUICKSTART_STUDY})")
    run.add_argument("--study-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of that study, as libra run --set does (repeatable)")
    run.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    out.add_argument("--name", default=None,
                     help="file name stem (default: <preset>-<device>[-amp], or cocoeval-<images> for --what cocoeval)")


# ------------------------------------------------------------------------------------ options
@dataclasses.dataclass
class _Plan:
    parts: list[str]
    device: Any  # torch.device
    study: Optional[str]  # the harness part's study file
    preset: str
    source: str  # where the detector settings came from, in words
    detector: Any  # DetectorConfig
    image_hw: tuple[int, int]
    batch: int
    threads: Optional[int]
    name: str


def _parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"--what {text!r}: unknown part {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {', '.join(PARTS)}, comma-separated")
    return [p for p in PARTS if p in parts]


def _resolve_device(spec: str):
    """detectors.engine.resolve_device (the rule training uses), its errors naming the flag."""
    from detectors.config import ConfigError
    from detectors.engine import resolve_device

    try:
        return resolve_device(spec, where="--device")
    except ConfigError as err:
        raise UserError(str(err)) from None


def _find_repo_file(relative: str) -> Optional[str]:
    """`relative` in the working directory, else in the source tree of this package."""
    here = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / relative, here / relative):
        if candidate.is_file():
            return str(candidate)
    return None


def _quickstart_fallback():
    """Used only when configs/cpu_small.yaml cannot be found: the small CPU model measured in
    the stack notes (tiny backbone, FPN 64, MLP 256, 128 RoIs, 500/200 proposals, 256 px)."""
    from detectors.config import DetectorConfig

    return DetectorConfig(
        backbone="tiny", num_classes=6, min_size=256, max_size=256, fpn_channels=64,
        rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200,
        roi_batch_size_per_image=128, representation_size=256,
    ), (256, 256), 4, None


def _from_config_file(path: str):
    """(detector, image (h, w), batch, threads) from a run configuration file."""
    from harness.overrides import load_train_config

    cfg = load_train_config(path)
    if cfg.data.kind == "synthetic":
        side = cfg.data.synthetic.image_size
        image_hw = (side, side)
    else:
        image_hw = (cfg.detector.min_size, cfg.detector.max_size)
    return cfg.detector, image_hw, cfg.schedule.batch_size, cfg.schedule.num_threads


def _parse_image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--image-size {text!r}: expected HEIGHTxWIDTH, e.g. 800x1333") from None
    if h < 32 or w < 32:
        raise UserError(f"--image-size {text!r}: both sides must be at least 32 pixels")
    from detectors.config import MAX_IMAGE_SIDE

    if max(h, w) > MAX_IMAGE_SIDE:
        raise UserError(f"--image-size {text!r}: each side must be at most {MAX_IMAGE_SIDE} pixels")
    return h, w


def _plan(args: argparse.Namespace) -> _Plan:
    from detectors.config import ConfigError, DetectorConfig

    device = _resolve_device(args.device)
    preset_hint = args.preset or ("paper" if device.type == "cuda" and not args.config else "cpu-quickstart")
    parts = _parse_parts(args.what if args.what is not None else ",".join(DEFAULT_PARTS[preset_hint]))
    for option, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                               ("--sampler-reps", args.sampler_reps, 1),
                               ("--cocoeval-images", args.cocoeval_images, 1),
                               ("--cocoeval-repeats", args.cocoeval_repeats, 1)):
        if value < low:
            raise UserError(f"{option} must be at least {low}, got {value}")
    for option, value in (("--batch-size", args.batch), ("--min-size", args.min_size),
                          ("--max-size", args.max_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    if args.preset and args.config:
        raise UserError("--preset and --config choose the same thing; pass only one")
    if args.amp and device.type != "cuda":
        raise UserError(f"--amp needs a CUDA device (the device is {device}); drop --amp on the CPU")

    if args.config:
        preset = Path(args.config).stem
        detector, image_hw, batch, threads = _from_config_file(args.config)
        source = f"detector, images and batch from {args.config}"
    else:
        preset = args.preset or ("paper" if device.type == "cuda" else "cpu-quickstart")
        if preset == "paper":
            # torchvision's fasterrcnn_resnet50_fpn sizes; 3 trainable stages as when fine-tuning
            # from ImageNet (mmdetection freezes the stem and stage 1 likewise).
            detector = DetectorConfig(backbone="resnet50", trainable_backbone_layers=3)
            image_hw, batch, threads = (detector.min_size, detector.max_size), 2, None
            source = "paper preset: torchvision's Faster R-CNN R-50-FPN defaults, 800x1333, batch 2"
        else:
            path = _find_repo_file(QUICKSTART_CONFIG)
            if path is None:
                detector, image_hw, batch, threads = _quickstart_fallback()
                source = (f"{QUICKSTART_CONFIG} not found; built-in fallback (tiny backbone, FPN 64, "
                          "MLP 256, 128 RoIs, 256 px, batch 4)")
            else:
                detector, image_hw, batch, threads = _from_config_file(str(path))
                source = f"detector, images and batch from {QUICKSTART_CONFIG}"
    changes = {k: v for k, v in (("backbone", args.backbone), ("min_size", args.min_size),
                                 ("max_size", args.max_size)) if v is not None}
    if changes:
        detector = dataclasses.replace(detector, **changes)
        if preset == "paper" and args.image_size is None:
            image_hw = (detector.min_size, detector.max_size)
        source += "; overridden: " + ", ".join(f"{k}={v}" for k, v in changes.items())
    try:
        detector.validate("detector")
        if detector.arch != "faster_rcnn":
            raise UserError(f"the benchmark covers Faster R-CNN; the configuration's arch is {detector.arch!r}")
        from detectors.backbones import BACKBONES

        if detector.backbone not in BACKBONES:
            raise UserError(f"--backbone {detector.backbone!r}: choose one of {', '.join(BACKBONES)}")
    except ConfigError as err:
        raise UserError(str(err)) from None
    if args.image_size:
        image_hw = _parse_image_size(args.image_size)
    batch = args.batch or batch or 2
    threads = args.threads or threads
    study = None
    if "harness" in parts:
        study = args.study or _find_repo_file(QUICKSTART_STUDY)
        if study is None:
            raise UserError(f"the harness part needs a study file: {QUICKSTART_STUDY} was not found; "
                            "pass --study STUDY.yaml")
        if not os.path.isfile(study):
            raise UserError(f"--study {study}: no such file")
        from harness.spec import load_study

        load_study(study, args.study_set, flag="--study-set")  # its mistakes now, not minutes in
    if args.name:
        name = args.name
    elif "model" in parts or "sampler" in parts:
        name = f"{preset}-{device.type}" + ("-amp" if args.amp else "")
    elif "cocoeval" in parts:
        name = f"cocoeval-{args.cocoeval_images}"
    else:
        name = f"harness-{Path(study).stem}"
    return _Plan(parts, device, study, preset, source, detector, image_hw, batch, threads, name)


# ------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    import torch

    from harness import bench

    plan = _plan(args)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    out_dir = Path(args.out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    h, w = plan.image_hw
    progress(f"bench {plan.name}: {', '.join(plan.parts)} on {plan.device}"
             + (" with AMP" if args.amp else "") + f"; {plan.source}")
    machine = bench.machine_info(str(plan.device))
    started_at = datetime.datetime.now(datetime.timezone.utc)

    settings = bench.ModelBenchSettings(
        image_height=h, image_width=w, batch_size=plan.batch, iters=args.iters, warmup=args.warmup,
        device=str(plan.device), amp=args.amp, seed=args.seed, memory=args.memory,
    )
    model = sampler = None
    cocoeval_rows = None
    if "model" in plan.parts:
        progress(f"[model] {plan.detector.backbone}, images {h}x{w}, batch {plan.batch}, "
                 f"{args.warmup} warm-up + {args.iters} timed rounds x 6 (5 variants and an A/A control)")
        model = bench.run_model_bench(plan.detector, settings, progress=progress)
    model_rows = model.rows if model else None
    if "sampler" in plan.parts:
        step = None
        if model_rows:
            step = next(r.train_step_s for r in model_rows if r.variant == bench.SAMPLER_VARIANT)
        sampler = bench.run_sampler_bench(
            device=str(plan.device), reps=args.sampler_reps,
            num_proposals=plan.detector.rpn_post_nms_top_n_train,
            rois_per_image=plan.detector.roi_batch_size_per_image,
            positive_fraction=plan.detector.roi_positive_fraction,
            num_bins=plan.detector.iou_balanced_sampling.num_bins,
            image_height=h, image_width=w, seed=args.seed,
            batch_size=plan.batch if step else None, train_step_s=step, progress=progress,
        )
    if "cocoeval" in plan.parts:
        cocoeval_rows = bench.run_cocoeval_bench(
            args.cocoeval_images, repeats=args.cocoeval_repeats, seed=args.seed, progress=progress
        )
    harness_cost = None
    if "harness" in plan.parts:
        harness_cost = bench.run_harness_bench(plan.study, overrides=args.study_set, progress=progress)
    elapsed = time.perf_counter() - start
    machine["load_average_1_5_15_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())

    command = "libra bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if _called_as_libra() else None
    files = write_report(
        out_dir, plan.name, plan=plan, args=args, settings=settings, machine=machine,
        started_at=started_at, elapsed=elapsed, command=command,
        model=model, sampler=sampler, cocoeval_rows=cocoeval_rows, harness_cost=harness_cost,
    )
    print(_summary(model_rows, sampler, cocoeval_rows, harness_cost))
    print(f"done in {elapsed:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return 0


def _called_as_libra() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "bench"


def _command_line(args: argparse.Namespace, plan: _Plan) -> str:
    """The equivalent command line, from the parsed options (the real argv when known)."""
    parts = ["libra", "bench"]
    if args.config:
        parts += ["--config", args.config]
    else:
        parts += ["--preset", plan.preset]
    parts += ["--device", str(plan.device), "--what", ",".join(plan.parts)]
    for option, value in (("--backbone", args.backbone), ("--min-size", args.min_size),
                          ("--max-size", args.max_size), ("--image-size", args.image_size),
                          ("--batch-size", args.batch), ("--threads", args.threads)):
        if value is not None:
            parts += [option, str(value)]
    if args.amp:
        parts.append("--amp")
    parts += ["--iters", str(args.iters), "--warmup", str(args.warmup)]
    if "cocoeval" in plan.parts:
        parts += ["--cocoeval-images", str(args.cocoeval_images)]
        parts += ["--cocoeval-repeats", str(args.cocoeval_repeats)]
    if args.memory != "auto":
        parts += ["--memory", args.memory]
    if "harness" in plan.parts:
        parts += ["--study", plan.study]
        for text in args.study_set:
            parts += ["--study-set", text]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


# ------------------------------------------------------------------------------------ report
def _target_lines(rows, sampler, plan: _Plan, amp: bool) -> list[str]:
    from harness.bench import CONTROL, all_on

    at_paper = plan.preset == "paper" and plan.device.type == "cuda" and plan.detector.backbone == "resnet50" \
        and plan.image_hw == (800, 1333)
    lines = []
    if rows:
        libra = next(r for r in rows if r.variant == all_on())
        where = ("GPU at the paper's settings" if at_paper else
                 f"{plan.device.type.upper()}, {plan.preset}: the target is stated for a GPU at the paper's "
                 "settings, this is the same ratio on this configuration")
        ok_train = libra.train_time_ratio <= TARGET_TRAIN_RATIO
        ok_infer = libra.infer_throughput_ratio >= TARGET_INFER_RATIO
        undecided = libra.train_time_ratio_q25 <= TARGET_TRAIN_RATIO <= libra.train_time_ratio_q75
        lines.append(f"- All three components, training step time: x{libra.train_time_ratio:.3f} of the baseline "
                     f"(paired IQR {libra.train_time_ratio_q25:.3f} to {libra.train_time_ratio_q75:.3f}); "
                     f"target at most x{TARGET_TRAIN_RATIO:.2f}: **{'met' if ok_train else 'missed'}**"
                     + (" by the median, but the IQR straddles the target" if undecided else "") + f" ({where}).")
        lines.append(f"- All three components, inference throughput: x{libra.infer_throughput_ratio:.3f} of the "
                     f"baseline; target at least x{TARGET_INFER_RATIO:.2f}: **{'met' if ok_infer else 'missed'}**.")
        control = next((r for r in rows if r.variant == CONTROL), None)
        if control is not None:
            lines.append(f"- Noise floor of this run (A/A control): training x{control.train_time_ratio:.3f} "
                         f"(IQR {control.train_time_ratio_q25:.3f} to {control.train_time_ratio_q75:.3f}), "
                         f"inference x{control.infer_throughput_ratio:.3f}.")
        if libra.memory_ratio is not None:
            extra = libra.peak_memory_mb - next(r for r in rows if r.variant == "baseline").peak_memory_mb
            lines.append(f"- All three components, peak memory: x{libra.memory_ratio:.3f} of the baseline "
                         f"({extra:+.0f} MB); reported, no target.")
    if sampler and sampler.share_of_step_pct is not None:
        ok = sampler.share_of_step_pct < TARGET_SAMPLER_SHARE_PCT
        lines.append(f"- IoU-balanced sampler: {sampler.share_of_step_pct:.3f}% of a training step "
                     f"({sampler.batch_size} images x {sampler.vectorised_us:.0f} us); target under "
                     f"{TARGET_SAMPLER_SHARE_PCT:.0f}%: **{'met' if ok else 'missed'}**.")
    return lines


def write_report(out_dir: Path, name: str, *, plan: _Plan, args, settings, machine: dict, started_at,
                 elapsed: float, command: Optional[str], model, sampler, cocoeval_rows,
                 harness_cost=None) -> list[Path]:
    """Write <name>.md (everything) and a CSV per measured part; returns the paths."""
    import pandas as pd

    from harness.bench import CONTROL, fmt as _fmt, md_table as _md_table, model_table as _model_table

    model_rows = model.rows if model else None

    files: list[Path] = []
    det = plan.detector
    md = [f"# Benchmark `{name}`", ""]
    md.append(f"Generated {started_at:%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s by:")
    md += ["", "```", command or _command_line(args, plan), "```", ""]
    md += ["## Machine and versions", "", _md_table([{"item": k, "value": v} for k, v in machine.items()]), ""]

    if model_rows:
        md += ["## Component costs against the baseline", ""]
        md.append(f"Detector: {plan.source}. Backbone {det.backbone} + FPN ({det.fpn_channels} channels), "
                  f"min/max size {det.min_size}/{det.max_size}, RPN {det.rpn_post_nms_top_n_train} proposals "
                  f"(train) / {det.rpn_post_nms_top_n_test} (test), {det.roi_batch_size_per_image} RoIs per "
                  f"image, box head {det.representation_size}, {det.num_classes} classes, random init.")
        md.append(f"Input: {settings.batch_size} random images of {settings.image_height}x{settings.image_width} "
                  f"with {settings.boxes_per_image} random boxes each, already on {settings.device}. "
                  f"{settings.warmup} warm-up and {settings.iters} timed rounds; in each round every variant runs one "
                  "training step (forward, backward, gradient clipping, SGD step) and one inference batch, in "
                  "an order rotated every round. Times are medians over rounds with their IQR; ratios are "
                  "medians of per-round paired ratios (a variant against the baseline in the same round), "
                  "with their IQR. AMP: " + ("on" if settings.amp else "off") + ".")
        control = next((r for r in model_rows if r.variant == CONTROL), None)
        if control is not None:
            md.append(f"'{CONTROL}' is a second, identical baseline: its ratios ({control.train_time_ratio:.3f} "
                      f"training, {control.infer_throughput_ratio:.3f} inference) are this run's noise floor; "
                      "differences of that size mean nothing; its memory is not measured again (n/m). "
                      "(Inference of +iou_balanced_sampling and +balanced_l1_loss also runs the baseline's "
                      "code: neither component acts at test time.)")
        md.append(f"Peak memory: {model_rows[0].memory_method}.")
        if model_rows[0].idle_memory_mb is not None:
            md.append("'MB above idle' subtracts the RSS of that process before the model is built "
                      "(Python + torch + torchvision), which every variant pays alike.")
        md.append("Inference with random weights passes few detections through the score threshold, so "
                  "post-processing is lighter than with a trained model: if anything, component ratios "
                  "are overstated.")
        md += ["", _md_table(_model_table(model_rows)), ""]
        csv_path = out_dir / f"{name}.csv"
        pd.DataFrame([r.as_row() for r in model_rows]).to_csv(csv_path, index=False)
        files.append(csv_path)
        csv_path = out_dir / f"{name}-rounds.csv"
        pd.DataFrame(model.rounds).to_csv(csv_path, index=False)
        files.append(csv_path)

    if sampler:
        md += ["## IoU-balanced sampler", ""]
        md.append(f"One image's negatives: {sampler.num_candidates} candidates (from "
                  f"{det.rpn_post_nms_top_n_train} proposals plus the gt boxes), drawing {sampler.num_expected}, "
                  f"{det.iou_balanced_sampling.num_bins} bins, on {sampler.device}; {sampler.reps} timed calls each, "
                  "interleaved. 'per-bin loop' is `harness.bench.iou_balanced_neg_sample_loop`, a straightforward "
                  "implementation written as the comparison baseline; 'random' is the baseline's randperm draw.")
        rows = [
            {"sampler": "vectorised (detectors.sampling)", "us per image (median [IQR])":
                f"{sampler.vectorised_us:.1f} [{sampler.vectorised_us_q25:.1f}, {sampler.vectorised_us_q75:.1f}]",
             "share of a training step": _fmt(sampler.share_of_step_pct, ".3f") + ("%" if sampler.share_of_step_pct is not None else "")},
            {"sampler": "per-bin loop (comparison)", "us per image (median [IQR])":
                f"{sampler.loop_us:.1f} [{sampler.loop_us_q25:.1f}, {sampler.loop_us_q75:.1f}]",
             "share of a training step": _fmt(sampler.loop_share_of_step_pct, ".3f") + ("%" if sampler.loop_share_of_step_pct is not None else "")},
            {"sampler": "random (baseline's draw)", "us per image (median [IQR])": f"{sampler.random_us:.1f}",
             "share of a training step": ""},
        ]
        md += ["", _md_table(rows), ""]
        md.append(f"Loop time / vectorised time: {sampler.speedup_vs_loop:.2f}"
                  + (" (the vectorised sampler is the faster)." if sampler.speedup_vs_loop > 1
                     else " (the per-bin loop is the faster here)."))
        if sampler.share_of_step_pct is not None:
            md.append(f"Share of a step: {sampler.batch_size} images x the per-image time, over the median "
                      f"training step of +iou_balanced_sampling ({sampler.train_step_s:.4f} s); its extra over "
                      f"the random draw is {sampler.extra_over_random_pct:.3f}% of the step.")
        md.append("")
        csv_path = out_dir / f"{name}-sampler.csv"
        pd.DataFrame([dataclasses.asdict(sampler)]).to_csv(csv_path, index=False)
        files.append(csv_path)

    if cocoeval_rows:
        from harness.bench import STAT_NAMES

        first = cocoeval_rows[0]
        md += ["## COCO evaluation speed", ""]
        md.append(f"Synthetic COCO-val-sized set: {first.num_images} images, {first.num_gt} gt boxes "
                  f"(1% crowd), 80 categories, {first.num_detections} detections; bbox evaluation end to end "
                  f"(index, loadRes, evaluate, accumulate, summarize), median of {first.repeats} run(s) per backend.")
        rows = [{"backend": r.backend, "total s": f"{r.total_s:.1f}", "load s": f"{r.load_s:.1f}",
                 "evaluate s": f"{r.evaluate_s:.1f}", "accumulate+summarize s": f"{r.accumulate_summarize_s:.1f}",
                 "speed-up": f"{r.speedup:.1f}x", "12 stats vs pycocotools": _agreement(r),
                 "max abs diff": f"{r.max_abs_diff_vs_pycocotools:.2g}"} for r in cocoeval_rows]
        md += ["", _md_table(rows), ""]
        md.append("Stats (pycocotools): " + ", ".join(f"{n} {v:.4f}" for n, v in zip(STAT_NAMES, first.stats)) + ".")
        if len(cocoeval_rows) == 1:
            md.append("faster-coco-eval is not installed: `pip install faster-coco-eval` (the `fast-eval` extra).")
        md.append("")
        csv_path = out_dir / f"{name}-cocoeval.csv"
        pd.DataFrame([{**{k: v for k, v in dataclasses.asdict(r).items() if k != "stats"},
                       **dict(zip(STAT_NAMES, r.stats))} for r in cocoeval_rows]).to_csv(csv_path, index=False)
        files.append(csv_path)

    if harness_cost:
        hc = harness_cost
        md += ["## The harness's own cost", ""]
        md.append(f"`libra run {plan.study}" + "".join(f" --set {o}" for o in args.study_set)
                  + f"` in a fresh work dir (local Ray, SQLite MLflow, Optuna journal; the synthetic data "
                  f"generated beforehand): {hc.num_trials} trials, {hc.slots} at once, {hc.wall_s:.0f} s of "
                  f"wall time, so {hc.slots} x {hc.wall_s:.0f} = {hc.slots * hc.wall_s:.0f} slot-seconds. "
                  "Training and evaluation are the trials' own epoch times (fit's figures); the trial "
                  "overhead is launch-to-result minus those; set-up is from the command's start to the "
                  "study's MLflow parent run (imports, stores, Ray start), teardown from its end to the "
                  "command's exit.")
        total = hc.slots * hc.wall_s
        rows = [{"where the slot time goes": part, "slot-seconds": f"{sec:.1f}", "share": f"{100 * sec / total:.1f}%"}
                for part, sec in hc.breakdown()]
        md += ["", _md_table(rows), ""]
        md.append(f"Per trial, the overhead's median is {hc.trial_overhead_median_s:.2f} s and its maximum "
                  f"{hc.trial_overhead_max_s:.1f} s (a worker process's first trial pays for its start and "
                  f"imports). Study set-up {hc.setup_s:.1f} s, teardown {hc.teardown_s:.1f} s.")
        md.append(f"Ideal (training + evaluation / {hc.slots} slots): {hc.ideal_s:.0f} s; the study took "
                  f"{hc.wall_s:.0f} s = x{hc.wall_over_ideal:.3f} of the ideal.")
        md.append("")
        csv_path = out_dir / f"{name}-harness.csv"
        pd.DataFrame([dataclasses.asdict(t) for t in hc.trials]).to_csv(csv_path, index=False)
        files.append(csv_path)

    targets = _target_lines(model_rows, sampler, plan, args.amp)
    if harness_cost:
        ok = harness_cost.wall_over_ideal <= TARGET_HARNESS_RATIO
        targets.append(f"- Harness, {Path(plan.study).stem} study: wall time x{harness_cost.wall_over_ideal:.3f} of "
                       f"the ideal; target at most x{TARGET_HARNESS_RATIO:.2f}: **{'met' if ok else 'missed'}**.")
    if targets:
        md += ["## Targets", ""] + targets + [""]
    md += ["## Not measured here", ""] + _not_measured(plan, machine) + [""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    return [md_path] + files


def _not_measured(plan: _Plan, machine: dict) -> list[str]:
    lines = []
    if plan.device.type != "cuda" and ("model" in plan.parts or "sampler" in plan.parts):
        gpu = "no GPU on this machine" if machine.get("gpu") == "none" else "run on the CPU"
        lines.append(f"- GPU figures ({gpu}): the targets at the paper's settings (R-50-FPN, 800x1333, AMP) "
                     "are not measured by this file; run `libra bench --preset paper --device cuda --amp`.")
    missing = [p for p in PARTS if p not in plan.parts]
    if missing:
        lines.append(f"- Parts left out by --what: {', '.join(missing)}.")
    lines.append("- Data loading (the batch is made once, on the device) and multi-GPU communication.")
    if "harness" not in plan.parts:
        lines.append("- The harness's own cost: add `--what harness` (runs the quick-start study).")
    return lines


def _agreement(row) -> str:
    if row.identical_to_pycocotools:
        return "identical"
    if row.agrees_with_pycocotools:
        return "equal to float rounding"
    return "DIFFER"


def _summary(model_rows, sampler, cocoeval_rows, harness_cost=None) -> str:
    from harness.bench import fmt as _fmt

    lines = []
    if model_rows:
        lines.append(f"{'variant':<28}{'train s/step':>13}{'ratio':>8}{'img/s':>9}{'ratio':>8}{'peak MB':>9}{'ratio':>8}")
        for r in model_rows:
            lines.append(f"{r.variant:<28}{r.train_step_s:>13.4f}{r.train_time_ratio:>8.3f}{r.infer_images_per_s:>9.2f}"
                         f"{r.infer_throughput_ratio:>8.3f}{_fmt(r.peak_memory_mb, '.0f'):>9}{_fmt(r.memory_ratio):>8}")
    if sampler:
        share = "" if sampler.share_of_step_pct is None else f", {sampler.share_of_step_pct:.3f}% of a step"
        lines.append(f"sampler: vectorised {sampler.vectorised_us:.0f} us/image, per-bin loop {sampler.loop_us:.0f} us, "
                     f"random {sampler.random_us:.0f} us{share}")
    if cocoeval_rows:
        for r in cocoeval_rows:
            lines.append(f"cocoeval {r.backend}: {r.total_s:.1f} s ({r.speedup:.1f}x), stats {_agreement(r)} "
                         f"(max abs diff {r.max_abs_diff_vs_pycocotools:.2g})")
    if harness_cost:
        hc = harness_cost
        lines.append(f"harness {hc.study}: {hc.num_trials} trials in {hc.wall_s:.0f} s on {hc.slots} slots, ideal "
                     f"{hc.ideal_s:.0f} s (x{hc.wall_over_ideal:.3f}); set-up {hc.setup_s:.0f} s, trial overhead "
                     f"{hc.trial_overhead_s:.0f} slot-s, tracking {hc.tracking_s:.0f} slot-s")
    return "\n".join(lines)
