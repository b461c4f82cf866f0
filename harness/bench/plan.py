"""What one benchmark run measures (a Plan), and running its parts: `libra bench` and a bench
study's trial (harness.bench.trial) both go through `measure`."""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

from detectors.config import DetectorConfig
from harness.bench.model import SAMPLER_VARIANT, ModelBenchSettings, Progress, quiet, run_model_bench, variants

PARTS = ("model", "sampler", "cocoeval", "harness")
# What each part measured, None where it did not run: a ModelBenchResult, a SamplerResult, a list
# of CocoEvalResult (one per backend), a HarnessCost.
Results = namedtuple("Results", PARTS, defaults=(None,) * len(PARTS))


@dataclass(frozen=True)
class Plan:
    parts: tuple[str, ...]  # of PARTS, in that order
    settings: ModelBenchSettings  # device, image size, batch, rounds, AMP, seed, memory
    detector: DetectorConfig
    preset: str  # the preset's name, or the stem of the --config file
    source: str  # where the detector settings came from, in words
    name: str  # the output files' stem
    sampler_reps: int = 300
    cocoeval_images: int = 5000
    cocoeval_repeats: int = 3
    study: Optional[str] = None  # the harness part's study file, and its --study-set overrides
    study_set: tuple[str, ...] = ()


def input_size(cfg) -> tuple[int, int]:
    """(height, width) of a TrainConfig's images: the synthetic set's side, else min/max size."""
    if cfg.data.kind == "synthetic":
        return cfg.data.synthetic.image_size, cfg.data.synthetic.image_size
    return cfg.detector.min_size, cfg.detector.max_size


def measure(plan: Plan, progress: Progress = quiet) -> Results:
    """Run the plan's parts in order; the sampler's share is of the +iou_balanced_sampling step."""
    out, s, det = {}, plan.settings, plan.detector
    if "model" in plan.parts:
        progress(f"[model] {det.backbone}, images {s.image_height}x{s.image_width}, batch {s.batch_size}, "
                 f"{s.warmup} warm-up + {s.iters} timed rounds of {len(variants())} variants"
                 + (" and an A/A control" if s.control else ""))
        out["model"] = run_model_bench(det, s, progress=progress)
    if "sampler" in plan.parts:
        from harness.bench.sampler import run_sampler_bench

        step = next((r.train_step_s for r in out["model"].rows if r.variant == SAMPLER_VARIANT), None) \
            if "model" in out else None
        out["sampler"] = run_sampler_bench(
            device=s.device, reps=plan.sampler_reps, num_bins=det.iou_balanced_sampling.num_bins,
            batch_size=s.batch_size if step else None, train_step_s=step, progress=progress,
            num_proposals=det.rpn_post_nms_top_n_train, rois_per_image=det.roi_batch_size_per_image,
            positive_fraction=det.roi_positive_fraction, image_height=s.image_height, image_width=s.image_width,
            seed=s.seed)
    if "cocoeval" in plan.parts:
        from harness.bench.cocoeval import run_cocoeval_bench

        out["cocoeval"] = run_cocoeval_bench(plan.cocoeval_images, repeats=plan.cocoeval_repeats, seed=s.seed,
                                             progress=progress)
    if "harness" in plan.parts:
        from harness.bench.harness_cost import run_harness_bench

        out["harness"] = run_harness_bench(plan.study, overrides=plan.study_set, progress=progress)
    return Results(**out)
