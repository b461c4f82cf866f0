"""The components are declared once (detectors/components.py): a fourth one, registered here in
the test, shows in the spec's labels, the MLflow tags, the report's columns, the --dry-run
table and the bench's variants with no change to harness/."""
from __future__ import annotations

import pytest
from mlflow import MlflowClient

from detectors import components as comps
from detectors.config import DetectorConfig
from harness import bench, report
from harness.cli import main
from harness.spec import load_study
from harness.tracking import Tracker

# A toy fourth switch: instance-balanced positives, a bool that already lives in the sampler's
# settings block, so the test needs no new config field.
TOY = comps.Component("instance_balanced_pos", code="ibp", title="IB-pos",
                      settings="iou_balanced_sampling", switch="instance_balanced_pos")
BL1 = "detector.balanced_l1_loss.enabled"


@pytest.fixture
def toy():
    comps.register(TOY)
    try:
        yield TOY
    finally:
        comps.unregister(TOY.name)


def test_the_declared_three_in_order():
    assert [c.name for c in comps.components()] == [
        "iou_balanced_sampling", "balanced_feature_pyramid", "balanced_l1_loss"]
    assert [c.code for c in comps.components()] == ["ibs", "bfp", "bl1"]
    assert comps.components()[2].key == BL1
    with pytest.raises(ValueError, match="already declared"):
        comps.register(comps.Component("bfp2", code="bfp", title="x"))
    with pytest.raises(ValueError, match="cannot be removed"):
        comps.unregister("balanced_l1_loss")


def test_turned_changes_only_the_switch():
    base = DetectorConfig()
    off = comps.components()[1].turned(base, False)
    assert not off.balanced_feature_pyramid.enabled
    assert off.balanced_feature_pyramid.refine_type == base.balanced_feature_pyramid.refine_type
    assert off.iou_balanced_sampling == base.iou_balanced_sampling


def test_a_registered_fourth_component_reaches_every_harness_list(toy, write_study, tmp_path, capsys):
    assert toy.key == "detector.iou_balanced_sampling.instance_balanced_pos"
    path = write_study("toy4", grid={toy.key: [False, True], BL1: [False, True]})
    study = load_study(path)

    # The spec: labels carry the toy's code, and the config reports its switch.
    trials = study.trials()
    assert [t.label.split(" seed")[0] for t in trials] == ["-ibp -bl1", "-ibp +bl1", "+ibp -bl1", "+ibp +bl1"]
    assert trials[2].config.detector.component_flags["instance_balanced_pos"] is True
    assert list(trials[2].config.detector.component_flags)[-1] == "instance_balanced_pos"

    # The --dry-run grid table titles the toy's column.
    assert main(["run", path, "--dry-run"]) == 0
    assert "IB-pos" in capsys.readouterr().out

    # The MLflow tags.
    work = str(tmp_path / "work")
    tracker = Tracker(study, work)
    tracker.start_parent(work, ["libra", "run", path])
    ids = {}
    for i, plan in enumerate(trials):
        ids[plan.key] = tracker.open_trial(plan, None, optuna_number=i)
        final = {"epoch": 1, "loss": 1.0, "bbox_mAP": 0.1 + 0.01 * i}
        tracker.log_epoch(ids[plan.key], final)
        tracker.finish_trial(ids[plan.key], {"final": final, "history": [final], "per_class_AP": {},
                                             "eval_summary": ""}, wall_seconds=1.0, attempts=1)
    tracker.end_parent("FINISHED", {"total": 4, "finished": 4, "failed": 0, "pruned": 0}, 0.13)
    tags = MlflowClient(tracker.uri).get_run(ids[trials[2].key]).data.tags
    assert tags["libra.flag.instance_balanced_pos"] == "true"
    assert tags["libra.flag.balanced_l1_loss"] == "false"

    # The report: a bool column in the runs, a check-mark column titled by the declaration,
    # rows labelled by it, and the all-off baseline found among four switches.
    runs = report.load_study_runs(tracker.uri, study.name)
    assert sorted(runs["instance_balanced_pos"].tolist()) == [False, False, True, True]
    table = report.study_table(runs, study)
    assert "IB-pos + BL1" in table["label"].tolist()
    assert "all four components off" in table.attrs["baseline_note"]
    header = report.to_markdown(table).splitlines()[0]
    assert header.index("IoU-sampling") < header.index("BL1") < header.index("IB-pos")

    # The bench's variants: the toy alone, and on in the all-on variant.
    variants = bench.component_variants(DetectorConfig())
    assert list(variants) == ["baseline", "+iou_balanced_sampling", "+balanced_feature_pyramid",
                              "+balanced_l1_loss", "+instance_balanced_pos", "libra (all four)"]
    alone = variants["+instance_balanced_pos"]
    assert alone.iou_balanced_sampling.instance_balanced_pos
    assert not any(alone.component_flags[c] for c in ("iou_balanced_sampling", "balanced_l1_loss"))
    assert all(variants["libra (all four)"].component_flags.values())


def test_unregistering_restores_the_three(toy):
    comps.unregister(toy.name)
    assert len(bench.variants()) == 5 and "instance_balanced_pos" not in report.flags()
    comps.register(toy)  # the fixture removes it again
