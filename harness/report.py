"""A study's MLflow runs as pandas tables, and that one table as markdown, CSV and LaTeX.

Reads MLflow only (the schema in harness/tracking.py's docstring), so a report can be made on
any machine that reaches the tracking server.

The ablation table is the paper's Table 2: one row per configuration (the values of the keys
the study varies), a check-mark column per Libra component, COCO AP, AP50, AP75, APs, APm, APl,
the change in AP against the baseline row, and the cost (seconds per training iteration,
inference images per second, peak memory). Units: AP columns are MLflow's fractions x 100 (the
paper's percent); costs are as logged (s, images/s, MB).

Statistics. The finished trials of a configuration (one per seed) give, per metric, the mean,
the sample standard deviation (ddof = 1) and n; a NaN value is left out of its metric.

The change against the baseline row (ΔAP) is a paired comparison, not a difference of two
per-row means: every finished run enters one linear model, configuration + seed block
(harness.effects.delta_table), so a configuration is compared with the baseline seed by seed
and the noise is the residual variance pooled over every configuration (df = runs - rank). With
two seeds per cell a per-row Welch interval would rest on 1 df a side; the pooled one rests on
all of them, and a configuration run with one seed still gets an interval when the others leave
residual df. The comparisons are a family (every row against the baseline), so

    separated      Holm-adjusted p < 1 - c (family-wise error <= 5% at c = 0.95)
    [low, high]    Bonferroni-simultaneous: d -/+ t.ppf(1 - (1 - c) / (2 m), df) * se, m rows

An interval that excludes 0 implies Holm separation (Holm's p <= Bonferroni's), so no row is
marked as separated that the family-wise test does not separate; a row can be Holm-separated
with its simultaneous interval touching 0. With no residual df (every configuration once) the
delta is shown with "(no residual df, no CI)" and nothing is claimed. Failed, pruned,
interrupted and running trials never enter the model; `unfinished_trials` lists them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from detectors.components import components, count_word
from harness.errors import UserError
from harness.spec import render_value, short_names
from harness.tracking import KEY, ROLE, STATE, open_client, read_runs


# The component columns follow detectors.components at call time (a registered component shows).
def flags() -> tuple[str, ...]:
    """Component names, in declaration order: one bool column each in runs and tables."""
    return tuple(c.name for c in components())


def flag_keys() -> dict[str, str]:
    """Dotted switch key -> component name."""
    return {c.key: c.name for c in components()}


def component_titles() -> dict[str, str]:
    """Component name -> column header."""
    return {c.name: c.title for c in components()}


def __getattr__(name: str):
    # FLAGS, FLAG_KEYS, COMPONENT_TITLES as module attributes, computed on access.
    live = {"FLAGS": flags, "FLAG_KEYS": flag_keys, "COMPONENT_TITLES": component_titles}
    if name in live:
        return live[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CHECK = "✓"
NOT_SEPARATED = "†"  # Holm's family-wise test does not separate the row from the baseline
NO_CI = "no residual df, no CI"
NO_SPREAD = "no spread over seeds, no CI"


@dataclass(frozen=True)
class Column:
    """A metric column: MLflow's latest value of `metric`, shown times `scale` with `digits`."""

    metric: str  # MLflow metric name
    key: str  # CSV stem: AP -> AP_mean, AP_std, AP_n
    title: str  # markdown header
    latex: str  # LaTeX header
    scale: float = 1.0  # shown value = MLflow value * scale
    digits: int = 1


AP_COLUMNS = (
    Column("bbox_mAP", "AP", "AP", "AP", 100.0, 1),
    Column("bbox_mAP_50", "AP50", "AP50", "AP$_{50}$", 100.0, 1),
    Column("bbox_mAP_75", "AP75", "AP75", "AP$_{75}$", 100.0, 1),
    Column("bbox_mAP_s", "APs", "APs", "AP$_S$", 100.0, 1),
    Column("bbox_mAP_m", "APm", "APm", "AP$_M$", 100.0, 1),
    Column("bbox_mAP_l", "APl", "APl", "AP$_L$", 100.0, 1),
)
COST_COLUMNS = (
    Column("mean_sec_per_iter", "sec_per_iter", "train s/iter", "train s/iter", 1.0, 3),
    Column("eval_images_per_sec", "infer_img_per_sec", "eval img/s", "eval img/s", 1.0, 1),
    Column("max_peak_memory_mb", "peak_mem_mb", "mem (MB)", "mem (MB)", 1.0, 0),
)
DEFAULT_COLUMNS = AP_COLUMNS + COST_COLUMNS

# Keys that say where or how fast a trial ran, not what it computed: two trials that differ
# only here are the same configuration.
_PLACEMENT_KEYS = ("schedule.seed", "schedule.num_threads", "schedule.device", "detector.pretrained",
                   "data.root", "data.train_images", "data.val_images", "data.train_annotations",
                   "data.val_annotations", "resources.cpus_per_worker", "resources.gpus_per_worker")

_FIXED = ("run_id", "label", "trial_key", "state", "reason", "seed", "optuna_trial", "status",
          "start_time", "parent_run_id", "params", "config", "tags")


# ------------------------------------------------------------------------------------------
# MLflow -> pandas.
# ------------------------------------------------------------------------------------------
def load_study_runs(tracking_uri: str, experiment_name: str):
    """The study's trial runs (child runs tagged libra.role=trial), one row each, tidy.

    Columns: run_id, label, trial_key, state (libra.trial_state), reason (failures), seed,
    optuna_trial, status, start_time, parent_run_id; params (dict: the varied dotted keys ->
    values, from libra.params), config (dict: every dotted param, read back with
    yaml.safe_load), tags (dict); one bool column per component (flags()); and one float
    column per metric with MLflow's latest value (the value at the last step: the last
    evaluated epoch for bbox_*), in MLflow's units (AP as a fraction). Empty when the store,
    the experiment or its trials do not exist. Ordered by start time.
    """
    return _search(tracking_uri, experiment_name, "trial")


