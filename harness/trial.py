"""One trial on Ray: the worker function around `detectors.engine.fit`, and how it is launched.

Two launches, one training code path (`train`):
- one worker: a plain Ray task holding the trial's CPU/GPU share (about 0.1 s to start once
  its process is up);
- several workers: a Ray Train `TorchTrainer` (DDP; gloo on CPUs, NCCL on GPUs), started from
  a zero-CPU Ray task so the driver never blocks. `fit` is DDP-aware; `train` is the same.

Workers never write to MLflow or Optuna. After each epoch rank 0 posts the engine's metrics to
the `Mailbox` actor; when the study prunes, it also waits there for the driver's verdict and
every rank raises `StopTrial` together (the verdict is broadcast), ending the trial with its
checkpoint saved. A trial's `out_dir` is `<work dir>/trials/<trial_key>`, so a relaunch of the
same trial resumes from its last checkpoint.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, Optional

import ray

VERDICT_TIMEOUT_S = 600.0  # a worker stops waiting for a silent driver and trains on


class StopTrial(Exception):
    """The driver asked this trial to stop (its pruner said so)."""


@ray.remote(num_cpus=0, max_restarts=0)
class Mailbox:
    """The driver's post box: epoch metrics in, prune verdicts and DDP results out.

    An async actor: `post` can wait for a verdict while `drain` and `answer` keep being served.
    """

    def __init__(self) -> None:
        self._inbox: list[tuple[str, int, dict]] = []
        self._waiting: dict[tuple[str, int, int], asyncio.Future] = {}
        self._results: dict[tuple[str, int], Any] = {}
        self._placed: list[tuple[str, int, str, str]] = []

    async def post(self, key: str, attempt: int, metrics: dict, wait_s: float) -> bool:
        """Deliver one epoch's metrics; with wait_s > 0, return the driver's stop verdict."""
        future = None
        if wait_s > 0:
            future = asyncio.get_running_loop().create_future()
            self._waiting[(key, attempt, int(metrics["epoch"]))] = future
        self._inbox.append((key, attempt, metrics))
        if future is None:
            return False
        try:
            return bool(await asyncio.wait_for(future, wait_s))
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiting.pop((key, attempt, int(metrics["epoch"])), None)

    async def drain(self) -> list[tuple[str, int, dict]]:
        messages, self._inbox = self._inbox, []
        return messages

    async def place(self, key: str, attempt: int, node_id: str, host: str) -> None:
        """A trial's attempt says which Ray node runs it (rank 0's, for DDP)."""
        self._placed.append((key, attempt, node_id, host))

    async def drain_placed(self) -> list[tuple[str, int, str, str]]:
        placed, self._placed = self._placed, []
        return placed

    async def answer(self, key: str, attempt: int, epoch: int, stop: bool) -> None:
        future = self._waiting.get((key, attempt, epoch))
        if future is not None and not future.done():
            future.set_result(stop)

    async def put_result(self, key: str, attempt: int, result: Any) -> None:
        self._results[(key, attempt)] = result

    async def take_result(self, key: str, attempt: int) -> Any:
        return self._results.pop((key, attempt), None)


# ------------------------------------------------------------------------------------------
# Worker side.
# ------------------------------------------------------------------------------------------
def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Reporter:
    """The `fit` callback: post the epoch's metrics (rank 0) and stop when the driver says so."""

    def __init__(self, payload: Mapping[str, Any]):
        self.mailbox = payload["mailbox"]
        self.key = payload["trial_key"]
        self.attempt = payload["attempt"]
        self.wait_s = VERDICT_TIMEOUT_S if payload["prunable"] else 0.0
        self.last_epoch = 0

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        rank, world = _rank()
        self.last_epoch = int(metrics["epoch"])
        stop = False
        if rank == 0:
            plain = {k: _number(v) for k, v in metrics.items() if _number(v) is not None}
            stop = ray.get(self.mailbox.post.remote(self.key, self.attempt, plain, self.wait_s))
        if world > 1 and self.wait_s > 0:
            # Every rank must leave fit at the same epoch, or the others hang in a collective.
            import torch.distributed as dist

            verdict = [stop]
            dist.broadcast_object_list(verdict, src=0)
            stop = bool(verdict[0])
        if stop:
            raise StopTrial(f"pruned after epoch {self.last_epoch}")


