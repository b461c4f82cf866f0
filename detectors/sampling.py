"""RoI samplers of the second stage: IoU-balanced negatives, instance-balanced positives, random.

All three are pure functions of tensors, like detectron2's `subsample_labels`: they run on the
inputs' device with vectorised torch ops (no NumPy, no Python loop over candidates), keep no
state between calls, and return indices (int64, ascending, no repetition) into their input.
Randomness comes only from `generator` (a torch.Generator on the same device as the input, or
None for torch's global RNG), so a seeded generator makes a call reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["iou_balanced_neg_sample", "instance_balanced_pos_sample", "random_sample"]


def iou_balanced_neg_sample(
    max_ious: Tensor,
    num_expected: int,
    *,
    num_bins: int = 3,
    floor_thr: float = -1.0,
    floor_fraction: float = 0.0,
    bin_max: Optional[float] = None,
    zero_iou: str = "in_bins",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw negatives evenly over IoU bins, the paper's IoU-balanced sampling.

    Hard negatives (IoU > 0.05 with some ground truth) are rare among proposals, so uniform
    sampling mostly draws easy ones; drawing N/K from each of K IoU bins (p_k = N / (K * M_k))
    gives the hard ones their share.

    Args:
        max_ious: [M] float, for each NEGATIVE candidate its largest IoU with any ground-truth
            box. The caller passes negatives only, so the values lie in [0, neg_iou_thr).
        num_expected: how many negatives to draw (>= 0).
        num_bins: K >= 1, the number of equal-width IoU bins.
        floor_thr: -1 puts every candidate into the bins, which then cover [0, max]. A value
            >= 0 makes the candidates with IoU < floor_thr a separate "floor" set, and the bins
            cover [floor_thr, max]. (As IoUs are >= 0, floor_thr = 0 leaves the floor set empty;
            mmdetection instead treats 0 as "IoU exactly 0 is the floor".)
        floor_fraction: in [0, 1], the share of the budget for the floor set:
            int(num_expected * floor_fraction) drawn uniformly from it; the rest goes to the bins.
        bin_max: the bins' top edge. None (ours): the largest IoU among the bin candidates.
            A number fixes it: the K bins split [floor, bin_max] evenly, N/K draws each, and
            candidates at or above bin_max go to the last bin. 1.0 is the reference's (every
            release takes the max over all proposals, gts added as proposals included, so its
            edges are 0, 1/3, 2/3, 1 at K = 3, the top bin stays empty below the 0.5 negative
            threshold, and K = 2 is plain random sampling: mmdetection issue #5323).
        zero_iou: how negatives with IoU exactly 0 are treated. "in_bins" (ours, and the CVPR
            release 387fdb3): they are ordinary members of bin 0. "fill_only" (the authors'
            code from Dec 2019 and mmdetection v2, where floor_thr -1 turns into 0 after the
            first call): they join the floor set, so they are drawn only from the floor budget
            and for the shortfall after the bins' own fill; the bins then cover IoU > 0.
        generator: torch.Generator on max_ious' device, or None for the global RNG.

    Returns:
        [min(num_expected, M)] int64 indices into max_ious, ascending, without repetition,
        on max_ious' device. When num_expected >= M all indices come back (no RNG is used).

    The draw, in three stages:
        1. each bin gets (bin budget) // K draws, uniformly without replacement, or all of the
           bin when it holds fewer; the floor set gets its budget the same way;
        2. the bins' shortfall is filled uniformly from the bin candidates not yet drawn, so the
           floor set never gets more than its fraction while the bins can still pay;
        3. any shortfall left (a small floor set, or too few bin candidates) is filled uniformly
           from all remaining candidates, floor set included. With floor_thr = -1 stages 2 and 3
           coincide: the shortfall of small bins is filled from all remaining negatives, as in
           the paper and in mmdetection.

    By default (bin_max None) the bin edges span the candidates' own range, from the floor (0,
    or floor_thr) to the largest IoU among them; the largest value belongs to the last bin.
    mmdetection takes the maximum over positives too, which with a 0.5 negative threshold leaves
    the top bins empty (mmdetection issue #5323) and turns K bins into fewer: bin_max = 1.0.
    """
    if num_expected < 0:
        raise ValueError(f"iou_balanced_neg_sample: num_expected must be >= 0, got {num_expected}")
    if num_bins < 1:
        raise ValueError(f"iou_balanced_neg_sample: num_bins must be >= 1, got {num_bins}")
    if not (floor_thr == -1.0 or floor_thr >= 0.0):
        raise ValueError(f"iou_balanced_neg_sample: floor_thr must be -1 or >= 0, got {floor_thr}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(
            f"iou_balanced_neg_sample: floor_fraction must be in [0, 1], got {floor_fraction}"
        )
    if zero_iou not in ("in_bins", "fill_only"):
        raise ValueError(f"iou_balanced_neg_sample: zero_iou must be 'in_bins' or 'fill_only', got {zero_iou!r}")
    if bin_max is not None and not bin_max > max(floor_thr, 0.0):
        raise ValueError(
            f"iou_balanced_neg_sample: bin_max must be above the floor {max(floor_thr, 0.0)}, got {bin_max}"
        )
    if max_ious.dim() != 1:
        raise ValueError(
            f"iou_balanced_neg_sample: max_ious must be 1-D [M], got shape {tuple(max_ious.shape)}"
        )
    num_candidates = max_ious.numel()
    device = max_ious.device
    if num_expected >= num_candidates:
        return torch.arange(num_candidates, dtype=torch.int64, device=device)
    if num_expected == 0:
        return torch.empty(0, dtype=torch.int64, device=device)

    use_floor = floor_thr >= 0.0 or zero_iou == "fill_only"
    if floor_thr >= 0.0:
        in_floor = max_ious < floor_thr
    else:
        in_floor = torch.zeros(num_candidates, dtype=torch.bool, device=device)
    if zero_iou == "fill_only":
        in_floor = in_floor | (max_ious == 0)
    num_floor_expected = int(num_expected * floor_fraction) if use_floor else 0
    num_bin_expected = num_expected - num_floor_expected
    in_bins = ~in_floor

    # Bin index in [0, K): equal widths over [low, high]. The clamp puts the maximum itself
    # into the last bin (not a bin of its own); a zero-width range (all IoUs equal) makes a
    # single bin 0, which the fill then tops up like plain random sampling.
    low = max(floor_thr, 0.0)
    if bin_max is None:
        high = torch.where(in_bins, max_ious, torch.full_like(max_ious, low)).max()
    else:
        high = torch.tensor(bin_max, dtype=max_ious.dtype, device=device)
    width = ((high - low) / num_bins).clamp_min(torch.finfo(max_ious.dtype).tiny)
    bin_ids = ((max_ious - low) / width).floor().clamp(0, num_bins - 1).long()
    # Group K is the floor set.
    group_ids = torch.where(in_floor, torch.full_like(bin_ids, num_bins), bin_ids)
    quotas = torch.full(
        (num_bins + 1,), num_bin_expected // num_bins, dtype=torch.int64, device=device
    )
    quotas[num_bins] = num_floor_expected

    selected = _take_per_group(group_ids, quotas, _random_keys(num_candidates, device, generator))
    if use_floor:
        num_bin_missing = num_bin_expected - (selected & in_bins).sum()
        selected = _fill_at_random(selected, in_bins, num_bin_missing, generator)
    selected = _fill_at_random(selected, None, num_expected - selected.sum(), generator)
    return selected.nonzero().squeeze(1)