def load_parent_runs(tracking_uri: str, experiment_name: str):
    """The study's parent runs (one per `libra run` invocation): run_id, start_time, status,
    tags (dict; libra.command, libra.work_dir, libra.kind, ...). Ordered by start time."""
    import pandas as pd

    records = _records(tracking_uri, experiment_name, "study")
    rows = [{"run_id": r["run_id"], "start_time": r["start_time"], "status": r["status"],
             "tags": {k[5:]: v for k, v in r.items() if k.startswith("tags.")}} for r in records]
    return pd.DataFrame(rows, columns=["run_id", "start_time", "status", "tags"])


def _search(tracking_uri: str, experiment_name: str, role: str):
    import pandas as pd

    return tidy_runs(pd.DataFrame(_records(tracking_uri, experiment_name, role)))


def _records(tracking_uri: str, experiment_name: str, role: str) -> list[dict]:
    return read_runs(tracking_uri, experiment_name, role)


def tidy_runs(frame):
    """mlflow.search_runs-shaped rows (`params.*`, `metrics.*`, `tags.*`; e.g. from
    harness.tracking.trial_runs) -> the tidy frame `load_study_runs` returns."""
    import pandas as pd

    rows = []
    for record in ([] if frame is None else frame.to_dict("records")):
        tags = {k[5:]: str(v) for k, v in record.items() if k.startswith("tags.") and _present(v)}
        if tags.get(ROLE, "trial") != "trial":
            continue
        # Config keys are dotted; the dot-free params (ibs, bfp, bl1, seed, ...) are the MLflow
        # view's short aliases of them (mlflow_view.param_aliases), not keys of their own.
        config = {k[7:]: _parse_param(v) for k, v in record.items()
                  if k.startswith("params.") and "." in k[7:] and _present(v)}
        metrics = {k[8:]: _float(v) for k, v in record.items() if k.startswith("metrics.")}
        try:
            params = json.loads(tags.get("libra.params") or "{}")
        except json.JSONDecodeError:
            params = {}
        run_id = str(record.get("run_id"))
        seed = _int(tags.get("libra.seed"))
        if seed is None:
            seed = _int(config.get("schedule.seed"))
        row = {
            "run_id": run_id,
            "label": tags.get("libra.label") or tags.get("mlflow.runName") or run_id[:8],
            "trial_key": tags.get(KEY),
            "state": tags.get(STATE, "running"),
            "reason": tags.get("libra.failure_reason", ""),
            "seed": seed,
            "optuna_trial": _int(tags.get("libra.optuna_trial")),
            "status": record.get("status"),
            "start_time": record.get("start_time"),
            "parent_run_id": tags.get("mlflow.parentRunId"),
            "params": params, "config": config, "tags": tags,
        }
        for comp in components():
            text = tags.get(f"libra.flag.{comp.name}")
            row[comp.name] = (text == "true") if text is not None else bool(config.get(comp.key, False))
        row.update(metrics)
        rows.append(row)
    out = pd.DataFrame(rows)
    for name in _FIXED + flags():
        if name not in out.columns:
            out[name] = pd.Series(dtype=object)
    if len(out):
        out = _dedupe(out.sort_values("start_time", kind="stable"))
    return out.reset_index(drop=True)


def _dedupe(runs):
    """One run per trial_key: the finished one if any, else the latest (the tracker reuses a
    trial's run on resume, so duplicates only come from hand-made or very old records)."""
    rank = (runs["state"] == "finished").astype(int)
    ordered = runs.assign(_rank=rank, _pos=range(len(runs)))
    keyed = ordered[ordered["trial_key"].notna()]
    keep = keyed.sort_values(["_rank", "_pos"]).groupby("trial_key", sort=False).tail(1)
    kept = set(keep.index) | set(ordered.index[ordered["trial_key"].isna()])
    return runs.loc[[i for i in runs.index if i in kept]]


def metric_histories(tracking_uri: str, run_ids: Iterable[str], metric: str = "bbox_mAP"):
    """Per-step values of `metric` for each run: DataFrame[run_id, step, value] (MLflow units;
    step = epoch). Runs without the metric contribute no rows."""
    import pandas as pd

    client = open_client(tracking_uri)
    rows = []
    if client is not None:
        for run_id in run_ids:
            for m in client.get_metric_history(run_id, metric):
                rows.append({"run_id": run_id, "step": int(m.step), "value": float(m.value)})
    frame = pd.DataFrame(rows, columns=["run_id", "step", "value"])
    # A resumed epoch may be logged twice: keep its last value.
    return frame.drop_duplicates(["run_id", "step"], keep="last").sort_values(["run_id", "step"])


# ------------------------------------------------------------------------------------------
# Statistics.
# ------------------------------------------------------------------------------------------
def _summary(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof = 1, n) of the finite values; NaN where undefined."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(finite) / n
    if n < 2:
        return mean, math.nan, 1
    var = math.fsum((v - mean) ** 2 for v in finite) / (n - 1)
    return mean, math.sqrt(var), n


