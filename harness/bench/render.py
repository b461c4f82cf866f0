"""Rendering: a benchmark's results as the markdown report and CSVs `libra bench` writes (the
machine and versions first), the sections a bench study's trial logs and `libra bench` prints at
the end (tables via pandas)."""
from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Optional

import pandas as pd

from detectors.components import count_word
from harness.bench.cocoeval import STAT_NAMES
from harness.bench.model import BASELINE, CONTROL, all_on
from harness.bench.plan import PARTS, Plan, Results

TARGET_HARNESS_RATIO = 1.15  # the quick-start study: wall time within 15% of the ideal
TARGET_TRAIN_RATIO = 1.05  # all components on: at most 5% more training step time ...
TARGET_INFER_RATIO = 0.95  # ... and at most 5% less inference throughput (GPU, paper settings)
TARGET_SAMPLER_SHARE_PCT = 1.0  # the IoU-balanced sampler: under 1% of a training step


def fmt(value: Optional[float], spec: str = ".3f") -> str:
    """A figure as text; "n/m" (not measured) for None."""
    return "n/m" if value is None else format(value, spec)


def iqr(record, key: str, spec: str) -> str:
    """A figure's median and IQR as text, "median [q25, q75]": record.key, key_q25, key_q75."""
    return "{:{s}} [{:{s}}, {:{s}}]".format(*(getattr(record, key + end) for end in ("", "_q25", "_q75")), s=spec)


def md_table(rows) -> str:
    """A markdown table of display strings (numbers are not re-parsed); rows: a list of dicts or a DataFrame."""
    frame = pd.DataFrame(rows)
    return frame.fillna("").to_markdown(index=False, disable_numparse=True) if len(frame) else ""


def model_table(rows) -> list[dict[str, str]]:
    """The component-cost table: one row of display strings per variant."""
    table = []
    for r in rows:
        row = {"variant": r.variant, "train s/step (median [IQR])": iqr(r, "train_step_s", ".4f"),
               "train time ratio [paired IQR]": iqr(r, "train_time_ratio", ".3f"),
               "inference images/s": f"{r.infer_images_per_s:.2f}",
               "inference s/batch [IQR]": iqr(r, "infer_batch_s", ".4f"),
               "throughput ratio": f"{r.infer_throughput_ratio:.3f}", "peak memory MB": fmt(r.peak_memory_mb, ".0f"),
               "memory ratio": fmt(r.memory_ratio)}
        if r.idle_memory_mb is not None:
            row["MB above idle"] = fmt(r.peak_memory_mb - r.idle_memory_mb, ".0f")
            row["above-idle ratio"] = fmt(r.memory_above_idle_ratio)
        table.append(row)
    return table


