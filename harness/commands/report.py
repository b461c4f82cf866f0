"""Turn a study's MLflow runs into the paper's comparison table and plots.

Reads MLflow only, so it works on any machine that reaches the tracking server. Writes, under
--out (default results/<study name>):

  report.md     the table, the trials that did not finish, the paper's numbers side by side,
                the plots, and how to reproduce the report
  table.csv     the same table, one column per number (AP in percent: MLflow's fraction x 100)
  table.tex     the same table as a booktabs tabular (\\usepackage{booktabs,amssymb})
  trials.csv    every trial run with its MLflow run id and final metrics (MLflow's units)
  effects.csv   a grid's main effects and two-way interactions in AP points (seed as a block,
                pooled residual variance, Holm-adjusted p) with the seeds planner's columns
  *.png         per-epoch bbox mAP curves; a grid's AP bar chart; a search's Optuna plots

and logs the same files as artifacts (report/) of the study's latest parent run in MLflow, then
prints the address that opens the study in `mlflow ui` (harness/mlflow_view.py).

A cell over several seeds is mean +- std (n); the change in AP against the baseline row (all
three components off) is paired by seed with the residual variance pooled over every run, shown
with 95% Bonferroni-simultaneous intervals over the rows, and a dagger where Holm's family-wise
test does not separate it from zero. With every configuration run once no interval exists and
none is claimed. Failed and pruned trials are listed, never averaged.

examples:
  libra report studies/quickstart.yaml
  libra report studies/paper_table2_components.yaml --tracking-uri http://mlflow:5000
  libra report --study quickstart --tracking-uri sqlite:////abs/libra-work/quickstart/mlflow.db
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import tempfile
from typing import Any, Optional

from harness.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("study_file", nargs="?", metavar="STUDY.yaml",
                        help="the study file the runs were made with")
    parser.add_argument("--study", metavar="NAME",
                        help="report the study NAME from the tracking store, without its file "
                             "(the study recorded by its latest `libra run` is used)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking server or store (default: the study's "
                             "tracking.uri, else sqlite:////<work dir>/mlflow.db)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="the study's work dir: its MLflow store and Optuna journal "
                             "(default: ./libra-work/<study name>)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="Optuna RDB storage of a search (default: the study's, else "
                             "<work dir>/optuna.journal)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: results/<study name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the study file, as for `libra run`; repeatable")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="a search's best trials to show (default 10)")


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window

    from harness import plots, preflight, report
    from harness.spec import load_study
    from harness.stores import resolve_stores

    if (args.study_file is None) == (args.study is None):
        raise UserError("give a study file (libra report STUDY.yaml) or --study NAME, not both "
                        "and not neither")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if args.study is not None and args.overrides:
        raise UserError("--set needs the study file; with --study NAME the recorded study is used")

    study = load_study(args.study_file, args.overrides) if args.study_file else None
    name = study.name if study else args.study
    stores = resolve_stores(name, study.spec.tracking if study else None, work_dir=args.work_dir,
                            tracking_uri=args.tracking_uri, optuna_storage=args.optuna_storage)
    work_dir = stores.work_dir if args.work_dir else None
    uri, experiment = stores.mlflow_uri, stores.experiment
    if args.tracking_uri or (study and study.spec.tracking.uri):
        source = preflight.value_source("--tracking-uri", args.tracking_uri, "tracking.uri",
                                        args.study_file, args.overrides)
        preflight.check_tracking_uri(uri, source, contact=False)
    out = preflight.writable_dir("--out", args.out or os.path.join("results", name), create=False)

    runs = report.load_study_runs(uri, experiment)
    if not len(runs):
        again = f"libra run {args.study_file}" if args.study_file else "libra run STUDY.yaml"
        if args.tracking_uri:
            again += f" --tracking-uri {args.tracking_uri}"
        raise UserError(f"no runs of study {name!r} in {uri}; run `{again}` first")
    parents = report.load_parent_runs(uri, experiment)
    if study is None:
        study = _recorded_study(uri, parents)
    if (study.kind if study else _latest_tag(parents, "libra.kind")) == "bench":
        print(f"{name} is a bench study: it has no ablation table; its results are the trial's "
              f"bench.* metrics and bench.md artifact in MLflow ({uri})")
        return 0
    if work_dir is None:
        recorded = _latest_tag(parents, "libra.work_dir")
        work_dir = recorded if recorded and os.path.isdir(recorded) else stores.work_dir

    os.makedirs(out, exist_ok=True)
    kind = study.kind if study else (_latest_tag(parents, "libra.kind") or "grid")
    varied = study.varied_keys if study else _varied_from_runs(runs)
    if study is not None:
        table = report.study_table(runs, study, top=args.top)
    elif kind == "search":
        table = report.best_trials(runs, varied, top=args.top)
    else:
        table = report.ablation_table(runs, varied)

    written = {"table.csv": report.to_csv(table), "table.tex": report.to_latex(table),
               "trials.csv": _trials_csv(runs)}
    effects = report.study_effects(runs, study, rounds=study.seed_rounds) if study is not None else None
    if effects is not None:
        written["effects.csv"] = effects.to_csv(index=False)
    for filename, text in written.items():
        with open(os.path.join(out, filename), "w", encoding="utf-8") as fh:
            fh.write(text)

    figures, notes = _plots(plots, report, uri, runs, table, study, kind, work_dir, args, out)
    markdown = _report_md(report, name, uri, experiment, study, kind, runs, parents, table,
                          figures, notes, args)
    if effects is not None:
        markdown += "\n## Effects (effects.csv)\n\n" + report.effects_markdown(effects) + "\n"
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    print(report.to_markdown(table))
    listing = report.unfinished_trials(runs)
    if len(listing):
        print(f"\n{len(listing)} trial(s) did not finish and are not in the table; see report.md")
    if effects is not None:
        print("\n" + report.effects_markdown(effects))
    print(f"\nwrote {out}/: report.md, " + ", ".join(sorted(written))
          + "".join(f", {os.path.basename(p)}" for p in figures))
    for note in notes:
        print(f"  note: {note}")
    print(_log_to_parent(uri, experiment, parents, out, sorted(written) + ["report.md"], figures))
    return 0


def _log_to_parent(uri: str, experiment: str, parents: Any, out: str, names: list[str],
                   figures: list[str]) -> str:
    """The report's files as artifacts (report/) of the study's latest parent run, so the MLflow
    UI holds them beside the runs; returns the line to print (where to browse, or why not)."""
    from mlflow import MlflowClient

    from harness import mlflow_view

    if not len(parents):
        return "MLflow: no parent run to attach the report to (runs made before libra run recorded one)"
    parent = str(list(parents["run_id"])[-1])
    try:
        client = MlflowClient(tracking_uri=uri)
        paths = [os.path.join(out, name) for name in names] + list(figures)
        mlflow_view.log_files(client, parent, paths, "report")
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
    except Exception as err:  # an artifact store this machine cannot write: the files stay on disk
        return f"  note: the report was not logged to MLflow ({' '.join(str(err).split())[:200]})"
    return (f"logged to MLflow run {parent} (artifacts report/)\n"
            + mlflow_view.browse_hint(uri, experiment_id))


# ------------------------------------------------------------------------------------------
def _plots(plots: Any, report: Any, uri: str, runs: Any, table: Any, study: Any, kind: str,
           work_dir: str, args: argparse.Namespace, out: str) -> tuple[list[str], list[str]]:
    figures, notes = [], []
    shown = runs[runs["state"].isin(["finished", "pruned"])]
    histories = report.metric_histories(uri, shown["run_id"], "bbox_mAP")
    if kind == "search":
        ranked = list(table["run_ids"]) if len(table) else []
        order = [rid for ids in ranked for rid in ids.split(";") if rid]
        order += [rid for rid in shown["run_id"] if rid not in order]
        labels = dict(zip(shown["run_id"], shown["label"]))
        states = dict(zip(shown["run_id"], shown["state"]))
        groups = {(labels[rid] + (" (pruned)" if states[rid] == "pruned" else "")): [rid]
                  for rid in order}
        dashed = [label for label in groups if label.endswith("(pruned)")]
    else:
        groups = {}
        for label, ids in zip(table["label"], table["run_ids"]):
            if ids:
                groups[label if label not in groups else f"{label} ({len(groups) + 1})"] = ids.split(";")
        dashed = []
    path = plots.plot_curves(histories, groups, os.path.join(out, "curves_bbox_mAP.png"),
                             title=f"{study.name if study else args.study}: bbox mAP per epoch",
                             dashed=dashed)
    if path:
        figures.append(path)
    else:
        notes.append("per-epoch curves: no bbox_mAP was logged")
    if kind != "search":
        path = plots.plot_ablation_bars(table, os.path.join(out, "ap_bars.png"),
                                        title="AP per configuration (mean ± std over seeds)")
        if path:
            figures.append(path)
    else:
        storage = args.optuna_storage or (study.spec.tracking.optuna_storage if study else None)
        ostudy, why = plots.load_optuna_study(study.name if study else args.study, work_dir, storage)
        if ostudy is None:
            notes.append(f"Optuna plots: skipped ({why})")
        else:
            metric = study.metric if study else "bbox_mAP"
            drawn, skipped = plots.plot_search(ostudy, out, target_name=metric,
                                               params=study.varied_keys if study else None)
            figures += drawn
            notes += skipped
    return figures, notes


def _report_md(report: Any, name: str, uri: str, experiment: str, study: Any, kind: str,
               runs: Any, parents: Any, table: Any, figures: list[str], notes: list[str],
               args: argparse.Namespace) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    finished = int((runs["state"] == "finished").sum())
    lines = [f"# {name}: {'ablation' if kind == 'grid' else 'search'} report", ""]
    if study is not None and study.spec.description:
        lines += [study.spec.description, ""]
    lines += [f"- date: {now}",
              f"- MLflow: `{uri}` (experiment `{experiment}`)",
              f"- trials: {len(runs)} recorded, {finished} finished",
              f"- this report: `{_command(args)}`"]
    command = _latest_tag(parents, "libra.command")
    if command:
        lines.append(f"- the runs: `{command}`")
    lines += [f"- {line}" for line in report.describe_provenance(runs, parents)]
    lines += ["", "## Results", "", report.to_markdown(table), ""]
    lines += ["Every number comes from MLflow: AP columns are the trial runs' latest `bbox_mAP*` "
              "values x 100 (the last evaluated epoch), train s/iter is `mean_sec_per_iter`, eval "
              "img/s the last `eval_images_per_sec`, mem `max_peak_memory_mb`; `table.csv` lists each row's "
              "run ids, `trials.csv` each run's values.", ""]
    listing = report.unfinished_trials(runs)
    lines += ["## Trials not in the table", ""]
    if len(listing):
        lines += ["Failed, pruned, interrupted or still running: listed here, never averaged.", "",
                  report.unfinished_markdown(listing), ""]
    else:
        lines += ["None: every recorded trial finished.", ""]
    comparison = report.reference_comparison(table)
    if comparison is not None and len(comparison):
        lines += ["## Against the paper", "",
                  "The study file's reference numbers next to ours, matched by config values. "
                  "The paper's are on its data and schedule (COCO, 12 epochs); a small or "
                  "synthetic set shows whether the harness measures, not whether the paper "
                  "reproduces.", "",
                  comparison.to_markdown(index=False, disable_numparse=True), ""]
    if figures or notes:
        lines += ["## Plots", ""]
        for path in figures:
            base = os.path.basename(path)
            lines += [f"![{base}]({base})", ""]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    argv = ["libra", "report"]
    argv += [args.study_file] if args.study_file else ["--study", args.study]
    for override in args.overrides:
        argv += ["--set", override]
    for flag in ("tracking_uri", "work_dir", "optuna_storage", "out"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.top != 10:
        argv += ["--top", str(args.top)]
    return shlex.join(argv)


def _latest_tag(parents: Any, name: str) -> Optional[str]:
    for tags in reversed(list(parents["tags"]) if len(parents) else []):
        if isinstance(tags, dict) and tags.get(name):
            return tags[name]
    return None


def _recorded_study(uri: str, parents: Any) -> Any:
    """The study (after --set) that the latest `libra run` logged as study.yaml, or None."""
    import yaml
    from mlflow import MlflowClient

    from harness.spec import validate_study

    for run_id, tags in reversed(list(zip(parents["run_id"], parents["tags"])) if len(parents) else []):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = MlflowClient(tracking_uri=uri).download_artifacts(run_id, "study.yaml", tmp)
                with open(path, encoding="utf-8") as fh:
                    mapping = yaml.safe_load(fh)
            return validate_study(mapping, tags.get("libra.study_file") or "study.yaml",
                                  f"study.yaml of run {run_id}")
        except Exception:  # no artifact access from here, or an older study format
            continue
    return None


def _varied_from_runs(runs: Any) -> list[str]:
    keys: list[str] = []
    for params in runs["params"]:
        for key in params or {}:
            if key not in keys:
                keys.append(key)
    return keys


def _trials_csv(runs: Any) -> str:
    """Every trial run, MLflow's units: what the table's numbers can be recomputed from."""
    from harness.report import DEFAULT_COLUMNS

    metrics = [c.metric for c in DEFAULT_COLUMNS if c.metric in runs.columns]
    cols = ["run_id", "label", "state", "seed", "optuna_trial", "trial_key", "reason"]
    frame = runs[cols + metrics].copy()
    frame.insert(3, "params", [json.dumps(p, sort_keys=True) for p in runs["params"]])
    return frame.to_csv(index=False)