# ------------------------------------------------------------------------------------------
# Tables.
# ------------------------------------------------------------------------------------------
def ablation_table(runs, varied_keys: Sequence[str], columns: Sequence[Column] = DEFAULT_COLUMNS,
                   *, delta_metric: Optional[str] = "bbox_mAP",
                   order: Optional[Sequence[Mapping[str, Any]]] = None,
                   reference: Sequence[Any] = (), baseline: Optional[int] = None,
                   confidence: float = 0.95):
    """One row per configuration (the values of `varied_keys`), over seeds.

    runs: `load_study_runs`' frame. Only trials in state finished enter the statistics; a
    configuration whose trials all failed still gets its row (n = 0, empty cells).
    order: the configurations' order (a grid's points); others follow in start order.
    reference: the study's `reference` rows (harness.spec.ReferenceRow, or mappings with
        label, match, metrics): a row whose config matches gets `paper_<key>` columns.
    baseline: index of the baseline row; default the first row with all three components
        off, else the first row with results (`table.attrs["baseline_note"]` says which).

    Columns: label, the three flags (bool), each other varied key (its values), n_trials,
    n_finished, seeds, and per Column `<key>_mean`, `<key>_std`, `<key>_n` (shown units);
    with a delta metric: baseline (bool), d<key> (paired estimate), d<key>_se, d<key>_low,
    d<key>_high (Bonferroni-simultaneous), d<key>_df, d<key>_p, d<key>_p_holm,
    d<key>_separated (Holm; True/False, None without a test), d<key>_note; paper_label and
    paper_<key>, paper_d<key> when a reference matches; run_ids and optuna_trials (';'-joined)
    of the finished trials, so every number can be traced back to MLflow.
    """
    import pandas as pd

    varied = list(varied_keys)
    others = [k for k in varied if k not in flag_keys()]
    short = short_names(others)
    columns = list(columns)
    delta = next((c for c in columns if c.metric == delta_metric), None) if delta_metric else None

    groups: dict[str, dict] = {}
    for run in runs.to_dict("records") if len(runs) else []:
        values = {k: _value_of(run, k) for k in varied}
        group = groups.setdefault(_group_id(values), {"values": values, "runs": []})
        group["runs"].append(run)
    ids = []
    for point in order or ():
        gid = _group_id({k: point.get(k, _MISSING) for k in varied})
        if gid in groups and gid not in ids:
            ids.append(gid)
    ids += [gid for gid in groups if gid not in ids]
    missing = [_label(dict(point), varied, short) for point in order or ()
               if _group_id({k: point.get(k, _MISSING) for k in varied}) not in groups]

    rows, warnings = [], []
    observations: list[tuple[int, Any, float]] = []  # (row, seed, delta metric) per finished run
    for gid in ids:
        group = groups[gid]
        done = [r for r in group["runs"] if r.get("state") == "finished"]
        first = group["runs"][0]
        row: dict[str, Any] = {"label": _label(group["values"], varied, short)}
        for name in flags():
            row[name] = bool(first.get(name))
        for key in others:
            row[key] = group["values"][key]
        row["n_trials"] = len(group["runs"])
        row["n_finished"] = len(done)
        row["seeds"] = ";".join(str(s) for s in sorted({r["seed"] for r in done
                                                        if r.get("seed") is not None}))
        for col in columns:
            values = [_float(r.get(col.metric)) * col.scale for r in done]
            row[f"{col.key}_mean"], row[f"{col.key}_std"], row[f"{col.key}_n"] = _summary(values)
            if col is delta:
                observations += [(len(rows), r.get("seed"), v) for r, v in zip(done, values)
                                 if math.isfinite(v)]
        row["run_ids"] = ";".join(r["run_id"] for r in done)
        row["optuna_trials"] = ";".join(str(r["optuna_trial"]) for r in done
                                        if r.get("optuna_trial") is not None)
        row["_config"] = first.get("config") or {}
        conflict = _conflicts(group["runs"])
        if conflict:
            warnings.append(f"row {row['label']!r} mixes trials whose configs differ in {conflict}")
        rows.append(row)

    table = pd.DataFrame(rows)
    note = ""
    if delta is not None and len(table):
        base, note = _pick_baseline(table, delta, baseline)
        _add_deltas(table, delta, base, confidence, observations)
    if reference and len(table):
        _add_reference(table, reference, columns, delta)
    if len(table):
        table = table.drop(columns=["_config"])
    table.attrs.update({"columns": columns, "delta": delta, "others": others, "short": short,
                        "baseline_note": note, "confidence": confidence, "warnings": warnings,
                        "missing": missing, "kind": "grid"})
    return table


def best_trials(runs, varied_keys: Sequence[str], metric: str = "bbox_mAP",
                direction: str = "maximize", top: int = 10,
                columns: Sequence[Column] = DEFAULT_COLUMNS):
    """A search's best finished configurations by `metric` (best first, at most `top`), in
    `ablation_table`'s columns without a delta; `optuna_trials` names the trials."""
    columns = list(columns)
    if not any(c.metric == metric for c in columns):
        columns.append(Column(metric, metric, metric, _latex_escape(metric), 1.0, 4))
    key = next(c.key for c in columns if c.metric == metric)
    table = ablation_table(runs, varied_keys, columns, delta_metric=None)
    attrs = dict(table.attrs)
    if len(table):
        table = table[table["n_finished"] > 0]
        table = table.sort_values(f"{key}_mean", ascending=direction == "minimize",
                                  na_position="last", kind="stable").head(top)
        table = table.reset_index(drop=True)
    table.attrs.update(attrs)
    table.attrs.update({"kind": "search", "metric": metric, "direction": direction, "top": top})
    return table


def study_table(runs, study, top: int = 10):
    """The table a study gets: a grid's `ablation_table` in the file's order with its reference
    rows; a search's `best_trials`."""
    if study.kind == "grid":
        return ablation_table(runs, study.varied_keys, order=study.grid_points(),
                              reference=study.spec.reference)
    return best_trials(runs, study.varied_keys, study.metric, study.direction, top)


