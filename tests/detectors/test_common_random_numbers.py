"""Common random numbers: two configurations of an ablation with one seed share what is random.

An ablation compares configurations run with the same seeds (the seed is a block in the report's
model). The comparison is only as sharp as what the paired runs share: the same initial weights
for the modules both have, and the same flipped images in the same order. These tests pin both.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from detectors import build_detector
from detectors.config import TrainConfig
from detectors.engine import fit, seeded_batches, stream_seed


def _detector(bfp: bool):
    return TrainConfig.from_dict({"detector": {
        "backbone": "tiny", "num_classes": 3, "min_size": 64, "max_size": 64, "fpn_channels": 16,
        "representation_size": 32, "balanced_feature_pyramid": {"enabled": bfp}}}).detector


def test_the_bfp_leaves_the_other_modules_initial_weights_unchanged():
    weights = {}
    for bfp in (False, True):
        torch.manual_seed(7)
        weights[bfp] = build_detector(_detector(bfp)).state_dict()
    shared = [k for k in weights[False]]
    # The BFP-on model has the same keys under its wrapper (backbone.backbone.*) plus the BFP's own.
    on = {k.replace("backbone.backbone.", "backbone."): v for k, v in weights[True].items()}
    assert set(shared) <= set(on)
    assert len(on) > len(shared)
    for key in shared:  # the RPN and the RoI head are built after the BFP: they would differ
        assert torch.equal(weights[False][key], on[key]), key


class _Draws(Dataset):
    """Item i is (i, one uniform draw from the global RNG): what a random flip would draw."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return index, torch.rand(()).item()


def _epoch(loader, seed, epoch, extra_draws):
    """The items of one epoch when the consumer draws `extra_draws(i)` numbers after batch i
    (as a sampler does, a different number in each configuration)."""
    items = []
    for i, batch in enumerate(seeded_batches(loader, seed, epoch, len(loader))):
        items.append(batch)
        torch.rand(extra_draws(i))
    return items


def test_each_batch_draws_the_same_whatever_earlier_iterations_drew():
    loader = DataLoader(_Draws(), batch_size=2, shuffle=True)  # the shuffle draws from the global RNG
    first = _epoch(loader, seed=3, epoch=1, extra_draws=lambda i: 0)
    second = _epoch(loader, seed=3, epoch=1, extra_draws=lambda i: 17 * (i + 1))
    assert len(first) == 3
    for a, b in zip(first, second):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # ... and another epoch or seed draws otherwise
    other_epoch = _epoch(loader, seed=3, epoch=2, extra_draws=lambda i: 0)
    other_seed = _epoch(loader, seed=4, epoch=1, extra_draws=lambda i: 0)
    assert not torch.equal(first[0][1], other_epoch[0][1])
    assert not torch.equal(first[0][1], other_seed[0][1])


def test_stream_seeds_differ_between_neighbouring_iterations_epochs_and_seeds():
    seeds = {stream_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3)


def test_batches_stop_at_num_iters_or_at_the_end_of_the_loader():
    loader = DataLoader(_Draws(), batch_size=2)
    assert len(list(seeded_batches(loader, 0, 1, 2))) == 2
    assert len(list(seeded_batches(loader, 0, 1, 10))) == 3


def _flips_seen(tmp_path, cfg, monkeypatch):
    """Per iteration of a fit, each training image's column sums [B, W]: they tell a flipped
    image from an unflipped one (train_step is wrapped, not replaced)."""
    from detectors import engine

    seen = []
    original = engine.train_step

    def recording_step(model, optimizer, scaler, images, targets, **kwargs):
        seen.append(torch.stack([img.sum(dim=(0, 1)) for img in images]))
        return original(model, optimizer, scaler, images, targets, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", recording_step)
        fit(cfg, str(tmp_path), progress=False)
    return seen


def _fit_config(root, ibs: bool) -> TrainConfig:
    return TrainConfig.from_dict({
        "detector": {"backbone": "tiny", "num_classes": 6, "min_size": 96, "max_size": 96, "fpn_channels": 16,
                     "anchor_sizes": [8, 16, 32, 64, 128], "representation_size": 32,
                     "roi_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                     "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30,
                     "iou_balanced_sampling": {"enabled": ibs}},
        "data": {"kind": "synthetic", "root": str(root),
                 "synthetic": {"num_train": 8, "num_val": 2, "image_size": 96}},
        "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "lr_steps": [], "amp": False,
                     "num_threads": 1, "seed": 5},
    })


def test_two_configurations_with_one_seed_train_on_the_same_flipped_images(tmp_path, monkeypatch):
    # The IoU-balanced sampler draws other numbers than the random one: without the per-iteration
    # seeds the flips of every later batch would follow whatever the sampler drew.
    plain = _flips_seen(tmp_path / "plain", _fit_config(tmp_path / "data", False), monkeypatch)
    balanced = _flips_seen(tmp_path / "ibs", _fit_config(tmp_path / "data", True), monkeypatch)
    assert len(plain) == len(balanced) == 4
    for a, b in zip(plain, balanced):
        assert torch.equal(a, b)
