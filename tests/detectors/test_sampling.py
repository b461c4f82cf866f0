"""Samplers: per-bin and per-instance quotas, fill of small groups, floor set, edges, determinism."""
import pytest
import torch

from detectors.sampling import instance_balanced_pos_sample, iou_balanced_neg_sample, random_sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _uniform(num, low, high, seed):
    """[num] float32 values uniform in [low, high), reproducible."""
    return low + (high - low) * torch.rand(num, generator=_gen(seed))


def _three_bins(sizes, seed=0):
    """IoUs with known membership of the bins [0, 0.15), [0.15, 0.3), [0.3, 0.45] (K = 3).

    Values keep 0.01 away from the edges, and one candidate sits at 0.45 (the maximum, so the
    bin width is exactly 0.15) in the last bin. Returns (max_ious [M], bin_of_each [M]).
    """
    ranges = [(0.01, 0.14), (0.16, 0.29), (0.31, 0.44)]
    values, bins = [], []
    for k, (size, (low, high)) in enumerate(zip(sizes, ranges)):
        if k == 2:
            size -= 1
            values.append(torch.tensor([0.45]))
            bins.append(torch.tensor([2]))
        values.append(_uniform(size, low, high, seed + k))
        bins.append(torch.full((size,), k))
    return torch.cat(values), torch.cat(bins)


def _check_indices(indices, num_candidates, num_expected):
    assert indices.dtype == torch.int64
    assert indices.numel() == min(num_expected, num_candidates)
    assert indices.unique().numel() == indices.numel(), "repeated index"
    if indices.numel():
        assert 0 <= indices.min() and indices.max() < num_candidates


# ---------------------------------------------------------------------------------------------
# IoU-balanced negatives.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_bins_get_equal_shares(seed):
    max_ious, bins = _three_bins([200, 100, 50])
    # 30 // 3 = 10 per bin; all bins hold more than 10, so no fill is needed.
    indices = iou_balanced_neg_sample(max_ious, 30, generator=_gen(seed))
    _check_indices(indices, max_ious.numel(), 30)
    assert torch.bincount(bins[indices], minlength=3).tolist() == [10, 10, 10]


def test_remainder_of_the_budget_is_filled():
    max_ious, bins = _three_bins([200, 100, 50])
    # 32 // 3 = 10 per bin, then 2 more from any bin.
    indices = iou_balanced_neg_sample(max_ious, 32, generator=_gen(0))
    _check_indices(indices, max_ious.numel(), 32)
    counts = torch.bincount(bins[indices], minlength=3)
    assert (counts >= 10).all() and counts.sum() == 32


