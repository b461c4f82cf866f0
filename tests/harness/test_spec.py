"""Study files: validation with one-line errors naming file and key, --set overrides, and the
expansion into trials with stable keys. No Ray, no stores: fast."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from harness.cli import main
from harness.errors import UserError
from harness.spec import apply_override, config_keys, load_study, parse_override
from harness.study import plan_concurrency

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = sorted(glob.glob(os.path.join(ROOT, "studies", "*.yaml")))
QUICKSTART = os.path.join(ROOT, "studies", "quickstart.yaml")


@pytest.mark.parametrize("path", STUDIES, ids=os.path.basename)
def test_every_shipped_study_validates(path):
    study = load_study(path)
    if study.kind == "grid":
        assert study.trials()
    elif study.kind == "bench":
        assert study.bench_trial().key
    else:
        assert study.spec.search.num_trials >= 1


def test_quickstart_is_the_2x2x2_ablation_on_the_cpu():
    study = load_study(QUICKSTART)
    trials = study.trials()
    assert len(trials) == 16  # 2 x 2 x 2 configurations x 2 seeds
    flags = [tuple(t.config.detector.component_flags.values()) for t in trials]
    assert len(set(flags)) == 8  # every on/off combination of the three components ...
    assert sorted(t.config.schedule.seed for t in trials) == [0] * 8 + [1] * 8  # ... once per seed
    for t in trials:
        assert t.config.schedule.device == "cpu"
        assert t.config.schedule.num_threads == 1  # pinned to the trial's CPU share
        assert t.config.data.kind == "synthetic"


def test_trial_keys_are_stable_and_follow_the_config():
    first = [t.key for t in load_study(QUICKSTART).trials()]
    again = [t.key for t in load_study(QUICKSTART).trials()]
    assert first == again and len(set(first)) == 16
    longer = [t.key for t in load_study(QUICKSTART, ["schedule.epochs=7"]).trials()]
    assert not set(first) & set(longer)
    ddp = [t.key for t in load_study(QUICKSTART, ["resources.workers=2"]).trials()]
    assert not set(first) & set(ddp)  # 2 workers double the batch: another trial
    concurrency = [t.key for t in load_study(QUICKSTART, ["resources.concurrency=1"]).trials()]
    assert concurrency == first  # how many run at once changes nothing in a trial


def test_cases_are_zipped_not_crossed():
    study = load_study(os.path.join(ROOT, "studies", "paper_table6_alpha_gamma.yaml"))
    trials = study.trials()
    assert len(trials) == 9
    baselines = [(t.config.detector.rcnn_box_loss, t.config.detector.box_loss.loss_weight) for t in trials[:4]]
    assert baselines == [("smooth_l1", 1.0), ("smooth_l1", 1.5), ("smooth_l1", 2.0), ("l1", 1.0)]
    pairs = [(t.config.detector.balanced_l1_loss.enabled, t.config.detector.balanced_l1_loss.alpha,
              t.config.detector.balanced_l1_loss.gamma) for t in trials[4:]]
    assert all(p[0] is True for p in pairs)
    assert [p[1:] for p in pairs] == [(0.2, 1.0), (0.3, 1.0), (0.5, 1.0), (0.5, 1.5), (0.5, 2.0)]


def test_cases_cross_the_other_axes_and_the_seeds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "grid": {"detector.min_size": [128, 160],
                              "cases": [{"detector.balanced_l1_loss.alpha": 0.2},
                                        {"detector.balanced_l1_loss.alpha": 0.5}]},
        "seeds": [0, 1, 2]}))
    trials = load_study(str(path)).trials()
    assert len(trials) == 2 * 2 * 3
    assert {t.seed for t in trials} == {0, 1, 2}
    assert trials[0].config.schedule.seed == 0


def test_relative_data_paths_become_absolute_against_the_study_file(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    path = folder / "coco.yaml"
    path.write_text(yaml.safe_dump({
        "name": "coco", "data": {"kind": "coco", "train_images": "../coco/train",
                                 "train_annotations": "../coco/train.json",
                                 "val_images": "../coco/val", "val_annotations": "../coco/val.json"},
        "grid": {"detector.min_size": [800]}}))
    cfg = load_study(str(path)).trials()[0].config
    assert cfg.data.train_images == str(tmp_path / "coco" / "train")
    assert os.path.isabs(cfg.data.val_annotations)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("schedule.epochs=2") == ("schedule.epochs", 2)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=non_local") == ("a", "non_local")
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("schedule.epochs")


def test_apply_override_finds_dotted_grid_keys():
    mapping = {"name": "x", "grid": {"detector.balanced_l1_loss.enabled": [False, True]},
               "schedule": {"epochs": 12}}
    apply_override(mapping, "grid.detector.balanced_l1_loss.enabled", [True])
    apply_override(mapping, "grid.detector.min_size", [128, 160])
    apply_override(mapping, "schedule.epochs", 2)
    apply_override(mapping, "resources.concurrency", 1)
    assert mapping["grid"] == {"detector.balanced_l1_loss.enabled": [True],
                               "detector.min_size": [128, 160]}
    assert mapping["schedule"] == {"epochs": 2}
    assert mapping["resources"] == {"concurrency": 1}


def test_overrides_reach_search_space_bounds():
    path = os.path.join(ROOT, "studies", "quickstart_search.yaml")
    study = load_study(path, ["search.space.detector.balanced_l1_loss.gamma.high=2.5",
                              "search.num_trials=3"])
    assert study.spec.search.space["detector.balanced_l1_loss.gamma"].high == 2.5
    assert study.spec.search.num_trials == 3


def test_config_keys_lists_leaves_only():
    keys = config_keys()
    assert "detector.balanced_l1_loss.alpha" in keys
    assert "data.synthetic.num_train" in keys
    assert "detector.balanced_l1_loss" not in keys


# Each bad study: (overrides on the quick-start, the one line's expected key and words).
BAD = [
    (["grid.detector.balanced_l1_loss.alpah=[0.2, 0.5]"], "grid.detector.balanced_l1_loss.alpah: unknown key"),
    (["grid={}"], "grid: the grid is empty"),
    (["grid.detector.balanced_l1_loss.enabled=[]"], "grid.detector.balanced_l1_loss.enabled: empty list"),
    (["grid.detector.balanced_l1_loss.alpha=[0.5, -1]"], "grid.detector.balanced_l1_loss.alpha[1]:"),
    (["grid.detector.balanced_l1_loss=[1]"], "grid.detector.balanced_l1_loss: detector.balanced_l1_loss is a section"),
    (["grid.detector.min_size=160"], "grid.detector.min_size: a grid axis is a list"),
    (["detector.min_sise=160"], "unknown key 'detector.min_sise'"),
    (["schedule.epochs=many"], "schedule.epochs must be an integer"),
    (["resources.workers=two"], "resources.workers: Input should be a valid integer"),
    (["resources.workers=0"], "resources.workers: Input should be greater than or equal to 1"),
    (["resources.gpus=1"], "resources.gpus: unknown key"),
    (["resources.workers=2", "resources.gpus_per_worker=0.5"], "resources.gpus_per_worker: DDP"),
    (["resources.gpus_per_worker=1", "schedule.device=cpu"], "resources.gpus_per_worker: GPUs requested"),
    (["seeds=[]"], "seeds: empty"),
    (["max_retries=-1"], "max_retries: Input should be greater than or equal to 0"),
    (["colour=blue"], "colour: unknown key"),
    (["search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 0.1, high: 1}}, num_trials: 2}"],
     "give exactly one of `grid:`"),
    (["grid=null", "search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 1, high: 0.1}}, num_trials: 2}"],
     "search.space.detector.balanced_l1_loss.alpha: `low` must be below `high`"),
    (["grid=null", "search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 0, high: 1}}, num_trials: 2}"],
     "search.space.detector.balanced_l1_loss.alpha: the range reaches an invalid value"),
    (["grid=null", "search={space: {detector.backbone: {type: float, low: 0.1, high: 1}}, num_trials: 2}"],
     "search.space.detector.backbone: a float range needs a number setting"),
    (["grid=null", "search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 0.1, high: 1}}, "
      "num_trials: 2, metric: mAP}"], "search.metric: unknown metric 'mAP'"),
    (["grid=null", "search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 0.1, high: 1}}, "
      "num_trials: 2, first_trials: [{detector.balanced_l1_loss.alpha: 3}]}"],
     "search.first_trials[0].detector.balanced_l1_loss.alpha: 3 is outside the space"),
    (["grid=null", "search={space: {detector.balanced_l1_loss.alpha: {type: float, low: 0.1, high: 1}}, "
      "num_trials: 2, sampler: annealing}"], "search.sampler.name: Input should be"),
    (["reference=[{label: x, match: {detector.nope: 1}, metrics: {bbox_mAP: 0.3}}]"],
     "reference[0].match.detector.nope: unknown key"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1].split(":")[0][:40] for b in BAD])
def test_bad_study_is_one_line_naming_file_and_key_exit_2(overrides, expected, capsys):
    argv = ["run", QUICKSTART, "--dry-run"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert "quickstart.yaml: " in err
    assert expected in err


def test_bad_yaml_and_missing_file_are_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ngrid: {a: [1, 2\n")
    assert main(["run", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.yaml: not valid YAML" in err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_dry_run_lists_trials_and_resources(capsys):
    assert main(["run", QUICKSTART, "--dry-run", "--set", "seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "16 trials" in out
    assert "1 worker(s) x (1 CPU)" in out
    for key in (t.key for t in load_study(QUICKSTART, ["seeds=[0, 1]"]).trials()):
        assert key in out


def test_concurrency_follows_resources_and_impossible_requests_fail():
    study = load_study(QUICKSTART)  # 1 CPU per trial, concurrency 2
    assert plan_concurrency(study, [{"CPU": 8.0}], "here") == 2
    assert plan_concurrency(study, [{"CPU": 1.0}], "here") == 1
    ddp = load_study(QUICKSTART, ["resources.workers=2", "resources.cpus_per_worker=2",
                                  "resources.concurrency=null"])
    assert plan_concurrency(ddp, [{"CPU": 4.0}, {"CPU": 4.0}], "here") == 2
    gpus = load_study(QUICKSTART, ["resources.gpus_per_worker=1", "resources.workers=4"])
    with pytest.raises(UserError, match="resources: each worker needs 1 CPU \\+ 1 GPU"):
        plan_concurrency(gpus, [{"CPU": 16.0}], "a local Ray cluster")
    with pytest.raises(UserError, match="a trial needs 4 worker"):
        plan_concurrency(gpus, [{"CPU": 16.0, "GPU": 2.0}], "a local Ray cluster")
    assert plan_concurrency(gpus, [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}], "x") == 2
