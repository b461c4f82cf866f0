"""A finished study read back the way a researcher meets it in MLflow: a real `libra run` (Ray,
the engine, an SQLite store) and `libra report`, then everything the UI shows read through
MlflowClient: the per-configuration tag and short params of the trials, the parent's
description, base params, grid, plan, best trial and the report's files, the experiment's saved
view; and, where Debian's chromium is installed, the page `libra run` prints rendered by a real
headless browser against `mlflow server` on loopback (runs grouped by configuration, the
means over seeds on screen)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml
from mlflow import MlflowClient

from detectors.components import components
from harness import mlflow_view
from harness.cli import main
from harness.spec import flatten, load_study, render_value
from harness.tracking import default_uri
from tests.harness.conftest import TINY_BASE

pytestmark = pytest.mark.slow

BL1 = "detector.balanced_l1_loss.enabled"
ALPHA = "detector.balanced_l1_loss.alpha"
DESCRIPTION = "Balanced L1 on and off, two seeds: is the UI's view the report's?"
# conftest's tiny model and set, one epoch here: seconds per trial.
BASE = {**copy.deepcopy(TINY_BASE), "schedule": {**TINY_BASE["schedule"], "epochs": 1}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished(ray_cluster, data_root, tmp_path_factory):
    """`libra run` then `libra report` of a 2-configuration x 2-seed grid; what they printed."""
    root = tmp_path_factory.mktemp("mlflow-view")
    mapping = {"name": "ui-view", "description": DESCRIPTION, **copy.deepcopy(BASE),
               "grid": {BL1: [False, True]}, "seeds": [0, 1]}
    mapping["data"]["root"] = data_root
    path = root / "ui-view.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    work, out = root / "work", root / "results"
    with _captured() as run_out:
        assert main(["run", str(path), "--work-dir", str(work)]) == 0
    with _captured() as report_out:
        assert main(["report", str(path), "--work-dir", str(work), "--out", str(out)]) == 0
    uri = default_uri(str(work))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ui-view")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("libra.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("libra.role") == "trial"]
    return {"path": str(path), "uri": uri, "client": client, "experiment": experiment,
            "parents": parents, "trials": trials, "out": str(out), "study": load_study(str(path)),
            "run_out": run_out.text, "report_out": report_out.text}


class _Text:
    text = ""


class _captured:
    """Capture what the CLI prints (pytest's capsys is function-scoped; this fixture is not)."""

    def __enter__(self):
        import io

        self.result, self.buffer, self.saved = _Text(), io.StringIO(), sys.stdout
        sys.stdout = self.buffer
        return self.result

    def __exit__(self, *exc):
        sys.stdout = self.saved
        self.result.text = self.buffer.getvalue()
        return False


# ------------------------------------------------------------------------------------------
# Trials: one tag per configuration, short params beside the dotted keys.
# ------------------------------------------------------------------------------------------
def test_trials_carry_a_seedless_configuration_tag_for_group_by(finished):
    trials = finished["trials"]
    assert len(trials) == 4
    by_config: dict[str, list[int]] = {}
    for run in trials:
        tags = run.data.tags
        by_config.setdefault(tags["libra.config"], []).append(int(tags["libra.seed"]))
        assert tags["libra.label"].endswith(f" seed={tags['libra.seed']}")
    # Every component in declaration order (IoU sampling and the BFP are on by default, as in
    # the paper's Libra R-CNN), the seed left out: two seeds per group.
    assert {k: sorted(v) for k, v in by_config.items()} == {
        "+ibs +bfp -bl1": [0, 1], "+ibs +bfp +bl1": [0, 1]}


def test_short_param_aliases_agree_with_the_dotted_keys(finished):
    for run in finished["trials"]:
        params = run.data.params
        for comp in components():
            assert params[comp.code] == params[comp.key]  # "true" | "false", the same text
        assert params["seed"] == params["schedule.seed"] == run.data.tags["libra.seed"]
    assert {r.data.params["bl1"] for r in finished["trials"]} == {"true", "false"}


def test_a_varied_setting_gets_its_short_name_in_the_tag_and_params(tmp_path):
    mapping = {"name": "alpha-grid", **copy.deepcopy(BASE),
               "grid": {ALPHA: [0.3, 0.5]}, "seeds": [0, 1]}
    mapping["detector"].update({"iou_balanced_sampling": {"enabled": False},
                                "balanced_feature_pyramid": {"enabled": False}})
    path = tmp_path / "alpha.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    study = load_study(str(path))
    plan = study.trials()[2]  # alpha 0.5, seed 0 (last axis fastest, seeds innermost)
    assert mlflow_view.config_label(plan, study) == "-ibs -bfp +bl1 alpha=0.5"
    assert mlflow_view.param_aliases(plan, study) == {"ibs": False, "bfp": False, "bl1": True,
                                                      "seed": 0, "alpha": 0.5}
    assert mlflow_view.alias_names(study) == ["ibs", "bfp", "bl1", "seed", "alpha"]


# ------------------------------------------------------------------------------------------
# The parent run: description, base params and grid, the plan, the best trial, the report.
# ------------------------------------------------------------------------------------------
def test_parent_has_the_description_base_params_grid_and_plan(finished):
    (parent,) = finished["parents"]
    study = finished["study"]
    assert parent.data.tags["mlflow.note.content"] == DESCRIPTION
    params = parent.data.params
    for key, value in flatten(study.base).items():
        assert params[f"base.{key}"] == render_value(value)
    assert json.loads(params[f"grid.{BL1}"]) == [False, True]
    assert json.loads(params["seeds"]) == [0, 1] and params["kind"] == "grid"
    client = finished["client"]
    with tempfile.TemporaryDirectory() as tmp:
        plan = open(client.download_artifacts(parent.info.run_id, "plan.md", tmp)).read()
    assert "4 trials" in plan and "BL1" in plan  # the --dry-run table


def test_parent_names_the_best_trial(finished):
    (parent,) = finished["parents"]
    tags = parent.data.tags
    by_id = {r.info.run_id: r for r in finished["trials"]}
    best = by_id[tags["libra.best_run_id"]]  # a tie (a tiny model's equal APs) may name either
    assert best.data.metrics["bbox_mAP"] == max(r.data.metrics["bbox_mAP"] for r in by_id.values())
    assert tags["libra.best_run_name"] == best.data.tags["libra.label"] == best.info.run_name
    assert tags["libra.best_config"] == best.data.tags["libra.config"]
    assert parent.data.metrics["best_bbox_mAP"] == best.data.metrics["bbox_mAP"]


def test_run_and_report_log_their_tables_and_plots_on_the_parent(finished):
    (parent,) = finished["parents"]
    client = finished["client"]
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "plan.md", "summary.md", "report"} <= top
    logged = {os.path.basename(a.path) for a in client.list_artifacts(parent.info.run_id, "report")}
    on_disk = set(os.listdir(finished["out"]))
    assert {"report.md", "table.csv", "table.tex", "trials.csv", "effects.csv",
            "ap_bars.png", "curves_bbox_mAP.png"} <= logged
    assert logged == on_disk  # every file the report wrote, and only those
    with tempfile.TemporaryDirectory() as tmp:
        summary = open(client.download_artifacts(parent.info.run_id, "summary.md", tmp)).read()
        logged_csv = open(client.download_artifacts(parent.info.run_id, "report/table.csv", tmp)).read()
    assert "BL1" in summary and "AP50" in summary  # the closing table libra run printed
    assert summary.strip() in finished["run_out"]
    assert logged_csv == open(os.path.join(finished["out"], "table.csv")).read()


