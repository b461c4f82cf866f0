"""The comparison table printed at the end of `libra run` (a full report is `libra report`'s job).

Rows: a grid's points in the file's order (seeds averaged), or a search's best trials. Columns:
the component check marks, the other varied settings, COCO AP in percent (AP, AP50, AP75, APs,
APm, APl), seconds per training iteration, and the study's published reference AP when given.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

import yaml

from harness.spec import Study, short_names, render_value

COMPONENTS = {  # flag key -> column title
    "detector.iou_balanced_sampling.enabled": "IoU-sampling",
    "detector.balanced_feature_pyramid.enabled": "BFP",
    "detector.balanced_l1_loss.enabled": "BL1",
}
AP_COLUMNS = {
    "bbox_mAP": "AP", "bbox_mAP_50": "AP50", "bbox_mAP_75": "AP75",
    "bbox_mAP_s": "APs", "bbox_mAP_m": "APm", "bbox_mAP_l": "APl",
}
TOP_SEARCH_ROWS = 10


def comparison_table(frame: Any, study: Study) -> str:
    """Markdown table of the finished trials in `frame` (harness.tracking.trial_runs' columns)."""
    import pandas as pd

    if frame is None or len(frame) == 0:
        return "(no finished trials to compare)"
    frame = frame[frame["tags.libra.trial_state"] == "finished"]
    if len(frame) == 0:
        return "(no finished trials to compare)"
    varied = study.varied_keys
    short = short_names(varied)
    rows = []
    for _, run in frame.iterrows():
        params = json.loads(run.get("tags.libra.params") or "{}")
        row: dict[str, Any] = {"_order": _order(study, params)}
        for key in varied:
            value = params.get(key, _param(run, key))
            if key in COMPONENTS:
                row[COMPONENTS[key]] = "✓" if value is True else "✗" if value is False else "-"
            else:
                row[short[key]] = "-" if value is None else render_value(value)
        for metric, title in AP_COLUMNS.items():
            row[title] = 100.0 * _metric(run, metric)
        row["sec/iter"] = _metric(run, "mean_sec_per_iter")
        if study.kind == "search":
            row["trial"] = run.get("tags.libra.optuna_trial")
        reference = _reference_ap(study, run)
        if reference is not None:
            row["paper AP"] = 100.0 * reference
        rows.append(row)
    table = pd.DataFrame(rows)
    settings = [c for c in table.columns if c not in AP_COLUMNS.values()
                and c not in ("sec/iter", "paper AP", "_order", "trial")]
    if study.kind == "grid":
        numeric = [c for c in table.columns if c in AP_COLUMNS.values() or c in ("sec/iter", "paper AP")]
        grouped = table.groupby(settings, sort=False, dropna=False)
        table = grouped[numeric + ["_order"]].mean().reset_index()
        table["seeds"] = grouped.size().to_numpy()
        table = table.sort_values("_order")
    else:
        ascending = study.direction == "minimize"
        column = AP_COLUMNS.get(study.metric)
        if column is not None:
            table = table.sort_values(column, ascending=ascending).head(TOP_SEARCH_ROWS)
        table = table[["trial"] + [c for c in table.columns if c != "trial"]]
    table = table.drop(columns=["_order"])
    return table.to_markdown(index=False, floatfmt=".2f")


def _order(study: Study, params: dict) -> float:
    """Position of a grid point in the file's order (searches: no order)."""
    if study.kind != "grid":
        return 0.0
    for i, point in enumerate(study.grid_points()):
        if all(params.get(k) == v for k, v in point.items()):
            return float(i)
    return math.inf


def _param(run: Any, key: str) -> Any:
    text = run.get(f"params.{key}")
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _metric(run: Any, name: str) -> float:
    value = run.get(f"metrics.{name}")
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _reference_ap(study: Study, run: Any) -> Optional[float]:
    for row in study.spec.reference:
        if "bbox_mAP" in row.metrics and all(_param(run, k) == v for k, v in row.match.items()):
            return row.metrics["bbox_mAP"]
    return None