def sections(plan: Plan, res: Results) -> str:
    """The measured parts' sections (markdown) and the targets."""
    det, s, md = plan.detector, plan.settings, []
    if res.model:
        rows = res.model.rows
        control = next((r for r in rows if r.variant == CONTROL), None)
        md += ["## Component costs against the baseline", "",
               f"Detector: {plan.source}. Backbone {det.backbone} + FPN ({det.fpn_channels} channels), min/max size "
               f"{det.min_size}/{det.max_size}, RPN {det.rpn_post_nms_top_n_train} proposals (train) / "
               f"{det.rpn_post_nms_top_n_test} (test), {det.roi_batch_size_per_image} RoIs per image, box head "
               f"{det.representation_size}, {det.num_classes} classes, random init.",
               f"Input: {s.batch_size} random images of {s.image_height}x{s.image_width} with {s.boxes_per_image} random "
               f"boxes each, already on {s.device}. {s.warmup} warm-up and {s.iters} timed rounds; in each round every "
               "variant runs one training step (forward, backward, gradient clipping, SGD step) and one inference "
               "batch, in an order rotated every round. Times are medians over rounds with their IQR; ratios are "
               "medians of per-round paired ratios (a variant against the baseline in the same round), with their "
               "IQR. AMP: " + ("on" if s.amp else "off") + "."]
        if control is not None:
            md.append(f"'{CONTROL}' is a second, identical baseline: its ratios ({control.train_time_ratio:.3f} "
                      f"training, {control.infer_throughput_ratio:.3f} inference) are this run's noise floor; "
                      "differences of that size mean nothing; its memory is not measured again (n/m). (Inference of "
                      "+iou_balanced_sampling and +balanced_l1_loss also runs the baseline's code: neither component "
                      "acts at test time.)")
        md.append(f"Peak memory: {rows[0].memory_method}.")
        if rows[0].idle_memory_mb is not None:
            md.append("'MB above idle' subtracts the RSS of that process before the model is built "
                      "(Python + torch + torchvision), which every variant pays alike.")
        md += ["Inference with random weights passes few detections through the score threshold, so "
               "post-processing is lighter than with a trained model: if anything, component ratios are overstated.",
               "", md_table(model_table(rows)), ""]
    if res.sampler:
        sp = res.sampler
        share = lambda v: "" if v is None else f"{v:.3f}%"  # noqa: E731
        md += ["## IoU-balanced sampler", "",
               f"One image's negatives: {sp.num_candidates} candidates (from {det.rpn_post_nms_top_n_train} proposals "
               f"plus the gt boxes), drawing {sp.num_expected}, {det.iou_balanced_sampling.num_bins} bins, on "
               f"{sp.device}; {sp.reps} timed calls each, interleaved, each call timed by torch.utils.benchmark.Timer. "
               "'per-bin loop' is `harness.bench.iou_balanced_neg_sample_loop`, a straightforward implementation "
               "written as the comparison baseline; 'random' is the baseline's randperm draw.", "",
               md_table(pd.DataFrame([
                   ("vectorised (detectors.sampling)", iqr(sp, "vectorised_us", ".1f"), share(sp.share_of_step_pct)),
                   ("per-bin loop (comparison)", iqr(sp, "loop_us", ".1f"), share(sp.loop_share_of_step_pct)),
                   ("random (baseline's draw)", f"{sp.random_us:.1f}", "")],
                   columns=["sampler", "us per image (median [IQR])", "share of a training step"])), "",
               f"Loop time / vectorised time: {sp.speedup_vs_loop:.2f}" + (
                   " (the vectorised sampler is the faster)." if sp.speedup_vs_loop > 1
                   else " (the per-bin loop is the faster here).")]
        if sp.share_of_step_pct is not None:
            md.append(f"Share of a step: {sp.batch_size} images x the per-image time, over the median training step "
                      f"of +iou_balanced_sampling ({sp.train_step_s:.4f} s); its extra over the random draw is "
                      f"{sp.extra_over_random_pct:.3f}% of the step.")
        md.append("")
    if res.cocoeval:
        first = res.cocoeval[0]
        md += ["## COCO evaluation speed", "",
               f"Synthetic COCO-val-sized set: {first.num_images} images, {first.num_gt} gt boxes (1% crowd), 80 "
               f"categories, {first.num_detections} detections; bbox evaluation end to end (index, loadRes, evaluate, "
               f"accumulate, summarize), median of {first.repeats} run(s) per backend.", "",
               md_table([{"backend": r.backend, "total s": f"{r.total_s:.1f}", "load s": f"{r.load_s:.1f}",
                          "evaluate s": f"{r.evaluate_s:.1f}", "accumulate+summarize s": f"{r.accumulate_summarize_s:.1f}",
                          "speed-up": f"{r.speedup:.1f}x", "12 stats vs pycocotools": (
                              "identical" if r.identical_to_pycocotools
                              else "equal to float rounding" if r.agrees_with_pycocotools else "DIFFER"),
                          "max abs diff": f"{r.max_abs_diff_vs_pycocotools:.2g}"} for r in res.cocoeval]), "",
               "Stats (pycocotools): " + ", ".join(f"{n} {v:.4f}" for n, v in zip(STAT_NAMES, first.stats)) + "."]
        if len(res.cocoeval) == 1:
            md.append("faster-coco-eval is not installed: `pip install faster-coco-eval` (the `fast-eval` extra).")
        md.append("")
    if res.harness:
        hc = res.harness
        total = hc.slots * hc.wall_s
        md += ["## The harness's own cost", "",
               f"`libra run {plan.study}" + "".join(f" --set {o}" for o in plan.study_set) + "` in a fresh work dir "
               f"(local Ray, SQLite MLflow, Optuna journal; the synthetic data generated beforehand): {hc.num_trials} "
               f"trials, {hc.slots} at once, {hc.wall_s:.0f} s of wall time, so {hc.slots} x {hc.wall_s:.0f} = "
               f"{total:.0f} slot-seconds. Training and evaluation are the trials' own epoch times (fit's figures); "
               "the trial overhead is launch-to-result minus those; set-up is from the command's start to the study's "
               "MLflow parent run (imports, stores, Ray start), teardown from its end to the command's exit.", "",
               md_table([{"where the slot time goes": part, "slot-seconds": f"{sec:.1f}",
                          "share": f"{100 * sec / total:.1f}%"} for part, sec in hc.breakdown()]), "",
               f"Per trial, the overhead's median is {hc.trial_overhead_median_s:.2f} s and its maximum "
               f"{hc.trial_overhead_max_s:.1f} s (a worker process's first trial pays for its start and imports). "
               f"Study set-up {hc.setup_s:.1f} s, teardown {hc.teardown_s:.1f} s.",
               f"Ideal (training + evaluation / {hc.slots} slots): {hc.ideal_s:.0f} s; the study took {hc.wall_s:.0f} s "
               f"= x{hc.wall_over_ideal:.3f} of the ideal.", ""]
    targets = _targets(plan, res)
    return "\n".join(md + (["## Targets", ""] + targets + [""] if targets else []))


