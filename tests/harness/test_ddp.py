"""DDP as the harness launches it (Ray Train's TorchTrainer, gloo on CPUs): two processes really
train together, and their gradients are averaged, so one DDP step on two half-batches is one
single-process step on the whole batch.

The model is small and deterministic (no BatchNorm, whose batch statistics would differ between a
half-batch and the whole one; no random sampling): a conv stem, the project's Balanced Feature
Pyramid on five levels, a linear box regressor and the project's balanced L1 loss, trained by the
engine's own `train_one_epoch`, wrapped in DDP the way `fit` wraps the detector.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow

LR = 0.5  # large, so that a wrong gradient moves the weights far more than rounding does


def _make_model_and_batch():
    """(model, [(images, targets)]): the same initial weights in every process (seed 0), and a
    batch of 2 images with one box each; rank r of 2 takes image r."""
    from collections import OrderedDict

    import torch.nn.functional as F
    from torch import nn

    from detectors.bfp import BalancedFeaturePyramid
    from detectors.losses import balanced_l1_loss

    class PyramidBoxRegressor(nn.Module):
        """images [N, 3, 32, 32] -> 4 box deltas per image; loss: balanced L1, mean over N x 4."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bfp = BalancedFeaturePyramid(8, 5, refine_level=2, refine_type="non_local")
            nn.init.normal_(self.bfp.refine.out.weight, std=0.1)  # let the attention path train too
            self.head = nn.Linear(8, 4)

        def forward(self, images, targets):
            x = self.stem(torch.stack(images))  # [N, 8, 16, 16]
            levels = OrderedDict((str(i), F.max_pool2d(x, 2 ** i) if i else x) for i in range(5))
            pooled = torch.stack([f.mean(dim=(2, 3)) for f in self.bfp(levels).values()]).mean(0)  # [N, 8]
            target = torch.stack([t["boxes"][0] for t in targets]) / 32.0  # [N, 4]
            return {"loss_box_reg": balanced_l1_loss(self.head(pooled), target, reduction="mean")}

    torch.manual_seed(0)
    model = PyramidBoxRegressor()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 32, 32, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 1.0, 31.0, 12.0]]), "labels": torch.tensor([2])}]
    return model, images, targets


def _one_step(model, images, targets, ctx):
    """One optimizer step of the engine's training loop on (images, targets); returns its metrics."""
    from detectors.config import ScheduleConfig
    from detectors.engine import lr_factor, train_one_epoch

    schedule = ScheduleConfig(lr=LR, warmup_iters=0, lr_steps=(), amp=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, 1, schedule))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(model, [(images, targets)], optimizer, scheduler, scaler,
                           device=torch.device("cpu"), epoch=1, schedule=schedule, ctx=ctx)


def _ddp_worker(config):
    """One rank: train on its own image, in DDP as `fit` wraps it; save what it saw and ended with."""
    import torch.distributed as dist
    from torch import nn

    from detectors.engine import DistContext

    ctx = DistContext.current()  # what the engine sees inside the worker
    model, images, targets = _make_model_and_batch()
    ddp = nn.parallel.DistributedDataParallel(model)
    metrics = _one_step(ddp, images[ctx.rank:ctx.rank + 1], targets[ctx.rank:ctx.rank + 1], ctx)
    torch.save({"rank": ctx.rank, "world_size": ctx.world_size, "backend": dist.get_backend(),
                "pid": os.getpid(), "loss": metrics["loss"], "params": model.state_dict()},
               os.path.join(config["out"], f"rank{ctx.rank}.pt"))


def test_two_ddp_workers_average_gradients_like_one_process_on_the_whole_batch(ray_cluster, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detectors.engine import DistContext

    # The workers get this file's functions by value: a test module is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        _ddp_worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ddp-grad", storage_path=str(tmp_path / "ray")),
    ).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Two processes ran, each inside a 2-process gloo group.
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert ranks[0]["pid"] != ranks[1]["pid"] != os.getpid()

    # The same step in this process on the whole batch.
    model, images, targets = _make_model_and_batch()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _one_step(model, images, targets, DistContext())
    expected = model.state_dict()
    # One rank alone on its own half (what a rank would do if nothing averaged its gradient).
    alone, _, _ = _make_model_and_batch()
    _one_step(alone, images[:1], targets[:1], DistContext())

    # Tolerance: the whole batch's mean over 8 residuals and DDP's mean of two means over 4 add
    # the same float32 numbers in a different order, a few ulp (float32 eps 1.2e-7) of each
    # gradient, times lr 0.5 on weights of order 0.1 to 1: well under 1e-6. A missing average
    # (one rank's own gradient) or a sum instead of a mean moves some weight by more than 1e-3.
    atol = 1e-6
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    off_alone = max((alone.state_dict()[k] - expected[k]).abs().max().item() for k in expected)
    assert moved > 1e-2 and off_alone > 1e-3, (moved, off_alone)
    for r in ranks:
        for name, tensor in expected.items():
            torch.testing.assert_close(r["params"][name], tensor, rtol=0, atol=atol, msg=name)
    # The logged loss is the mean over ranks, i.e. the whole batch's loss.
    assert ranks[0]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert ranks[1]["loss"] == ranks[0]["loss"]
