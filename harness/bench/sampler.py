"""Sampler cost: detectors.sampling.iou_balanced_neg_sample on one image's realistic negatives,
against a straightforward per-bin loop (the comparison baseline) and the baseline's random draw,
timed interleaved with torch.utils.benchmark.Timer."""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Optional

import torch
from torch import Tensor

from harness.bench.model import Progress, quiet, synthetic_batch


def iou_balanced_neg_sample_loop(max_ious: Tensor, num_expected: int, *, num_bins: int = 3,
                                 generator: Optional[torch.Generator] = None) -> Tensor:
    """COMPARISON BASELINE, not used in training: IoU-balanced negative sampling written the
    straightforward way, one Python iteration (and one randperm) per bin.

    The rule of iou_balanced_neg_sample with floor_thr = -1: K equal-width bins over [0, max
    IoU], num_expected // K drawn uniformly from each (all of a smaller bin), the shortfall
    drawn uniformly from the rest. Bin ids are computed the same way as there.

    max_ious: [M] float, each candidate's max IoU with any ground truth. Returns
    [min(num_expected, M)] int64 indices into max_ious, ascending, no repetition.
    """
    num_candidates, device = max_ious.numel(), max_ious.device
    if num_expected >= num_candidates:
        return torch.arange(num_candidates, dtype=torch.int64, device=device)
    width = (max_ious.max() / num_bins).clamp_min(torch.finfo(max_ious.dtype).tiny)
    bin_ids = (max_ious / width).floor().clamp(0, num_bins - 1).long()
    per_bin, chosen = num_expected // num_bins, []
    for k in range(num_bins):
        members = torch.nonzero(bin_ids == k).squeeze(1)
        if members.numel() > per_bin:
            members = members[torch.randperm(members.numel(), generator=generator, device=device)[:per_bin]]
        chosen.append(members)
    taken = torch.cat(chosen)
    missing = num_expected - taken.numel()
    if missing > 0:
        rest = torch.ones(num_candidates, dtype=torch.bool, device=device)
        rest[taken] = False
        rest_idx = torch.nonzero(rest).squeeze(1)
        taken = torch.cat([taken, rest_idx[torch.randperm(rest_idx.numel(), generator=generator, device=device)[:missing]]])
    return taken.sort().values


def realistic_negatives(*, num_proposals: int = 2000, num_gt: int = 7, image_height: int = 800,
                        image_width: int = 1333, rois_per_image: int = 512, positive_fraction: float = 0.25,
                        neg_iou_thr: float = 0.5, seed: int = 0, device: torch.device | str = "cpu",
                        ) -> tuple[Tensor, int]:
    """One image's negatives as an RPN gives them: a quarter of the proposals are jittered
    copies of the gt boxes (the positives and the hard negatives), the rest random boxes, and
    the gt boxes themselves, as in training. Returns (max IoUs [M] of the proposals with IoU <
    neg_iou_thr, how many negatives the sampler draws: rois_per_image - positives drawn)."""
    from torchvision.ops import box_iou

    gen = torch.Generator().manual_seed(seed)
    gt = synthetic_batch(batch_size=1, image_height=image_height, image_width=image_width, num_classes=1,
                         boxes_per_image=num_gt, seed=seed)[1][0]["boxes"]  # [G, 4]
    num_near = num_proposals // 4
    parents = gt[torch.randint(0, num_gt, (num_near,), generator=gen)]
    near = parents + torch.cat([parents[:, 2:] - parents[:, :2]] * 2, 1) * 0.25 * torch.randn(num_near, 4, generator=gen)
    xy = torch.rand(num_proposals - num_near, 2, generator=gen) * torch.tensor([image_width, image_height])
    wh = torch.exp(torch.rand(num_proposals - num_near, 2, generator=gen) * math.log(400.0)) + 4.0
    proposals = torch.cat([near, torch.cat([xy, xy + wh], 1), gt])
    proposals = torch.cat([torch.minimum(proposals[:, :2], proposals[:, 2:]),
                           torch.maximum(proposals[:, :2], proposals[:, 2:]) + 1.0], 1)
    max_ious = box_iou(gt, proposals).max(dim=0).values
    num_pos = min(int((max_ious >= neg_iou_thr).sum()), int(rois_per_image * positive_fraction))
    return max_ious[max_ious < neg_iou_thr].to(device), rois_per_image - num_pos


