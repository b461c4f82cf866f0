"""`libra run` end to end: real Ray (a local 2-CPU cluster), real MLflow SQLite, real Optuna
journal, the real engine on a tiny model. Slow (seconds to a minute each); they run in CI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.search import KEY_ATTR, REASON_ATTR, storage_for
from harness.spec import load_study
from harness.tracking import default_uri, trial_runs
from tests.harness.conftest import LONG_EPOCH_DATA, checkpoint_epoch

pytestmark = pytest.mark.slow

BFP = "detector.balanced_feature_pyramid.enabled"
BL1 = "detector.balanced_l1_loss.enabled"
GRID = {BFP: [False, True], BL1: [False, True]}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _optuna_trials(work, name):
    study = optuna.load_study(study_name=name, storage=storage_for(str(work)))
    return study.get_trials()


def _runs(work, name):
    return trial_runs(default_uri(str(work)), name)


def test_grid_end_to_end_then_rerun_trains_nothing(ray_cluster, write_study, tmp_path, capsys):
    path = write_study("grid4", grid=GRID)
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "4/4 trials done" in out and "0 failed" in out
    assert "BFP" in out and "AP50" in out and "ΔAP" in out  # the comparison table
    assert "Effects (factorial, seed as a block" in out and "p_holm" in out  # effects.csv's rows

    client = MlflowClient(default_uri(str(work)))
    experiment = client.get_experiment_by_name("grid4")
    parents = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _runs(work, "grid4")
    assert len(children) == 4
    assert set(children["tags.mlflow.parentRunId"]) == {parents[0].info.run_id}
    assert set(children["status"]) == {"FINISHED"}
    assert set(children["tags.libra.trial_state"]) == {"finished"}
    assert children["metrics.bbox_mAP"].notna().all()
    expected = {t.key for t in load_study(path).trials()}
    assert set(children["tags.libra.trial_key"]) == expected
    run_id = children.loc[0, "run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "bbox_mAP")] == [1, 2]
    assert "eval_summary.txt" in {a.path for a in client.list_artifacts(run_id)}

    trials = _optuna_trials(work, "grid4")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {t.user_attrs[KEY_ATTR] for t in trials} == expected
    for key in expected:
        assert os.path.isfile(work / "trials" / key / "checkpoint.pt")

    # The same command again: everything is done, nothing trains, nothing is duplicated.
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s) already done" in out and "start " not in out
    assert len(_runs(work, "grid4")) == 4
    assert len(_optuna_trials(work, "grid4")) == 4


def test_search_with_pruner_records_pruned_and_complete(ray_cluster, write_study, tmp_path, capsys):
    # The pruner's evidence must be deterministic on a tiny set, so this search minimises the
    # training loss (same code path as validation AP): a learning rate of 1e-5 cannot keep up
    # with 0.02 and is pruned at epoch 2, after one warm-up epoch.
    lr = {"schedule.lr": {"type": "categorical", "choices": [0.02, 1.0e-5]}}
    path = write_study("prune", schedule={"epochs": 3}, resources={"concurrency": 1}, search={
        "space": lr, "num_trials": 2, "metric": "loss", "direction": "minimize",
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 1},
        "first_trials": [{"schedule.lr": 0.02}, {"schedule.lr": 1.0e-5}]})
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "1 pruned" in out

    trials = _optuna_trials(work, "prune")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].params == {"schedule.lr": 0.02}
    assert sorted(trials[1].intermediate_values) == [1, 2]  # stopped after epoch 2 of 3

    runs = _runs(work, "prune").set_index("tags.libra.trial_key")
    done, pruned = runs.loc[trials[0].user_attrs[KEY_ATTR]], runs.loc[trials[1].user_attrs[KEY_ATTR]]
    assert done["tags.libra.trial_state"] == "finished" and done["status"] == "FINISHED"
    assert done["metrics.loss"] == pytest.approx(trials[0].value)
    assert pruned["tags.libra.trial_state"] == "pruned" and pruned["status"] == "KILLED"
    client = MlflowClient(default_uri(str(work)))
    assert [m.step for m in client.get_metric_history(pruned["run_id"], "loss")] == [1, 2]


def test_trial_with_two_cpu_workers_runs_ddp(ray_cluster, write_study, tmp_path, capsys):
    path = write_study("ddp", grid={BL1: [True]},
                       resources={"workers": 2, "cpus_per_worker": 1, "concurrency": 1})
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 0
    assert "2 worker(s) x (1 CPU), DDP" in capsys.readouterr().out
    runs = _runs(work, "ddp")
    assert len(runs) == 1
    assert runs.loc[0, "tags.libra.trial_state"] == "finished"
    assert runs.loc[0, "params.resources.workers"] == "2"
    assert runs["metrics.bbox_mAP"].notna().all()
    client = MlflowClient(default_uri(str(work)))
    history = client.get_metric_history(runs.loc[0, "run_id"], "loss")
    assert [m.step for m in history] == [1, 2]  # rank 0 alone reports: no duplicate epochs
    # What the worker itself saw: torch.distributed with 2 processes, each training on its half
    # of the 8 images (2 steps of 2 images per epoch; one process alone would take 4 steps).
    world = client.get_metric_history(runs.loc[0, "run_id"], "world_size")
    assert [(m.step, m.value) for m in world] == [(1, 2.0), (2, 2.0)]
    steps = client.get_metric_history(runs.loc[0, "run_id"], "attempt_steps")
    assert [(m.step, m.value) for m in steps] == [(1, 2.0), (2, 4.0)]


def test_failing_trial_is_retried_then_reported(ray_cluster, write_study, tmp_path, capsys):
    # A learning rate of 1e6 makes the loss NaN in the first iterations: a genuine failure.
    path = write_study("faults", grid={"schedule.lr": [0.01, 1.0e6]}, max_retries=1)
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 1
    out = capsys.readouterr().out
    assert "retry    lr=1e+06" in out
    assert "1 finished now, 0 pruned, 1 failed" in out
    assert "failed: lr=1e+06 seed=0: NonFiniteLossError" in out

    runs = _runs(work, "faults").set_index("params.schedule.lr")
    assert runs.loc["0.01", "tags.libra.trial_state"] == "finished"
    bad = runs.loc["1000000.0"]
    assert bad["status"] == "FAILED" and bad["tags.libra.trial_state"] == "failed"
    assert bad["tags.libra.attempts"] == "2"
    assert bad["tags.libra.failure_reason"].startswith("NonFiniteLossError: training loss became nan")
    states = {t.user_attrs["libra.params"]["schedule.lr"]: t for t in _optuna_trials(work, "faults")}
    assert states[0.01].state == TrialState.COMPLETE
    assert states[1.0e6].state == TrialState.FAIL
    assert "NonFiniteLossError" in states[1.0e6].user_attrs[REASON_ATTR]


def test_impossible_resources_fail_before_any_trial(ray_cluster, write_study, tmp_path, capsys):
    path = write_study("gpus", grid={BL1: [True]}, resources={"gpus_per_worker": 4})
    assert main(["run", path, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "gpus.yaml: resources: each worker needs 1 CPU + 4 GPU" in err
    assert len(_runs(tmp_path / "w", "gpus")) == 0


def test_resume_after_the_driver_is_killed(ray_cluster, write_study, tmp_path, capsys):
    path = write_study("killed", grid=GRID, schedule={"epochs": 3}, resources={"concurrency": 1},
                       data=LONG_EPOCH_DATA)
    work = tmp_path / "work"
    labels = [t.label for t in load_study(path).trials()]
    argv = ["run", path, "--work-dir", str(work)]
    # The driver in its own process group, with its own local Ray cluster, as a user runs it.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", *argv], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in driver.stdout:
            seen.append(line)
            # Kill once trial 1 finished and trial 2 has a checkpoint (epoch 1 is reported
            # only after its checkpoint is written).
            if f"{labels[1]}: epoch 1/3" in line or time.monotonic() > deadline:
                break
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        # The killed driver's Ray processes are ours to clean up.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = "".join(seen)
    assert f"finished {labels[0]}" in log, log
    assert f"{labels[1]}: epoch 1/3" in log, log

    before = _runs(work, "killed").set_index("tags.libra.trial_key")
    finished_before = set(before.index[before["tags.libra.trial_state"] == "finished"])
    assert finished_before
    keys = {t.label: t.key for t in load_study(path).trials()}
    cut_run = before.loc[keys[labels[1]], "run_id"]
    stamps = {k: os.path.getmtime(work / "trials" / k / "checkpoint.pt") for k in finished_before}
    cut_epoch = checkpoint_epoch(work / "trials" / keys[labels[1]])  # what the kill left: >= 1
    assert 1 <= cut_epoch < 3, f"trial 2 had trained {cut_epoch} of 3 epochs when killed"

    assert main(argv) == 0  # the same command, resumed (here on the test's Ray cluster)
    out = capsys.readouterr().out
    assert "resuming: 1 trial(s)" in out
    assert f"{len(finished_before)} trial(s) already done" in out
    # Resumed from its checkpoint, not from scratch: what the second attempt trained, as fit
    # recorded it, starts after the epoch the killed driver's checkpoint held (or one later: a
    # worker can outlive its driver by a moment and write one more), 48 steps an epoch.
    attempt = json.loads((work / "trials" / keys[labels[1]] / "metrics.json").read_text())["attempt"]
    start = attempt["attempt_start_epoch"]
    assert cut_epoch + 1 <= start <= 3
    assert attempt["attempt_steps"] == 48 * (3 - start + 1)

    after = _runs(work, "killed")
    assert len(after) == 4 and after["tags.libra.trial_key"].is_unique  # no duplicate runs
    assert set(after["tags.libra.trial_state"]) == {"finished"}
    assert after.set_index("tags.libra.trial_key").loc[keys[labels[1]], "run_id"] == cut_run
    for key, stamp in stamps.items():  # finished trials were not trained again
        assert os.path.getmtime(work / "trials" / key / "checkpoint.pt") == stamp
    client = MlflowClient(default_uri(str(work)))
    history = client.get_metric_history(cut_run, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch logged once
    states = [t.state for t in _optuna_trials(work, "killed")]
    assert states.count(TrialState.COMPLETE) == 4
    assert states.count(TrialState.FAIL) == 1  # the killed driver's RUNNING trial, now closed
    metrics = json.loads((work / "trials" / keys[labels[1]] / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


def test_ctrl_c_stops_cleanly_and_marks_nothing_finished(write_study, tmp_path):
    # 20 short epochs: the SIGINT sent after the first always lands while the trial still runs.
    path = write_study("ctrlc", grid={BL1: [False, True]}, schedule={"epochs": 20},
                       resources={"concurrency": 1})
    work = tmp_path / "work"
    first = load_study(path).trials()[0]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", path, "--work-dir", str(work)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    seen = []
    try:
        for line in driver.stdout:
            seen.append(line)
            if f"{first.label}: epoch 1/20" in line:
                driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert driver.wait(60) == 130, "".join(seen)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = "".join(seen)
    assert "re-run the same command to resume" in log, log
    assert "finished " not in log

    client = MlflowClient(default_uri(str(work)))
    experiment = client.get_experiment_by_name("ctrlc")
    parent = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'study'")[0]
    assert parent.info.status == "KILLED"
    runs = _runs(work, "ctrlc")
    assert len(runs) == 1
    assert runs.loc[0, "tags.libra.trial_state"] == "interrupted"
    assert runs.loc[0, "status"] == "KILLED"
    trials = _optuna_trials(work, "ctrlc")
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs.get("libra.interrupted") is True
    assert REASON_ATTR not in trials[0].user_attrs  # not a failure: it will resume


def test_a_search_proposing_the_same_configuration_trains_it_once(ray_cluster, write_study,
                                                                  tmp_path, capsys):
    space = {BL1: {"type": "categorical", "choices": [True]}}  # every proposal is the same
    path = write_study("dupes", search={"space": space, "num_trials": 3, "pruner": "none",
                                        "sampler": "random"})
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert out.count("start ") == 1
    assert "(measured before)" in out
    trials = _optuna_trials(work, "dupes")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({t.value for t in trials}) == 1
    assert len(_runs(work, "dupes")) == 1


def test_a_proposal_already_measured_is_answered_from_the_record(ray_cluster, write_study,
                                                                 tmp_path, capsys):
    # One trial at a time, so the second and third proposals come after the first has finished:
    # not parked behind a running twin (the test above) but found finished in the record. The
    # search minimises the training loss, which is never 0, so a value read from elsewhere (or
    # a retrained twin's) cannot pass for the recorded one by accident.
    space = {BL1: {"type": "categorical", "choices": [True]}}  # every proposal is the same
    path = write_study("measured", resources={"concurrency": 1}, search={
        "space": space, "num_trials": 3, "pruner": "none", "sampler": "random",
        "metric": "loss", "direction": "minimize"})
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert out.count("start ") == 1 and "3/3 trials done" in out

    runs = _runs(work, "measured")
    assert len(runs) == 1
    run = runs.iloc[0]
    recorded = run["metrics.loss"]
    assert recorded > 0
    # The run belongs to the trial that trained (trial 0); a relaunch would retag it.
    assert run["tags.libra.optuna_trial"] == "0"
    client = MlflowClient(default_uri(str(work)))
    # finish_trial logs the trial's wall time once per training that reached the end.
    assert len(client.get_metric_history(run["run_id"], "trial_wall_seconds")) == 1
    trials = _optuna_trials(work, "measured")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert {t.user_attrs[KEY_ATTR] for t in trials} == {run["tags.libra.trial_key"]}
    assert [t.value for t in trials] == pytest.approx([recorded] * 3, rel=1e-12)
    # Only the trial that trained reported epochs; the answered ones never ran (a launched
    # twin is handed the logged epochs for the pruner, so it would show them too).
    assert sorted(trials[0].intermediate_values) == [1, 2]
    assert trials[1].intermediate_values == {} and trials[2].intermediate_values == {}

    # A later invocation with a larger budget: the new proposal is answered from MLflow's record
    # (the driver's memory of this run is gone), still without training.
    argv = ["run", path, "--work-dir", str(work), "--set", "search.num_trials=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(measured before)" in out and "start " not in out
    trials = _optuna_trials(work, "measured")
    assert len(trials) == 4 and trials[3].state == TrialState.COMPLETE
    assert trials[3].value == pytest.approx(recorded, rel=1e-12)
    assert trials[3].intermediate_values == {}
    assert len(_runs(work, "measured")) == 1
    assert len(client.get_metric_history(run["run_id"], "trial_wall_seconds")) == 1


def test_a_killed_worker_is_retried_from_its_checkpoint(ray_cluster, write_study, tmp_path, capsys):
    import threading

    import psutil

    path = write_study("worker", grid={BL1: [True]}, schedule={"epochs": 4}, max_retries=1)
    key = load_study(path).trials()[0].key
    checkpoint = tmp_path / "work" / "trials" / key / "checkpoint.pt"
    killed = []

    def kill_worker_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(f"trial-{key}" in part for part in proc.info["cmdline"] or []):
                proc.kill()  # the trial's Ray worker process, which this test's cluster started
                killed.append(proc.info["pid"])

    killer = threading.Thread(target=kill_worker_after_first_checkpoint)
    killer.start()
    try:
        assert main(["run", path, "--work-dir", str(tmp_path / "work")]) == 0
    finally:
        killer.join()
    assert killed
    out = capsys.readouterr().out
    assert "retry " in out and "finished +bl1" in out
    runs = _runs(tmp_path / "work", "worker")
    assert len(runs) == 1 and runs.loc[0, "tags.libra.attempts"] == "2"
    history = MlflowClient(default_uri(str(tmp_path / "work"))).get_metric_history(
        runs.loc[0, "run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # each epoch once
    # Resumed, not restarted: the second attempt's own record (fit's, at every epoch it trained)
    # starts after the checkpoint the first attempt left, and took 4 steps per epoch it trained.
    client = MlflowClient(default_uri(str(tmp_path / "work")))
    starts = {m.step: m.value for m in client.get_metric_history(runs.loc[0, "run_id"], "attempt_start_epoch")}
    assert starts[1] == 1.0  # epoch 1: the first attempt, from scratch
    resumed_at = int(starts[4])
    assert resumed_at >= 2 and all(starts[e] == resumed_at for e in range(resumed_at, 5))
    attempt = json.loads((tmp_path / "work" / "trials" / key / "metrics.json").read_text())["attempt"]
    assert attempt == {"attempt_start_epoch": resumed_at, "attempt_steps": 4 * (5 - resumed_at),
                       "world_size": 1}
