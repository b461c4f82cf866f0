"""The paper's protocol end to end: `libra train` a tiny Faster R-CNN, then `libra run` a Fast
R-CNN study that names its checkpoint: the proposals are produced once (their own MLflow run,
a folder under the work dir), every trial reads them, and a re-run reuses them. Real Ray,
MLflow (SQLite) and Optuna, as the other run tests."""
from __future__ import annotations

import json
import os

import pytest
import yaml
from mlflow import MlflowClient

from harness.cli import main
from harness.tracking import default_uri, trial_runs

from tests.harness.conftest import BL1, TINY_BASE

pytestmark = pytest.mark.slow


def test_a_fast_rcnn_study_produces_its_proposals_once(ray_cluster, write_study, data_root, tmp_path, capsys):
    config = {k: dict(TINY_BASE[k]) for k in ("detector", "data", "schedule")}
    config["data"]["root"] = data_root
    config["schedule"] = dict(config["schedule"], epochs=1, device="cpu")
    (tmp_path / "rpn.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "rpn.yaml"), "--out", str(tmp_path / "rpn"), "--no-progress"]) == 0
    checkpoint = str(tmp_path / "rpn" / "checkpoint.pt")

    path = write_study("fast", detector={"arch": "fast_rcnn"}, grid={BL1: [False, True]},
                       proposals={"checkpoint": checkpoint})
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work), "--dry-run"]) == 0
    assert "produced first into" in capsys.readouterr().out
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "proposals: producing" in out and "2/2 trials done" in out

    folders = os.listdir(work / "proposals")
    assert len(folders) == 1
    folder = str(work / "proposals" / folders[0])
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    assert manifest["checkpoint"] == checkpoint
    assert manifest["splits"]["train"]["num_images"] == 8 and manifest["splits"]["val"]["num_images"] == 4
    assert manifest["splits"]["train"]["post_nms_top_n"] == TINY_BASE["detector"]["rpn_post_nms_top_n_train"]

    uri = default_uri(str(work))
    runs = trial_runs(uri, "fast")
    assert len(runs) == 2 and set(runs["tags.libra.trial_state"]) == {"finished"}
    assert set(runs["params.data.proposals"]) == {folder}
    assert set(runs["params.detector.arch"]) == {"fast_rcnn"}
    assert runs["metrics.bbox_mAP"].notna().all()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fast")
    staged = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'proposals'")
    assert len(staged) == 1 and staged[0].info.status == "FINISHED"
    assert staged[0].data.metrics["train_images"] == 8
    assert staged[0].data.tags["libra.proposals_dir"] == folder

    # Again: the folder is reused, no second proposals run, no trial trains again.
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "produced earlier, reused" in out and "2 trial(s) already done" in out
    assert len(client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'proposals'")) == 1
    assert len(trial_runs(uri, "fast")) == 2