def _targets(plan: Plan, res: Results) -> list[str]:
    met = lambda ok: f"**{'met' if ok else 'missed'}**"  # noqa: E731
    s, lines = plan.settings, []
    if res.model:
        rows = {r.variant: r for r in res.model.rows}
        libra = rows[all_on()]
        at_paper = plan.preset == "paper" and s.device.startswith("cuda") and plan.detector.backbone == "resnet50" \
            and (s.image_height, s.image_width) == (800, 1333)
        where = "GPU at the paper's settings" if at_paper else (
            f"{s.device.split(':')[0].upper()}, {plan.preset}: the target is stated for a GPU at the paper's settings, "
            "this is the same ratio on this configuration")
        every = f"All {count_word()} components"
        undecided = libra.train_time_ratio_q25 <= TARGET_TRAIN_RATIO <= libra.train_time_ratio_q75
        lines += [f"- {every}, training step time: x{libra.train_time_ratio:.3f} of the baseline (paired IQR "
                  f"{libra.train_time_ratio_q25:.3f} to {libra.train_time_ratio_q75:.3f}); target at most "
                  f"x{TARGET_TRAIN_RATIO:.2f}: {met(libra.train_time_ratio <= TARGET_TRAIN_RATIO)}"
                  + (" by the median, but the IQR straddles the target" if undecided else "") + f" ({where}).",
                  f"- {every}, inference throughput: x{libra.infer_throughput_ratio:.3f} of the baseline; "
                  f"target at least x{TARGET_INFER_RATIO:.2f}: {met(libra.infer_throughput_ratio >= TARGET_INFER_RATIO)}."]
        if CONTROL in rows:
            c = rows[CONTROL]
            lines.append(f"- Noise floor of this run (A/A control): training x{c.train_time_ratio:.3f} (IQR "
                         f"{c.train_time_ratio_q25:.3f} to {c.train_time_ratio_q75:.3f}), inference "
                         f"x{c.infer_throughput_ratio:.3f}.")
        if libra.memory_ratio is not None:
            lines.append(f"- {every}, peak memory: x{libra.memory_ratio:.3f} of the baseline "
                         f"({libra.peak_memory_mb - rows[BASELINE].peak_memory_mb:+.0f} MB); reported, no target.")
    if res.sampler and res.sampler.share_of_step_pct is not None:
        sp = res.sampler
        lines.append(f"- IoU-balanced sampler: {sp.share_of_step_pct:.3f}% of a training step ({sp.batch_size} images "
                     f"x {sp.vectorised_us:.0f} us); target under {TARGET_SAMPLER_SHARE_PCT:.0f}%: "
                     f"{met(sp.share_of_step_pct < TARGET_SAMPLER_SHARE_PCT)}.")
    if res.harness:
        ratio = res.harness.wall_over_ideal
        lines.append(f"- Harness, {Path(plan.study).stem} study: wall time x{ratio:.3f} of the ideal; target at most "
                     f"x{TARGET_HARNESS_RATIO:.2f}: {met(ratio <= TARGET_HARNESS_RATIO)}.")
    return lines


