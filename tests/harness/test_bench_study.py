"""A study with a `bench:` block: the component-cost benchmark as one Ray task on the study's
resources, recorded by the driver as a child run under the study's parent run; resumable."""
from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient

from harness.cli import main
from harness.spec import load_study
from harness.tracking import default_uri, trial_runs

pytestmark = pytest.mark.slow

BENCH = {"iters": 2, "warmup": 1, "batch": 1, "what": ["model"], "memory": "off", "image_size": [64, 96]}
TINY = {"min_size": 64, "max_size": 96}


def _bench_study(write_study, name, bench=BENCH):
    return write_study(name, bench=bench, detector=TINY)


def test_bench_study_is_one_tracked_trial_and_is_not_rerun(ray_cluster, write_study, tmp_path, capsys):
    path = _bench_study(write_study, "bench_tiny")
    work = tmp_path / "work"
    assert main(["run", path, "--work-dir", str(work), "--dry-run"]) == 0
    assert "the component-cost benchmark (model)" in capsys.readouterr().out

    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "Component costs against the baseline" in out

    uri = default_uri(str(work))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench_tiny")
    parents = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["libra.kind"] == "bench"
    children = trial_runs(uri, "bench_tiny")
    assert len(children) == 1
    child = children.iloc[0]
    assert child["tags.mlflow.parentRunId"] == parents[0].info.run_id
    assert child["status"] == "FINISHED" and child["tags.libra.trial_state"] == "finished"
    assert child["tags.libra.trial_key"] == load_study(path).bench_trial().key
    assert child["metrics.bench.baseline.train_time_ratio"] == 1.0
    assert child["metrics.bench.libra_all_three.train_step_s"] > 0
    assert child["params.bench.iters"] == "2" and child["params.detector.min_size"] == "64"
    run_id = child["run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"bench.md", "config.yaml"} <= artifacts

    # Re-run: the finished trial is kept, nothing is measured again.
    assert main(["run", path, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "already done in an earlier run" in out
    assert "Component costs" not in out
    children = trial_runs(uri, "bench_tiny")
    assert list(children["run_id"]) == [run_id]
    parents = client.search_runs([experiment.experiment_id], "tags.`libra.role` = 'study'")
    assert len(parents) == 2
    assert {p.data.metrics["trials_finished"] for p in parents} == {0.0, 1.0}

    # `libra report` says there is no ablation table, in one line, and does not fail.
    assert main(["report", path, "--work-dir", str(work), "--out", str(tmp_path / "rep")]) == 0
    assert "no ablation table" in capsys.readouterr().out


def test_bad_bench_key_is_one_line_exit_2(write_study, tmp_path, capsys):
    path = _bench_study(write_study, "bench_bad", bench={**BENCH, "itres": 3})
    assert main(["run", path, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bench_bad.yaml: bench.itres: unknown key" in err and "iters" in err
    assert not os.path.exists(tmp_path / "w")


def test_bench_with_grid_or_amp_on_cpu_is_rejected(write_study, tmp_path, capsys):
    both = write_study("bench_both", bench=BENCH, grid={"detector.balanced_l1_loss.enabled": [True]})
    assert main(["run", both, "--dry-run"]) == 2
    assert "give exactly one of" in capsys.readouterr().err
    amp = _bench_study(write_study, "bench_amp", bench={**BENCH, "amp": True})
    assert main(["run", amp, "--dry-run"]) == 2
    assert "bench_amp.yaml: bench.amp: AMP needs a GPU" in capsys.readouterr().err


def test_shipped_bench_studies_validate():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("bench_cpu_quickstart", "bench_paper_gpu"):
        study = load_study(os.path.join(root, "studies", f"{name}.yaml"))
        assert study.kind == "bench" and study.varied_keys == []
