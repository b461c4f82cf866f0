"""What a study looks like in the MLflow UI: the names, tags and saved view a researcher reads there.

harness/tracking.py records everything; this module decides how it reads in `mlflow ui`:

Trial runs get
    tag    libra.config  the configuration without the seed, from the component declarations
                         (detectors/components.py): "-ibs +bfp -bl1", then any other varied
                         setting by its short name ("-ibs -bfp +bl1 alpha=0.3"). "Group by" on
                         it gives one row per configuration with the mean over seeds.
    params short aliases beside the dotted keys (which the report reads): one per component
           code (ibs, bfp, bl1: "true" | "false"), seed, and each other varied key's short name
           (alpha). MLflow's columns cut "detector.balanced_..." to the same few letters.

The parent run gets the study's description (mlflow.note.content, the run's "Description"),
the base config and the grid as params (base.<dotted key>, grid.<dotted key> = the values as
JSON, seeds), plan.md (the --dry-run text), and at the end the best trial (tags
libra.best_run_id, libra.best_run_name, libra.best_config; metric best_<metric>) and
summary.md (the closing table `libra run` prints). `libra report` logs its files there too
(report.md, *.csv, table.tex, *.png) under report/.

The experiment gets its description (mlflow.note.content), mlflow.experimentKind =
custom_model_development, and a saved view (tag mlflow.sharedViewState.<VIEW_KEY>: runs grouped
by libra.config, columns ibs/bfp/bl1/seed, the AP metrics and s/iter). MLflow 3.17.2's UI
ignores experimentKind (its workflow switch is always on and starts on "GenAI" unless the URL
says otherwise), so `libra run` and `libra report` print `view_url`, which opens the runs page
with `workflowType=machine_learning` and the saved view (`viewStateShareKey`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

from detectors.components import components
from harness.spec import Study, TrialPlan, component_codes, flatten, render_value, short_names

CONFIG_TAG = "libra.config"
VIEW_KEY = "libra-ablation"  # the saved view's key: the URL's viewStateShareKey
NOTE = "mlflow.note.content"  # MLflow's "Description" of a run or an experiment
KIND = "mlflow.experimentKind"
SHARED_VIEW = "mlflow.sharedViewState."
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
METRIC_COLUMNS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "mean_sec_per_iter")


# ------------------------------------------------------------------------------------------
# Trial runs.
# ------------------------------------------------------------------------------------------
def config_label(plan: TrialPlan, study: Study) -> str:
    """The trial's configuration without its seed: every component's switch in declaration
    order ("+ibs -bfp +bl1"), then each other setting the study varies ("alpha=0.3")."""
    flags = plan.config.detector.component_flags
    parts = [("+" if flags[c.name] else "-") + c.code for c in components()]
    codes = component_codes()
    short = short_names(study.varied_keys)
    for key, value in plan.params.items():
        if key in codes or key == "schedule.seed":
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else render_value(value)
        parts.append(f"{short.get(key, key)}={shown}")
    return " ".join(parts)


def param_aliases(plan: TrialPlan, study: Study) -> dict[str, Any]:
    """Short param names beside the dotted keys: component codes, seed, varied keys' suffixes.
    An alias never has a dot-free clash with a dotted key (those always have a dot)."""
    flags = plan.config.detector.component_flags
    aliases: dict[str, Any] = {c.code: flags[c.name] for c in components()}
    aliases["seed"] = plan.seed
    codes = component_codes()
    for key, name in short_names(study.varied_keys).items():
        if key in codes or key == "schedule.seed" or name in aliases:
            continue
        value = plan.params.get(key)
        if value is not None:
            aliases[name] = value
    return aliases


def alias_names(study: Study) -> list[str]:
    """The alias params every trial of `study` has, in column order."""
    names = [c.code for c in components()] + ["seed"]
    codes = component_codes()
    for key, name in short_names(study.varied_keys).items():
        if key not in codes and key != "schedule.seed" and name not in names:
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------
# The experiment: its description, its kind, the saved ablation view.
# ------------------------------------------------------------------------------------------
def view_state(study: Study) -> dict[str, Any]:
    """The saved view MLflow's UI applies for `?viewStateShareKey=VIEW_KEY`: the runs grouped
    by libra.config (mean over seeds), the alias params, the AP metrics and s/iter as columns."""
    def column(kind: str, name: str) -> str:  # the UI's canonical column key
        return f"{kind}.`{name}`"

    metric = study.metric
    metrics = [metric] + [m for m in METRIC_COLUMNS if m != metric]
    selected = ([column("tags", CONFIG_TAG)] + [column("params", p) for p in alias_names(study)]
                + [column("metrics", m) for m in metrics])
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
        "selectedColumns": selected,
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": CONFIG_TAG}]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
    }


def dress_experiment(client: Any, experiment_id: str, study: Study) -> None:
    """Description, kind and the saved view on the study's experiment (set on every run, so
    the view follows the study file's current grid)."""
    tags = {KIND: "custom_model_development",
            SHARED_VIEW + VIEW_KEY: json.dumps(view_state(study), separators=(",", ":"))}
    if study.spec.description:
        tags[NOTE] = study.spec.description
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)