def instance_balanced_pos_sample(
    gt_indices: Tensor,
    num_expected: int,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw about equally many positives per ground-truth box (the paper's positive balancing).

    Args:
        gt_indices: [P] int, for each POSITIVE candidate the index of its matched ground-truth
            box (any integer labels; only equality matters).
        num_expected: how many positives to draw (>= 0).
        generator: torch.Generator on gt_indices' device, or None for the global RNG.

    Returns:
        [min(num_expected, P)] int64 indices into gt_indices, ascending, without repetition.

    Each of the G ground truths present gets num_expected // G draws, uniformly without
    replacement, or all of its positives when it has fewer; the shortfall is filled uniformly
    from the positives not yet drawn. With more ground truths than num_expected every quota is 0
    and the draw is plain random sampling.
    """
    if num_expected < 0:
        raise ValueError(
            f"instance_balanced_pos_sample: num_expected must be >= 0, got {num_expected}"
        )
    if gt_indices.dim() != 1:
        raise ValueError(
            f"instance_balanced_pos_sample: gt_indices must be 1-D [P], got shape "
            f"{tuple(gt_indices.shape)}"
        )
    num_candidates = gt_indices.numel()
    device = gt_indices.device
    if num_expected >= num_candidates:
        return torch.arange(num_candidates, dtype=torch.int64, device=device)
    if num_expected == 0:
        return torch.empty(0, dtype=torch.int64, device=device)

    unique_gts, group_ids = torch.unique(gt_indices, return_inverse=True)
    num_gts = unique_gts.numel()
    quotas = torch.full((num_gts,), num_expected // num_gts, dtype=torch.int64, device=device)
    selected = _take_per_group(group_ids, quotas, _random_keys(num_candidates, device, generator))
    selected = _fill_at_random(selected, None, num_expected - selected.sum(), generator)
    return selected.nonzero().squeeze(1)


def random_sample(
    num_candidates: int,
    num_expected: int,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Draw uniformly without replacement: the baseline sampler, with the others' signature.

    Args:
        num_candidates: M >= 0, the size of the pool.
        num_expected: how many to draw (>= 0).
        generator: torch.Generator on `device`, or None for the global RNG.
        device: where the indices live (default: the CPU).

    Returns:
        [min(num_expected, M)] int64 indices in [0, M), ascending, without repetition.
    """
    if num_candidates < 0 or num_expected < 0:
        raise ValueError(
            f"random_sample: num_candidates and num_expected must be >= 0, "
            f"got {num_candidates} and {num_expected}"
        )
    if num_expected >= num_candidates:
        return torch.arange(num_candidates, dtype=torch.int64, device=device)
    perm = torch.randperm(num_candidates, generator=generator, device=device)
    return perm[:num_expected].sort().values


# ---------------------------------------------------------------------------------------------
# Helpers: selection masks built from random keys, without a loop over candidates or groups.
# ---------------------------------------------------------------------------------------------
def _random_keys(num: int, device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """[num] float64 keys, i.i.d. uniform: the `k` smallest of a set are a uniform k-subset."""
    # float64 so that ties (which would favour lower indices via the stable sort) are negligible.
    return torch.rand(num, generator=generator, device=device, dtype=torch.float64)


def _take_per_group(group_ids: Tensor, quotas: Tensor, keys: Tensor) -> Tensor:
    """[M] bool: in each group g, the quotas[g] members with the smallest keys (all if fewer).

    group_ids: [M] int64 in [0, G); quotas: [G] int64 >= 0; keys: [M] random sort keys.
    """
    # Order by (group, key): sort by key, then stable-sort by group so keys stay ordered inside.
    by_key = keys.argsort()
    sorted_groups, by_group = group_ids[by_key].sort(stable=True)
    order = by_key[by_group]
    counts = torch.bincount(group_ids, minlength=quotas.numel())
    group_starts = counts.cumsum(0) - counts
    positions = torch.arange(group_ids.numel(), device=group_ids.device)
    rank_in_group = positions - group_starts[sorted_groups]
    taken = torch.zeros_like(group_ids, dtype=torch.bool)
    taken[order] = rank_in_group < quotas[sorted_groups]
    return taken


def _fill_at_random(
    selected: Tensor,
    eligible: Optional[Tensor],
    num_missing: Tensor,
    generator: Optional[torch.Generator],
) -> Tensor:
    """`selected` plus `num_missing` (a 0-d tensor; all if fewer) uniform picks among the
    candidates not yet selected and, when given, `eligible` ([M] bool)."""
    pool = ~selected if eligible is None else eligible & ~selected
    # Fresh keys: the keys left over from an earlier draw are biased (the smallest were taken).
    keys = _random_keys(selected.numel(), selected.device, generator)
    quotas = torch.stack([num_missing.clamp_min(0), torch.zeros_like(num_missing)]).to(torch.int64)
    return selected | _take_per_group((~pool).long(), quotas, keys)
