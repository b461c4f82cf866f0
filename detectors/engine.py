"""Training and evaluation of one detector on one dataset: `fit`, `train_one_epoch`, `evaluate`.

Plain PyTorch. DDP-aware (when the caller has initialised torch.distributed, e.g. Ray Train's
TorchTrainer, the model is wrapped in DDP, the data sharded, and evaluation gathered on rank 0),
but knows nothing of Ray, Optuna or MLflow: the harness listens through `callbacks`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from detectors.build import build_detector
from detectors.config import ConfigError, ScheduleConfig, TrainConfig, check_device
from detectors.errors import CheckpointError
from detectors.data.loader import build_datasets, collate_detection
from detectors.evaluation import coco_box_eval, predictions_to_coco

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"

Callback = Callable[[dict], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


# ------------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def current() -> "DistContext":
        if dist.is_available() and dist.is_initialized():
            return DistContext(dist.get_rank(), dist.get_world_size())
        return DistContext()


def resolve_device(spec: str, where: str = "schedule.device") -> torch.device:
    """'auto' -> this process's CUDA device when there is one (LOCAL_RANK under DDP), else CPU.

    `where` names the setting in errors (`libra eval` passes "--device").
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    check_device(where, spec)
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where} is {spec!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{where} is {spec!r} but only {torch.cuda.device_count()} CUDA device(s) "
                          f"are visible (cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    return device


def set_determinism(enabled: bool) -> None:
    """schedule.deterministic: deterministic kernels where torch has them, a warning (not an
    error: a study must not die on the first such op) where it has none, cuDNN's fixed
    algorithms. CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, hence setdefault."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(iteration: int, iters_per_epoch: int, schedule: ScheduleConfig) -> float:
    """Multiplier on the base lr at a global iteration: linear warm-up times step decay.

    Warm-up rises linearly from warmup_ratio to 1 over warmup_iters; the step decay multiplies
    by lr_gamma once for every lr_steps epoch already completed.
    """
    epoch = iteration // max(iters_per_epoch, 1)
    decay = schedule.lr_gamma ** sum(1 for step in schedule.lr_steps if epoch >= step)
    if iteration < schedule.warmup_iters:
        progress = iteration / schedule.warmup_iters
        return decay * (schedule.warmup_ratio + (1.0 - schedule.warmup_ratio) * progress)
    return decay


def peak_memory_mb(device: torch.device) -> float:
    """CUDA allocator peak on a GPU; the process's peak resident set on the CPU (Linux ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _progress_enabled(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _iterate(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)


def stream_seed(seed: int, epoch: int, iteration: int) -> int:
    """The global RNG's seed for one iteration of training: a hash of (seed, epoch, iteration)
    through NumPy's SeedSequence, so neighbouring iterations get unrelated streams."""
    return int(np.random.SeedSequence((seed, epoch, iteration)).generate_state(1, np.uint64)[0])


def seeded_batches(loader: DataLoader, seed: int, epoch: int, num_iters: int) -> Iterator:
    """The loader's first `num_iters` batches, the global RNG re-seeded before each is drawn.

    What an iteration draws at random (the flips of its images, the RPN's and the R-CNN's
    samples) then depends on (seed, epoch, iteration) alone, not on what earlier iterations
    happened to draw. Two configurations of one ablation with one seed therefore see the same
    flipped images in the same order (common random numbers: the comparison between them loses
    the noise they would otherwise not share), and a resumed run draws what an uninterrupted one
    does. Iteration 0's seed is set before the iterator is made, which draws the loader workers'
    base seed.
    """
    torch.manual_seed(stream_seed(seed, epoch, 0))
    batches = iter(loader)
    for i in range(num_iters):
        torch.manual_seed(stream_seed(seed, epoch, i + 1))
        try:
            yield next(batches)
        except StopIteration:
            return


# ------------------------------------------------------------------------------------ training
def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    params: Optional[Sequence[Tensor]] = None,
    grad_clip: Optional[float] = None,
    use_amp: bool = False,
    guard: Optional[Callable[[Tensor, dict[str, Tensor]], Any]] = None,
) -> tuple[Any, dict[str, Tensor]]:
    """One optimisation step, the one `fit` and the benchmark both take.

    Forward (the model in train mode; float16 autocast when use_amp), loss = the sum of the model's
    `loss_*` terms, then `guard(loss, loss_dict)` (e.g. the non-finite check; it may raise before
    any weight changes), backward through the scaler, gradient-norm clipping of `params` (default
    the trainable ones) at `grad_clip`, the optimizer step, and the gradients freed (so between
    steps the model holds only its resident tensors).

    Args:
        images: N tensors [3, H_i, W_i] on the model's device; targets: N dicts with "boxes"
            [G_i, 4] xyxy and "labels" [G_i].

    Returns (what guard returned, default the detached total loss [] ; the loss terms).
    """
    with torch.autocast(device_type=images[0].device.type, dtype=torch.float16, enabled=use_amp):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    checked = guard(loss, loss_dict) if guard is not None else loss.detach()
    scaler.scale(loss).backward()
    if grad_clip is not None:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return checked, loss_dict


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    epoch: int,
    schedule: ScheduleConfig,
    ctx: DistContext = DistContext(),
    progress: bool = False,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of each loss term, lr and speed figures.

    The learning rate is stepped every iteration (warm-up is per iteration). Under DDP the loss
    is averaged over ranks for the log, which also makes every rank see the same non-finite
    loss and stop together instead of hanging in the next all-reduce.
    """
    model.train()
    use_amp = schedule.amp and device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    num_iters = len(loader) if schedule.max_iters_per_epoch is None else min(len(loader), schedule.max_iters_per_epoch)
    sums: dict[str, float] = {}
    num_images = 0
    num_done = 0
    iter_seconds = 0.0
    batches = seeded_batches(loader, schedule.seed, epoch, num_iters)
    for i, (images, targets) in enumerate(_iterate(batches, num_iters, f"epoch {epoch}", progress)):
        start = time.perf_counter()
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]

        def guard(loss: Tensor, loss_dict: dict[str, Tensor], iteration: int = i + 1) -> Tensor:
            logged = torch.stack([loss.detach().float()] + [v.detach().float() for v in loss_dict.values()])
            if ctx.distributed:
                dist.all_reduce(logged)
                logged /= ctx.world_size
            if not torch.isfinite(logged[0]):
                raise NonFiniteLossError(
                    f"training loss became {logged[0].item()} at epoch {epoch}, iteration {iteration} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate or keep grad_clip on"
                )
            return logged

        logged, loss_dict = train_step(model, optimizer, scaler, images, targets, params=params,
                                       grad_clip=schedule.grad_clip, use_amp=use_amp, guard=guard)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        iter_seconds += time.perf_counter() - start

        values = logged.tolist()
        for name, value in zip(["loss", *loss_dict.keys()], values):
            sums[name] = sums.get(name, 0.0) + value
        num_images += len(images)
        num_done += 1
    metrics = {name: total / max(num_done, 1) for name, total in sums.items()}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["sec_per_iter"] = iter_seconds / max(num_done, 1)
    metrics["train_images_per_sec"] = num_images * ctx.world_size / iter_seconds if iter_seconds else 0.0
    return metrics


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    indices: Sequence[int],
    batch_size: int = 2,
    amp: bool = False,
    progress: bool = False,
) -> tuple[list[dict], int, float]:
    """Run the model on `dataset[indices]`; returns COCO result records, images seen, seconds."""
    model.eval()
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, collate_fn=collate_detection)
    label_to_cat_id = _base_dataset(dataset).label_to_cat_id
    records: list[dict] = []
    seconds = 0.0
    num_images = 0
    use_amp = amp and device.type == "cuda"
    for images, targets in _iterate(loader, len(loader), "eval", progress):
        start = time.perf_counter()
        # A Fast R-CNN is handed each image's pre-computed proposals; other models make their own.
        given = {"proposals": [t["proposals"].to(device) for t in targets]} if "proposals" in targets[0] else {}
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model([img.to(device) for img in images], **given)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        num_images += len(images)
        for out, target in zip(outputs, targets):
            records.extend(
                predictions_to_coco(
                    int(target["image_id"]), out["boxes"].float().cpu(), out["scores"].float().cpu(),
                    out["labels"].cpu(), label_to_cat_id,
                )
            )
    return records, num_images, seconds


def _base_dataset(dataset: Dataset) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: Optional[torch.device] = None,
    batch_size: int = 2,
    amp: bool = False,
    backend: str = "pycocotools",
    progress: bool = False,
    ctx: Optional[DistContext] = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """COCO box evaluation of `model` on `dataset` (a CocoDetection).

    Under DDP every rank predicts its share of the images; rank 0 gathers the records and runs
    COCOeval; the result is broadcast so every rank returns the same dict:
    {"metrics": {bbox_mAP, ..., eval_seconds, eval_images_per_sec}, "per_class_AP": {...},
    "summary": COCOeval's printed summary}. With bootstrap = B > 0 the metrics also hold
    bbox_mAP_boot_sd (detectors.evaluation.coco_box_eval: AP's SD over B resamples of the images).
    """
    ctx = ctx or DistContext.current()
    device = device or next(model.parameters()).device
    start = time.perf_counter()
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    records, num_images, infer_seconds = predict(
        model, dataset, device=device, indices=indices, batch_size=batch_size, amp=amp, progress=progress
    )
    if ctx.distributed:
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, (records, num_images, infer_seconds))
        records = [r for part in gathered for r in part[0]]
        num_images = sum(part[1] for part in gathered)
        infer_seconds = max(part[2] for part in gathered)  # ranks run in parallel
    result: list = [None]
    if ctx.is_main:
        base = _base_dataset(dataset)
        evaluation = coco_box_eval(base.coco, records, image_ids=base.image_ids, backend=backend,
                                   bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)
        metrics = dict(evaluation.metrics)
        if "bbox_mAP_boot_sd" in evaluation:
            metrics["bbox_mAP_boot_sd"] = evaluation["bbox_mAP_boot_sd"]
        metrics["eval_seconds"] = time.perf_counter() - start
        metrics["eval_images_per_sec"] = num_images / infer_seconds if infer_seconds else 0.0
        result[0] = {"metrics": metrics, "per_class_AP": evaluation.per_class_AP, "summary": evaluation.summary}
    if ctx.distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a run killed mid-write must still find the previous checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


_CHECKPOINT_FIX = "give a checkpoint.pt written by libra train"


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Checkpoints hold only tensors and plain containers, so they load with weights_only=True.

    Raises CheckpointError (one line naming `path`) for a file that is missing, a folder,
    truncated, corrupt, not a torch file, or holds objects beyond tensors and containers (a
    pickle that could run code: refused, never loaded another way).
    """
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; {_CHECKPOINT_FIX} (the file inside it)")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol, then fails
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message here advises weights_only=False: that would run the file's code.
        if "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and "
                                  f"plain containers, which can run code, so it was not loaded; "
                                  f"{_CHECKPOINT_FIX}") from None
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not written by "
                              f"torch.save, so it was not loaded; {_CHECKPOINT_FIX}") from None
    except OSError as err:  # missing, unreadable
        raise CheckpointError(f"checkpoint {path}: cannot read it ({err.strerror or err})") from None
    except Exception:  # noqa: BLE001 (RuntimeError, EOFError, ValueError ...: a broken file)
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not written by "
                              f"torch.save, so it was not loaded; {_CHECKPOINT_FIX}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the mapping "
                              f"libra train writes; {_CHECKPOINT_FIX}")
    return state


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model (eval mode) and the config it was trained with.

    Raises CheckpointError naming `path` for anything wrong with the file or its contents.
    """
    state = load_checkpoint(path, device)
    missing = [key for key in ("model", "config") if key not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        keys = ", ".join(sorted(map(str, state))[:5]) or "none"
        raise CheckpointError(f"checkpoint {path} is not one libra train writes (it needs 'model' "
                              f"and 'config' mappings; it has keys: {keys}); {_CHECKPOINT_FIX}")
    try:
        cfg = TrainConfig.from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: its config is not valid: {err}") from None
    # The trained weights replace any pretrained ones, which need not exist on this machine.
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, pretrained=None))
    model = build_detector(cfg.detector).to(device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[1:2] or [type(err).__name__]
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model its config "
                              f"describes ({first[0].strip()[:160]})") from None
    return model.eval(), cfg


# ------------------------------------------------------------------------------------ fit
def _check_classes(cfg: TrainConfig, num_dataset_classes: int) -> None:
    if cfg.detector.num_classes != num_dataset_classes:
        raise ConfigError(
            f"detector.num_classes is {cfg.detector.num_classes} but the dataset has "
            f"{num_dataset_classes} categories; set detector.num_classes: {num_dataset_classes}"
        )


def check_proposals_given(cfg: TrainConfig) -> None:
    """A Fast R-CNN trains on files: without data.proposals there is nothing to train on."""
    if cfg.detector.arch == "fast_rcnn" and cfg.data.proposals is None:
        raise ConfigError("detector.arch is fast_rcnn but data.proposals is not set; point it at a "
                          "folder written by `libra proposals CONFIG --checkpoint CKPT --out DIR`")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fit(
    cfg: TrainConfig,
    out_dir: str,
    *,
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
    progress: Optional[bool] = None,
    eval_backend: str = "pycocotools",
) -> dict[str, Any]:
    """Train `cfg` for its schedule, evaluating after epochs, checkpointing after every epoch.

    Args:
        cfg: the run; data paths must be absolute (see DataConfig.resolved).
        out_dir: where `checkpoint.pt` (latest) and `metrics.json` go (rank 0 writes).
        callbacks: called on every rank after each epoch (checkpoint already written) with flat
            metrics: epoch (1-based), loss and loss_* terms, lr, sec_per_iter,
            train_images_per_sec, peak_memory_mb, epoch_seconds, attempt_start_epoch and
            attempt_steps (this call's first epoch and steps so far), world_size, and on evaluated epochs the
            bbox_* metrics, eval_seconds, eval_images_per_sec (and bbox_mAP_boot_sd at the last
            epoch with schedule.eval_bootstrap > 0). An exception from a callback
            stops training and propagates (the harness prunes this way).
        resume: continue from out_dir's checkpoint when there is one.
        progress: a progress bar over iterations; None = only when stderr is a terminal.

    Returns:
        {"final": last epoch's metrics, "history": every epoch's, "per_class_AP": {name: AP},
         "eval_summary": str, "checkpoint": path, "attempt": {"attempt_start_epoch",
         "attempt_steps", "world_size"}}: what this call trained (also in every epoch's metrics,
         hence in the history, the checkpoint and metrics.json).

    Raises:
        NonFiniteLossError when the loss goes NaN/inf; ConfigError / DatasetError for bad input.
    """
    ctx = DistContext.current()
    schedule = cfg.schedule
    device = resolve_device(schedule.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    if schedule.num_threads is not None:
        torch.set_num_threads(schedule.num_threads)
    set_determinism(schedule.deterministic)
    show_progress = _progress_enabled(progress) and ctx.is_main
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)

    check_proposals_given(cfg)
    train_set, val_set = build_datasets(cfg.data)
    _check_classes(cfg, train_set.num_classes)

    seed_everything(schedule.seed)
    model = build_detector(cfg.detector).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = schedule.learning_rate(ctx.world_size)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=schedule.amp and device.type == "cuda")

    if ctx.distributed:
        sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, seed=schedule.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(schedule.seed))
    loader = DataLoader(
        train_set, batch_size=schedule.batch_size, sampler=sampler, collate_fn=collate_detection,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
    )
    iters_per_epoch = len(loader) if schedule.max_iters_per_epoch is None else min(len(loader), schedule.max_iters_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, schedule)
    )

    history: list[dict] = []
    last_eval: dict[str, Any] = {"per_class_AP": {}, "summary": ""}
    start_epoch = 1
    if resume and os.path.isfile(checkpoint_path):
        start_epoch, history, last_eval = _resume(checkpoint_path, device, model, optimizer,
                                                  scheduler, scaler)
    # What this attempt itself trains, so a caller can tell a resume from a restart by what ran
    # (not by what was printed): its first epoch and its optimizer steps (one scheduler step each).
    steps_before = scheduler.last_epoch

    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, schedule.epochs + 1):
        epoch_start = time.perf_counter()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            # Reseed per epoch so a resumed run draws the same batches as an uninterrupted one.
            sampler.generator.manual_seed(schedule.seed + epoch)
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update(
            train_one_epoch(
                model, loader, optimizer, scheduler, scaler, device=device, epoch=epoch,
                schedule=schedule, ctx=ctx, progress=show_progress,
            )
        )
        metrics["peak_memory_mb"] = peak_memory_mb(device)
        metrics.update(_attempt(start_epoch, scheduler.last_epoch - steps_before, ctx))
        if epoch % schedule.eval_every == 0 or epoch == schedule.epochs:
            last_eval = evaluate(
                _unwrap(model), val_set, device=device, batch_size=schedule.evaluation_batch_size, amp=schedule.amp,
                backend=eval_backend, progress=show_progress, ctx=ctx,
                # the evaluation noise of the run's final AP (its last evaluation only)
                bootstrap=schedule.eval_bootstrap if epoch == schedule.epochs else 0,
                bootstrap_seed=schedule.seed,
            )
            metrics.update(last_eval["metrics"])
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        history.append(metrics)

        if ctx.is_main:
            save_checkpoint(checkpoint_path, _checkpoint_state(
                _unwrap(model), optimizer, scheduler, scaler, epoch, cfg, history, last_eval))
            _write_metrics(out_dir, cfg, history, last_eval,
                           _attempt(start_epoch, scheduler.last_epoch - steps_before, ctx))
        for callback in callbacks:
            callback(dict(metrics))

    return {
        "final": history[-1] if history else {},
        "history": history,
        "per_class_AP": last_eval["per_class_AP"],
        "eval_summary": last_eval["summary"],
        "checkpoint": checkpoint_path,
        "attempt": _attempt(start_epoch, scheduler.last_epoch - steps_before, ctx),
    }


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      scaler: torch.amp.GradScaler, epoch: int, cfg: TrainConfig,
                      history: list[dict], last_eval: dict) -> dict:
    """Everything `_resume` needs to continue after `epoch` (1-based, finished) as if never
    stopped: weights, SGD momentum, the LR schedule's position, the AMP scale, torch's RNG."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "history": history,
        "last_eval": {"per_class_AP": last_eval["per_class_AP"], "summary": last_eval["summary"]},
        "rng_state": torch.get_rng_state(),
    }