def machine_info(device: Optional[str] = None) -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any), load average, and the versions that matter."""
    import psutil
    import torch
    from torch.utils import collect_env

    cpu = re.search(r"Model name:\s*(.+)", collect_env.get_cpu_info(collect_env.run) or "")
    info = {"cpu": cpu.group(1).strip() if cpu else "unknown", "cpu_cores": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads()), "ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
            "gpu": "none"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device).index or 0 if device else 0)
        info["cuda"] = str(torch.version.cuda)
    info["load_average_1_5_15"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["python"] = platform.python_version()
    for package in ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def write_report(out_dir: Path, plan: Plan, res: Results, *, machine: dict, header: str) -> list[Path]:
    """<name>.md (`header`, `machine` (machine_info at the start) with the load average now, every
    section, what was not measured) and one CSV per part; returns the paths."""
    machine = {**machine, "load_average_1_5_15_at_end": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    md = [header, "", "## Machine and versions", "",
          md_table([{"item": k, "value": v} for k, v in machine.items()]), "", sections(plan, res),
          "## Not measured here", ""]
    if not plan.settings.device.startswith("cuda") and {"model", "sampler"} & set(plan.parts):
        gpu = "no GPU on this machine" if machine.get("gpu") == "none" else "run on the CPU"
        md.append(f"- GPU figures ({gpu}): the targets at the paper's settings (R-50-FPN, 800x1333, AMP) are not "
                  "measured by this file; run `libra bench --preset paper --device cuda --amp`.")
    missing = [p for p in PARTS if p not in plan.parts]
    if missing:
        md.append(f"- Parts left out by --what: {', '.join(missing)}.")
    md.append("- Data loading (the batch is made once, on the device) and multi-GPU communication.")
    if "harness" not in plan.parts:
        md.append("- The harness's own cost: add `--what harness` (runs the quick-start study).")
    path = out_dir / f"{plan.name}.md"
    path.write_text("\n".join(md + [""]))
    tables = {"": res.model and [r._asdict() for r in res.model.rows], "-rounds": res.model and res.model.rounds,
              "-sampler": res.sampler and [res.sampler._asdict()],
              "-cocoeval": res.cocoeval and [{**{k: v for k, v in r._asdict().items() if k != "stats"},
                                              **dict(zip(STAT_NAMES, r.stats))} for r in res.cocoeval],
              "-harness": res.harness and [t._asdict() for t in res.harness.trials]}
    files = [path]
    for suffix, rows in tables.items():
        if rows:
            files.append(out_dir / f"{plan.name}{suffix}.csv")
            pd.DataFrame(rows).to_csv(files[-1], index=False)
    return files