@pytest.mark.parametrize("seed", range(5))
def test_small_bins_are_taken_whole_and_the_rest_is_filled(seed):
    max_ious, bins = _three_bins([100, 2, 3])
    # Quota 10 per bin: bins 1 and 2 give all they have (2 + 3), bin 0 gives 10 + the 15 missing.
    indices = iou_balanced_neg_sample(max_ious, 30, generator=_gen(seed))
    _check_indices(indices, max_ious.numel(), 30)
    assert torch.bincount(bins[indices], minlength=3).tolist() == [25, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_the_maximum_falls_into_the_last_bin(seed):
    # Bins [0, 0.1), [0.1, 0.2), [0.2, 0.3]: the last holds only the maximum 0.3, so its quota
    # of 1 always draws it (an extra bin, or a half-open last bin, would lose it to chance).
    max_ious = torch.cat([_uniform(300, 0.0, 0.09, seed), torch.tensor([0.3])])
    indices = iou_balanced_neg_sample(max_ious, 3, generator=_gen(seed))
    assert 300 in indices.tolist()


def test_bin_edges_come_from_the_negatives_own_range():
    # All negatives in [0, 0.06]: the bins are [0, 0.02), [0.02, 0.04), [0.04, 0.06], not a
    # split of [0, 0.5) whose upper bins would be empty.
    max_ious = torch.cat([_uniform(100, 0.001, 0.019, 0), _uniform(100, 0.021, 0.039, 1),
                          _uniform(99, 0.041, 0.059, 2), torch.tensor([0.06])])
    bins = torch.arange(300) // 100
    indices = iou_balanced_neg_sample(max_ious, 30, generator=_gen(0))
    assert torch.bincount(bins[indices], minlength=3).tolist() == [10, 10, 10]


@pytest.mark.parametrize("num_bins", [1, 2, 5])
def test_other_numbers_of_bins(num_bins):
    # 100 candidates per bin, bin k in [k / K, (k + 1) / K) * 0.5, kept away from the edges.
    width = 0.5 / num_bins
    parts = [_uniform(100, k * width + 0.1 * width, (k + 0.9) * width, k) for k in range(num_bins)]
    max_ious = torch.cat(parts + [torch.tensor([0.5])])
    bins = torch.cat([torch.arange(num_bins).repeat_interleave(100), torch.tensor([num_bins - 1])])
    indices = iou_balanced_neg_sample(max_ious, 10 * num_bins, num_bins=num_bins, generator=_gen(0))
    assert torch.bincount(bins[indices], minlength=num_bins).tolist() == [10] * num_bins


def test_no_duplicates_over_many_seeds():
    for seed in range(40):
        gen = torch.Generator().manual_seed(1000 + seed)
        num_candidates = int(torch.randint(1, 300, (1,), generator=gen))
        num_expected = int(torch.randint(0, 320, (1,), generator=gen))
        # Skewed IoUs: most near 0, a few high, some ties.
        max_ious = (torch.rand(num_candidates, generator=gen) ** 4 * 0.5).round(decimals=2)
        floor = [(-1.0, 0.0), (0.05, 0.5), (0.1, 1.0)][seed % 3]
        indices = iou_balanced_neg_sample(
            max_ious, num_expected, num_bins=1 + seed % 5, floor_thr=floor[0],
            floor_fraction=floor[1], generator=_gen(seed),
        )
        _check_indices(indices, num_candidates, num_expected)


def test_all_equal_ious_behave_like_random_sampling():
    indices = iou_balanced_neg_sample(torch.full((50,), 0.2), 20, generator=_gen(0))
    _check_indices(indices, 50, 20)
    indices = iou_balanced_neg_sample(torch.zeros(50), 20, generator=_gen(0))
    _check_indices(indices, 50, 20)


def test_draw_within_a_bin_is_uniform():
    # One bin [0, 0.1) of 4 candidates with quota 2 out of the 3 bins' 6: each of the 4 is drawn
    # with probability 1/2 -> 200 of 400 draws, binomial sd 10; +-50 is a 5-sigma band.
    max_ious = torch.cat([torch.tensor([0.01, 0.02, 0.03, 0.04]), _uniform(50, 0.11, 0.19, 0),
                          _uniform(49, 0.21, 0.29, 1), torch.tensor([0.3])])
    hits = torch.zeros(4)
    for seed in range(400):
        indices = iou_balanced_neg_sample(max_ious, 6, generator=_gen(seed))
        hits += torch.bincount(indices[indices < 4], minlength=4)
    assert ((hits - 200).abs() < 50).all(), hits


def test_floor_set_gets_its_fraction():
    # Floor set: 200 candidates below 0.05. Bins over [0.05, 0.5]: 100 + 100 + 100.
    floor_ious = _uniform(200, 0.0, 0.049, 0)
    bin_ious = torch.cat([_uniform(100, 0.06, 0.19, 1), _uniform(100, 0.21, 0.34, 2),
                          _uniform(99, 0.36, 0.49, 3), torch.tensor([0.5])])
    max_ious = torch.cat([floor_ious, bin_ious])
    groups = torch.cat([torch.full((200,), 3), torch.arange(3).repeat_interleave(100)])
    # 40 * 0.25 = 10 from the floor, the 30 left over 3 bins: 10 each.
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, floor_fraction=0.25,
                                      generator=_gen(0))
    _check_indices(indices, 500, 40)
    assert torch.bincount(groups[indices], minlength=4).tolist() == [10, 10, 10, 10]
    # int(40 * 0.1) = 4 from the floor; 36 // 3 = 12 per bin.
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, floor_fraction=0.1,
                                      generator=_gen(0))
    assert torch.bincount(groups[indices], minlength=4).tolist() == [12, 12, 12, 4]
    # Fraction 0: the floor is drawn from only when the bins cannot pay.
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, generator=_gen(0))
    assert (groups[indices] == 3).sum() == 0


