"""Seeds in rounds (issue 13, item 4): `seeds: {initial, max, until_half_width}` grows a grid a
seed at a time until every main effect's 95% half-width meets the target or the cap is reached;
each round is printed and tagged on the parent run; a re-run resumes the rounds without
training anything twice. Real Ray, MLflow SQLite, Optuna, the engine on a tiny model."""
from __future__ import annotations

import pytest
from mlflow import MlflowClient

from harness.cli import main
from harness.spec import SpecError, load_study
from harness.tracking import default_uri, trial_runs

pytestmark = pytest.mark.slow

BL1 = "detector.balanced_l1_loss.enabled"


def test_rounds_stop_when_resolved_then_grow_to_the_cap_on_a_stricter_target(
        ray_cluster, write_study, tmp_path, capsys):
    path = write_study("rounds", grid={BL1: [False, True]}, schedule={"epochs": 1},
                       seeds={"initial": 2, "max": 3, "until_half_width": 1000.0})
    work = tmp_path / "work"
    uri = default_uri(str(work))
    # A target no interval misses: round 1 (seeds 0-1, 4 trials, 1 residual df) resolves it.
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "round 1: seeds 0-1, widest main-effect 95% half-width" in out and "resolved" in out
    runs = trial_runs(uri, "rounds")
    assert len(runs) == 4 and sorted(runs["tags.libra.seed"].astype(int)) == [0, 0, 1, 1]

    # The same study with a target no interval meets and a cap of 4: round 1 is read back
    # (nothing retrains), rounds 2 and 3 add seeds 2 and 3 to both configurations, the cap ends
    # it, and the closing count says what this invocation trained (not the earlier rounds twice).
    strict = ["run", path, "--work-dir", str(work), "--set", "seeds.until_half_width=1.0e-12",
              "--set", "seeds.max=4"]
    assert main(strict) == 0
    out = capsys.readouterr().out
    assert "4 trial(s) already done" in out
    assert "round 1: seeds 0-1" in out and "adding seed 2 to every configuration" in out
    assert "round 2: seeds 0-2" in out and "adding seed 3 to every configuration" in out
    assert "round 3: seeds 0-3" in out and "stopping at the cap of 4 seeds, not resolved" in out
    assert "8/8 trials done: 4 from earlier runs, 4 finished now" in out
    runs = trial_runs(uri, "rounds")
    assert len(runs) == 8 and runs["tags.libra.trial_key"].is_unique
    assert sorted(runs["tags.libra.seed"].astype(int)) == [0, 0, 1, 1, 2, 2, 3, 3]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rounds")
    parents = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'study'",
                                 order_by=["attributes.start_time DESC"])
    latest = parents[0].data.tags
    assert latest["libra.seeds"] == "0,1,2,3" and len(latest["libra.rounds"].splitlines()) == 3
    # the closing table and effects cover all four seeds
    assert "Effects (factorial" in out
    # with what the rounds' stopping rule does to the intervals' coverage (simulated)
    assert ("seeds in rounds (2 per configuration, one more per round up to 4, until every main "
            "effect is within +-1e-12)") in out and "at the worst noise level" in out


def test_seed_rounds_are_validated_and_shown_by_dry_run(write_study, tmp_path, capsys):
    with pytest.raises(SpecError, match="max .* must be >= initial"):
        load_study(write_study("bad", grid={BL1: [False, True]},
                               seeds={"initial": 3, "max": 2, "until_half_width": 1.0}))
    with pytest.raises(SpecError, match="until_half_width"):
        load_study(write_study("bad2", grid={BL1: [False, True]}, seeds={"initial": 2, "max": 4}))
    path = write_study("shown", grid={BL1: [False, True]},
                       seeds={"initial": 2, "max": 5, "until_half_width": 1.5, "first": 10})
    study = load_study(path)
    assert study.seeds == [10, 11] and [t.seed for t in study.trials()] == [10, 11, 10, 11]
    assert main(["run", path, "--dry-run", "--work-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "seeds in rounds: 2 to start (10-11)" in out and "at most 5 seeds (10 trials)" in out
