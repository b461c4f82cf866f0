"""PNG plots of a study: per-epoch metric curves, the ablation bar chart, and Optuna's search plots.

Figures are drawn on matplotlib's Agg canvas (no display needed). Our own plots use
`matplotlib.figure.Figure` directly and leave pyplot's global state alone; Optuna's plotting
functions go through pyplot, so their figures are closed after saving.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

ALPHA_KEY = "detector.balanced_l1_loss.alpha"
GAMMA_KEY = "detector.balanced_l1_loss.gamma"
MAX_LEGEND = 12  # more curves than this: the rest are drawn thin and grey, without a legend entry


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def plot_curves(histories, groups: Mapping[str, Sequence[str]], path: str, *,
                ylabel: str = "bbox mAP (%)", title: str = "", scale: float = 100.0,
                dashed: Sequence[str] = ()) -> Optional[str]:
    """Per-epoch curves: one line per group of runs, the mean over its runs (seeds) at each
    epoch, with a band of +/- one sample std where two or more runs have that epoch.

    histories: DataFrame[run_id, step, value] (harness.report.metric_histories);
    groups: label -> run ids, in legend order (groups past MAX_LEGEND are drawn grey);
    dashed: labels drawn dashed (e.g. pruned trials). Returns `path`, or None when no group
    has a single point (nothing is written then).
    """
    import numpy as np

    fig, ax = _figure()
    drawn = 0
    for i, (label, run_ids) in enumerate(groups.items()):
        part = histories[histories["run_id"].isin(list(run_ids))]
        if not len(part):
            continue
        table = part.pivot_table(index="step", columns="run_id", values="value", aggfunc="last")
        steps = table.index.to_numpy()
        values = table.to_numpy(dtype=float) * scale  # [epochs, runs], NaN where a run lacks the epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows and n = 1 rows
            mean = np.nanmean(values, axis=1)
            count = np.sum(np.isfinite(values), axis=1)
            std = np.where(count >= 2, np.nanstd(values, axis=1, ddof=1), np.nan)
        style = "--" if label in dashed else "-"
        n_runs = table.shape[1]
        if i < MAX_LEGEND:
            name = f"{label} (n={n_runs})" if n_runs > 1 else label
            line, = ax.plot(steps, mean, style, marker="o", markersize=3, linewidth=1.5, label=name)
            band = np.isfinite(std)
            if band.any():
                ax.fill_between(steps[band], (mean - std)[band], (mean + std)[band],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        else:
            ax.plot(steps, mean, style, color="0.7", linewidth=0.8)
        drawn += 1
    if drawn == 0:
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_ablation_bars(table, path: str, key: str = "AP", *, ylabel: str = "AP (%)",
                       title: str = "") -> Optional[str]:
    """One bar per row of an ablation table (harness.report.ablation_table): the mean of `key`
    with a +/- one std error bar where n >= 2, n under each bar, the baseline as a dashed line,
    and the paper's number (paper_<key>) as a black diamond where the study gives one.
    Returns `path`, or None when no row has a value."""
    import numpy as np

    if not len(table) or f"{key}_mean" not in table:
        return None
    means = table[f"{key}_mean"].to_numpy(dtype=float)
    if not np.isfinite(means).any():
        return None
    stds = np.nan_to_num(table[f"{key}_std"].to_numpy(dtype=float), nan=0.0)
    counts = table[f"{key}_n"].to_numpy(dtype=int)
    x = np.arange(len(table))
    fig, ax = _figure(max(5.0, 1.1 * len(table) + 2.0), 4.5)
    colors = ["0.55" if "baseline" in table and table.at[i, "baseline"] else "C0"
              for i in range(len(table))]
    ax.bar(x, np.nan_to_num(means, nan=0.0), yerr=stds, capsize=4, color=colors,
           error_kw={"linewidth": 1})
    if "baseline" in table and table["baseline"].any():
        base = means[int(np.argmax(table["baseline"].to_numpy(dtype=bool)))]
        if math.isfinite(base):
            ax.axhline(base, color="0.3", linestyle="--", linewidth=1, label="baseline")
    if f"paper_{key}" in table:
        paper = table[f"paper_{key}"].to_numpy(dtype=float)
        has = np.isfinite(paper)
        if has.any():
            ax.plot(x[has], paper[has], "D", color="black", markersize=5, label="paper")
    finite = means[np.isfinite(means)]
    low = max(0.0, float(np.min(finite - stds[np.isfinite(means)])) * 0.9)
    ax.set_ylim(bottom=low)
    for xi, mean, n in zip(x, means, counts):
        text = f"n={n}" if math.isfinite(mean) else "no result"
        ax.annotate(text, (xi, low), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize=7, color="white" if math.isfinite(mean) else "black")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in table["label"]], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------
# Optuna.
# ------------------------------------------------------------------------------------------
def load_optuna_study(name: str, work_dir: str, storage_url: Optional[str] = None
                      ) -> tuple[Any, str]:
    """(the Optuna study, "") from the journal at <work_dir>/optuna.journal or the RDB at
    `storage_url` (harness.search.storage_for), or (None, why not). Never creates a journal."""
    import optuna

    from harness.search import storage_for

    if not storage_url:
        journal = os.path.join(work_dir, "optuna.journal")
        if not os.path.isfile(journal):
            return None, (f"no Optuna journal at {journal}; give the study's --work-dir "
                          "or --optuna-storage")
    where = storage_url or os.path.join(work_dir, "optuna.journal")
    storage = storage_for(work_dir, storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage), ""
    except KeyError:
        return None, f"no Optuna study {name!r} in {where}"


def plot_search(ostudy: Any, out_dir: str, *, target_name: str = "bbox_mAP",
                params: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """Optuna's optimisation history, parameter importances and, when the space has both the
    balanced L1 alpha and gamma, their contour, as PNGs in `out_dir`.

    Returns (paths written, notes on the plots skipped and why). Importances need two or more
    completed trials and a parameter that took two or more values; the contour needs two or
    more completed trials with distinct (alpha, gamma).
    """
    import optuna
    from optuna.trial import TrialState

    written, notes = [], []
    complete = [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        return written, ["no completed Optuna trial: no search plots"]
    names = list(params) if params is not None else sorted({p for t in complete for p in t.params})
    varied = [p for p in names if len({repr(t.params.get(p)) for t in complete if p in t.params}) > 1]

    def save(draw, filename: str, what: str) -> None:
        import matplotlib.pyplot as plt

        path = os.path.join(out_dir, filename)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                axes = draw()
            fig = _figure_of(axes)
            fig.set_size_inches(7.0, 5.0)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        except Exception as err:  # Optuna's plots are experimental: skip one, keep the report
            plt.close("all")
            notes.append(f"{what}: not drawn ({' '.join(str(err).split())[:200]})")

    from optuna.visualization import matplotlib as ovm

    save(lambda: ovm.plot_optimization_history(ostudy, target_name=target_name),
         "optuna_history.png", "optimisation history")
    if len(complete) < 2 or not varied:
        notes.append(f"parameter importances: skipped ({len(complete)} completed trial(s), "
                     f"{len(varied)} parameter(s) with two or more values; need 2 and 1)")
    else:
        save(lambda: ovm.plot_param_importances(ostudy, params=varied, target_name=target_name),
             "optuna_importance.png", "parameter importances")
    if ALPHA_KEY in names and GAMMA_KEY in names:
        pairs = {(t.params.get(ALPHA_KEY), t.params.get(GAMMA_KEY)) for t in complete}
        if ALPHA_KEY in varied and GAMMA_KEY in varied and len(pairs) >= 2:
            save(lambda: ovm.plot_contour(ostudy, params=[ALPHA_KEY, GAMMA_KEY],
                                          target_name=target_name),
                 "optuna_contour_alpha_gamma.png", "alpha-gamma contour")
        else:
            notes.append("alpha-gamma contour: skipped (needs completed trials with two or more "
                         "values of both alpha and gamma)")
    return written, notes


def _figure_of(axes: Any):
    """The figure of what an Optuna matplotlib plot returns (an Axes or an array of them)."""
    if hasattr(axes, "figure"):
        return axes.figure
    return axes.flat[0].figure
