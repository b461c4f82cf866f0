"""`libra report` counts one run per trial: a real MLflow SQLite store holding two runs for the
same trial key (a hand-made copy, an old record) gives the table's n, means and states as if
each trial had one run: the finished one when there is one, else the latest."""
from __future__ import annotations

import pytest
import yaml

from harness import report
from harness.spec import load_study
from harness.tracking import Tracker

BFP = "detector.balanced_feature_pyramid.enabled"
STUDY = {
    "name": "dedup",
    "detector": {"backbone": "tiny", "num_classes": 3, "min_size": 64, "max_size": 64},
    "data": {"kind": "synthetic"},
    "schedule": {"epochs": 1},
    "grid": {BFP: [False, True]},
    "seeds": [0, 1],
}
OFF, ON = {BFP: False}, {BFP: True}
# Runs in the order they are created: (configuration, seed, state, final bbox_mAP).
RUNS = [
    (OFF, 0, "finished", 0.30),
    (OFF, 0, "running", 0.97),   # a later copy that never finished: the finished run counts
    (OFF, 1, "finished", 0.32),
    (OFF, 1, "finished", 0.34),  # two finished: the latest counts
    (ON, 0, "failed", 0.90),
    (ON, 0, "pruned", 0.91),     # neither finished: the latest is listed, neither averaged
    (ON, 1, "finished", 0.40),
]


def _write(tracker, plan, state, final, number):
    run_id = tracker.open_trial(plan, None, number)  # None: a new run even for a known key
    metrics = {"epoch": 1, "loss": 1.0, "bbox_mAP": final}
    tracker.log_epoch(run_id, metrics)
    if state == "finished":
        tracker.finish_trial(run_id, {"history": [metrics], "final": metrics, "eval_summary": "",
                                      "per_class_AP": {}}, 1.0, 1)
    elif state != "running":
        tracker.end_trial(run_id, state, attempts=1)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    path = root / "dedup.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    study = load_study(str(path))
    tracker = Tracker(study, str(root / "work"))
    tracker.start_parent(str(root / "work"), ["libra", "run", str(path)])
    run_ids = [_write(tracker, study.make_trial(params, seed), state, final, number)
               for number, (params, seed, state, final) in enumerate(RUNS)]
    tracker.end_parent("FINISHED", {"total": 4}, 0.4)
    return {"uri": tracker.uri, "study": study, "run_ids": run_ids}


def test_the_store_really_holds_duplicates(store):
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"])
    runs = [client.get_run(r) for r in store["run_ids"]]
    keys = [r.data.tags["libra.trial_key"] for r in runs]
    assert len(keys) == 7 and len(set(keys)) == 4
    starts = [r.info.start_time for r in runs]
    assert starts == sorted(starts) and len(set(starts)) == 7  # "latest" is well defined


def test_one_run_per_trial_finished_first_else_latest(store):
    runs = report.load_study_runs(store["uri"], "dedup")
    assert len(runs) == 4 and runs["trial_key"].is_unique
    kept = set(runs["run_id"])
    ids = store["run_ids"]
    assert kept == {ids[0], ids[3], ids[5], ids[6]}
    by_id = runs.set_index("run_id")
    assert by_id.loc[ids[5], "state"] == "pruned"


def test_the_table_averages_each_trial_once(store):
    runs = report.load_study_runs(store["uri"], "dedup")
    table = report.study_table(runs, store["study"]).set_index("label")
    # BFP off: seeds 0 and 1 -> 0.30 and 0.34 (not 0.97, not 0.32): mean 32.0 AP, n = 2.
    # BFP on: seed 1 only (seed 0 has no finished run): 40.0, n = 1.
    off, on = table.loc["no components"], table.loc["BFP"]
    assert (off["AP_mean"], off["AP_n"]) == (pytest.approx(32.0), 2)
    assert (on["AP_mean"], on["AP_n"]) == (pytest.approx(40.0), 1)
