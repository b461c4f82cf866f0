"""Optuna through the driver's helpers: a real journal file, first trials queued once, states
told correctly, and trials a dead driver left RUNNING recovered."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState

from harness import search
from harness.errors import UserError
from harness.spec import load_study

ALPHA = "detector.balanced_l1_loss.alpha"
BINS = "detector.iou_balanced_sampling.num_bins"
SPACE = {ALPHA: {"type": "float", "low": 0.1, "high": 1.0, "log": True},
         BINS: {"type": "int", "low": 2, "high": 5}}


@pytest.fixture
def study(write_study):
    return load_study(write_study(
        "search", search={"space": SPACE, "num_trials": 4, "sampler": {"name": "tpe", "seed": 0},
                          "pruner": "median", "first_trials": [{ALPHA: 0.5, BINS: 3}]}))


def test_first_trials_come_first_and_are_queued_once(study, tmp_path):
    ostudy = search.open_study(study, str(tmp_path))
    assert (tmp_path / "optuna.journal").exists()
    search.open_study(study, str(tmp_path))  # a resumed run must not queue them again
    trial = ostudy.ask()
    assert search.suggest(trial, study) == {ALPHA: 0.5, BINS: 3}
    assert trial.user_attrs[search.PARAMS_ATTR] == {ALPHA: 0.5, BINS: 3}
    proposed = search.suggest(ostudy.ask(), study)
    assert 0.1 <= proposed[ALPHA] <= 1.0 and isinstance(proposed[BINS], int)


def test_states_pruned_fail_complete_and_what_counts(study, tmp_path):
    ostudy = search.open_study(study, str(tmp_path))
    complete, pruned, failed = ostudy.ask(), ostudy.ask(), ostudy.ask()
    for trial in (complete, pruned, failed):
        search.suggest(trial, study)
    complete.report(0.2, 1)
    search.tell_complete(ostudy, complete, 0.3)
    pruned.report(0.01, 1)
    search.tell_pruned(ostudy, pruned)
    search.tell_failed(ostudy, failed, "NonFiniteLossError: loss is nan")
    states = {t.number: t for t in ostudy.get_trials()}
    assert states[0].state == TrialState.COMPLETE and states[0].value == pytest.approx(0.3)
    assert states[1].state == TrialState.PRUNED
    assert states[2].state == TrialState.FAIL
    assert states[2].user_attrs[search.REASON_ATTR] == "NonFiniteLossError: loss is nan"
    assert search.counted_trials(ostudy) == 3
    nan = ostudy.ask()
    search.suggest(nan, study)
    search.tell_complete(ostudy, nan, float("nan"))  # never COMPLETE without a real score
    assert ostudy.get_trials()[-1].state == TrialState.FAIL


def test_running_trials_of_a_dead_driver_fail_and_are_queued_again(study, tmp_path):
    ostudy = search.open_study(study, str(tmp_path))
    first = ostudy.ask()
    params = search.suggest(first, study)
    # The driver is killed here: the journal keeps the trial RUNNING forever.
    reopened = search.open_study(study, str(tmp_path))
    assert search.recover_interrupted(reopened) == [0]
    frozen = reopened.get_trials()[0]
    assert frozen.state == TrialState.FAIL and search.REASON_ATTR not in frozen.user_attrs
    assert search.counted_trials(reopened) == 0  # interrupted trials do not use up the budget
    again = reopened.ask()
    assert search.suggest(again, study) == params  # same settings, so the same trial key


def test_grid_recovery_does_not_queue(write_study, tmp_path):
    grid = load_study(write_study("grid", grid={ALPHA: [0.2, 0.5]}))
    ostudy = search.open_study(grid, str(tmp_path))
    trial = ostudy.ask()
    search.pin(trial, {ALPHA: 0.2})
    reopened = search.open_study(grid, str(tmp_path))
    assert search.recover_interrupted(reopened, requeue=False) == [0]
    assert not reopened.get_trials(states=(TrialState.WAITING,))


def test_a_changed_categorical_space_is_a_user_error(write_study, tmp_path):
    space = {"detector.balanced_feature_pyramid.refine_type":
             {"type": "categorical", "choices": ["conv", "non_local"]}}
    before = load_study(write_study("cat", search={"space": space, "num_trials": 2, "pruner": "none"}))
    ostudy = search.open_study(before, str(tmp_path))
    search.tell_complete(ostudy, _asked(ostudy, before), 0.1)
    space["detector.balanced_feature_pyramid.refine_type"]["choices"] = ["none", "conv"]
    after = load_study(write_study("cat", search={"space": space, "num_trials": 2, "pruner": "none"}))
    reopened = search.open_study(after, str(tmp_path))
    with pytest.raises(UserError, match="search.space.detector.balanced_feature_pyramid.refine_type"):
        search.suggest(reopened.ask(), after)


def test_samplers_by_name(study, write_study):
    assert type(search.make_sampler(study)).__name__ == "TPESampler"
    grid = load_study(write_study("g", search={
        "space": {BINS: {"type": "int", "low": 2, "high": 4}}, "num_trials": 3, "sampler": "grid"}))
    assert type(search.make_sampler(grid)).__name__ == "GridSampler"
    assert type(search.make_pruner(study, epochs=12)).__name__ == "MedianPruner"


def _asked(ostudy, study):
    trial = ostudy.ask()
    search.suggest(trial, study)
    return trial