# Per-image sampler times in microseconds (medians and IQRs over calls): vectorised is
# detectors.sampling.iou_balanced_neg_sample, loop iou_balanced_neg_sample_loop, random the baseline's
# randperm draw; with batch_size (images per step) and train_step_s (the +iou_balanced_sampling
# median step), the shares of a training step in %: batch_size x (vectorised | vectorised - random | loop) / step.
SamplerResult = namedtuple("SamplerResult", "device num_candidates num_expected reps vectorised_us vectorised_us_q25 "
                           "vectorised_us_q75 loop_us loop_us_q25 loop_us_q75 random_us speedup_vs_loop batch_size "
                           "train_step_s share_of_step_pct extra_over_random_pct loop_share_of_step_pct")


def run_sampler_bench(*, device: str = "cpu", reps: int = 200, warmup: int = 10, num_bins: int = 3,
                      batch_size: Optional[int] = None, train_step_s: Optional[float] = None,
                      progress: Progress = quiet, **negatives) -> SamplerResult:
    """Time one image's negative sampling three ways, `warmup` untimed then `reps` timed calls
    each, the three taking turns call by call (the order rotated), so drift hits all alike.
    With `batch_size` and `train_step_s` (a step's median with the sampler on) the shares of a
    training step are given. `negatives`: realistic_negatives' options (proposals, RoIs, image
    size, seed); its defaults are the paper's RPN output and R-CNN batch."""
    import pandas as pd
    from torch.utils.benchmark import Timer

    from detectors.sampling import iou_balanced_neg_sample

    dev = torch.device(device)
    max_ious, num_expected = realistic_negatives(device=dev, **negatives)
    calls = {"vectorised": lambda: iou_balanced_neg_sample(max_ious, num_expected, num_bins=num_bins),
             "loop": lambda: iou_balanced_neg_sample_loop(max_ious, num_expected, num_bins=num_bins),
             "random": lambda: torch.randperm(max_ious.numel(), device=dev)[:num_expected]}
    # Timer syncs CUDA around the call; it would time on one thread unless told otherwise.
    timers = {k: Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for k, f in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    progress(f"[sampler] {max_ious.numel()} negatives, drawing {num_expected}, {reps} reps on {dev}")
    for r in range(warmup + reps):
        for key in keys[r % 3:] + keys[: r % 3]:
            seconds = timers[key].timeit(1).median
            if r >= warmup:
                times[key].append(seconds * 1e6)
    quartiles = pd.DataFrame(times).quantile([0.25, 0.5, 0.75])  # [3, sampler], linear interpolation
    (vq25, vmed, vq75), (lq25, lmed, lq75), (_, rmed, _) = (quartiles[k].tolist() for k in keys)
    shares = [None] * 3
    if batch_size and train_step_s:
        shares = [100.0 * batch_size * us / (train_step_s * 1e6) for us in (vmed, vmed - rmed, lmed)]
    return SamplerResult(
        device=str(dev), num_candidates=max_ious.numel(), num_expected=num_expected, reps=reps,
        vectorised_us=vmed, vectorised_us_q25=vq25, vectorised_us_q75=vq75, loop_us=lmed, loop_us_q25=lq25,
        loop_us_q75=lq75, random_us=rmed, speedup_vs_loop=lmed / vmed, batch_size=batch_size,
        train_step_s=train_step_s, share_of_step_pct=shares[0], extra_over_random_pct=shares[1],
        loop_share_of_step_pct=shares[2])
