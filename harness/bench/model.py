"""Model cost: the baseline, each component alone and all on, timed side by side on one batch.

Every variant is built from one `DetectorConfig` with the same seed, plus an identical copy of
the baseline as an A/A control (its ratios are the run's noise floor). The variants take turns,
one training step (detectors.engine.train_step, the one `fit` takes) and one inference batch
per round, the order rotated every round, so drift hits every variant alike; ratios are medians
of per-round paired ratios. Peak memory, CUDA: resident tensors + batch + the training step's
allocator peak above them, as a run of the variant alone would see it. CPU: a process's peak
RSS never goes down, so each variant gets a fresh process (`cpu_memory_probe`) whose peak is
reset after the imports (/proc/self/clear_refs); its RSS before the model is the idle figure.
"""
from __future__ import annotations

import gc
import math
import multiprocessing
import re
import resource
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.benchmark.utils.timer import timer  # perf_counter, after a CUDA sync on GPUs

from detectors.components import components, count_word
from detectors.config import DetectorConfig

Progress = Callable[[str], None]
BASELINE = "baseline"
SAMPLER_VARIANT = "+iou_balanced_sampling"  # the variant whose training step the sampler is a share of
CONTROL = "baseline again (A/A control)"  # a second, identical baseline: its ratios show the noise
# SGD as the engine runs it; a small lr keeps the weights (and so the work per step) steady.
SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
GRAD_CLIP = 35.0


def quiet(_: str) -> None:
    pass


def all_on() -> str:
    """The variant with every component on: "libra (all three)"."""
    return f"libra (all {count_word()})"


def variants() -> dict[str, tuple[bool, ...]]:
    """Variant name -> which components are on, in detectors.components order: the baseline
    (all off), "+<name>" for each component alone, and all of them on."""
    names = [c.name for c in components()]
    return {BASELINE: (False,) * len(names), **{f"+{n}": tuple(m == n for m in names) for n in names},
            all_on(): (True,) * len(names)}


def component_variants(base: DetectorConfig) -> dict[str, DetectorConfig]:
    """The configurations of `variants()`: `base` with only the components' switches changed
    (num_bins, refine_type, alpha, ... all come from `base`)."""
    out = {}
    for name, switches in variants().items():
        cfg = base
        for comp, on in zip(components(), switches):
            cfg = comp.turned(cfg, on)
        out[name] = cfg
    return out