def study_effects(runs, study, confidence: float = 0.95, *, rounds: Optional[Any] = None):
    """A grid study's factorial effects (harness.effects.effects_table: main effects and two-way
    interactions, seed as a block, pooled residual variance, Holm) with the seeds planner's
    columns (harness.planner.plan, for the study's analysis.target_effect); None for a search
    or a bench. Factors are the grid's keys, levels in the file's order (the first is the
    baseline), labels the table's short names.

    With `rounds` (the study's harness.spec.SeedRounds, which the report's caller passes:
    a running study's own rounds see plain seed lists), attrs["rounds_coverage"] holds what the
    rounds' stopping rule does to the intervals (harness.planner.rounds_coverage, about 1 s):
    the simulated coverage at the runs' residual SD and the lowest over noise levels from a
    quarter to four times the target half-width."""
    import numpy as np

    from harness import effects, planner
    from harness.spec import CASES

    if study.kind != "grid":
        return None
    keys = [k for k in study.varied_keys if k != "schedule.seed"]
    levels = {k: list(v) for k, v in study.spec.grid.items() if k != CASES and k in keys}
    titles, switches = component_titles(), flag_keys()
    short = short_names([k for k in keys if k not in switches])
    labels = {k: titles[switches[k]] if k in switches else short.get(k, k) for k in keys}
    table = effects.effects_table(runs, keys, levels, labels=labels, confidence=confidence,
                                  reference=study.spec.reference)
    planned = planner.plan(table, study.spec.analysis.target_effect)
    planned.attrs.update(evaluation_noise(runs))
    design = table.attrs.get("design")
    if rounds is not None and design is not None and rounds.max > rounds.initial:
        sigma = table.attrs.get("sigma", math.nan)
        levels = rounds.until_half_width * np.geomspace(0.25, 4.0, 13)
        at = [sigma] if math.isfinite(sigma) and sigma > 0 else []
        cover, _ = planner.rounds_coverage(design, rounds.initial, rounds.max,
                                           rounds.until_half_width, at + list(levels),
                                           confidence=confidence)
        planned.attrs["rounds_coverage"] = {
            "initial": rounds.initial, "max": rounds.max, "half_width": rounds.until_half_width,
            "at_sigma": float(cover[0]) if at else math.nan, "lowest": float(cover[len(at):].min()),
            "confidence": confidence}
    return planned


def evaluation_noise(runs, scale: float = 100.0) -> dict[str, Any]:
    """The evaluation noise of the finished runs' AP: eval_sd = sqrt(mean of bbox_mAP_boot_sd^2)
    in shown units (the bootstrap over validation images each run logs with
    schedule.eval_bootstrap > 0; detectors.evaluation.bootstrap_map), eval_sd_runs = how many
    runs logged it. {} when none did."""
    if runs is None or not len(runs) or "bbox_mAP_boot_sd" not in runs.columns:
        return {}
    done = runs[runs["state"] == "finished"]
    sds = [float(v) * scale for v in done["bbox_mAP_boot_sd"]
           if v is not None and math.isfinite(float(v))]
    if not sds:
        return {}
    return {"eval_sd": math.sqrt(math.fsum(v * v for v in sds) / len(sds)), "eval_sd_runs": len(sds)}


def noise_lines(attrs: Mapping[str, Any]) -> list[str]:
    """Where the noise comes from, for the effects section: the seed-to-seed (residual) SD next
    to the evaluation (bootstrap) SD, and which of more seeds or more validation images helps."""
    sigma, eval_sd = attrs.get("sigma", math.nan), attrs.get("eval_sd")
    if eval_sd is None:
        return ["- evaluation noise: not measured (set schedule.eval_bootstrap, e.g. 200, to "
                "bootstrap each run's AP over its validation images)"]
    lines = [f"- noise: seed-to-seed (the model's residual) SD {sigma:.3g} AP points; evaluation "
             f"SD {eval_sd:.3g} AP points (bootstrap over the validation images, "
             f"{attrs.get('eval_sd_runs')} runs): how far a run's AP would move on another "
             "validation set of the same size"]
    if math.isfinite(sigma) and sigma > 0:
        ratio = eval_sd / sigma
        if ratio >= 1.0:
            verdict = ("the validation set's noise is as large as the seeds': more validation "
                       "images are needed before these effects generalise beyond this set; "
                       "more seeds only narrow the intervals for this set")
        elif ratio >= 0.5:
            verdict = ("both matter: more seeds narrow the intervals, more validation images "
                       "shrink the part no number of seeds removes")
        else:
            verdict = ("seed-to-seed noise dominates: more seeds narrow the intervals; the "
                       "validation set is large enough")
        lines.append(f"- evaluation / seed SD = {ratio:.2f}: {verdict}")
    return lines


def effects_markdown(table) -> str:
    """effects.csv's rows as a markdown table, with the design's notes under it."""
    if table is None or not len(table):
        notes = (table.attrs.get("notes") if table is not None else None) or ["no effects"]
        return "\n".join(f"- {n}" for n in notes)
    shown = ["term", "estimate", "ci_low", "ci_high", "se", "df", "p", "p_holm", "detectable"]
    shown += [c for c in ("seeds_needed", "paper", "paper_outside", "note") if c in table]
    text = table[shown].to_markdown(index=False, floatfmt=".3g")
    attrs = table.attrs
    lines = [text, "",
             f"- {attrs.get('n_runs', 0)} finished runs, residual SD {attrs.get('sigma', math.nan):.3g} "
             f"AP points on {attrs.get('df_resid', 0)} df; seed "
             f"{'in the model as a block' if attrs.get('blocked') else 'not a block'}",
             "- main effect: the mean over the configurations with the factor at its level minus "
             "the mean with it at the baseline level, averaged over the other factors (not the "
             "paper's one-at-a-time delta, which is `paper`); separated = Holm-adjusted p < 0.05",
             "- detectable: the smallest true effect these runs detect with 80% power"]
    if "seeds_needed" in table:
        lines.append(f"- seeds_needed: seeds per configuration to detect {attrs.get('target_effect')} "
                     "AP points with 80% power")
    lines += noise_lines(attrs)
    lines += rounds_lines(attrs)
    lines += [f"- {n}" for n in attrs.get("notes") or []]
    return "\n".join(lines)