def test_small_floor_set_is_taken_whole_and_bins_pay_the_rest():
    max_ious = torch.cat([torch.tensor([0.0, 0.01, 0.02, 0.03]), _uniform(300, 0.1, 0.5, 0)])
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, floor_fraction=0.5,
                                      generator=_gen(0))
    _check_indices(indices, 304, 40)
    assert (indices < 4).sum() == 4


def test_small_bins_are_paid_by_the_floor_set_last():
    # The bins hold 5 candidates: all 5 are drawn, and the floor set fills the remaining 35.
    max_ious = torch.cat([_uniform(500, 0.0, 0.04, 0), _uniform(5, 0.1, 0.4, 1)])
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, floor_fraction=0.25,
                                      generator=_gen(0))
    _check_indices(indices, 505, 40)
    assert (indices >= 500).sum() == 5


def test_bins_shortfall_prefers_bin_candidates_over_the_floor():
    # Bin budget 30 (quota 10 each); bin 1 is empty, so bins 0 and 2 pay its 10 before the floor
    # set gets more than its 10.
    max_ious = torch.cat([_uniform(200, 0.0, 0.04, 0), _uniform(100, 0.06, 0.19, 1),
                          _uniform(99, 0.36, 0.49, 2), torch.tensor([0.5])])
    indices = iou_balanced_neg_sample(max_ious, 40, floor_thr=0.05, floor_fraction=0.25,
                                      generator=_gen(0))
    assert (indices < 200).sum() == 10


def test_num_expected_at_least_m_returns_all():
    max_ious = _uniform(7, 0.0, 0.5, 0)
    for num_expected in (7, 8, 100):
        assert iou_balanced_neg_sample(max_ious, num_expected).tolist() == list(range(7))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input_and_zero_budget(device):
    empty = iou_balanced_neg_sample(torch.zeros(0, device=device), 10)
    assert empty.shape == (0,) and empty.dtype == torch.int64 and empty.device.type == device
    none = iou_balanced_neg_sample(torch.rand(10, device=device), 0)
    assert none.shape == (0,) and none.dtype == torch.int64 and none.device.type == device