def train(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Train one trial in this process (one DDP rank when torch.distributed is initialised).

    Returns {"status": "finished", "result": fit's result} or {"status": "pruned", "epoch": n};
    anything `fit` raises (NonFiniteLossError included) propagates: the driver retries.
    """
    import torch

    from detectors.config import TrainConfig
    from detectors.engine import fit

    # Parallel trials share the machine: each uses exactly its CPU share.
    torch.set_num_threads(int(payload["num_threads"]))
    if _rank()[0] == 0:
        _announce_node(payload)
    cfg = TrainConfig.from_dict(payload["config"])
    reporter = _Reporter(payload)
    try:
        result = fit(cfg, payload["out_dir"], callbacks=[reporter], resume=True, progress=False)
    except StopTrial:
        return {"status": "pruned", "epoch": reporter.last_epoch}
    return {"status": "finished", "result": _plain(result)}


def _announce_node(payload: Mapping[str, Any]) -> None:
    """Tell the driver which node this attempt runs on (MLflow tags libra.node_id, libra.host)."""
    import socket

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    ip = ray.util.get_node_ip_address()
    payload["mailbox"].place.remote(payload["trial_key"], payload["attempt"], node_id,
                                    f"{socket.gethostname()} ({ip})")


def _single(payload: Mapping[str, Any]) -> dict[str, Any]:
    if payload.get("bench") is not None:  # a bench study's trial: measured, not trained
        _announce_node(payload)
        from harness.bench.trial import run_bench_trial

        return {"status": "finished", "result": run_bench_trial(dict(payload))}
    return train(payload)


def _ddp_loop(payload: Mapping[str, Any]) -> None:
    outcome = train(payload)
    if _rank()[0] == 0:
        ray.get(payload["mailbox"].put_result.remote(payload["trial_key"], payload["attempt"], outcome))


def _ddp(payload: Mapping[str, Any]) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": payload["cpus_per_worker"]}
    if payload["gpus_per_worker"]:
        resources["GPU"] = payload["gpus_per_worker"]
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config=dict(payload),
        scaling_config=ScalingConfig(num_workers=payload["workers"],
                                     use_gpu=bool(payload["gpus_per_worker"]),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{payload['trial_key']}-a{payload['attempt']}-{int(time.time())}",
                             storage_path=payload["ray_storage"]),
    )
    trainer.fit()
    outcome = ray.get(payload["mailbox"].take_result.remote(payload["trial_key"], payload["attempt"]))
    if outcome is None:
        raise RuntimeError("the DDP run ended without a result from rank 0")
    return outcome


# ------------------------------------------------------------------------------------------
# Driver side.
# ------------------------------------------------------------------------------------------
def launch(payload: Mapping[str, Any]) -> "ray.ObjectRef":
    """Start one attempt of a trial; the ref resolves to `train`'s outcome or raises its error.

    payload: trial_key, attempt, config (TrainConfig.to_dict()), out_dir (absolute),
    num_threads, workers, cpus_per_worker, gpus_per_worker, ray_storage (absolute), mailbox,
    prunable (wait for the driver's verdict after each epoch), bench (a bench study's `bench:`
    block, or None: then the trial measures, harness.bench.trial, instead of training).
    """
    name = f"trial-{payload['trial_key']}"
    if payload["workers"] == 1:
        task = ray.remote(_single).options(
            num_cpus=payload["cpus_per_worker"], num_gpus=payload["gpus_per_worker"],
            max_retries=0, name=name)
    else:
        task = ray.remote(_ddp).options(num_cpus=0, max_retries=0, name=name)
    return task.remote(dict(payload))


def failure_reason(err: BaseException) -> str:
    """One line naming what went wrong in a trial, without Ray's wrapping."""
    cause: Optional[BaseException] = err
    seen = 0
    while seen < 5:
        seen += 1
        inner = getattr(cause, "cause", None)  # RayTaskError wraps the task's exception
        failures = getattr(inner or cause, "worker_failures", None)  # Ray Train: rank -> error
        if isinstance(failures, Mapping) and failures:
            inner = next(iter(failures.values()))
        if inner is None or inner is cause:
            break
        cause = inner
    text = str(cause).strip().splitlines()
    # Ray's own messages put the original error's last line at the end of a traceback.
    lines = [line.strip() for line in text if line.strip()]
    message = lines[-1] if lines else ""
    name = type(cause).__name__
    if message.startswith(name):
        return message[:500]
    return f"{name}: {message}"[:500]


def _number(value: Any) -> Optional[float]:
    try:
        if isinstance(value, bool):
            return None
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _plain(obj: Any) -> Any:
    """fit's result as plain Python (numbers as float) so it pickles and logs anywhere."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    number = _number(obj)
    if number is not None:
        return number
    return str(obj)