def rounds_lines(attrs: Mapping[str, Any]) -> list[str]:
    """What seed rounds do to the intervals (study_effects' attrs["rounds_coverage"])."""
    rc = attrs.get("rounds_coverage")
    if not rc:
        return []
    here = (f"{100 * rc['at_sigma']:.1f}% if the true residual SD is these runs' estimate, "
            if math.isfinite(rc["at_sigma"]) else "")
    return [f"- seeds in rounds ({rc['initial']} per configuration, one more per round up to "
            f"{rc['max']}, until every main effect is within +-{rc['half_width']:g}): stopping "
            "once the intervals came out narrow makes them cover less than their nominal "
            f"{100 * rc['confidence']:.0f}%. Simulated for this grid and rule (4000 studies per "
            f"noise level, Monte Carlo SE 0.3%): {here}{100 * rc['lowest']:.1f}% at the worst "
            "noise level"]


def unfinished_trials(runs):
    """Trials that did not finish (failed, pruned, interrupted, running): label, state, seed,
    reason, run_id. They are listed, never averaged."""
    import pandas as pd

    cols = ["label", "state", "seed", "reason", "run_id"]
    if not len(runs):
        return pd.DataFrame(columns=cols)
    out = runs[runs["state"] != "finished"][cols].copy()
    return out.sort_values(["state", "label"], kind="stable").reset_index(drop=True)


_MISSING = object()


def _value_of(run: Mapping[str, Any], key: str) -> Any:
    params = run.get("params") or {}
    if key in params:
        return params[key]
    return (run.get("config") or {}).get(key)


def _group_id(values: Mapping[str, Any]) -> str:
    return json.dumps({k: (None if v is _MISSING else render_value(v)) for k, v in values.items()},
                      sort_keys=True)


def _label(values: Mapping[str, Any], varied: Sequence[str], short: Mapping[str, str]) -> str:
    """'IoU-sampling + BFP', 'no components', 'alpha=0.5, gamma=1.5' ..."""
    parts = []
    by_key = {c.key: c for c in components()}
    switches = [k for k in varied if k in by_key]
    if switches:
        on = [by_key[k].title for k in switches if values.get(k) is True]
        parts.append(" + ".join(on) if on else "no components")
    for key in varied:
        if key not in by_key:
            value = values.get(key, _MISSING)
            parts.append(f"{short.get(key, key)}={'?' if value is _MISSING else render_value(value)}")
    return ", ".join(parts) if parts else "all trials"


def _conflicts(runs: Sequence[Mapping[str, Any]]) -> str:
    """The config keys (beyond seed and placement) whose values differ within one row."""
    differing = []
    configs = [r.get("config") or {} for r in runs]
    keys = sorted(set().union(*configs)) if configs else []
    for key in keys:
        if key in _PLACEMENT_KEYS:
            continue
        seen = {render_value(c.get(key)) for c in configs}
        if len(seen) > 1:
            differing.append(f"{key} ({', '.join(sorted(seen))})")
    return "; ".join(differing[:5])


def _pick_baseline(table, delta: Column, baseline: Optional[int]) -> tuple[int, str]:
    has = table[f"{delta.key}_n"] > 0
    if baseline is not None:
        if not 0 <= baseline < len(table):
            raise UserError(f"baseline row {baseline} does not exist; the table has {len(table)} rows")
        return baseline, f"baseline: row {table.at[baseline, 'label']!r} (chosen)"
    off = has & ~table[list(flags())].any(axis=1)
    if off.any():
        index = int(off.idxmax())
        return index, f"baseline: {table.at[index, 'label']!r}, the row with all {count_word()} components off"
    index = int(has.idxmax()) if has.any() else 0
    return index, (f"baseline: no row has all {count_word()} components off, so the first row with "
                   f"results, {table.at[index, 'label']!r}, is the baseline")


def _add_deltas(table, delta: Column, base: int, confidence: float,
                observations: Sequence[tuple[int, Any, float]]) -> None:
    """Each row against the baseline row, paired by seed with the pooled residual variance
    (harness.effects.delta_table), Holm over the rows, Bonferroni-simultaneous intervals (the
    module docstring). observations: (row index, seed, value in shown units) per finished run."""
    from scipy import stats

    from harness.effects import delta_table

    k = delta.key
    present = {i for i, _, _ in observations}
    fit: dict[str, dict] = {}
    df = 0
    if base in present and len(present) > 1:
        rows_of, seeds, values = zip(*observations)
        frame = delta_table(rows_of, seeds, values, base, confidence)
        df = int(frame.attrs["df_resid"])
        fit = {int(r["level"]): r for r in frame.to_dict("records")}
    family = [r for r in fit.values() if math.isfinite(r["p"])]
    q = (float(stats.t.ppf(1.0 - (1.0 - confidence) / (2.0 * len(family)), df))
         if family and df > 0 else math.nan)
    names = ("d", "se", "low", "high", "df", "p", "p_holm", "separated", "note")
    out = {name: [] for name in names}
    for i in range(len(table)):
        values = dict.fromkeys(names, math.nan)
        values.update(separated=None, note="")
        row = fit.get(i)
        if i == base:
            values.update(d=0.0 if i in present else math.nan, note="baseline")
        elif i not in present or base not in present:
            values["note"] = "no finished trial"
        elif row is None or not math.isfinite(row["estimate"]):
            values["note"] = "not comparable: no seed links it to the baseline"
        elif df <= 0:
            values.update(d=row["estimate"], note=NO_CI)
        elif not row["se"] > 0:
            values.update(d=row["estimate"], df=df, note=NO_SPREAD)
        else:
            separated = bool(row["p_holm"] < 1.0 - confidence)
            values.update(d=row["estimate"], se=row["se"], low=row["estimate"] - q * row["se"],
                          high=row["estimate"] + q * row["se"], df=df, p=row["p"],
                          p_holm=row["p_holm"], separated=separated,
                          note="" if separated else "not separated from zero")
        for name in names:
            out[name].append(values[name])
    table["baseline"] = [i == base for i in range(len(table))]
    table[f"d{k}"] = out["d"]
    for name in ("se", "low", "high", "df", "p", "p_holm"):
        table[f"d{k}_{name}"] = out[name]
    table[f"d{k}_separated"] = _object_series(out["separated"])
    table[f"d{k}_note"] = out["note"]


