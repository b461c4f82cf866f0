"""Benchmarks: what each Libra component, the IoU-balanced sampler and COCO evaluation cost.

Three measurements, each a pure function that returns plain records (no printing, no files),
so `libra bench` and a harness study kind can share them:

- `run_model_bench`: the baseline, each component alone and all three together, built from one
  base `DetectorConfig` with the same seed and fed the same synthetic batch, plus an identical
  copy of the baseline as an A/A control. After warm-up the variants take turns, one training
  step and one inference batch each per round, and the order rotates every round, so whatever
  drifts during the run (other processes, clocks, caches) hits every variant alike. Reported
  per variant: median and IQR of the training step time and of the inference batch time,
  images per second, peak memory, and each as a ratio to the baseline; the control's ratios
  are the run's noise floor.
- `run_sampler_bench`: `iou_balanced_neg_sample` on realistic negatives against a
  straightforward per-bin loop (`iou_balanced_neg_sample_loop`, the comparison baseline) and
  against the baseline's random draw.
- `run_cocoeval_bench`: pycocotools against faster-coco-eval on a COCO-val-sized synthetic
  result set, with a check that all 12 numbers agree.

What "peak memory" means (it differs by device, see `run_model_bench`):
- CUDA: the allocator's peak during a training step, measured the way a run of that variant
  alone would see it: the variant's resident tensors (parameters, buffers, optimizer state)
  plus the input batch plus the step's peak above what was allocated when it began. The other
  variants' models live on the same GPU meanwhile, so the raw process peak would not do.
- CPU: the peak resident set of a fresh process that builds only that variant and runs a few
  training steps and inference batches on the same batch. One process per variant, because a
  process's peak RSS never goes down and the allocator keeps freed memory. The peak is reset
  after the imports (Linux /proc/self/clear_refs), so passing import-time spikes do not mask
  the model; the RSS before building the model (Python, torch, torchvision) is reported beside
  it as the idle figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from detectors.components import components, count_word
from detectors.config import DetectorConfig, from_mapping, to_plain
from detectors.evaluation import as_backend_coco, backend_available, coco_backend

Progress = Callable[[str], None]

BASELINE = "baseline"
# The variant whose training step the sampler's cost is a share of.
SAMPLER_VARIANT = "+iou_balanced_sampling"
# A second, identical baseline timed alongside: its ratios to the baseline show the run's noise.
CONTROL = "baseline again (A/A control)"


def _quiet(_: str) -> None:
    pass


def all_on() -> str:
    """The variant with every component on: "libra (all three)"."""
    return f"libra (all {count_word()})"


def variants() -> dict[str, tuple[bool, ...]]:
    """Variant name -> which components are on, in detectors.components order: the baseline
    (all off), "+<name>" for each component alone, and all of them on."""
    names = [c.name for c in components()]
    out = {BASELINE: (False,) * len(names)}
    out.update({f"+{name}": tuple(n == name for n in names) for name in names})
    out[all_on()] = (True,) * len(names)
    return out


def __getattr__(name: str):
    # VARIANTS as a module attribute, derived from detectors.components on access.
    if name == "VARIANTS":
        return variants()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =============================================================================================
# Component variants and the synthetic batch.
# =============================================================================================
def component_variants(base: DetectorConfig) -> dict[str, DetectorConfig]:
    """The configurations of `variants()`, from `base` with only the components' switches changed.

    Every other setting of a component (num_bins, refine_type, alpha, ...) comes from `base`.
    """
    out = {}
    for name, switches in variants().items():
        cfg = base
        for comp, on in zip(components(), switches):
            cfg = comp.turned(cfg, on)
        out[name] = cfg
    return out


def synthetic_batch(
    *,
    batch_size: int,
    image_height: int,
    image_width: int,
    num_classes: int,
    boxes_per_image: int = 7,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random images and random valid boxes, the same for every variant.

    Returns `batch_size` images [3, H, W] float in [0, 1] and targets {"boxes" [K, 4] xyxy in
    pixels, "labels" [K] int64 in [1, num_classes]}. K = boxes_per_image (COCO val averages 7.3
    boxes per image); box sides are log-uniform from 4% to 60% of the shorter image side, with
    aspect ratios from 1:2 to 2:1, so small, medium and large objects all occur.
    """
    gen = torch.Generator().manual_seed(seed)
    short = min(image_height, image_width)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, image_height, image_width, generator=gen))
        k = boxes_per_image
        log_lo, log_hi = math.log(max(2.0, 0.04 * short)), math.log(0.6 * short)
        side = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(k, generator=gen))
        aspect = torch.exp((torch.rand(k, generator=gen) - 0.5) * 2 * math.log(2.0))  # w / h
        w = (side * aspect.sqrt()).clamp(max=image_width - 1)
        h = (side / aspect.sqrt()).clamp(max=image_height - 1)
        x0 = torch.rand(k, generator=gen) * (image_width - w)
        y0 = torch.rand(k, generator=gen) * (image_height - h)
        boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)
        labels = torch.randint(1, num_classes + 1, (k,), generator=gen, dtype=torch.int64)
        targets.append({"boxes": boxes, "labels": labels})
    images = [img.to(device) for img in images]
    targets = [{key: v.to(device) for key, v in t.items()} for t in targets]
    return images, targets


# =============================================================================================
# Model benchmark.
# =============================================================================================
@dataclass(frozen=True)
class ModelBenchSettings:
    """How the variants are run and timed. Images are image_height x image_width pixels."""

    image_height: int = 800
    image_width: int = 1333
    batch_size: int = 2  # images per training step and per inference batch
    iters: int = 20  # timed rounds; every variant takes one training step and one inference batch per round
    warmup: int = 5  # untimed rounds before (allocator, cuDNN, caches settle)
    device: str = "cpu"  # cpu | cuda | cuda:N (already resolved)
    amp: bool = False  # float16 autocast + GradScaler; CUDA only
    seed: int = 0
    boxes_per_image: int = 7
    # SGD as the engine runs it: a small lr keeps the weights (and so the work per step) from
    # drifting over the run; momentum, weight decay and clipping cost what they cost in training.
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = 35.0
    memory: str = "auto"  # auto: CUDA allocator on a GPU, a fresh process per variant on the CPU | off
    memory_steps: int = 3  # CPU memory probe: steps (after one warm-up) in the fresh process
    control: bool = True  # also time an identical copy of the baseline (the noise floor)