# ------------------------------------------------------------------------------------------
# The experiment: its description and kind, the saved view, the address printed.
# ------------------------------------------------------------------------------------------
def test_experiment_has_the_description_and_the_saved_ablation_view(finished):
    tags = finished["experiment"].tags
    assert tags["mlflow.note.content"] == DESCRIPTION
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState." + mlflow_view.VIEW_KEY])
    assert view["groupBy"] == {"aggregateFunction": "average",
                               "groupByKeys": [{"mode": "tag", "groupByData": "libra.config"}]}
    assert view["selectedColumns"][:6] == ["tags.`libra.config`", "params.`ibs`", "params.`bfp`",
                                           "params.`bl1`", "params.`seed`", "metrics.`bbox_mAP`"]


def test_run_and_report_print_the_address_of_the_runs_view(finished):
    url = (f"http://127.0.0.1:5000/#/experiments/{finished['experiment'].experiment_id}/runs"
           f"?workflowType=machine_learning&viewStateShareKey={mlflow_view.VIEW_KEY}")
    for printed in (finished["run_out"], finished["report_out"]):
        assert f"mlflow ui --backend-store-uri {finished['uri']}, then open {url}" in printed
    assert mlflow_view.view_url("http://mlflow:5000/", "7").startswith(
        "http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning")


# ------------------------------------------------------------------------------------------
# A real browser on the printed page.
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(finished, tmp_path):
    """`mlflow server` on loopback over the study's store, in its own process group (its job
    consumers outlive a SIGTERM to the parent), stopped by signalling that group only."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "w")
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", finished["uri"], "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # healthy after ~13 s on a quiet machine; far longer under load
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _rendered(url: str, profile: str) -> str:
    """The page's DOM after its scripts ran, from headless chromium (wide, so the table's
    virtualised columns are all drawn)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=2600,1400", "--virtual-time-budget=30000",
         "--dump-dom", url], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_printed_page_shows_the_ablation_in_a_real_browser(finished, mlflow_server, tmp_path):
    experiment_id = finished["experiment"].experiment_id
    url = mlflow_view.view_url(mlflow_server, experiment_id)
    dom = _rendered(url, str(tmp_path / "profile"))
    headers = set(re.findall(r'data-testid="sort-header-([^"]*)"', dom))
    assert {"libra.config", "ibs", "bfp", "bl1", "seed", "bbox_mAP", "bbox_mAP_50"} <= headers
    means: dict[str, float] = {}
    for run in finished["trials"]:
        means.setdefault(run.data.tags["libra.config"], []).append(run.data.metrics["bbox_mAP"])
    for config, values in means.items():
        assert f"Group: {config}<" in dom  # one row per configuration
        # The group row's bbox_mAP cell holds the average over its seeds.
        row_html = "".join(re.findall(
            r'row-id="tag\.libra\.config\.' + re.escape(config) + r'"(.*?)(?=role="row"|$)', dom, re.S))
        shown = re.findall(r'id="cell-metrics\.`bbox_mAP`-\d+"[^>]*><span[^>]*>\s*([-0-9.e+]+)\s*'
                           r'<span[^>]*>\(average\)', row_html)
        assert len(shown) == 1, (config, shown)
        assert float(shown[0]) == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12)