def _object_series(values: list) -> Any:
    import pandas as pd

    return pd.Series(values, dtype=object)


def _add_reference(table, reference: Sequence[Any], columns: Sequence[Column],
                   delta: Optional[Column]) -> None:
    refs = [_ref_fields(r) for r in reference]
    labels, values = [], {c.key: [] for c in columns}
    for config in table["_config"]:
        hit = next((r for r in refs if all(_same(config.get(k, _MISSING), v)
                                           for k, v in r[1].items())), None)
        labels.append(hit[0] if hit else "")
        for col in columns:
            value = hit[2].get(col.metric) if hit else None
            values[col.key].append(math.nan if value is None else float(value) * col.scale)
    if not any(labels):
        return
    table["paper_label"] = labels
    for col in columns:
        if any(not math.isnan(v) for v in values[col.key]):
            table[f"paper_{col.key}"] = values[col.key]
    if delta is not None and f"paper_{delta.key}" in table and "baseline" in table:
        base = int(table["baseline"].idxmax())
        table[f"paper_d{delta.key}"] = table[f"paper_{delta.key}"] - table.at[base, f"paper_{delta.key}"]


def _ref_fields(ref: Any) -> tuple[str, Mapping[str, Any], Mapping[str, float]]:
    if isinstance(ref, Mapping):
        return str(ref.get("label", "")), dict(ref.get("match") or {}), dict(ref.get("metrics") or {})
    return ref.label, dict(ref.match), dict(ref.metrics)


def _same(a: Any, b: Any) -> bool:
    """Config values equal as settings: 3 == 3.0, but true != 1."""
    if a is _MISSING:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return render_value(a) == render_value(b)


# ------------------------------------------------------------------------------------------
# Rendering: one table, three formats, the same numbers.
# ------------------------------------------------------------------------------------------
def to_markdown(table) -> str:
    """The table as GitHub markdown, followed by its legend lines."""
    import pandas as pd

    if not len(table):
        return "(no trials to compare)"
    headers, aligns, rows, legend = _cells(table, latex=False)
    names = {"c": "center", "l": "left", "r": "right"}
    text = pd.DataFrame(rows, columns=headers).to_markdown(
        index=False, disable_numparse=True, colalign=[names[a] for a in aligns])
    return text + ("\n\n" + "\n".join(legend) if legend else "")


