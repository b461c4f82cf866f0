"""The training engine: learning-rate schedule, fit on synthetic data, checkpoints and resume."""
import dataclasses
import json
import math

import pytest
import torch

from detectors.config import ConfigError, ScheduleConfig, TrainConfig
from detectors.engine import CHECKPOINT_NAME, NonFiniteLossError, fit, load_checkpoint, lr_factor


def tiny_config(root, **schedule) -> TrainConfig:
    return TrainConfig.from_dict({
        "detector": {
            "backbone": "tiny", "num_classes": 6, "min_size": 96, "max_size": 96, "fpn_channels": 16,
            "anchor_sizes": [8, 16, 32, 64, 128], "representation_size": 32, "roi_batch_size_per_image": 32,
            "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30,
        },
        "data": {"kind": "synthetic", "root": str(root), "synthetic": {"num_train": 8, "num_val": 4, "image_size": 96}},
        "schedule": {"epochs": 2, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "lr_steps": [], "amp": False,
                     "num_threads": 1, **schedule},
    })


def test_lr_factor_warms_up_linearly_then_steps_down():
    s = ScheduleConfig(warmup_iters=10, warmup_ratio=0.1, lr_steps=(2, 3), lr_gamma=0.1)
    # iteration 0: 0.1; iteration 5: 0.1 + 0.9 * 5/10 = 0.55; 10 iterations per epoch below
    assert lr_factor(0, 10, s) == pytest.approx(0.1)
    assert lr_factor(5, 10, s) == pytest.approx(0.55)
    assert lr_factor(10, 10, s) == pytest.approx(1.0)
    assert lr_factor(19, 10, s) == pytest.approx(1.0)
    assert lr_factor(20, 10, s) == pytest.approx(0.1)  # epoch index 2 reached: x0.1
    assert lr_factor(35, 10, s) == pytest.approx(0.01)  # epoch index 3: x0.1 again


def test_linear_scaling_rule():
    s = ScheduleConfig(batch_size=2, base_lr=0.02, base_batch_size=16)
    assert s.learning_rate(world_size=8) == pytest.approx(0.02)  # 2 x 8 = 16 images: the paper's lr
    assert s.learning_rate(world_size=1) == pytest.approx(0.0025)
    assert dataclasses.replace(s, lr=0.5).learning_rate(8) == 0.5


def test_fit_trains_evaluates_checkpoints_and_reports(tmp_path):
    cfg = tiny_config(tmp_path / "data", eval_bootstrap=20)
    seen = []
    result = fit(cfg, str(tmp_path / "run"), callbacks=[seen.append], progress=False)
    assert [m["epoch"] for m in seen] == [1, 2]
    first, last = result["history"]
    assert last["loss"] < first["loss"]
    # the evaluation noise is measured at the last evaluation only
    assert "bbox_mAP_boot_sd" not in first and "bbox_mAP_boot_sd" in seen[-1]
    assert math.isfinite(last["bbox_mAP_boot_sd"]) and last["bbox_mAP_boot_sd"] >= 0
    for name in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_AR_100"):
        assert 0.0 <= last[name] <= 1.0, name
    for name in ("sec_per_iter", "train_images_per_sec", "peak_memory_mb", "eval_images_per_sec", "epoch_seconds"):
        assert last[name] > 0, name
    assert set(result["per_class_AP"]) == {"square", "disc", "triangle", "cross", "ring", "ellipse"}
    assert "Average Precision" in result["eval_summary"]
    # checkpoints hold only tensors and plain containers
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2 and TrainConfig.from_dict(state["config"]) == cfg
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_resume_continues_from_the_next_epoch_like_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path / "data", epochs=3, lr_steps=[2])
    straight = fit(cfg, str(tmp_path / "straight"), progress=False)

    # interrupt after epoch 1: a callback that raises stops training with the checkpoint saved
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, str(tmp_path / "cut"), callbacks=[_stop_after(1)], progress=False)
    after_cut = load_checkpoint(str(tmp_path / "cut" / CHECKPOINT_NAME))
    assert after_cut["epoch"] == 1
    momentum_before = [s["momentum_buffer"].clone() for s in after_cut["optimizer"]["state"].values()]
    assert momentum_before, "SGD momentum buffers are part of the checkpoint"

    seen = []
    resumed = fit(cfg, str(tmp_path / "cut"), callbacks=[seen.append], progress=False)
    assert [m["epoch"] for m in seen] == [2, 3]
    # What each call trained, as fit records it: 8 images / batch 2 = 4 steps per epoch.
    assert straight["attempt"] == {"attempt_start_epoch": 1, "attempt_steps": 12, "world_size": 1}
    assert resumed["attempt"] == {"attempt_start_epoch": 2, "attempt_steps": 8, "world_size": 1}
    assert [(m["attempt_start_epoch"], m["attempt_steps"]) for m in seen] == [(2, 4), (2, 8)]
    assert [h["attempt_start_epoch"] for h in resumed["history"]] == [1, 2, 2]  # epoch 1: the first call
    on_disk = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert on_disk["attempt"] == resumed["attempt"]
    assert load_checkpoint(str(tmp_path / "cut" / CHECKPOINT_NAME))["history"][-1]["attempt_steps"] == 8
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
    final_straight = load_checkpoint(str(tmp_path / "straight" / CHECKPOINT_NAME))["model"]
    final_resumed = load_checkpoint(str(tmp_path / "cut" / CHECKPOINT_NAME))["model"]
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_restart_records_that_it_trained_from_scratch(tmp_path):
    cfg = tiny_config(tmp_path / "data", epochs=1, max_iters_per_epoch=3)
    fit(cfg, str(tmp_path / "run"), progress=False)
    cfg2 = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=2))
    # resume=False ignores the checkpoint: both epochs again, 3 steps each (max_iters_per_epoch).
    restarted = fit(cfg2, str(tmp_path / "run"), resume=False, progress=False)
    assert restarted["attempt"] == {"attempt_start_epoch": 1, "attempt_steps": 6, "world_size": 1}
    resumed = fit(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=3)),
                  str(tmp_path / "run"), progress=False)
    assert resumed["attempt"] == {"attempt_start_epoch": 3, "attempt_steps": 3, "world_size": 1}