def _resume(checkpoint_path: str, device: torch.device, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler) -> tuple[int, list[dict], dict]:
    """Load a `_checkpoint_state` into the (unwrapped) model, optimizer, schedule and scaler,
    and restore torch's RNG. Returns (the first epoch still to train, the history so far, the
    last evaluation's per-class AP and summary)."""
    state = load_checkpoint(checkpoint_path, device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_state"].cpu())
    return int(state["epoch"]) + 1, list(state["history"]), dict(state["last_eval"])


def _attempt(start_epoch: int, num_steps: int, ctx: DistContext) -> dict[str, int]:
    """What this call of `fit` trained: its first epoch (1 = from scratch, > 1 = resumed), its
    optimizer steps so far, and the number of processes that trained together (DDP world size)."""
    return {"attempt_start_epoch": start_epoch, "attempt_steps": num_steps, "world_size": ctx.world_size}


def _write_metrics(out_dir: str, cfg: TrainConfig, history: list[dict], last_eval: dict,
                   attempt: dict[str, int]) -> None:
    payload = {
        "config": cfg.to_dict(),
        "attempt": attempt,
        "final": history[-1] if history else {},
        "history": history,
        "per_class_AP": last_eval["per_class_AP"],
        "eval_summary": last_eval["summary"],
    }
    tmp = os.path.join(out_dir, METRICS_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, allow_nan=True)
    os.replace(tmp, os.path.join(out_dir, METRICS_NAME))
