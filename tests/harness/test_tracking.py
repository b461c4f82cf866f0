"""MLflow through the driver's writer: a real SQLite store in tmp_path, the documented schema,
resume without duplicates, and a one-line error for an unreachable server."""
from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from harness.cli import main
from harness.errors import UserError
from harness.spec import load_study
from harness.tracking import Tracker, check_reachable, default_uri, trial_runs

BFP = "detector.balanced_feature_pyramid.enabled"
BL1 = "detector.balanced_l1_loss.enabled"


@pytest.fixture
def study(write_study):
    return load_study(write_study("track", grid={BFP: [False, True], BL1: [False, True]}))


def _epoch(epoch, mAP):
    return {"epoch": epoch, "loss": 2.0 / epoch, "lr": 0.01, "sec_per_iter": 0.1,
            "epoch_seconds": 3.0, "peak_memory_mb": 500.0 + epoch, "bbox_mAP": mAP,
            "bbox_mAP_l": math.nan}


def test_default_store_is_an_absolute_sqlite_uri(tmp_path):
    uri = default_uri(str(tmp_path / "w"))
    assert uri == "sqlite:///" + str(tmp_path / "w" / "mlflow.db")
    assert uri.startswith("sqlite:////")


def test_parent_and_child_runs_follow_the_schema(study, tmp_path):
    work = str(tmp_path / "work")
    tracker = Tracker(study, work)
    assert (tmp_path / "work" / "mlflow.db").exists()  # created before any trial starts
    parent = tracker.start_parent(work, ["libra", "run", study.path])
    plan = study.trials()[3]
    run_id = tracker.open_trial(plan, None, optuna_number=3)
    tracker.log_epoch(run_id, _epoch(1, 0.10))
    tracker.log_epoch(run_id, _epoch(2, 0.20))
    history = [_epoch(1, 0.10), _epoch(2, 0.20)]
    tracker.finish_trial(run_id, {"final": history[-1], "history": history,
                                  "per_class_AP": {"circle": 0.3}, "eval_summary": "AP = 0.2"},
                         wall_seconds=9.0, attempts=1)
    tracker.end_parent("FINISHED", {"total": 4, "finished": 1, "failed": 0, "pruned": 0}, 0.2)

    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == tracker.experiment_id
    assert tags["mlflow.parentRunId"] == parent
    assert tags["libra.role"] == "trial" and tags["libra.trial_state"] == "finished"
    assert tags["libra.trial_key"] == plan.key and tags["libra.seed"] == "0"
    assert tags["libra.flag.balanced_feature_pyramid"] == "true"
    assert tags["libra.flag.balanced_l1_loss"] == "true"
    assert tags["libra.flag.iou_balanced_sampling"] == "true"  # the base config's default
    assert json.loads(tags["libra.params"]) == {BFP: True, BL1: True}
    assert tags["libra.optuna_trial"] == "3" and tags["libra.attempts"] == "1"
    for name in ("libra.git_commit", "libra.version.torch", "libra.version.ray",
                 "libra.version.optuna", "libra.version.mlflow", "libra.arch"):
        assert tags[name]
    assert params["detector.balanced_l1_loss.enabled"] == "true"
    assert params["detector.backbone"] == "tiny"
    assert params["schedule.lr_steps"] == "[]"
    assert params["resources.workers"] == "1"
    assert metrics["bbox_mAP"] == pytest.approx(0.20)
    assert metrics["total_train_seconds"] == pytest.approx(6.0)
    assert metrics["max_peak_memory_mb"] == pytest.approx(502.0)
    assert metrics["trial_wall_seconds"] == pytest.approx(9.0)
    steps = [(m.step, m.value) for m in client.get_metric_history(run_id, "bbox_mAP")]
    assert steps == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert math.isnan(metrics["bbox_mAP_l"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"eval_summary.txt", "metrics.json", "per_class_AP.json", "config.yaml"} <= artifacts

    parent_run = client.get_run(parent)
    assert parent_run.data.tags["libra.role"] == "study"
    assert parent_run.data.metrics["trials_finished"] == 1
    assert parent_run.data.metrics["best_bbox_mAP"] == pytest.approx(0.2)
    assert "study.yaml" in {a.path for a in client.list_artifacts(parent)}

    frame = trial_runs(tracker.uri, study.name)
    assert len(frame) == 1 and frame.loc[0, "metrics.bbox_mAP"] == pytest.approx(0.2)


def test_resume_reuses_the_interrupted_run_and_keeps_finished_ones(study, tmp_path):
    work = str(tmp_path / "work")
    first = Tracker(study, work)
    first.start_parent(work, [])
    done, cut = study.trials()[:2]
    done_id = first.open_trial(done, None)
    first.finish_trial(done_id, {"final": _epoch(2, 0.3), "history": [_epoch(1, 0.1), _epoch(2, 0.3)]},
                       1.0, 1)
    cut_id = first.open_trial(cut, None)
    first.log_epoch(cut_id, _epoch(1, 0.05))  # ... and the driver dies here

    second = Tracker(study, work)
    second.start_parent(work, [])
    records = second.existing_trials()
    assert records[done.key].state == "finished" and records[done.key].run_id == done_id
    assert records[cut.key].state == "running"
    reused = second.open_trial(cut, records[cut.key])
    assert reused == cut_id
    assert second.logged_epochs(reused) == {1: pytest.approx({"loss": 2.0, "lr": 0.01,
                                                              "sec_per_iter": 0.1,
                                                              "epoch_seconds": 3.0,
                                                              "peak_memory_mb": 501.0,
                                                              "bbox_mAP": 0.05,
                                                              "bbox_mAP_l": math.nan},
                                                             nan_ok=True)}
    second.end_trial(reused, "failed", attempts=2, reason="NonFiniteLossError: loss is nan\nat epoch 2")
    frame = trial_runs(second.uri, study.name)
    assert len(frame) == 2  # no duplicates
    failed = frame[frame["tags.libra.trial_key"] == cut.key].iloc[0]
    assert failed["status"] == "FAILED"
    assert failed["tags.libra.failure_reason"] == "NonFiniteLossError: loss is nan at epoch 2"
    assert failed["tags.libra.attempts"] == "2"


def test_unreachable_tracking_server_is_one_line(write_study, tmp_path, capsys):
    with pytest.raises(UserError, match="cannot reach MLflow tracking server at http://127.0.0.1:9"):
        check_reachable("http://127.0.0.1:9")
    path = write_study("unreachable", grid={BL1: [True]})
    code = main(["run", path, "--work-dir", str(tmp_path / "w"), "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot reach MLflow tracking server at http://127.0.0.1:9" in err
    assert "drop --tracking-uri" in err
