"""A bench study's one trial: the plan from the trial's config and `bench:` block, measured in
this process (harness.trial runs it as a Ray task holding the trial's resources)."""
from __future__ import annotations

import time

from harness.bench.model import ModelBenchSettings, bench_metrics
from harness.bench.plan import PARTS, Plan, input_size, measure
from harness.bench.render import sections


def run_bench_trial(payload: dict) -> dict:
    """A bench study's one trial, in this process (a Ray task holding the trial's resources).

    payload: config (TrainConfig.to_dict()), bench (BenchSpec.model_dump()), num_threads.
    Returns {"final": {"bench_seconds"}, "metrics": bench.* figures, "markdown": the results'
    sections as `libra bench` writes them, "device"}: plain Python, it pickles to the driver.
    """
    import torch

    from detectors.config import TrainConfig
    from detectors.engine import resolve_device

    start = time.perf_counter()
    torch.set_num_threads(int(payload["num_threads"]))
    cfg, opts = TrainConfig.from_dict(payload["config"]), payload["bench"]
    device = str(resolve_device(cfg.schedule.device))  # "auto" as training resolves it
    h, w = opts.get("image_size") or input_size(cfg)
    settings = ModelBenchSettings(image_height=h, image_width=w, batch_size=opts.get("batch") or cfg.schedule.batch_size,
                                  iters=opts["iters"], warmup=opts["warmup"], device=device, amp=bool(opts["amp"]),
                                  seed=cfg.schedule.seed, memory=opts["memory"])
    plan = Plan(parts=tuple(p for p in PARTS if p in opts["what"]), settings=settings, detector=cfg.detector,
                preset="study", source="the study's detector", name="bench", sampler_reps=int(opts["sampler_reps"]))
    results = measure(plan)
    metrics = bench_metrics(results.model.rows) if results.model else {}
    if results.sampler:
        metrics.update({f"bench.sampler.{k}": float(v) for k, v in results.sampler._asdict().items()
                        if k in ("vectorised_us", "loop_us", "random_us", "speedup_vs_loop", "share_of_step_pct",
                                 "extra_over_random_pct") and v is not None})
    return {"final": {"bench_seconds": time.perf_counter() - start}, "metrics": metrics,
            "markdown": sections(plan, results), "device": device}
