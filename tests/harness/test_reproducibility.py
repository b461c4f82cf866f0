"""Reproducibility inside `libra run` (issue 13, item 6): the same configuration and seed gives
the same losses and the same AP when two copies train at once as Ray tasks, and when one of
them is killed mid-trial and resumed from its checkpoint. Real Ray, MLflow SQLite, the engine.

The two copies differ only in `data.root`, a placement key (the synthetic set is generated
from its own seed, so both roots hold the same images): the report treats them as one
configuration, the harness as two trials that run side by side.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
from mlflow import MlflowClient

from harness.cli import main
from harness.spec import load_study
from harness.tracking import default_uri, trial_runs

pytestmark = pytest.mark.slow


def _histories(work, experiment):
    client = MlflowClient(default_uri(str(work)))
    runs = trial_runs(default_uri(str(work)), experiment)
    out = {}
    for _, run in runs.iterrows():
        out[run["tags.libra.trial_key"]] = {
            name: [m.value for m in sorted(client.get_metric_history(run["run_id"], name),
                                           key=lambda m: m.step)]
            for name in ("loss", "bbox_mAP", "bbox_mAP_50", "bbox_AR_100")}
    return out


def test_two_copies_at_once_and_a_resumed_copy_give_identical_numbers(ray_cluster, write_study,
                                                                      tmp_path):
    import psutil

    roots = [str(tmp_path / "copy-a"), str(tmp_path / "copy-b")]
    path = write_study("repro", grid={"data.root": roots}, schedule={"epochs": 3},
                       resources={"concurrency": 2}, max_retries=1)
    trials = load_study(path).trials()
    keys = [t.key for t in trials]
    work = tmp_path / "work"
    checkpoint = work / "trials" / keys[1] / "checkpoint.pt"
    killed = []

    def kill_second_copy_after_its_first_checkpoint():
        deadline = time.monotonic() + 180
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(f"trial-{keys[1]}" in part for part in proc.info["cmdline"] or []):
                proc.kill()  # the second copy's Ray worker, started by this test's cluster
                killed.append(proc.info["pid"])

    killer = threading.Thread(target=kill_second_copy_after_its_first_checkpoint)
    killer.start()
    try:
        assert main(["run", path, "--work-dir", str(work)]) == 0
    finally:
        killer.join()
    assert killed, "the second copy's worker was never found to kill"
    record = json.loads((work / "trials" / keys[1] / "metrics.json").read_text())["attempt"]
    assert record["attempt_start_epoch"] >= 2  # it did resume from a checkpoint, not restart

    histories = _histories(work, "repro")
    first, second = histories[keys[0]], histories[keys[1]]
    assert len(first["loss"]) == len(second["loss"]) == 3
    # Bit for bit: the CPU kernels are deterministic and resume restores every random state
    # the next epochs draw from. (MLflow stores float64, so equality here is exact equality.)
    assert first == second