def view_url(tracking_uri: str, experiment_id: str) -> str:
    """The address that opens the study's runs in MLflow's UI with the ablation view: the
    tracking server itself, or `mlflow ui`'s default address for a SQLite store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI
    return (f"{base}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")


def browse_hint(tracking_uri: str, experiment_id: str) -> str:
    """Two lines for the end of `libra run` / `libra report`: how to start the UI, what to open."""
    start = ("" if tracking_uri.startswith(("http://", "https://"))
             else f"mlflow ui --backend-store-uri {tracking_uri}, then ")
    return (f"browse: {start}open {view_url(tracking_uri, experiment_id)}\n"
            f"  (runs grouped by {CONFIG_TAG}, mean over seeds; without the link: \"Model "
            f"training\", Group by -> {CONFIG_TAG})")


# ------------------------------------------------------------------------------------------
# The parent run.
# ------------------------------------------------------------------------------------------
def parent_params(study: Study) -> dict[str, str]:
    """The study's base config (base.<dotted key>), its grid (grid.<dotted key>: the values as
    JSON) or search space (search.<dotted key>), and its seeds, as text."""
    params = {f"base.{k}": render_value(v) for k, v in flatten(study.base).items()}
    if study.spec.grid is not None:
        for key, values in study.spec.grid.items():
            params[f"grid.{key}"] = json.dumps(values, default=str)
    if study.spec.search is not None:
        for key, dim in study.spec.search.space.items():
            params[f"search.{key}"] = json.dumps(dim.model_dump(exclude_none=True), default=str)
    seeds = study.spec.seeds
    params["seeds"] = json.dumps(seeds.model_dump() if hasattr(seeds, "model_dump") else
                                 (seeds if seeds is not None else study.seeds))
    params["kind"] = study.kind
    return params


def dress_parent(client: Any, run_id: str, study: Study, plan_text: str) -> None:
    """The description, the base params and grid, and plan.md on a new parent run."""
    from mlflow.entities import Param, RunTag

    tags = [RunTag(NOTE, study.spec.description)] if study.spec.description else []
    items = [Param(k, v[:6000]) for k, v in sorted(parent_params(study).items())]
    for start in range(0, max(len(items), 1), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=items[start:start + 100], tags=tags if start == 0 else [])
    client.log_text(run_id, plan_text + "\n", "plan.md")


def best_trial(runs: Any, metric: str, direction: str) -> Optional[dict]:
    """The finished trial with the best `metric` in `runs` (harness.report.tidy_runs' frame),
    or None when none has it."""
    import math

    if runs is None or not len(runs) or metric not in runs.columns:
        return None
    done = [r for r in runs.to_dict("records") if r.get("state") == "finished"
            and r.get(metric) is not None and math.isfinite(float(r[metric]))]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda r: float(r[metric]))


def mark_best(client: Any, parent_id: str, runs: Any, metric: str, direction: str) -> Optional[dict]:
    """Say on the parent run which trial is best: tags libra.best_run_id, libra.best_run_name,
    libra.best_config, and the metric best_<metric> (over every finished trial of the study,
    earlier invocations' included)."""
    import time

    from mlflow.entities import Metric, RunTag

    best = best_trial(runs, metric, direction)
    if best is None:
        return None
    tags = best.get("tags") or {}
    items = [RunTag("libra.best_run_id", best["run_id"]),
             RunTag("libra.best_run_name", str(best.get("label") or best["run_id"])),
             RunTag("libra.best_config", tags.get(CONFIG_TAG) or str(best.get("label") or ""))]
    client.log_batch(parent_id, tags=items,
                     metrics=[Metric(f"best_{metric}", float(best[metric]),
                                     int(time.time() * 1000), 0)])
    return best


def log_files(client: Any, run_id: str, paths: Iterable[str], artifact_path: Optional[str] = None) -> None:
    """Log existing files as artifacts of `run_id` (the report's files on the parent run)."""
    for path in paths:
        if os.path.isfile(path):
            client.log_artifact(run_id, path, artifact_path)


def log_summary(client: Any, run_id: str, text: str) -> None:
    """`libra run`'s closing table (and effects) as summary.md on the parent run."""
    client.log_text(run_id, text + "\n", "summary.md")


def latest_parent(client: Any, experiment_id: str) -> Optional[str]:
    """The run id of the study's latest parent run (the latest `libra run`), or None."""
    from mlflow.entities import ViewType

    runs = client.search_runs([experiment_id], filter_string="tags.`libra.role` = 'study'",
                              run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None