def test_seeded_generator_is_deterministic():
    max_ious = _uniform(1000, 0.0, 0.5, 0)
    first = iou_balanced_neg_sample(max_ious, 30, generator=_gen(0))
    again = iou_balanced_neg_sample(max_ious, 30, generator=_gen(0))
    other = iou_balanced_neg_sample(max_ious, 30, generator=_gen(1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calls_change_no_state():
    # The reference sampler rewrites its floor_thr on the first call; a pure function cannot, but
    # check the observable: a call in between, with other settings, changes nothing.
    max_ious = _uniform(500, 0.0, 0.5, 0)
    before = max_ious.clone()
    first = iou_balanced_neg_sample(max_ious, 40, floor_thr=-1.0, generator=_gen(3))
    iou_balanced_neg_sample(max_ious, 40, floor_thr=0.1, floor_fraction=0.5, generator=_gen(4))
    again = iou_balanced_neg_sample(max_ious, 40, floor_thr=-1.0, generator=_gen(3))
    assert torch.equal(first, again)
    assert torch.equal(max_ious, before)


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_are_kept(device):
    max_ious = _uniform(100, 0.0, 0.5, 0).to(device)
    indices = iou_balanced_neg_sample(max_ious, 12, generator=_gen(0, device))
    assert indices.device.type == device and indices.dtype == torch.int64
    _check_indices(indices.cpu(), 100, 12)
    as_double = iou_balanced_neg_sample(max_ious.double(), 12, floor_thr=0.1, floor_fraction=0.5,
                                   generator=_gen(0, device))
    assert as_double.device.type == device and as_double.numel() == 12


@pytest.mark.parametrize(
    "kwargs",
    [{"num_bins": 0}, {"floor_thr": -0.5}, {"floor_fraction": 1.5}, {"floor_fraction": -0.1}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        iou_balanced_neg_sample(torch.rand(10), 5, **kwargs)


def test_bad_budget_or_shape_raises():
    with pytest.raises(ValueError):
        iou_balanced_neg_sample(torch.rand(10), -1)
    with pytest.raises(ValueError):
        iou_balanced_neg_sample(torch.rand(2, 5), 3)


# ---------------------------------------------------------------------------------------------
# Instance-balanced positives.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_instances_with_many_positives_get_equal_shares(seed):
    gt_indices = torch.tensor([0] * 60 + [1] * 25 + [2] * 40)
    gt_indices = gt_indices[torch.randperm(125, generator=_gen(seed))]
    indices = instance_balanced_pos_sample(gt_indices, 30, generator=_gen(seed))
    _check_indices(indices, 125, 30)
    assert torch.bincount(gt_indices[indices], minlength=3).tolist() == [10, 10, 10]


def test_instances_with_few_positives_are_taken_whole():
    # Quota 30 // 3 = 10: instance 5 gives its 3, the 7 missing come from the others.
    gt_indices = torch.tensor([7] * 60 + [5] * 3 + [100] * 40)
    indices = instance_balanced_pos_sample(gt_indices, 30, generator=_gen(0))
    _check_indices(indices, 103, 30)
    chosen = gt_indices[indices]
    assert (chosen == 5).sum() == 3
    assert (chosen == 7).sum() >= 10 and (chosen == 100).sum() >= 10


def test_more_instances_than_budget_is_random_sampling():
    gt_indices = torch.arange(50).repeat(2)
    indices = instance_balanced_pos_sample(gt_indices, 20, generator=_gen(0))
    _check_indices(indices, 100, 20)


def test_instance_sampler_edges():
    gt_indices = torch.tensor([0, 0, 1])
    assert instance_balanced_pos_sample(gt_indices, 3).tolist() == [0, 1, 2]
    assert instance_balanced_pos_sample(gt_indices, 10).tolist() == [0, 1, 2]
    assert instance_balanced_pos_sample(gt_indices, 0).shape == (0,)
    empty = instance_balanced_pos_sample(torch.zeros(0, dtype=torch.int64), 5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError):
        instance_balanced_pos_sample(gt_indices, -1)


def test_instance_sampler_is_deterministic_and_never_repeats():
    gen = torch.Generator().manual_seed(7)
    for seed in range(20):
        num_positives = int(torch.randint(1, 200, (1,), generator=gen))
        gt_indices = torch.randint(0, 6, (num_positives,), generator=gen)
        num_expected = int(torch.randint(0, 210, (1,), generator=gen))
        first = instance_balanced_pos_sample(gt_indices, num_expected, generator=_gen(seed))
        _check_indices(first, num_positives, num_expected)
        again = instance_balanced_pos_sample(gt_indices, num_expected, generator=_gen(seed))
        assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------
# Random sampling.
# ---------------------------------------------------------------------------------------------
def test_random_sample_properties():
    indices = random_sample(100, 25, generator=_gen(0))
    _check_indices(indices, 100, 25)
    assert torch.equal(indices, indices.sort().values)
    assert torch.equal(indices, random_sample(100, 25, generator=_gen(0)))
    assert not torch.equal(indices, random_sample(100, 25, generator=_gen(1)))
    assert random_sample(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert random_sample(0, 10).shape == (0,)
    assert random_sample(10, 0).shape == (0,)
    with pytest.raises(ValueError):
        random_sample(10, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_random_sample_device(device):
    indices = random_sample(50, 10, generator=_gen(0, device), device=device)
    assert indices.device.type == device and indices.dtype == torch.int64
    _check_indices(indices.cpu(), 50, 10)


def test_bins_start_at_the_floor_threshold_not_at_zero():
    # Floor set: 100 at IoU 0.1. Above floor_thr = 0.3 the two bins are [0.3, 0.4) and [0.4, 0.5]
    # (width 0.1 from the floor edge): 50 at 0.32 and 10 at 0.45 + the maximum 0.5. Budget 20,
    # floor fraction 0: 10 per bin, so exactly 10 drawn at >= 0.4. Bins measured from 0 instead
    # ([0, 0.25), [0.25, 0.5]) would put every bin candidate in one bin: about 20 * 11 / 61 = 4.
    max_ious = torch.cat([torch.full((100,), 0.1), torch.full((50,), 0.32), torch.full((10,), 0.45),
                          torch.tensor([0.5])])
    for seed in range(3):
        indices = iou_balanced_neg_sample(max_ious, 20, num_bins=2, floor_thr=0.3, generator=_gen(seed))
        drawn = max_ious[indices]
        assert (drawn >= 0.4).sum() == 10 and (drawn < 0.3).sum() == 0


def test_an_iou_equal_to_the_floor_threshold_is_in_the_bins():
    # floor_thr splits IoU < floor_thr (floor) from >= floor_thr (bins); 0.25 is exact in float32.
    # With fraction 0 the 10 draws all come from the 30 candidates at exactly 0.25; counting them
    # as floor (<=) would leave the bins empty and draw mostly the 100 at 0.1.
    max_ious = torch.cat([torch.full((100,), 0.1), torch.full((30,), 0.25)])
    indices = iou_balanced_neg_sample(max_ious, 10, num_bins=3, floor_thr=0.25, generator=_gen(0))
    assert max_ious[indices].tolist() == [0.25] * 10


# ---------------------------------------------------------------------------------------------
# Edges found by mutation testing (docs/testing.md): each pins documented behaviour.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"num_expected": -1}, "num_expected must be >= 0, got -1"),
    ({"num_bins": 0}, "num_bins must be >= 1, got 0"),
    ({"floor_thr": -0.5}, "floor_thr must be -1 or >= 0, got -0.5"),
    ({"floor_fraction": 1.5}, r"floor_fraction must be in \[0, 1\], got 1.5"),
    ({"zero_iou": "never"}, "zero_iou must be 'in_bins' or 'fill_only', got 'never'"),
    ({"floor_thr": 0.2, "bin_max": 0.1}, "bin_max must be above the floor 0.2, got 0.1"),
    ({"floor_thr": 0.2, "bin_max": 0.2}, "bin_max must be above the floor 0.2, got 0.2"),
    ({"bin_max": 0.0}, "bin_max must be above the floor 0.0, got 0.0"),
    ({"max_ious": torch.rand(2, 5)}, r"max_ious must be 1-D \[M\], got shape \(2, 5\)"),
])
def test_bad_arguments_name_the_argument_and_the_value(kwargs, message):
    args = {"max_ious": torch.rand(10), "num_expected": 5, **kwargs}
    with pytest.raises(ValueError, match="iou_balanced_neg_sample: " + message):
        iou_balanced_neg_sample(args.pop("max_ious"), args.pop("num_expected"), **args)


def test_other_samplers_name_the_argument_and_the_value():
    with pytest.raises(ValueError, match="instance_balanced_pos_sample: num_expected must be >= 0, got -1"):
        instance_balanced_pos_sample(torch.tensor([0, 1]), -1)
    with pytest.raises(ValueError, match=r"gt_indices must be 1-D \[P\], got shape \(2, 1\)"):
        instance_balanced_pos_sample(torch.tensor([[0], [1]]), 1)
    with pytest.raises(ValueError, match="random_sample: num_candidates and num_expected must be "
                                         ">= 0, got 10 and -1"):
        random_sample(10, -1)


def test_boundary_arguments_are_accepted():
    # floor_thr 0 is valid (an empty floor set), and with floor_thr -1 any bin_max above 0 is.
    max_ious = _uniform(50, 0.0, 0.5, 0)
    assert iou_balanced_neg_sample(max_ious, 10, floor_thr=0.0, generator=_gen(0)).numel() == 10
    assert iou_balanced_neg_sample(max_ious, 10, bin_max=0.5, generator=_gen(0)).numel() == 10


def test_a_budget_of_one_draws_one():
    assert iou_balanced_neg_sample(_uniform(50, 0.0, 0.5, 0), 1, generator=_gen(0)).numel() == 1
    assert instance_balanced_pos_sample(torch.tensor([0, 0, 1, 2]), 1, generator=_gen(0)).numel() == 1
    empty = instance_balanced_pos_sample(torch.tensor([0, 0, 1]), 0)
    assert empty.dtype == torch.int64


def test_taking_everything_uses_no_randomness():
    # "When num_expected >= M all indices come back (no RNG is used)": the generator is untouched.
    for draw in (lambda g: iou_balanced_neg_sample(_uniform(6, 0.0, 0.5, 0), 6, generator=g),
                 lambda g: instance_balanced_pos_sample(torch.tensor([0, 0, 1, 1, 2, 2]), 6, generator=g),
                 lambda g: random_sample(6, 6, generator=g)):
        gen = _gen(0)
        state = gen.get_state()
        assert draw(gen).tolist() == list(range(6))
        assert torch.equal(gen.get_state(), state)


def test_without_a_floor_set_the_floor_fraction_is_ignored(seed=0):
    # floor_thr -1 (in_bins): no floor set, so floor_fraction must not take budget from the bins:
    # 60 over bins of (1000, 100, 100) is still 20 / 20 / 20.
    max_ious, bins = _three_bins((1000, 100, 100), seed)
    for s in range(3):
        picked = bins[iou_balanced_neg_sample(max_ious, 60, floor_fraction=0.5, generator=_gen(s))]
        assert torch.bincount(picked, minlength=3).tolist() == [20, 20, 20]


def test_an_empty_floor_set_leaves_its_budget_to_the_final_uniform_fill():
    # floor_thr 0: the floor set (IoU < 0) is empty but still has its budget of 30 of 60; the bins
    # get 30 // 3 = 10 each, and the floor's 30 are filled uniformly from everything left, which
    # is mostly bin 0: about 10 + 30 * 990 / 1170 = 35 there, far from the 20 of a bin budget of 60.
    max_ious, bins = _three_bins((1000, 100, 100), 0)
    for s in range(3):
        picked = bins[iou_balanced_neg_sample(max_ious, 60, floor_thr=0.0, floor_fraction=0.5,
                                              generator=_gen(s))]
        counts = torch.bincount(picked, minlength=3).tolist()
        assert counts[0] >= 28 and min(counts) >= 10, counts


def test_a_fixed_bin_max_sets_the_edges():
    # 10 candidates at IoU < 0.1, 200 at 0.2-0.3, 200 at 0.36-0.45. Own range (bin_max None, K 3):
    # edges 0, 0.15, 0.3, 0.45, so the 10 low ones are bin 0 and are all drawn (quota 10 of 30).
    # bin_max 1.0: edges 0, 1/3, 2/3, 1; the low ones share bin 0 with 200 others and only a few
    # are drawn (10 draws of 210 in bin 0, plus a uniform fill of 10 for the empty top bin).
    low = _uniform(10, 0.01, 0.1, 0)
    max_ious = torch.cat([low, _uniform(200, 0.2, 0.3, 1), _uniform(199, 0.36, 0.44, 2),
                          torch.tensor([0.45])])
    for s in range(3):
        own = iou_balanced_neg_sample(max_ious, 30, generator=_gen(s))
        assert (own < 10).sum().item() == 10
        fixed = iou_balanced_neg_sample(max_ious, 30, bin_max=1.0, generator=_gen(s))
        assert (fixed < 10).sum().item() <= 5
        # and the top bin is empty: 10 from bin 0 plus 10 from bin 1, the other 10 filled from both
        assert (fixed >= 210).sum().item() >= 10


def test_zero_iou_fill_only_draws_zeros_only_for_the_shortfall():
    # 100 negatives at IoU exactly 0 and 60 spread over (0.01, 0.45). "in_bins": zeros are bin-0
    # members, so some are drawn; "fill_only": they form the floor set (budget 0 here), the bins
    # of the nonzero ones pay all 20, and no zero is drawn.
    max_ious = torch.cat([torch.zeros(100), _uniform(59, 0.01, 0.44, 0), torch.tensor([0.45])])
    for s in range(3):
        in_bins = iou_balanced_neg_sample(max_ious, 20, generator=_gen(s))
        fill_only = iou_balanced_neg_sample(max_ious, 20, zero_iou="fill_only", generator=_gen(s))
        assert (in_bins < 100).sum().item() >= 1
        assert fill_only.numel() == 20 and (fill_only < 100).sum().item() == 0
    # Too few nonzero candidates: the zeros fill what the bins cannot pay.
    few = torch.cat([torch.zeros(100), torch.tensor([0.1, 0.2, 0.3])])
    fill_only = iou_balanced_neg_sample(few, 10, zero_iou="fill_only", generator=_gen(0))
    assert fill_only.numel() == 10 and {100, 101, 102} <= set(fill_only.tolist())


def test_the_fill_uses_the_given_generator_not_the_global_rng():
    # A floor set (budget 10) and two small bins (5 each of quota 10): stage 2 fills the bins'
    # shortfall of 10 from the 90 left in the large bin, a draw that must use the generator.
    max_ious, _ = _three_bins((5, 5, 100), 0)
    max_ious = torch.cat([_uniform(100, 0.0, 0.009, 3), max_ious])  # below floor_thr 0.01
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(iou_balanced_neg_sample(max_ious, 40, floor_thr=0.01, floor_fraction=0.25,
                                             generator=_gen(0)))
    assert torch.equal(draws[0], draws[1])
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(instance_balanced_pos_sample(torch.tensor([0] * 50 + [1] * 2), 20, generator=_gen(0)))
    assert torch.equal(draws[0], draws[1])


def _every_path(inputs, generator_seed):
    """Every public sampler on every branch that creates tensors, on the CPU inputs `inputs`
    (max_ious [M] float32, gt_indices [P] int64, made outside any default-device context).

    generator_seed None draws from the global RNG (seeded here so that runs compare), an int from
    a fresh CPU generator. Returns the list of index tensors.
    """
    max_ious, with_zeros, gt_indices = inputs

    def gen():
        return None if generator_seed is None else _gen(generator_seed)

    if generator_seed is None:
        torch.manual_seed(5)
    return [
        iou_balanced_neg_sample(max_ious, 100, generator=gen()),  # take all
        iou_balanced_neg_sample(max_ious, 0, generator=gen()),  # empty
        iou_balanced_neg_sample(max_ious, 24, generator=gen()),  # bins only
        iou_balanced_neg_sample(max_ious, 24, floor_thr=0.05, floor_fraction=0.25, generator=gen()),
        iou_balanced_neg_sample(max_ious.double(), 24, floor_thr=0.05, floor_fraction=0.25,
                                generator=gen()),
        iou_balanced_neg_sample(max_ious, 24, bin_max=1.0, generator=gen()),
        iou_balanced_neg_sample(with_zeros, 24, zero_iou="fill_only", generator=gen()),
        instance_balanced_pos_sample(gt_indices, 100, generator=gen()),
        instance_balanced_pos_sample(gt_indices, 0, generator=gen()),
        instance_balanced_pos_sample(gt_indices, 12, generator=gen()),
        random_sample(30, 30, generator=gen(), device="cpu"),
        random_sample(30, 7, generator=gen(), device=torch.device("cpu")),
    ]


@pytest.mark.parametrize("generator_seed", [None, 0])
def test_tensors_are_made_on_the_inputs_device_not_the_default_device(generator_seed):
    # On a GPU, a tensor created without device= lands on torch's default device (the CPU, or
    # whatever set_default_device chose) and mixes devices with the inputs. Make the default device
    # "meta" (tensors without data): every tensor created on the default device is then a meta
    # tensor, so a missing device= gives a meta result or an error, while correct code, which
    # creates everything on its input's device, returns the same CPU indices as without it.
    max_ious, _ = _three_bins((50, 20, 10), 0)
    inputs = (max_ious, torch.cat([torch.zeros(20), max_ious]),
              torch.tensor([0] * 30 + [1] * 4 + [2] * 10))
    expected = _every_path(inputs, generator_seed)
    with torch.device("meta"):
        got = _every_path(inputs, generator_seed)
    for index, (want, have) in enumerate(zip(expected, got)):
        assert have.device.type == "cpu", f"call {index}: result on {have.device}"
        assert have.dtype == torch.int64 and torch.equal(have, want), f"call {index}"