@dataclass(frozen=True)
class VariantResult:
    """One variant's figures. Times in seconds; ratios are to the baseline (baseline = 1.0)."""

    variant: str
    flags: dict[str, bool]  # component name -> on, in detectors.components order
    num_params: int
    train_step_s: float  # median over timed rounds (the IQR beside it is over rounds too)
    train_step_s_q25: float
    train_step_s_q75: float
    infer_batch_s: float  # median
    infer_batch_s_q25: float
    infer_batch_s_q75: float
    infer_images_per_s: float  # batch_size / median inference batch time
    peak_memory_mb: Optional[float]  # see the module docstring; None when not measured
    idle_memory_mb: Optional[float]  # CPU only: RSS of the probe process before building the model
    memory_method: str  # how peak_memory_mb was measured, in words
    # Median over rounds of (this train step / the baseline's in the same round), and its IQR.
    train_time_ratio: float
    train_time_ratio_q25: float
    train_time_ratio_q75: float
    infer_throughput_ratio: float  # median over rounds of baseline's / this inference time: < 1 is slower
    memory_ratio: Optional[float]
    # CPU: (peak - idle) / the baseline's, the model's and the step's own memory without the
    # ~0.7 GB that importing torch costs every process alike; None on CUDA (already excluded).
    memory_above_idle_ratio: Optional[float]
    final_loss: float  # last timed step's total loss: finite, or the timings are suspect

    def __getattr__(self, name: str):
        # row.iou_balanced_sampling etc.: each component's switch reads like a field.
        flags = self.__dict__.get("flags") or {}
        if name in flags:
            return flags[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def as_row(self) -> dict[str, Any]:
        """Flat mapping for a CSV: variant, one bool per component, then the figures."""
        row = dataclasses.asdict(self)
        flags = row.pop("flags")
        return {"variant": row.pop("variant"), **flags, **row}


class _Runner:
    """One variant's model, optimizer and scaler; times one training step or inference batch."""

    def __init__(self, cfg: DetectorConfig, settings: ModelBenchSettings, device: torch.device):
        from detectors.build import build_detector

        torch.manual_seed(settings.seed)  # same initial weights for the parts variants share
        self.model = build_detector(cfg).to(device)
        self.device = device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        self.use_amp = settings.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)
        self.grad_clip = settings.grad_clip
        self.last_loss: Optional[Tensor] = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, images: list[Tensor], targets: list[dict]) -> float:
        """One training step, detectors.engine.train_step (the one `fit` takes); seconds."""
        from detectors.engine import train_step

        self.model.train()
        self._sync()
        start = time.perf_counter()
        loss, _ = train_step(self.model, self.optimizer, self.scaler, images, targets, params=self.params,
                             grad_clip=self.grad_clip, use_amp=self.use_amp)
        self._sync()
        seconds = time.perf_counter() - start
        self.last_loss = loss
        return seconds

    @torch.no_grad()
    def infer(self, images: list[Tensor]) -> float:
        """One inference batch (eval mode, no gradients); seconds."""
        self.model.eval()
        self._sync()
        start = time.perf_counter()
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            self.model(images)
        self._sync()
        return time.perf_counter() - start

    def resident_bytes(self) -> int:
        """Bytes of parameters, buffers and optimizer state (distinct storages)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if torch.is_tensor(v))
        seen, total = set(), 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75) with linear interpolation."""
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def _batch_bytes(images: list[Tensor], targets: list[dict]) -> int:
    tensors = images + [v for t in targets for v in t.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ModelBenchResult:
    """Per-variant figures, and every timed round for whoever wants to look closer."""

    rows: list[VariantResult]
    # One record per timed (round, variant): round, position in that round's order, variant,
    # train_s, infer_s.
    rounds: list[dict] = field(default_factory=list)


def run_model_bench(
    base: DetectorConfig,
    settings: ModelBenchSettings,
    *,
    progress: Progress = _quiet,
) -> ModelBenchResult:
    """Time the `variants()` of `base` side by side (plus an A/A control copy of the baseline).

    Procedure: build every variant (torch.manual_seed(seed) before each, so shared parts start
    from the same weights); make one synthetic batch on the device; run `warmup` untimed rounds
    and `iters` timed rounds. In round r the variants go in a fixed order rotated by r, each
    taking one training step then one inference batch. On CUDA every timed region ends with
    torch.cuda.synchronize. Data loading is not part of either time (the batch is already on
    the device), so the figures isolate the model.

    Ratios are medians of per-round paired ratios (a variant's time over the baseline's in the
    same round, seconds apart), which cancels drift between rounds. The control (with
    settings.control) is a second, identical baseline: its ratios show the noise floor of the
    run, the smallest difference the run can tell apart.
    """
    device = torch.device(settings.device)
    if settings.iters < 1 or settings.warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {settings.iters} and {settings.warmup}")
    table = variants()
    configs = component_variants(base)
    if settings.control:
        configs[CONTROL] = configs[BASELINE]
    names = list(configs)
    images, targets = synthetic_batch(
        batch_size=settings.batch_size, image_height=settings.image_height, image_width=settings.image_width,
        num_classes=base.num_classes, boxes_per_image=settings.boxes_per_image, seed=settings.seed, device=device,
    )
    measure_cuda_memory = settings.memory == "auto" and device.type == "cuda"
    if measure_cuda_memory:
        torch.cuda.reset_peak_memory_stats(device)

    runners = {}
    for name in names:
        progress(f"[model] building {name}")
        runners[name] = _Runner(configs[name], settings, device)

    train_s: dict[str, list[float]] = {n: [] for n in names}
    infer_s: dict[str, list[float]] = {n: [] for n in names}
    rounds: list[dict] = []
    step_peak_above: dict[str, int] = {n: 0 for n in names}
    total_rounds = settings.warmup + settings.iters
    for r in range(total_rounds):
        timed = r >= settings.warmup
        order = names[r % len(names):] + names[: r % len(names)]
        gc.collect()  # outside the timed regions, so a collection does not land in one variant's step
        for position, name in enumerate(order):
            runner = runners[name]
            if measure_cuda_memory:
                allocated_before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t_train = runner.train_step(images, targets)
            if measure_cuda_memory:
                above = torch.cuda.max_memory_allocated(device) - allocated_before
                step_peak_above[name] = max(step_peak_above[name], above)
            t_infer = runner.infer(images)
            if timed:
                train_s[name].append(t_train)
                infer_s[name].append(t_infer)
                rounds.append({"round": r - settings.warmup + 1, "position": position, "variant": name,
                               "train_s": t_train, "infer_s": t_infer})
        if timed:
            progress(f"[model] round {r + 1 - settings.warmup}/{settings.iters}, train s/step: "
                     + ", ".join(f"{n} {train_s[n][-1]:.3f}" for n in names))
        else:
            progress(f"[model] warm-up round {r + 1}/{settings.warmup}")

    peak_mb: dict[str, Optional[float]] = {n: None for n in names}
    idle_mb: dict[str, Optional[float]] = {n: None for n in names}
    method = {n: "not measured" for n in names}
    if measure_cuda_memory:
        batch_bytes = _batch_bytes(images, targets)
        for name in names:
            peak_mb[name] = (runners[name].resident_bytes() + batch_bytes + step_peak_above[name]) / 2**20
            method[name] = "CUDA allocator: resident tensors + batch + training step's peak above them"
    final_loss = {n: float(runners[n].last_loss) for n in names}
    num_params = {n: sum(p.numel() for p in runners[n].model.parameters()) for n in names}
    del runners, images, targets
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if settings.memory == "auto" and device.type == "cpu":
        for name in names:
            if name == CONTROL:
                continue  # the baseline's configuration: a probe would only repeat its figure
            progress(f"[model] memory: fresh process for {name}")
            probe = cpu_memory_probe(configs[name], settings)
            peak_mb[name], idle_mb[name] = probe["peak_rss_mb"], probe["idle_rss_mb"]
            method[name] = "peak RSS of a fresh process" + (
                ", reset after imports" if probe["peak_reset_after_imports"] else ", imports included")

    results = []
    for name in names:
        tq25, tmed, tq75 = _quantiles(train_s[name])
        iq25, imed, iq75 = _quantiles(infer_s[name])
        train_ratios = [t / b for t, b in zip(train_s[name], train_s[BASELINE])]
        rq25, rmed, rq75 = _quantiles(train_ratios)
        throughput_ratios = [b / t for t, b in zip(infer_s[name], infer_s[BASELINE])]
        _, tpmed, _ = _quantiles(throughput_ratios)
        memory_ratio = above_idle_ratio = None
        if peak_mb[name] is not None and peak_mb[BASELINE]:
            memory_ratio = peak_mb[name] / peak_mb[BASELINE]
        if idle_mb[name] is not None and peak_mb[BASELINE] - idle_mb[BASELINE] > 0:
            above_idle_ratio = (peak_mb[name] - idle_mb[name]) / (peak_mb[BASELINE] - idle_mb[BASELINE])
        switches = table.get(name, table[BASELINE])
        results.append(VariantResult(
            variant=name, flags={c.name: on for c, on in zip(components(), switches)},
            num_params=num_params[name],
            train_step_s=tmed, train_step_s_q25=tq25, train_step_s_q75=tq75,
            infer_batch_s=imed, infer_batch_s_q25=iq25, infer_batch_s_q75=iq75,
            infer_images_per_s=settings.batch_size / imed, peak_memory_mb=peak_mb[name],
            idle_memory_mb=idle_mb[name], memory_method=method[name],
            train_time_ratio=rmed, train_time_ratio_q25=rq25, train_time_ratio_q75=rq75,
            infer_throughput_ratio=tpmed, memory_ratio=memory_ratio,
            memory_above_idle_ratio=above_idle_ratio, final_loss=final_loss[name],
        ))
    return ModelBenchResult(rows=results, rounds=rounds)


def bench_metrics(results: Sequence[VariantResult]) -> dict[str, float]:
    """Flat `{metric name: value}` for a tracker (e.g. MLflow): bench.<variant>.<figure>."""
    metrics = {}
    for row in results:
        key = re.sub(r"[^a-z0-9]+", "_", row.variant.lower()).strip("_")
        for figure in ("train_step_s", "infer_images_per_s", "peak_memory_mb", "train_time_ratio",
                       "infer_throughput_ratio", "memory_ratio"):
            value = getattr(row, figure)
            if value is not None:
                metrics[f"bench.{key}.{figure}"] = float(value)
    return metrics


def fmt(value: Optional[float], spec: str = ".3f", missing: str = "n/m") -> str:
    """A figure as text; `missing` for one not measured."""
    return missing if value is None else format(value, spec)


def model_table(rows: Sequence[VariantResult]) -> list[dict[str, str]]:
    """The component-cost table: one row of display strings per variant."""
    table = []
    for r in rows:
        row = {
            "variant": r.variant,
            "train s/step (median [IQR])": f"{r.train_step_s:.4f} [{r.train_step_s_q25:.4f}, {r.train_step_s_q75:.4f}]",
            "train time ratio [paired IQR]": f"{r.train_time_ratio:.3f} [{r.train_time_ratio_q25:.3f}, {r.train_time_ratio_q75:.3f}]",
            "inference images/s": f"{r.infer_images_per_s:.2f}",
            "inference s/batch [IQR]": f"{r.infer_batch_s:.4f} [{r.infer_batch_s_q25:.4f}, {r.infer_batch_s_q75:.4f}]",
            "throughput ratio": f"{r.infer_throughput_ratio:.3f}",
            "peak memory MB": fmt(r.peak_memory_mb, ".0f"),
            "memory ratio": fmt(r.memory_ratio),
        }
        if r.idle_memory_mb is not None:
            row["MB above idle"] = fmt(r.peak_memory_mb - r.idle_memory_mb, ".0f")
            row["above-idle ratio"] = fmt(r.memory_above_idle_ratio)
        table.append(row)
    return table


def md_table(rows: list[dict[str, str]]) -> str:
    """A markdown pipe table with the keys of the first row as its header."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in header) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CPU memory probe
def cpu_memory_probe(cfg: DetectorConfig, settings: ModelBenchSettings) -> dict[str, float]:
    """Peak RSS of a fresh Python process running one variant on the benchmark batch.

    The child builds the batch and the model, runs one warm-up and `memory_steps` training
    steps and inference batches, and reports {"peak_rss_mb", "idle_rss_mb": RSS after the
    imports, before the batch and the model, "peak_reset_after_imports": whether the peak could
    be reset there}. It uses this process's torch thread count.
    """
    request = {
        "detector": to_plain(cfg),
        "settings": dataclasses.asdict(settings),
        "num_threads": torch.get_num_threads(),
    }
    proc = subprocess.run(
        [sys.executable, "-c", "import harness.bench as b; b._cpu_memory_probe_main()"],
        input=json.dumps(request), capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"CPU memory probe for {cfg.backbone} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """The peak resident set since start or the last reset: VmHWM, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_memory_probe_main() -> None:
    """Entry point of the probe process: request JSON on stdin, result JSON on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(int(request["num_threads"]))
    import detectors.build  # noqa: F401  (imports belong to the idle figure, not to the model)

    gc.collect()
    peak_was_reset = _reset_peak_rss()
    idle = _current_rss_mb()
    cfg = from_mapping(DetectorConfig, request["detector"], "detector")
    settings = ModelBenchSettings(**request["settings"])
    images, targets = synthetic_batch(
        batch_size=settings.batch_size, image_height=settings.image_height, image_width=settings.image_width,
        num_classes=cfg.num_classes, boxes_per_image=settings.boxes_per_image, seed=settings.seed,
    )
    runner = _Runner(cfg, settings, torch.device("cpu"))
    for _ in range(1 + settings.memory_steps):
        runner.train_step(images, targets)
        runner.infer(images)
    peak = _peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "idle_rss_mb": idle, "peak_reset_after_imports": peak_was_reset}))


# =============================================================================================
# Sampler micro-benchmark.
# =============================================================================================
def iou_balanced_neg_sample_loop(
    max_ious: Tensor,
    num_expected: int,
    *,
    num_bins: int = 3,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """COMPARISON BASELINE for the benchmark, not used in training: IoU-balanced negative
    sampling written the straightforward way, one Python iteration (and one randperm) per bin.

    Same rule as detectors.sampling.iou_balanced_neg_sample with floor_thr = -1 (the default):
    K equal-width bins over [0, max IoU of the candidates], num_expected // K drawn uniformly
    from each bin (all of it if smaller), the shortfall drawn uniformly from the candidates not
    yet taken. Bin ids are computed the same way, so both put every candidate in the same bin.

    Args:
        max_ious: [M] float, each negative candidate's max IoU with any ground truth.
        num_expected: how many to draw.
    Returns:
        [min(num_expected, M)] int64 indices into max_ious, ascending, no repetition.
    """
    num_candidates = max_ious.numel()
    device = max_ious.device
    if num_expected >= num_candidates:
        return torch.arange(num_candidates, dtype=torch.int64, device=device)
    width = (max_ious.max() / num_bins).clamp_min(torch.finfo(max_ious.dtype).tiny)
    bin_ids = (max_ious / width).floor().clamp(0, num_bins - 1).long()
    per_bin = num_expected // num_bins
    chosen = []
    for k in range(num_bins):
        members = torch.nonzero(bin_ids == k).squeeze(1)
        if members.numel() <= per_bin:
            chosen.append(members)
        else:
            pick = torch.randperm(members.numel(), generator=generator, device=device)[:per_bin]
            chosen.append(members[pick])
    taken = torch.cat(chosen)
    missing = num_expected - taken.numel()
    if missing > 0:
        rest = torch.ones(num_candidates, dtype=torch.bool, device=device)
        rest[taken] = False
        rest_idx = torch.nonzero(rest).squeeze(1)
        pick = torch.randperm(rest_idx.numel(), generator=generator, device=device)[:missing]
        taken = torch.cat([taken, rest_idx[pick]])
    return taken.sort().values


def realistic_negatives(
    *,
    num_proposals: int = 2000,
    num_gt: int = 7,
    image_height: int = 800,
    image_width: int = 1333,
    rois_per_image: int = 512,
    positive_fraction: float = 0.25,
    neg_iou_thr: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, int]:
    """Max IoUs of one image's negative proposals, and how many negatives the sampler draws.

    Like an RPN's output: a quarter of the proposals are jittered copies of the ground-truth
    boxes (these give the positives and the hard negatives), the rest are random boxes (mostly
    IoU near 0). The gt boxes are added as proposals, as in training. Returns
    (max_ious [M] of the proposals with IoU < neg_iou_thr, rois_per_image - positives drawn).
    """
    from torchvision.ops import box_iou

    gen = torch.Generator().manual_seed(seed)
    gt_images, gt_targets = synthetic_batch(
        batch_size=1, image_height=image_height, image_width=image_width, num_classes=1,
        boxes_per_image=num_gt, seed=seed,
    )
    del gt_images
    gt = gt_targets[0]["boxes"]  # [G, 4]
    num_near = num_proposals // 4
    parents = gt[torch.randint(0, num_gt, (num_near,), generator=gen)]
    size = torch.cat([parents[:, 2:] - parents[:, :2]] * 2, dim=1)
    near = parents + size * 0.25 * torch.randn(num_near, 4, generator=gen)
    num_random = num_proposals - num_near
    xy = torch.rand(num_random, 2, generator=gen) * torch.tensor([image_width, image_height])
    wh = torch.exp(torch.rand(num_random, 2, generator=gen) * math.log(400.0)) + 4.0
    far = torch.cat([xy, xy + wh], dim=1)
    proposals = torch.cat([near, far, gt])
    lo = torch.minimum(proposals[:, :2], proposals[:, 2:])
    hi = torch.maximum(proposals[:, :2], proposals[:, 2:]) + 1.0
    proposals = torch.cat([lo, hi], dim=1)
    max_ious = box_iou(gt, proposals).max(dim=0).values
    num_pos = min(int((max_ious >= neg_iou_thr).sum()), int(rois_per_image * positive_fraction))
    negatives = max_ious[max_ious < neg_iou_thr]
    return negatives.to(device), rois_per_image - num_pos


@dataclass(frozen=True)
class SamplerResult:
    """Per-image sampler times (medians, microseconds) and their share of a training step."""

    device: str
    num_candidates: int  # negatives in the image
    num_expected: int  # negatives drawn
    reps: int
    vectorised_us: float  # detectors.sampling.iou_balanced_neg_sample
    vectorised_us_q25: float
    vectorised_us_q75: float
    loop_us: float  # iou_balanced_neg_sample_loop (comparison baseline)
    loop_us_q25: float
    loop_us_q75: float
    random_us: float  # the baseline's randperm draw, what IoU-balanced sampling replaces
    speedup_vs_loop: float
    batch_size: Optional[int] = None  # images per training step (for the shares below)
    train_step_s: Optional[float] = None  # the +iou_balanced_sampling variant's median step
    share_of_step_pct: Optional[float] = None  # batch_size * vectorised / train step, in %
    extra_over_random_pct: Optional[float] = None  # batch_size * (vectorised - random) / step, in %
    loop_share_of_step_pct: Optional[float] = None


def run_sampler_bench(
    *,
    device: str = "cpu",
    reps: int = 200,
    warmup: int = 10,
    num_proposals: int = 2000,
    rois_per_image: int = 512,
    positive_fraction: float = 0.25,
    num_bins: int = 3,
    image_height: int = 800,
    image_width: int = 1333,
    seed: int = 0,
    batch_size: Optional[int] = None,
    train_step_s: Optional[float] = None,
    progress: Progress = _quiet,
) -> SamplerResult:
    """Time one image's negative sampling three ways, interleaved, `reps` times each.

    Inputs come from `realistic_negatives` (num_proposals proposals plus the gt boxes; the
    defaults are the paper's RPN output and R-CNN batch). With `batch_size` and `train_step_s`
    (a training step's median time with the sampler on) the sampler's share of a step is given.
    """
    from detectors.sampling import iou_balanced_neg_sample

    dev = torch.device(device)
    max_ious, num_expected = realistic_negatives(
        num_proposals=num_proposals, rois_per_image=rois_per_image, positive_fraction=positive_fraction,
        image_height=image_height, image_width=image_width, seed=seed, device=dev,
    )
    candidates = {
        "vectorised": lambda: iou_balanced_neg_sample(max_ious, num_expected, num_bins=num_bins),
        "loop": lambda: iou_balanced_neg_sample_loop(max_ious, num_expected, num_bins=num_bins),
        "random": lambda: torch.randperm(max_ious.numel(), device=dev)[:num_expected],
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    keys = list(candidates)
    progress(f"[sampler] {max_ious.numel()} negatives, drawing {num_expected}, {reps} reps on {dev}")
    for r in range(warmup + reps):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            candidates[key]()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= warmup:
                times[key].append((time.perf_counter() - start) * 1e6)
    vq25, vmed, vq75 = _quantiles(times["vectorised"])
    lq25, lmed, lq75 = _quantiles(times["loop"])
    rmed = statistics.median(times["random"])
    share = extra = loop_share = None
    if batch_size and train_step_s:
        step_us = train_step_s * 1e6
        share = 100.0 * batch_size * vmed / step_us
        extra = 100.0 * batch_size * (vmed - rmed) / step_us
        loop_share = 100.0 * batch_size * lmed / step_us
    return SamplerResult(
        device=str(dev), num_candidates=max_ious.numel(), num_expected=num_expected, reps=reps,
        vectorised_us=vmed, vectorised_us_q25=vq25, vectorised_us_q75=vq75,
        loop_us=lmed, loop_us_q25=lq25, loop_us_q75=lq75, random_us=rmed,
        speedup_vs_loop=lmed / vmed, batch_size=batch_size, train_step_s=train_step_s,
        share_of_step_pct=share, extra_over_random_pct=extra, loop_share_of_step_pct=loop_share,
    )


# =============================================================================================
# COCOeval speed: pycocotools against faster-coco-eval.
# =============================================================================================
# COCO's 80 category ids (1..90 with ten unused).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass(frozen=True)
class SyntheticEvalSet:
    """A COCO-val-like ground truth and result set as arrays (turned into dicts per backend,
    because both COCO APIs write into the records they are given)."""

    image_sizes: np.ndarray  # [I, 2] (height, width)
    gt_image_index: np.ndarray  # [G] row into image_sizes
    gt_boxes: np.ndarray  # [G, 4] xywh
    gt_categories: np.ndarray  # [G] COCO category id
    gt_areas: np.ndarray  # [G] "segmentation" area, below the box area as in COCO
    gt_iscrowd: np.ndarray  # [G] 0/1
    det_image_index: np.ndarray  # [D]
    det_boxes: np.ndarray  # [D, 4] xywh
    det_categories: np.ndarray  # [D]
    det_scores: np.ndarray  # [D]

    @property
    def num_images(self) -> int:
        return int(self.image_sizes.shape[0])

    def gt_dataset(self) -> dict:
        images = [{"id": i + 1, "height": int(h), "width": int(w), "file_name": f"{i + 1:012d}.jpg"}
                  for i, (h, w) in enumerate(self.image_sizes.tolist())]
        annotations = [
            {"id": k + 1, "image_id": int(img) + 1, "category_id": int(cat), "bbox": box,
             "area": float(area), "iscrowd": int(crowd)}
            for k, (img, cat, box, area, crowd) in enumerate(zip(
                self.gt_image_index.tolist(), self.gt_categories.tolist(), self.gt_boxes.tolist(),
                self.gt_areas.tolist(), self.gt_iscrowd.tolist()))
        ]
        categories = [{"id": c, "name": f"class_{c}", "supercategory": "synthetic"} for c in COCO_CATEGORY_IDS]
        return {"images": images, "annotations": annotations, "categories": categories}

    def detections(self) -> list[dict]:
        return [
            {"image_id": int(img) + 1, "category_id": int(cat), "bbox": box, "score": float(score)}
            for img, cat, box, score in zip(
                self.det_image_index.tolist(), self.det_categories.tolist(), self.det_boxes.tolist(),
                self.det_scores.tolist())
        ]


def synthetic_eval_set(
    num_images: int = 5000,
    *,
    gt_per_image: float = 7.3,
    dets_per_image: int = 100,
    crowd_fraction: float = 0.01,
    seed: int = 0,
) -> SyntheticEvalSet:
    """A COCO-val-sized evaluation problem, generated with NumPy in a second or two.

    COCO val2017: 5,000 images, 36,781 boxes (7.3 per image), 80 categories, about 1% crowd
    boxes; a detector's result file holds up to 100 detections per image (500k in all). Here:
    Poisson(gt_per_image) boxes per image (log-uniform sizes, all three COCO area ranges), and
    per image `dets_per_image` detections: about three jittered copies of each gt box (80% with
    the right class, higher scores), the rest random boxes with random classes and low scores.
    So AP lands in a plausible range and every code path (matches, crowd ignores, area ranges,
    the 100-detection cap) is exercised.
    """
    rng = np.random.default_rng(seed)
    cats = np.asarray(COCO_CATEGORY_IDS)
    heights = rng.choice([375, 427, 480, 512, 640], size=num_images)
    sizes = np.stack([heights, np.full(num_images, 640)], axis=1)
    counts = rng.poisson(gt_per_image, size=num_images)
    gt_img = np.repeat(np.arange(num_images), counts)
    g = gt_img.size
    h_img, w_img = sizes[gt_img, 0].astype(np.float64), sizes[gt_img, 1].astype(np.float64)
    side = np.exp(rng.uniform(np.log(6.0), np.log(450.0), g))
    aspect = np.exp(rng.uniform(-np.log(2.5), np.log(2.5), g))
    w = np.minimum(side * np.sqrt(aspect), w_img - 1)
    h = np.minimum(side / np.sqrt(aspect), h_img - 1)
    x = rng.uniform(0, 1, g) * (w_img - w)
    y = rng.uniform(0, 1, g) * (h_img - h)
    gt_boxes = np.round(np.stack([x, y, w, h], axis=1), 2)
    gt_cats = rng.choice(cats, size=g)
    gt_areas = np.round(w * h * rng.uniform(0.45, 0.9, g), 2)
    gt_crowd = (rng.random(g) < crowd_fraction).astype(np.int64)

    # Detections: jittered copies of each image's gt boxes first, random boxes for the rest.
    det_img, det_boxes, det_cats, det_scores = [], [], [], []
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in range(num_images):
        gts = np.arange(starts[i], starts[i + 1])
        copies = np.repeat(gts, 3)[:dets_per_image]
        n_near = copies.size
        jitter = rng.normal(0.0, 0.12, (n_near, 4)) * np.repeat(gt_boxes[copies, 2:], 2, axis=1)
        near = gt_boxes[copies] + jitter
        near[:, 2:] = np.maximum(near[:, 2:], 1.0)
        near_cats = np.where(rng.random(n_near) < 0.8, gt_cats[copies], rng.choice(cats, size=n_near))
        near_scores = rng.beta(4, 2, n_near)
        n_far = dets_per_image - n_near
        fh, fw = float(sizes[i, 0]), float(sizes[i, 1])
        fs = np.exp(rng.uniform(np.log(6.0), np.log(400.0), n_far))
        fwd, fhd = np.minimum(fs, fw - 1), np.minimum(fs * rng.uniform(0.5, 2.0, n_far), fh - 1)
        far = np.stack([rng.uniform(0, 1, n_far) * (fw - fwd), rng.uniform(0, 1, n_far) * (fh - fhd), fwd, fhd], axis=1)
        det_img.append(np.full(dets_per_image, i))
        det_boxes.append(np.concatenate([near, far]))
        det_cats.append(np.concatenate([near_cats, rng.choice(cats, size=n_far)]))
        det_scores.append(np.concatenate([near_scores, rng.beta(1, 4, n_far)]))
    return SyntheticEvalSet(
        image_sizes=sizes, gt_image_index=gt_img, gt_boxes=gt_boxes, gt_categories=gt_cats,
        gt_areas=gt_areas, gt_iscrowd=gt_crowd,
        det_image_index=np.concatenate(det_img), det_boxes=np.round(np.concatenate(det_boxes), 2),
        det_categories=np.concatenate(det_cats), det_scores=np.round(np.concatenate(det_scores), 4),
    )


def _evaluate_once(backend: str, data: SyntheticEvalSet) -> tuple[np.ndarray, dict[str, float]]:
    """Run one backend end to end; returns (12 stats, seconds per phase)."""
    gt_dataset, detections = data.gt_dataset(), data.detections()  # fresh records, not timed
    sink = io.StringIO()
    times = {}
    with contextlib.redirect_stdout(sink):
        start = time.perf_counter()
        coco_cls, make_eval = coco_backend(backend)  # the backends of detectors.evaluation
        gt = as_backend_coco(gt_dataset, coco_cls)
        dt = gt.loadRes(detections)
        evaluator = make_eval(gt, dt)
        times["load_s"] = time.perf_counter() - start
        t = time.perf_counter()
        evaluator.evaluate()
        times["evaluate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluator.accumulate()
        evaluator.summarize()
        times["accumulate_summarize_s"] = time.perf_counter() - t
        times["total_s"] = time.perf_counter() - start
    return np.asarray(evaluator.stats[:12], dtype=np.float64), times


@dataclass(frozen=True)
class CocoEvalResult:
    backend: str
    num_images: int
    num_gt: int
    num_detections: int
    repeats: int
    total_s: float  # median over repeats: index + loadRes + evaluate + accumulate + summarize
    load_s: float
    evaluate_s: float
    accumulate_summarize_s: float
    speedup: float  # pycocotools total / this total
    stats: tuple[float, ...]  # the 12 COCO numbers
    max_abs_diff_vs_pycocotools: float
    identical_to_pycocotools: bool  # all 12 bit for bit
    # All 12 within 1e-12: the same evaluation, differing at most by float summation order.
    agrees_with_pycocotools: bool


def run_cocoeval_bench(
    num_images: int = 5000,
    *,
    repeats: int = 1,
    seed: int = 0,
    backends: Optional[Sequence[str]] = None,
    progress: Progress = _quiet,
) -> list[CocoEvalResult]:
    """Time COCO box evaluation per backend on `synthetic_eval_set(num_images)`; interleaved
    repeats, medians. Backends (detectors.evaluation.BACKENDS) default to pycocotools plus "faster" (faster-coco-eval) when installed."""
    if backends is None:
        backends = ["pycocotools"] + (["faster"] if backend_available("faster") else [])
    if "pycocotools" not in backends:
        raise ValueError("the COCOeval benchmark needs pycocotools as the reference backend")
    start = time.perf_counter()
    data = synthetic_eval_set(num_images, seed=seed)
    progress(f"[cocoeval] {num_images} images, {data.gt_boxes.shape[0]} gt boxes, "
             f"{data.det_boxes.shape[0]} detections generated in {time.perf_counter() - start:.1f} s")
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    stats: dict[str, np.ndarray] = {}
    for r in range(repeats):
        order = list(backends[r % len(backends):]) + list(backends[: r % len(backends)])
        for backend in order:
            progress(f"[cocoeval] repeat {r + 1}/{repeats}: {backend} ...")
            values, times = _evaluate_once(backend, data)
            runs[backend].append(times)
            if backend in stats and not np.array_equal(stats[backend], values, equal_nan=True):
                raise RuntimeError(f"{backend} gave different numbers on a repeat")
            stats[backend] = values
            progress(f"[cocoeval] repeat {r + 1}/{repeats}: {backend} {times['total_s']:.1f} s")
    reference = stats["pycocotools"]
    ref_total = statistics.median(t["total_s"] for t in runs["pycocotools"])
    results = []
    for backend in backends:
        medians = {k: statistics.median(t[k] for t in runs[backend]) for k in runs[backend][0]}
        diff = float(np.nanmax(np.abs(stats[backend] - reference))) if np.isfinite(reference).any() else 0.0
        results.append(CocoEvalResult(
            backend=backend, num_images=data.num_images, num_gt=int(data.gt_boxes.shape[0]),
            num_detections=int(data.det_boxes.shape[0]), repeats=repeats,
            total_s=medians["total_s"], load_s=medians["load_s"], evaluate_s=medians["evaluate_s"],
            accumulate_summarize_s=medians["accumulate_summarize_s"], speedup=ref_total / medians["total_s"],
            stats=tuple(float(v) for v in stats[backend]), max_abs_diff_vs_pycocotools=diff,
            identical_to_pycocotools=bool(np.array_equal(stats[backend], reference, equal_nan=True)),
            agrees_with_pycocotools=bool(np.allclose(stats[backend], reference, rtol=0.0, atol=1e-12, equal_nan=True)),
        ))
    return results


# =============================================================================================
# The harness's own cost: a study run end to end, its wall time taken apart.
# =============================================================================================
@dataclass(frozen=True)
class TrialTiming:
    """One trial as the study's MLflow records show it. Times are seconds; *_at are Unix times."""

    label: str
    state: str
    opened_at: float  # the driver created the trial's run (just before launching it on Ray)
    closed_at: float  # the driver terminated the run (after logging its results)
    wall_s: float  # trial_wall_seconds: launch on Ray -> result back in the driver
    fit_s: float  # total_train_seconds: the sum of fit's epoch times (training + evaluation)
    eval_s: float  # total_eval_seconds


@dataclass(frozen=True)
class HarnessCost:
    """Where a study's wall time goes, in slot-seconds (slots x wall time), and the ideal.

    The slot-seconds split into: training and evaluation (inside fit's epochs); trial overhead
    (launch -> result minus the epochs: Ray scheduling, the worker process and its imports on
    first use, data and model set-up, checkpoints, metric posts, returning the result);
    tracking at trial boundaries (the driver's MLflow work around each trial while its slot
    waits); study set-up (process start, imports, MLflow and Optuna stores, Ray start) and
    teardown (summary, Ray shutdown), which hold every slot; and idle slots (gaps between
    trials, and the tail when fewer trials than slots remain). The ideal is the study's
    training + evaluation time divided by the slots: no harness at all.
    """

    study: str
    num_trials: int
    slots: int
    wall_s: float
    setup_s: float
    teardown_s: float
    train_s: float
    eval_s: float
    trial_overhead_s: float
    trial_overhead_median_s: float
    trial_overhead_max_s: float
    tracking_s: float
    idle_slot_s: float
    ideal_s: float
    wall_over_ideal: float  # target: at most 1.15
    trials: tuple[TrialTiming, ...] = ()

    def breakdown(self) -> list[tuple[str, float]]:
        """(part, slot-seconds); the parts add up to slots x wall_s."""
        return [
            ("training", self.train_s),
            ("evaluation", self.eval_s),
            ("trial overhead (Ray task, worker start, set-up, checkpoints, result)", self.trial_overhead_s),
            ("tracking at trial boundaries (driver, MLflow)", self.tracking_s),
            ("study set-up (imports, MLflow/Optuna stores, Ray start) x slots", self.setup_s * self.slots),
            ("study teardown (summary, Ray shutdown) x slots", self.teardown_s * self.slots),
            ("idle slots (gaps, tail)", self.idle_slot_s),
        ]


def harness_cost(
    study: str,
    trials: Sequence[TrialTiming],
    *,
    slots: int,
    process_start: float,
    process_end: float,
    study_start: float,
    study_end: float,
) -> HarnessCost:
    """Take a study's wall time apart (see HarnessCost). Times are Unix seconds: the process
    (the `libra run` command) and the study's parent run in MLflow."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    wall = process_end - process_start
    overheads = [max(0.0, t.wall_s - t.fit_s) for t in trials]
    train = sum(t.fit_s - t.eval_s for t in trials)
    evaluation = sum(t.eval_s for t in trials)
    tracking = sum(max(0.0, (t.closed_at - t.opened_at) - t.wall_s) for t in trials)
    setup, teardown = study_start - process_start, process_end - study_end
    busy = train + evaluation + sum(overheads) + tracking + slots * (setup + teardown)
    ideal = (train + evaluation) / slots
    return HarnessCost(
        study=study, num_trials=len(trials), slots=slots, wall_s=wall, setup_s=setup, teardown_s=teardown,
        train_s=train, eval_s=evaluation, trial_overhead_s=sum(overheads),
        trial_overhead_median_s=statistics.median(overheads) if overheads else 0.0,
        trial_overhead_max_s=max(overheads, default=0.0),
        tracking_s=tracking, idle_slot_s=slots * wall - busy, ideal_s=ideal,
        wall_over_ideal=wall / ideal if ideal > 0 else math.inf, trials=tuple(trials),
    )


def run_harness_bench(
    study_path: str,
    *,
    overrides: Sequence[str] = (),
    keep_work_dir: bool = False,
    progress: Progress = _quiet,
) -> HarnessCost:
    """Run `libra run STUDY` in a fresh work dir (local Ray, SQLite MLflow, Optuna journal)
    and take its wall time apart with `harness_cost`.

    The synthetic data set is generated before the clock starts (a first-ever run would pay
    for it once; it is not the harness's cost). RAY_ADDRESS is removed from the child's
    environment, so the study starts its own local cluster, as the quick-start does.
    """
    import re
    import shutil
    import tempfile

    from harness.spec import load_study
    from harness.stores import default_uri, study_stores
    from harness.tracking import ROLE

    study = load_study(study_path, overrides)
    seen = set()
    for plan in study.trials() if study.kind == "grid" else []:
        data = plan.config.data
        if data.kind == "synthetic" and (data.root, data.synthetic) not in seen:
            from detectors.data.synthetic import ensure_synthetic

            seen.add((data.root, data.synthetic))
            progress(f"[harness] synthetic data ready: {ensure_synthetic(data.root, data.synthetic)['train_images']}")
    work_dir = tempfile.mkdtemp(prefix="libra-harness-bench-")
    uri = default_uri(work_dir)
    command = [sys.executable, "-m", "harness.cli", "run", os.path.abspath(study_path), "--work-dir", work_dir,
               "--tracking-uri", uri]
    for text in overrides:
        command += ["--set", text]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    progress(f"[harness] {' '.join(command[1:])}")
    slots = None
    tail: list[str] = []
    try:
        process_start = time.time()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-5:]
            found = re.search(r"up to (\d+) at once", line)
            if found and slots is None:
                slots = int(found.group(1))
            if line:
                progress(f"[harness] {line}")
        rc = proc.wait()
        process_end = time.time()
        if rc != 0:
            raise RuntimeError(f"the study run failed (exit {rc}): {tail[-1] if tail else ''}")
        if slots is None:
            raise RuntimeError("the study run did not say how many trials it ran at once ('up to N at once')")
        runs = _study_runs(uri, study_stores(study).experiment, ROLE)
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    parent, trials = runs
    return harness_cost(study.name, trials, slots=slots, process_start=process_start, process_end=process_end,
                        study_start=parent[0], study_end=parent[1])


def _study_runs(uri: str, experiment: str, role_tag: str) -> tuple[tuple[float, float], list[TrialTiming]]:
    """((parent run start, end), trials) from the study's MLflow experiment."""
    import pandas as pd

    from harness.tracking import read_runs

    frame = pd.DataFrame(read_runs(uri, experiment))
    parents = frame[frame[f"tags.{role_tag}"] == "study"]
    if len(parents) != 1:
        raise RuntimeError(f"expected one study run in {uri}, found {len(parents)}")
    parent = parents.iloc[0]
    trials = []
    for _, row in frame[frame[f"tags.{role_tag}"] == "trial"].iterrows():
        trials.append(TrialTiming(
            label=str(row.get("tags.libra.label")), state=str(row.get("tags.libra.trial_state")),
            opened_at=row["start_time"].timestamp(), closed_at=row["end_time"].timestamp(),
            wall_s=float(row.get("metrics.trial_wall_seconds", math.nan)),
            fit_s=float(row.get("metrics.total_train_seconds", math.nan)),
            eval_s=float(row.get("metrics.total_eval_seconds", math.nan)),
        ))
    trials.sort(key=lambda t: t.opened_at)
    return (parent["start_time"].timestamp(), parent["end_time"].timestamp()), trials


# =============================================================================================
# The machine and the versions (for the report header).
# =============================================================================================
def machine_info(device: Optional[str] = None) -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any), load average, and the versions that matter."""
    from importlib import metadata

    info: dict[str, str] = {}
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cpu_cores"] = str(os.cpu_count())
    info["torch_threads"] = str(torch.get_num_threads())
    try:
        import psutil

        info["ram_gb"] = f"{psutil.virtual_memory().total / 2**30:.1f}"
    except ImportError:
        info["ram_gb"] = "unknown"
    if torch.cuda.is_available():
        index = torch.device(device).index if device and device.startswith("cuda") else None
        info["gpu"] = torch.cuda.get_device_name(index or 0)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["gpu"] = "none"
    info["load_average_1_5_15"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["python"] = sys.version.split()[0]
    for package in ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


# =============================================================================================
# A bench study's trial (the worker side of `libra run` on a study with a `bench:` block).
# =============================================================================================
def run_bench_trial(payload: dict) -> dict:
    """Measure a bench study's parts in this process (a Ray task holding the trial's resources).

    payload: config (TrainConfig.to_dict()), bench (BenchSpec.model_dump()), seed, num_threads.
    Returns {"metrics": {name: value}, "markdown": the results as markdown tables,
    "device": where it ran}; plain Python, so it pickles back to the driver.
    """
    from detectors.config import TrainConfig

    torch.set_num_threads(int(payload["num_threads"]))
    cfg = TrainConfig.from_dict(payload["config"])
    opts = payload["bench"]
    from detectors.engine import resolve_device

    device = str(resolve_device(cfg.schedule.device))  # "auto" as training resolves it
    if opts.get("image_size"):
        h, w = opts["image_size"]
    elif cfg.data.kind == "synthetic":
        h = w = cfg.data.synthetic.image_size
    else:
        h, w = cfg.detector.min_size, cfg.detector.max_size
    batch = opts.get("batch") or cfg.schedule.batch_size
    settings = ModelBenchSettings(image_height=h, image_width=w, batch_size=batch, iters=opts["iters"],
                                  warmup=opts["warmup"], device=device, amp=bool(opts["amp"]),
                                  seed=int(payload["seed"]), memory=opts["memory"])
    det = cfg.detector
    metrics: dict[str, float] = {}
    md = [f"Device {device}{' with AMP' if settings.amp else ''}; backbone {det.backbone}, images "
          f"{h}x{w}, batch {batch}; {settings.warmup} warm-up + {settings.iters} timed rounds.", ""]
    step = None
    if "model" in opts["what"]:
        model = run_model_bench(det, settings)
        metrics.update(bench_metrics(model.rows))
        md += ["## Component costs against the baseline", "", md_table(model_table(model.rows)), ""]
        step = next(r.train_step_s for r in model.rows if r.variant == SAMPLER_VARIANT)
    if "sampler" in opts["what"]:
        sampler = run_sampler_bench(
            device=device, reps=int(opts["sampler_reps"]), num_proposals=det.rpn_post_nms_top_n_train,
            rois_per_image=det.roi_batch_size_per_image, positive_fraction=det.roi_positive_fraction,
            num_bins=det.iou_balanced_sampling.num_bins, image_height=h, image_width=w,
            seed=int(payload["seed"]), batch_size=batch if step else None, train_step_s=step)
        row = {}
        for figure in ("vectorised_us", "loop_us", "random_us", "speedup_vs_loop",
                       "share_of_step_pct", "extra_over_random_pct"):
            value = getattr(sampler, figure)
            if value is not None:
                metrics[f"bench.sampler.{figure}"] = float(value)
                row[figure] = f"{value:.3f}"
        md += ["## IoU-balanced sampler (one image)", "", md_table([row]), ""]
    return {"metrics": metrics, "markdown": "\n".join(md), "device": device}