def test_resuming_a_finished_run_returns_its_last_evaluation(tmp_path):
    # A finished trial relaunched (a retry after its checkpoint was written) trains nothing and
    # must still hand back the evaluation that the checkpoint holds, not an empty one.
    cfg = tiny_config(tmp_path / "data", epochs=1, max_iters_per_epoch=1)
    first = fit(cfg, str(tmp_path / "run"), progress=False)
    again = fit(cfg, str(tmp_path / "run"), progress=False)
    assert again["attempt"] == {"attempt_start_epoch": 2, "attempt_steps": 0, "world_size": 1}
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe
    assert same(again["per_class_AP"], first["per_class_AP"]) and len(again["per_class_AP"]) == 6
    assert again["eval_summary"] == first["eval_summary"] and "Average Precision" in again["eval_summary"]
    assert same(again["final"], first["final"])


def _stop_after(epoch):
    def callback(metrics):
        if metrics["epoch"] == epoch:
            raise KeyboardInterrupt
    return callback


def test_a_diverging_run_raises_non_finite_loss(tmp_path):
    cfg = tiny_config(tmp_path / "data", lr=1.0e6, grad_clip=None, warmup_iters=0, epochs=3)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        fit(cfg, str(tmp_path / "run"), progress=False)


def test_class_count_mismatch_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path / "data")
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, num_classes=80))
    with pytest.raises(ConfigError, match="num_classes: 6"):
        fit(cfg, str(tmp_path / "run"), progress=False)


def test_cuda_requested_without_a_gpu_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = tiny_config(tmp_path / "data", device="cuda")
    with pytest.raises(ConfigError, match="schedule.device"):
        fit(cfg, str(tmp_path / "run"), progress=False)


def test_deterministic_switch_sets_torch_and_is_undone(tmp_path):
    from detectors.engine import set_determinism

    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # warns, never kills a study
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


class _RunsCode:
    """Unpickling this would create `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_refuses_what_is_not_a_checkpoint_naming_the_file(tmp_path):
    from detectors.errors import CheckpointError

    marker = tmp_path / "ran"
    torch.save({"model": _RunsCode(str(marker))}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"unsafe.pt holds Python objects other than tensors "
                                              r"and plain containers, which can run code"):
        load_checkpoint(str(tmp_path / "unsafe.pt"))
    assert not marker.exists()  # refused, never unpickled another way
    torch.save({"epoch": 1}, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated, corrupt or not written by "
                                              "torch.save, so it was not loaded; give a checkpoint.pt"):
        load_checkpoint(str(tmp_path / "truncated.pt"))
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(CheckpointError, match="text.pt is truncated, corrupt"):
        load_checkpoint(str(tmp_path / "text.pt"))
    with pytest.raises(CheckpointError, match="none.pt: cannot read it \\(No such file or directory\\)"):
        load_checkpoint(str(tmp_path / "none.pt"))
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is a folder; give a checkpoint.pt"):
        load_checkpoint(str(tmp_path))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt holds a list, not the mapping libra train writes"):
        load_checkpoint(str(tmp_path / "list.pt"))
    assert load_checkpoint(str(tmp_path / "good.pt"), "cpu") == {"epoch": 1}
