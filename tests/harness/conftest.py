"""Shared set-up for the harness's run tests: one real local Ray cluster, tiny study files."""
from __future__ import annotations

import copy
import os

import pytest
import yaml

# The smallest model and set that still trains and evaluates: seconds per trial on one core.
TINY_BASE = {
    "detector": {
        "backbone": "tiny", "num_classes": 6, "min_size": 128, "max_size": 128,
        "fpn_channels": 32, "representation_size": 64, "roi_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
    },
    "data": {"kind": "synthetic", "synthetic": {"num_train": 8, "num_val": 4, "image_size": 128, "seed": 0}},
    "schedule": {"epochs": 2, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "lr_steps": [],
                 "amp": False},
    "resources": {"workers": 1, "cpus_per_worker": 1, "concurrency": 2},
}

# For the tests that kill a driver or a node once a trial has reported its first epoch: 48 steps
# an epoch (about 1.5 s here) instead of 4, so the kill lands while the trial is still training.
# With TINY_BASE's 4 steps a quiet machine finished all epochs in the driver's reporting latency,
# and the resumed attempt had nothing left to resume. The tests still assert on the checkpoint
# the kill left (checkpoint_epoch), not on this timing.
LONG_EPOCH_DATA = {"kind": "synthetic",
                   "synthetic": {"num_train": 96, "num_val": 4, "image_size": 128, "seed": 0}}

BFP = "detector.balanced_feature_pyramid.enabled"
BL1 = "detector.balanced_l1_loss.enabled"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One synthetic set for the whole session (the engine generates it on first use)."""
    return str(tmp_path_factory.mktemp("synthetic-data"))


@pytest.fixture
def write_study(tmp_path, data_root):
    """write_study(name, **top-level keys) -> path of a tiny study file in tmp_path."""

    def write(name: str, **keys) -> str:
        mapping = copy.deepcopy(TINY_BASE)
        mapping["name"] = name
        mapping["data"]["root"] = data_root
        for key, value in keys.items():
            if isinstance(value, dict) and isinstance(mapping.get(key), dict) and key != "grid":
                mapping[key].update(value)
            else:
                mapping[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return str(path)

    return write


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by every run test (it takes seconds to start)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 ** 2)
    yield ray
    ray.shutdown()


def checkpoint_epoch(trial_dir) -> int:
    """The last epoch a trial's checkpoint.pt holds (what a resumed attempt continues after)."""
    from detectors.engine import CHECKPOINT_NAME, load_checkpoint

    return int(load_checkpoint(os.path.join(str(trial_dir), CHECKPOINT_NAME))["epoch"])