def to_latex(table) -> str:
    """The table as a booktabs tabular (needs \\usepackage{booktabs,amssymb}), then its legend."""
    if not len(table):
        return "% no trials to compare\n"
    headers, aligns, rows, legend = _cells(table, latex=True)
    lines = ["% written by `libra report`; needs \\usepackage{booktabs,amssymb}",
             f"\\begin{{tabular}}{{{''.join(aligns)}}}", "\\toprule",
             " & ".join(headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if legend:
        lines.append("\\par\\footnotesize " + " ".join(_latex_escape(line, keep_math=True)
                                                       for line in legend))
    return "\n".join(lines) + "\n"


def to_csv(table) -> str:
    """Machine-readable: one column per number (mean, std, n apart), full precision, shown units."""
    if not len(table):
        return ""
    frame = table.copy()
    for key in table.attrs.get("others", []):
        frame[key] = [render_value(v) for v in frame[key]]
    return frame.to_csv(index=False)


def _cells(table, latex: bool) -> tuple[list[str], list[str], list[list[str]], list[str]]:
    """Headers, alignments (c/l/r), cell strings and legend lines: what the markdown and LaTeX
    renderers share, so both show the same numbers."""
    attrs = table.attrs
    columns: list[Column] = list(attrs.get("columns") or DEFAULT_COLUMNS)
    delta: Optional[Column] = attrs.get("delta")
    others: list[str] = list(attrs.get("others") or [])
    short = attrs.get("short") or short_names(others)
    search = attrs.get("kind") == "search"
    pm = " $\\pm$ " if latex else " ± "
    esc = _latex_escape if latex else (lambda s: s)
    multi = bool((table[[f"{c.key}_n" for c in columns]] > 1).any().any())

    heads: list[tuple[str, str]] = []  # (header, alignment)
    if search:
        heads.append(("trial", "l"))
    heads += [(c.title, "c") for c in components()]
    heads += [(esc(short.get(k, k)), "l") for k in others]
    if not multi and not search:
        heads.append(("seeds", "l"))
    anchor = _delta_anchor(columns, delta)  # the delta columns follow the AP columns
    for col in columns:
        heads.append((col.latex if latex else col.title, "r"))
        if col is anchor:
            d = delta
            heads.append((f"$\\Delta${d.latex}" if latex else f"Δ{d.title}", "r"))
            if "paper_" + d.key in table:
                heads.append((f"paper {d.latex}" if latex else f"paper {d.title}", "r"))
            if "paper_d" + d.key in table:
                heads.append((f"paper $\\Delta${d.latex}" if latex else f"paper Δ{d.title}", "r"))

    rows, kinds = [], set()
    for i in range(len(table)):
        row = []
        if search:
            row.append(esc(str(table.at[i, "optuna_trials"]) or "-"))
        for name in flags():
            row.append(("\\checkmark" if latex else CHECK) if table.at[i, name] else "")
        for key in others:
            row.append(esc(_show_value(table.at[i, key])))
        if not multi and not search:
            row.append(esc(str(table.at[i, "seeds"]) or "-"))
        for col in columns:
            row.append(format_cell(table.at[i, f"{col.key}_mean"], table.at[i, f"{col.key}_std"],
                                   int(table.at[i, f"{col.key}_n"]), col.digits, pm, multi))
            if col is anchor:
                cell, kind = format_delta(table, i, delta, latex)
                kinds.add(kind)
                row.append(cell)
                if "paper_" + delta.key in table:
                    row.append(_fmt(table.at[i, "paper_" + delta.key], delta.digits))
                if "paper_d" + delta.key in table:
                    row.append(_fmt(table.at[i, "paper_d" + delta.key], delta.digits, sign=True))
        rows.append(row)

    legend = []
    if multi:
        legend.append("Cells: mean ± std (n) over seeds (sample std, ddof = 1).")
    if delta is not None:
        level = int(round(100 * attrs.get("confidence", 0.95)))
        m = int(table[f"d{delta.key}_p"].notna().sum()) if f"d{delta.key}_p" in table else 0
        legend.append(f"Δ{delta.title}: change against the baseline row in AP points, paired by "
                      "seed (configuration + seed-block model, residual variance pooled over all "
                      f"runs), with {level}% Bonferroni-simultaneous intervals over the {m} "
                      f"comparisons; {attrs.get('baseline_note', '')}.")
        if "dagger" in kinds:
            legend.append(f"{NOT_SEPARATED} not separated from zero by Holm's test over the {m} "
                          f"comparisons (family-wise error {100 - level}%).")
        if "no_ci" in kinds:
            legend.append(f"({NO_CI}): every configuration ran once, so nothing is left to "
                          "estimate the noise from; no difference is claimed (add seeds).")
        if "no_spread" in kinds:
            legend.append(f"({NO_SPREAD}): the model fits every run exactly.")
    if "paper_label" in table:
        legend.append("paper: the study file's reference numbers (published, on the paper's data "
                      "and schedule), matched to rows by config values.")
    if search:
        legend.append(f"The best {len(table)} finished configurations by {attrs.get('metric')} "
                      f"({attrs.get('direction')}).")
    if any(c in COST_COLUMNS for c in columns):
        legend.append("Cost columns (train s/iter: mean seconds per training iteration; eval img/s: "
                      "images per second of the last evaluation, not training; mem: peak MB) are "
                      "each trial's own wall-clock figures, confounded with whatever else the "
                      "machine ran at the time (concurrent trials, the order they ran in, other "
                      "jobs): not comparable between rows. `libra bench` measures the components' costs "
                      "interleaved, side by side.")
    legend += [f"Warning: {w}." for w in attrs.get("warnings") or []]
    if attrs.get("missing"):
        legend.append("Not run yet: " + "; ".join(attrs["missing"]) + ".")
    headers = [h for h, _ in heads]
    aligns = [a for _, a in heads]
    if latex:
        legend = [line.replace("±", "$\\pm$").replace("Δ", "$\\Delta$")
                  .replace(NOT_SEPARATED, "$^\\dagger$") for line in legend]
    return headers, aligns, rows, legend


def _delta_anchor(columns: Sequence[Column], delta: Optional[Column]) -> Optional[Column]:
    """The column the delta columns follow: the last AP column, else the delta's own column."""
    if delta is None:
        return None
    ap = {c.metric for c in AP_COLUMNS}
    if delta.metric in ap:
        return [c for c in columns if c.metric in ap][-1]
    return delta


def _show_value(value: Any) -> str:
    """A varied setting for display: floats to 4 significant digits (a search samples 0.4328...)."""
    text = render_value(value)
    if isinstance(value, float) and len(text) > 6:
        return f"{value:.4g}"
    return text


def format_cell(mean: float, std: float, n: int, digits: int, pm: str = " ± ",
                show_n: bool = True) -> str:
    """'37.2 ± 0.3 (3)' for n >= 2; '37.2 (1)' or '37.2' for one value; '-' for none."""
    if n == 0 or mean is None or not math.isfinite(mean):
        return "-"
    if n == 1:
        return f"{mean:.{digits}f} (1)" if show_n else f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}{pm}{std:.{digits}f} ({n})"


def format_delta(table, i: int, col: Column, latex: bool) -> tuple[str, str]:
    """A delta cell and its kind: '', 'dagger', 'no_ci' or 'no_spread'."""
    k = col.key
    note = table.at[i, f"d{k}_note"]
    d = table.at[i, f"d{k}"]
    if note == "baseline":
        return "baseline", ""
    if d is None or not math.isfinite(d):
        return "-", ""
    digits = col.digits
    if note == NO_CI:
        return f"{d:+.{digits}f} ({NO_CI})", "no_ci"
    if note == NO_SPREAD:
        return f"{d:+.{digits}f} ({NO_SPREAD})", "no_spread"
    low, high = table.at[i, f"d{k}_low"], table.at[i, f"d{k}_high"]
    cell = f"{d:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    if table.at[i, f"d{k}_separated"] is False:
        return cell + ("$^\\dagger$" if latex else " " + NOT_SEPARATED), "dagger"
    return cell, ""


def _fmt(value: Any, digits: int, sign: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


_LATEX_SPECIAL = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#",
                  "_": "\\_", "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}",
                  "^": "\\textasciicircum{}"}


def _latex_escape(text: str, keep_math: bool = False) -> str:
    """Escape LaTeX's special characters; with keep_math, $...$ spans pass through."""
    if keep_math:
        parts = str(text).split("$")
        return "$".join(_latex_escape(p) if j % 2 == 0 else p for j, p in enumerate(parts))
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


# ------------------------------------------------------------------------------------------
# The end of `libra run`, and listings.
# ------------------------------------------------------------------------------------------
def render_markdown_table(runs, study, *, include_unfinished: bool = True,
                          rounds: Optional[Any] = None) -> str:
    """The report's table as markdown, for the end of `libra run`.

    runs: `load_study_runs`' frame, or mlflow.search_runs-shaped rows (harness.tracking.
    trial_runs); study: harness.spec.Study. With include_unfinished, the trials that did not
    finish follow the table (they are never averaged); a grid's factorial effects (the rows of
    effects.csv) follow last, with what the seed `rounds` (harness.spec.SeedRounds) did to
    their coverage when given.
    """
    if runs is None or not len(runs):
        return "(no trials recorded yet)"
    if "state" not in runs.columns:
        runs = tidy_runs(runs)
    text = to_markdown(study_table(runs, study))
    listing = unfinished_trials(runs)
    if include_unfinished and len(listing):
        text += "\n\nNot in the table (never averaged):\n\n" + unfinished_markdown(listing)
    effects = study_effects(runs, study, rounds=rounds)
    if effects is not None and len(effects):
        text += "\n\nEffects (factorial, seed as a block; `libra report` writes effects.csv):\n\n"
        text += effects_markdown(effects)
    return text


def unfinished_markdown(listing) -> str:
    """`unfinished_trials` as a markdown table."""
    import pandas as pd

    rows = [{"trial": r["label"], "state": r["state"],
             "reason": " ".join(str(r["reason"] or "").split())[:300] or "-",
             "run": r["run_id"]} for r in listing.to_dict("records")]
    return pd.DataFrame(rows, columns=["trial", "state", "reason", "run"]).to_markdown(
        index=False, disable_numparse=True)


def reference_comparison(table, columns: Sequence[Column] = AP_COLUMNS):
    """Ours against the paper's, per row that has reference numbers: label, paper row, and
    per metric `<key> ours` (mean ± std (n)) and `<key> paper`. None when nothing matched."""
    import pandas as pd

    if "paper_label" not in table:
        return None
    rows = []
    for i in range(len(table)):
        if not table.at[i, "paper_label"]:
            continue
        row = {"row": table.at[i, "label"], "paper row": table.at[i, "paper_label"]}
        for col in columns:
            if f"paper_{col.key}" not in table or f"{col.key}_mean" not in table:
                continue
            row[f"{col.key} ours"] = format_cell(table.at[i, f"{col.key}_mean"],
                                                 table.at[i, f"{col.key}_std"],
                                                 int(table.at[i, f"{col.key}_n"]), col.digits)
            row[f"{col.key} paper"] = _fmt(table.at[i, f"paper_{col.key}"], col.digits)
        rows.append(row)
    return pd.DataFrame(rows)


def describe_provenance(runs, parents=None) -> list[str]:
    """Lines on what produced the runs: code commits, library versions, devices, and any
    libra.machine.* / libra.host tags the runs carry."""
    lines = []
    tags = [t for t in (runs["tags"] if len(runs) else []) if isinstance(t, dict)]
    if parents is not None and len(parents):
        tags += [t for t in parents["tags"] if isinstance(t, dict)]

    def values(name: str) -> list[str]:
        return sorted({t[name] for t in tags if t.get(name)})

    commits = values("libra.git_commit")
    if commits:
        dirty = "yes" if "true" in values("libra.git_dirty") else "no"
        lines.append(f"code: git {', '.join(c[:12] for c in commits)} (uncommitted changes: {dirty})")
    versions = []
    for lib in ("python", "torch", "torchvision", "ray", "optuna", "mlflow"):
        found = values(f"libra.version.{lib}")
        if found:
            versions.append(f"{lib} {'/'.join(found)}")
    if versions:
        lines.append("versions: " + ", ".join(versions))
    machine = sorted({k for t in tags for k in t if k.startswith(("libra.machine.", "libra.host"))})
    for key in machine:
        lines.append(f"{key.split('.', 1)[1]}: {', '.join(values(key))}")
    if len(runs):
        devices = sorted({render_value(c.get("schedule.device")) for c in runs["config"]
                          if isinstance(c, dict) and "schedule.device" in c})
        res = sorted({(c.get("resources.workers"), c.get("resources.cpus_per_worker"),
                       c.get("resources.gpus_per_worker")) for c in runs["config"]
                      if isinstance(c, dict) and "resources.workers" in c}, key=str)
        if devices:
            lines.append("device: " + ", ".join(devices))
        for workers, cpus, gpus in res:
            lines.append(f"resources per trial: {workers} worker(s) x ({cpus} CPU, {gpus} GPU)")
        lines.append(reproducibility_line(runs["config"]))
    return lines


def reproducibility_line(configs) -> str:
    """Whether the same configuration and seed would give the same numbers again, from what the
    runs' configs say about where they ran (a trial with no GPU and device auto runs on CPU)."""
    configs = [c for c in configs if isinstance(c, dict)]
    on_gpu = [c for c in configs if str(c.get("schedule.device", "auto")).startswith("cuda")
              or (str(c.get("schedule.device", "auto")) == "auto"
                  and (c.get("resources.gpus_per_worker") or 0) > 0)]
    if not on_gpu:
        return ("reproducibility: CPU runs; the same configuration and seed give bit-identical "
                "losses and AP, also two at once as Ray tasks and across a resume "
                "(tests/harness/test_reproducibility.py)")
    strict = all(c.get("schedule.deterministic") is True for c in on_gpu)
    return ("reproducibility: GPU runs are not bit-identical from run to run: on CUDA, "
            "torchvision's roi_align backward accumulates with atomicAdd in no fixed order and "
            "cuDNN may choose nondeterministic kernels; "
            + ("schedule.deterministic was on (deterministic kernels where torch has them), "
               "so roi_align's is what remains" if strict else
               "schedule.deterministic: true removes what torch can (roi_align's remains)"))


# ------------------------------------------------------------------------------------------
# Small parsers.
# ------------------------------------------------------------------------------------------
def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _parse_param(text: Any) -> Any:
    """A param as logged (strings bare, everything else JSON) -> its value."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any) -> Optional[int]:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None