def synthetic_batch(*, batch_size: int, image_height: int, image_width: int, num_classes: int,
                    boxes_per_image: int = 7, seed: int = 0, device: torch.device | str = "cpu",
                    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random images and random valid boxes, the same for every variant.

    Returns `batch_size` images [3, H, W] float in [0, 1] and targets {"boxes" [K, 4] xyxy in
    pixels, "labels" [K] int64 in [1, num_classes]}, K = boxes_per_image (COCO val averages
    7.3). Box sides are log-uniform from 4% to 60% of the shorter image side, aspect ratios
    1:2 to 2:1, so small, medium and large objects all occur.
    """
    gen = torch.Generator().manual_seed(seed)
    k, short = boxes_per_image, min(image_height, image_width)
    log_lo, log_hi = math.log(max(2.0, 0.04 * short)), math.log(0.6 * short)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, image_height, image_width, generator=gen).to(device))
        side = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(k, generator=gen))
        aspect = torch.exp((torch.rand(k, generator=gen) - 0.5) * 2 * math.log(2.0))  # w / h
        w = (side * aspect.sqrt()).clamp(max=image_width - 1)
        h = (side / aspect.sqrt()).clamp(max=image_height - 1)
        x0, y0 = torch.rand(k, generator=gen) * (image_width - w), torch.rand(k, generator=gen) * (image_height - h)
        labels = torch.randint(1, num_classes + 1, (k,), generator=gen, dtype=torch.int64)
        targets.append({"boxes": torch.stack([x0, y0, x0 + w, y0 + h], 1).to(device), "labels": labels.to(device)})
    return images, targets


@dataclass(frozen=True)
class ModelBenchSettings:
    """How the variants are run and timed. Images are image_height x image_width pixels."""

    image_height: int = 800
    image_width: int = 1333
    batch_size: int = 2  # images per training step and per inference batch
    iters: int = 20  # timed rounds: every variant takes one training step and one inference batch
    warmup: int = 5  # untimed rounds first (allocator, cuDNN, caches settle)
    device: str = "cpu"  # cpu | cuda | cuda:N (already resolved)
    amp: bool = False  # float16 autocast + GradScaler; CUDA only
    seed: int = 0
    boxes_per_image: int = 7
    memory: str = "auto"  # auto: CUDA allocator on a GPU, a fresh process per variant on the CPU | off
    memory_steps: int = 3  # CPU memory probe: steps (after one warm-up) in the fresh process
    control: bool = True  # also time an identical copy of the baseline (the noise floor)


# One variant's figures (a VariantResult: the variant, one bool per component in
# detectors.components order, then FIGURES). Times in seconds, medians over the timed rounds with
# their IQR (_q25, _q75); infer_images_per_s is batch_size / the median inference batch time.
# Ratios are to the baseline (baseline = 1.0): train_time_ratio is the median over rounds of (this
# step / the baseline's in that round), with its IQR; infer_throughput_ratio the median of the
# baseline's / this inference time. peak_memory_mb: see the module docstring; idle_memory_mb (CPU
# only) the probe process's RSS before the model is built; memory_above_idle_ratio (CPU) (peak -
# idle) / the baseline's, without torch's ~0.7 GB; all three and memory_ratio None when not
# measured, memory_method how it was, in words. final_loss: the last timed step's total loss,
# finite, or the timings are suspect.
FIGURES = ("num_params train_step_s train_step_s_q25 train_step_s_q75 infer_batch_s infer_batch_s_q25 "
           "infer_batch_s_q75 infer_images_per_s peak_memory_mb idle_memory_mb memory_method train_time_ratio "
           "train_time_ratio_q25 train_time_ratio_q75 infer_throughput_ratio memory_ratio memory_above_idle_ratio "
           "final_loss").split()
# rows: a VariantResult per variant; rounds: per timed (round, variant) its position, train_s, infer_s.
ModelBenchResult = namedtuple("ModelBenchResult", "rows rounds")


def variant_result() -> type:
    """The VariantResult namedtuple for the components declared now (row.iou_balanced_sampling, ...)."""
    return namedtuple("VariantResult", ["variant", *(c.name for c in components()), *FIGURES])


class Runner:
    """One variant's model, optimizer and scaler; times one training step or inference batch."""

    def __init__(self, cfg: DetectorConfig, settings: ModelBenchSettings, device: torch.device):
        from detectors.build import build_detector

        torch.manual_seed(settings.seed)  # same initial weights for the parts variants share
        self.model = build_detector(cfg).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, **SGD)
        self.use_amp, self.device_type = settings.amp and device.type == "cuda", device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)
        self.last_loss: Optional[Tensor] = None

    def train_step(self, images: list[Tensor], targets: list[dict]) -> float:
        """One detectors.engine.train_step; seconds."""
        from detectors.engine import train_step

        self.model.train()
        start = timer()
        self.last_loss, _ = train_step(self.model, self.optimizer, self.scaler, images, targets,
                                       params=self.params, grad_clip=GRAD_CLIP, use_amp=self.use_amp)
        return timer() - start

    @torch.no_grad()
    def infer(self, images: list[Tensor]) -> float:
        """One inference batch (eval mode, no gradients); seconds."""
        self.model.eval()
        start = timer()
        with torch.autocast(device_type=self.device_type, dtype=torch.float16, enabled=self.use_amp):
            self.model(images)
        return timer() - start

    def resident_bytes(self) -> int:
        """Bytes of parameters, buffers and optimizer state (distinct storages)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def run_model_bench(base: DetectorConfig, settings: ModelBenchSettings, *, progress: Progress = quiet,
                    ) -> ModelBenchResult:
    """Time the `variants()` of `base` side by side (plus the A/A control with settings.control),
    as the module docstring says: in round r the variants in a fixed order rotated by r. The
    batch is already on the device, so data loading is in neither time."""
    import pandas as pd

    device = torch.device(settings.device)
    if settings.iters < 1 or settings.warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {settings.iters} and {settings.warmup}")
    configs = component_variants(base)
    if settings.control:
        configs[CONTROL] = configs[BASELINE]
    names = list(configs)
    images, targets = synthetic_batch(
        batch_size=settings.batch_size, image_height=settings.image_height, image_width=settings.image_width,
        num_classes=base.num_classes, boxes_per_image=settings.boxes_per_image, seed=settings.seed, device=device)
    cuda_memory = settings.memory == "auto" and device.type == "cuda"
    runners = {}
    for name in names:
        progress(f"[model] building {name}")
        runners[name] = Runner(configs[name], settings, device)
    rounds, step_peak_above = [], dict.fromkeys(names, 0)
    for r in range(settings.warmup + settings.iters):
        gc.collect()  # outside the timed regions, so a collection does not land in one variant's step
        for position, name in enumerate(names[r % len(names):] + names[: r % len(names)]):
            if cuda_memory:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t_train = runners[name].train_step(images, targets)
            if cuda_memory:  # the step's own peak, above what was resident when it began
                step_peak_above[name] = max(step_peak_above[name], torch.cuda.max_memory_allocated(device) - before)
            t_infer = runners[name].infer(images)
            if r >= settings.warmup:
                rounds.append({"round": r - settings.warmup + 1, "position": position, "variant": name,
                               "train_s": t_train, "infer_s": t_infer})
        if r < settings.warmup:
            progress(f"[model] warm-up round {r + 1}/{settings.warmup}")
        else:
            progress(f"[model] round {r + 1 - settings.warmup}/{settings.iters}, train s/step: "
                     + ", ".join(f"{x['variant']} {x['train_s']:.3f}" for x in rounds[-len(names):]))

    memory = dict.fromkeys(names, (None, None, "not measured"))  # name -> (peak MB, idle MB, how measured)
    if cuda_memory:  # what a run of the variant alone would see: resident + batch + step peak
        batch_bytes = sum(t.numel() * t.element_size() for t in images + [v for t in targets for v in t.values()])
        for name in names:
            memory[name] = ((runners[name].resident_bytes() + batch_bytes + step_peak_above[name]) / 2**20, None,
                            "CUDA allocator: resident tensors + batch + training step's peak above them")
    final_loss = {n: float(runners[n].last_loss) for n in names}
    num_params = {n: sum(p.numel() for p in runners[n].model.parameters()) for n in names}
    del runners, images, targets
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if settings.memory == "auto" and device.type == "cpu":
        for name in names[:-1] if settings.control else names:  # the control would repeat the baseline
            progress(f"[model] memory: fresh process for {name}")
            probe = cpu_memory_probe(configs[name], settings)
            memory[name] = (probe["peak_rss_mb"], probe["idle_rss_mb"], "peak RSS of a fresh process"
                            + (", reset after imports" if probe["peak_reset_after_imports"] else ", imports included"))

    frame = pd.DataFrame(rounds)
    train, infer = (frame.pivot(index="round", columns="variant", values=v) for v in ("train_s", "infer_s"))
    figures = {}
    for key, values in (("train_step_s", train), ("infer_batch_s", infer),
                        ("train_time_ratio", train.div(train[BASELINE], axis=0))):
        q = values.quantile([0.25, 0.5, 0.75])  # linear interpolation, as numpy's percentile
        figures.update({f"{key}_q25": q.loc[0.25], key: q.loc[0.5], f"{key}_q75": q.loc[0.75]})
    figures["infer_throughput_ratio"] = (1.0 / infer.div(infer[BASELINE], axis=0)).median()
    row_type, switches, rows = variant_result(), variants(), []
    base_peak, base_idle, _ = memory[BASELINE]
    for name in names:
        peak, idle, method = memory[name]
        fig = {k: float(v[name]) for k, v in figures.items()}
        rows.append(row_type(
            name, *switches.get(name, switches[BASELINE]), num_params=num_params[name], **fig,
            infer_images_per_s=settings.batch_size / fig["infer_batch_s"], peak_memory_mb=peak, idle_memory_mb=idle,
            memory_method=method, memory_ratio=peak / base_peak if peak is not None and base_peak else None,
            memory_above_idle_ratio=(peak - idle) / (base_peak - base_idle)
            if idle is not None and base_peak - base_idle > 0 else None, final_loss=final_loss[name]))
    return ModelBenchResult(rows, rounds)


def bench_metrics(results: Sequence[tuple]) -> dict[str, float]:
    """Flat `{metric name: value}` for MLflow: bench.<variant>.<figure>."""
    metrics = {}
    for row in results:
        key = re.sub(r"[^a-z0-9]+", "_", row.variant.lower()).strip("_")
        for figure in ("train_step_s", "infer_images_per_s", "peak_memory_mb", "train_time_ratio",
                       "infer_throughput_ratio", "memory_ratio"):
            if getattr(row, figure) is not None:
                metrics[f"bench.{key}.{figure}"] = float(getattr(row, figure))
    return metrics


def cpu_memory_probe(cfg: DetectorConfig, settings: ModelBenchSettings) -> dict[str, float]:
    """{"peak_rss_mb", "idle_rss_mb", "peak_reset_after_imports"} of a fresh (spawned) process
    running `cfg` on the benchmark batch with this process's torch thread count."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_probe, cfg, settings, torch.get_num_threads()).result()


def _probe(cfg: DetectorConfig, settings: ModelBenchSettings, num_threads: int) -> dict[str, float]:
    import psutil

    import detectors.build  # noqa: F401  (its imports belong to the idle figure, not to the model)

    torch.set_num_threads(num_threads)
    gc.collect()
    try:  # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    idle = psutil.Process().memory_info().rss / 2**20  # imports done: Python, torch, torchvision
    images, targets = synthetic_batch(
        batch_size=settings.batch_size, image_height=settings.image_height, image_width=settings.image_width,
        num_classes=cfg.num_classes, boxes_per_image=settings.boxes_per_image, seed=settings.seed)
    runner = Runner(cfg, settings, torch.device("cpu"))
    for _ in range(1 + settings.memory_steps):
        runner.train_step(images, targets)
        runner.infer(images)
    try:
        with open("/proc/self/status") as f:
            peak = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)  # kB
    except OSError:
        peak = None
    return {"peak_rss_mb": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "idle_rss_mb": idle, "peak_reset_after_imports": reset}
