"""The one rule for where a study's records live: flag, else the study's tracking block, else
a default under the work dir."""
from __future__ import annotations

import os

from harness.spec import Tracking
from harness.stores import resolve_stores


def test_defaults_live_under_the_work_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stores = resolve_stores("abl")
    assert stores.work_dir == os.path.join(str(tmp_path), "libra-work", "abl")
    assert stores.mlflow_uri == "sqlite:///" + os.path.join(stores.work_dir, "mlflow.db")
    assert stores.experiment == "abl" and stores.optuna_storage is None
    assert stores.optuna_where == os.path.join(stores.work_dir, "optuna.journal")


def test_the_study_file_then_the_flags_win(tmp_path):
    block = Tracking(uri="http://mlflow:5000", experiment="exp", optuna_storage="sqlite:///o.db")
    from_file = resolve_stores("abl", block, work_dir=str(tmp_path))
    assert (from_file.mlflow_uri, from_file.experiment, from_file.optuna_where) == (
        "http://mlflow:5000", "exp", "sqlite:///o.db")
    flags = resolve_stores("abl", block, work_dir=str(tmp_path), tracking_uri="sqlite:////x/m.db",
                           optuna_storage="postgresql://h/db")
    assert (flags.mlflow_uri, flags.optuna_storage, flags.experiment) == (
        "sqlite:////x/m.db", "postgresql://h/db", "exp")
    assert flags.work_dir == str(tmp_path)
