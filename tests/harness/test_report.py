"""`libra report`: a real MLflow store, filled through the driver's own writer (harness.tracking.
Tracker) with known trials, gives exactly the expected means, stds, paired deltas and their intervals;
failed, pruned and running trials are listed and never averaged; markdown, CSV and LaTeX show
the same numbers; the plots are written; the command fails in one line when it cannot report.
"""
import csv
import io
import math
import time

import pytest
import yaml
from scipy import stats

from harness import plots, report
from harness.cli import main
from harness.spec import load_study
from harness.tracking import Tracker, trial_runs

IOU = "detector.iou_balanced_sampling.enabled"
BFP = "detector.balanced_feature_pyramid.enabled"
ALPHA = "detector.balanced_l1_loss.alpha"
GAMMA = "detector.balanced_l1_loss.gamma"

BASE = {
    "detector": {"backbone": "tiny", "num_classes": 3, "min_size": 64, "max_size": 64,
                 "balanced_l1_loss": {"enabled": False}},
    "data": {"kind": "synthetic"},
    "schedule": {"epochs": 2},
}
ABLATION = {
    "name": "toy-ablation", **BASE,
    "grid": {IOU: [False, True], BFP: [False, True]},
    "seeds": [0, 1, 2, 3],
    "reference": [
        {"label": "baseline", "match": {IOU: False, BFP: False},
         "metrics": {"bbox_mAP": 0.359, "bbox_mAP_50": 0.580}},
        {"label": "+ IoU-balanced sampling", "match": {IOU: True, BFP: False},
         "metrics": {"bbox_mAP": 0.368, "bbox_mAP_50": 0.580}},
    ],
}
SEARCH = {
    "name": "toy-search", **BASE,
    "search": {"space": {ALPHA: {"type": "float", "low": 0.1, "high": 1.0},
                         GAMMA: {"type": "float", "low": 0.5, "high": 2.0}},
               "num_trials": 4, "metric": "bbox_mAP", "pruner": "none"},
}

A = {IOU: False, BFP: False}  # the baseline: every component off (BL1 is off in the base)
B = {IOU: True, BFP: False}
C = {IOU: False, BFP: True}
D = {IOU: True, BFP: True}
# (configuration, seed, final bbox_mAP, state). Failed, pruned and running trials log an
# absurd first-epoch mAP: averaging any of them in would move a mean visibly.
TRIALS = [
    (A, 0, 0.30, "finished"), (A, 1, 0.31, "finished"), (A, 2, 0.32, "finished"),
    (B, 0, 0.33, "finished"), (B, 1, 0.34, "finished"), (B, 2, 0.35, "finished"),
    (B, 3, 0.90, "pruned"),
    (C, 0, 0.30, "finished"), (C, 1, 0.32, "finished"), (C, 2, 0.34, "finished"),
    (D, 0, 0.36, "finished"), (D, 1, 0.95, "failed"), (D, 2, 0.97, "running"),
]
OOM = "RuntimeError: CUDA out of memory (tried to allocate 2.00 GiB)"
# Search trials: (alpha, gamma, final bbox_mAP, state)
SEARCH_TRIALS = [(0.5, 1.5, 0.372, "finished"), (0.2, 1.0, 0.367, "finished"),
                 (0.3, 1.0, 0.365, "finished"), (0.9, 0.6, 0.99, "pruned")]


def epochs(final, seed):
    """Two epochs of engine metrics ending at `final` bbox_mAP; APs is NaN for seed 2 (a set
    without small objects gives NaN), so APs has n = 2 where AP has n = 3."""
    out = []
    for epoch, value in ((1, final - 0.05), (2, final)):
        out.append({
            "epoch": epoch, "loss": 1.0 / epoch, "lr": 0.01, "sec_per_iter": 0.4 + 0.2 * epoch,
            "train_images_per_sec": 7.0, "peak_memory_mb": 100.0 * epoch + seed,
            "epoch_seconds": 5.0, "eval_seconds": 1.0, "eval_images_per_sec": 40.0 + epoch,
            "bbox_mAP": value, "bbox_mAP_50": value + 0.2, "bbox_mAP_75": value - 0.05,
            "bbox_mAP_s": math.nan if seed == 2 else value - 0.1, "bbox_mAP_m": value,
            "bbox_mAP_l": value + 0.1, "bbox_AR_100": value + 0.15,
        })
    return out


def record(tracker, study, params, seed, final, state, number):
    """What the driver writes for a trial that ends in `state` (harness/study.py's _Driver)."""
    run_id = tracker.open_trial(study.make_trial(params, seed), None, number)
    history = epochs(final, seed)
    if state == "finished":
        for metrics in history:
            tracker.log_epoch(run_id, metrics)
        tracker.finish_trial(run_id, {"history": history, "final": history[-1],
                                      "eval_summary": "AP 0.3", "per_class_AP": {}}, 11.0, 1)
    elif state in ("failed", "pruned"):
        tracker.log_epoch(run_id, history[0])
        tracker.end_trial(run_id, state, attempts=2 if state == "failed" else 1,
                          reason=OOM if state == "failed" else None)
    return run_id  # "running": opened, never ended (a driver that died)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import optuna

    from harness import search

    root = tmp_path_factory.mktemp("report")
    files = {}
    for name, mapping in (("ablation", ABLATION), ("search", SEARCH)):
        files[name] = root / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(mapping, sort_keys=False))
    work = root / "work"
    study = load_study(str(files["ablation"]))
    tracker = Tracker(study, str(work))
    tracker.start_parent(str(work), ["libra", "run", str(files["ablation"])])
    for number, (params, seed, final, state) in enumerate(TRIALS):
        record(tracker, study, params, seed, final, state, number)
    tracker.end_parent("FAILED", {"total": 16, "finished": 10, "failed": 1, "pruned": 1}, 0.36)

    # A search in the same store, with its Optuna journal under its own work dir.
    search_work = root / "search-work"
    sstudy = load_study(str(files["search"]))
    stracker = Tracker(sstudy, str(search_work), tracker.uri)
    stracker.start_parent(str(search_work), ["libra", "run", str(files["search"])])
    ostudy = search.open_study(sstudy, str(search_work))
    for alpha, gamma, final, state in SEARCH_TRIALS:
        ostudy.enqueue_trial({ALPHA: alpha, GAMMA: gamma})
        otrial = ostudy.ask()
        params = search.suggest(otrial, sstudy)
        record(stracker, sstudy, params, 0, final, state, otrial.number)
        if state == "finished":
            ostudy.tell(otrial, final)
        else:
            ostudy.tell(otrial, state=optuna.trial.TrialState.PRUNED)
    stracker.end_parent("FINISHED", {"total": 4, "finished": 3, "failed": 0, "pruned": 1}, 0.372)
    return {"root": root, "uri": tracker.uri, "work": work, "search_work": search_work,
            "study": study, "search_study": sstudy, "files": files}


@pytest.fixture(scope="module")
def runs(store):
    return report.load_study_runs(store["uri"], "toy-ablation")


@pytest.fixture(scope="module")
def table(runs, store):
    return report.study_table(runs, store["study"])


# ------------------------------------------------------------------------------------------
# Reading MLflow.
# ------------------------------------------------------------------------------------------
def test_load_study_runs_reads_the_trackers_schema(runs):
    assert len(runs) == len(TRIALS)  # the parent runs are not trials
    states = sorted(runs["state"])
    assert states == sorted(t[3] for t in TRIALS)
    failed = runs[runs["state"] == "failed"].iloc[0]
    assert failed["reason"] == OOM and failed["seed"] == 1
    assert failed["params"] == {IOU: True, BFP: True}
    assert bool(failed["iou_balanced_sampling"]) is True and bool(failed["balanced_l1_loss"]) is False
    # params come back typed (yaml.safe_load of the logged text)
    config = failed["config"]
    assert config[ALPHA] == 0.5 and config["detector.anchor_sizes"] == [32, 64, 128, 256, 512]
    assert config["detector.pretrained"] is None and config[IOU] is True
    finished = runs[runs["state"] == "finished"]
    assert finished["mean_sec_per_iter"].tolist() == pytest.approx([0.7] * 10)  # (0.6 + 0.8) / 2
    assert finished["eval_images_per_sec"].tolist() == pytest.approx([42.0] * 10)  # last epoch


def test_provenance_names_code_versions_devices_and_machine_tags(runs):
    import pandas as pd

    parents = pd.DataFrame([{"run_id": "p", "tags": {"libra.machine.gpu": "NVIDIA H200",
                                                      "libra.machine.host": "node-3"}}])
    lines = report.describe_provenance(runs, parents)
    assert any(line.startswith("code: git ") for line in lines)
    assert any(line.startswith("versions: python ") and "mlflow" in line for line in lines)
    assert "device: cpu" in lines and "machine.gpu: NVIDIA H200" in lines
    assert "resources per trial: 1 worker(s) x (1 CPU, 0 GPU)" in lines


def test_empty_when_the_store_or_the_study_is_missing(store, tmp_path):
    assert len(report.load_study_runs(store["uri"], "no-such-study")) == 0
    missing = "sqlite:///" + str(tmp_path / "nothing" / "mlflow.db")
    assert len(report.load_study_runs(missing, "toy-ablation")) == 0
    assert not (tmp_path / "nothing").exists()  # a report never creates a store


# ------------------------------------------------------------------------------------------
# The table's numbers.
# ------------------------------------------------------------------------------------------
def test_rows_follow_the_grid_with_mean_std_n_over_finished_seeds(table):
    assert table["label"].tolist() == ["no components", "BFP", "IoU-sampling", "IoU-sampling + BFP"]
    a, c, b, d = range(4)
    # A: 30, 31, 32 -> mean 31, s^2 = (1 + 0 + 1) / 2 = 1
    # C: 30, 32, 34 -> mean 32, s^2 = (4 + 0 + 4) / 2 = 4
    # B: 33, 34, 35 -> 34 +- 1; its pruned seed 3 (90 at epoch 1) is not in
    # D: 36 alone; its failed (95) and running (97) seeds are not in
    expected = {a: (31.0, 1.0, 3), c: (32.0, 2.0, 3), b: (34.0, 1.0, 3), d: (36.0, math.nan, 1)}
    for row, (mean, std, n) in expected.items():
        assert table.at[row, "AP_mean"] == pytest.approx(mean, abs=1e-9)
        assert table.at[row, "AP_n"] == n
        if n > 1:
            assert table.at[row, "AP_std"] == pytest.approx(std, abs=1e-9)
        else:
            assert math.isnan(table.at[row, "AP_std"])
    assert table["n_trials"].tolist() == [3, 3, 4, 3] and table["n_finished"].tolist() == [3, 3, 3, 1]
    assert table.at[b, "seeds"] == "0;1;2"
    # Seeds differ within every row by design: no row is flagged as mixing configs (the MLflow
    # view's short `seed` param once was, in every row of every report).
    assert table.attrs["warnings"] == []
    # AP50 = AP + 20 points; APs: seed 2 logged NaN, so A's APs is over seeds 0, 1: 20, 21
    assert table.at[a, "AP50_mean"] == pytest.approx(51.0, abs=1e-9)
    assert table.at[a, "APs_n"] == 2 and table.at[a, "APs_mean"] == pytest.approx(20.5, abs=1e-9)
    assert table.at[a, "APs_std"] == pytest.approx(math.sqrt(0.5), abs=1e-9)  # (0.25 + 0.25) / 1
    # costs: mean_sec_per_iter 0.7 every trial; peak memory max over epochs = 200 + seed
    assert table.at[a, "sec_per_iter_mean"] == pytest.approx(0.7)
    assert table.at[a, "peak_mem_mb_mean"] == pytest.approx(201.0)  # (200 + 201 + 202) / 3
    assert table.at[a, "peak_mem_mb_std"] == pytest.approx(1.0)


def test_delta_ap_is_paired_by_seed_with_the_pooled_variance_and_holm(table):
    a, c, b, d = range(4)
    assert bool(table.at[a, "baseline"]) and table.at[a, "dAP_note"] == "baseline"
    assert "all three components off" in table.attrs["baseline_note"]

    # Closed form. A, B, C ran seeds 0-2, D seed 0 only (its other seeds failed / are running):
    #   A 30 31 32 | B 33 34 35 | C 30 32 34 | D 36       (AP points)
    # configuration + seed model: D's one run fits its own parameter exactly, so the residuals
    # are those of the balanced 3 x 3 two-way table: e = y - row - col + grand with rows 31, 34,
    # 32, seed means 31, 32.33, 33.67, grand 32.33 -> e = +-1/3 (A, B), -+2/3 (C), 0 at seed 1;
    # SSR = 4 (1/9) + 2 (4/9) = 4/3 on df = 10 runs - 6 parameters = 4 -> sigma^2 = 1/3.
    # B - A = 3 (paired: every seed +3); se = sqrt(sigma^2 (1/3 + 1/3)) = sqrt(2/9) = 0.471405.
    se = math.sqrt(2 / 9)
    assert table.at[b, "dAP"] == pytest.approx(3.0, abs=1e-9)
    assert table.at[b, "dAP_se"] == pytest.approx(se, abs=1e-9)
    assert table.at[b, "dAP_df"] == 4
    assert table.at[b, "dAP_p"] == pytest.approx(2 * stats.t.sf(3.0 / se, 4), rel=1e-9)
    # three comparisons (B, C, D): Bonferroni-simultaneous 95% -> t(1 - 0.05 / 6, 4) = 3.9608
    q = stats.t.ppf(1 - 0.05 / 6, 4)
    assert q == pytest.approx(3.9608, abs=1e-4)
    assert table.at[b, "dAP_low"] == pytest.approx(3.0 - q * se, abs=1e-9)  # +1.133
    assert table.at[b, "dAP_high"] == pytest.approx(3.0 + q * se, abs=1e-9)  # +4.867
    assert table.at[b, "dAP_separated"] is True and table.at[b, "dAP_note"] == ""
    # C - A = 1, same se: t = 2.12, p = 0.101, not separated
    assert table.at[c, "dAP"] == pytest.approx(1.0, abs=1e-9)
    assert table.at[c, "dAP_p"] == pytest.approx(2 * stats.t.sf(1.0 / se, 4), rel=1e-9)
    assert table.at[c, "dAP_low"] < 0 < table.at[c, "dAP_high"]
    assert table.at[c, "dAP_separated"] is False and table.at[c, "dAP_note"] == "not separated from zero"
    # D - A, from D's one run: 36 at seed 0, where A's fitted value is 31 + (31 - 32.33) = 29.67,
    # so D's mean over seeds is 36 + 1.33 = 37.33 and D - A = 6.33: the pooled variance gives the
    # single-seed row an interval a per-row test could not.
    assert table.at[d, "dAP"] == pytest.approx(19 / 3, abs=1e-9)
    assert math.isfinite(table.at[d, "dAP_low"]) and table.at[d, "dAP_separated"] is not None

    # The same numbers from statsmodels: OLS with treatment coding against A and seed dummies,
    # Holm from multipletests, the simultaneous intervals from conf_int at 0.05 / 3.
    import numpy as np
    import pandas as pd
    import statsmodels.api as sm
    from statsmodels.stats.multitest import multipletests

    cfg, seed = list("AAABBBCCCD"), [0, 1, 2] * 3 + [0]
    X = pd.DataFrame({"const": 1.0, **{f"cfg_{k}": [float(x == k) for x in cfg] for k in "BCD"},
                      **{f"seed_{k}": [float(x == k) for x in seed] for k in (1, 2)}})
    fit = sm.OLS(np.array([30, 31, 32, 33, 34, 35, 30, 32, 34, 36.0]), X).fit()
    names = {b: "cfg_B", c: "cfg_C", d: "cfg_D"}
    holm = multipletests([fit.pvalues[n] for n in names.values()], method="holm")[1]
    ci = fit.conf_int(alpha=0.05 / 3)
    for (row, name), p_holm in zip(names.items(), holm):
        assert table.at[row, "dAP"] == pytest.approx(fit.params[name], abs=1e-9)
        assert table.at[row, "dAP_se"] == pytest.approx(fit.bse[name], rel=1e-9)
        assert table.at[row, "dAP_p"] == pytest.approx(fit.pvalues[name], rel=1e-7)
        assert table.at[row, "dAP_p_holm"] == pytest.approx(p_holm, rel=1e-7)
        assert (table.at[row, "dAP_low"], table.at[row, "dAP_high"]) == pytest.approx(
            tuple(ci.loc[name]), abs=1e-7)
        assert table.at[row, "dAP_separated"] is bool(p_holm < 0.05)
    assert np.isfinite(table["dAP_p"].drop(index=a)).all()


def test_paired_deltas_hold_their_family_wise_error_and_joint_coverage():
    """By simulation, through the report's own code: 4 configurations x 3 seeds with a seed
    effect 10x the noise. Under the null (no configuration differs) Holm marks a row separated
    in at most 5% of studies (binomial 3-sigma slack); with true deltas (0, 0, 1.5) the three
    simultaneous intervals cover all true deltas at once in at least 95% of studies."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    col, sims, configs, seeds = report.AP_COLUMNS[0], 400, 4, 3
    truth = np.array([0.0, 0.0, 0.0, 1.5])
    false_alarm = covered = 0
    for _ in range(sims):
        seed_effect = rng.normal(0.0, 5.0, seeds)
        obs_null, obs_alt = [], []
        for i in range(configs):
            for s in range(seeds):
                noise = rng.normal(0.0, 0.5)
                obs_null.append((i, s, 30.0 + seed_effect[s] + noise))
                obs_alt.append((i, s, 30.0 + truth[i] + seed_effect[s] + noise))
        null = pd.DataFrame(index=range(configs))
        report._add_deltas(null, col, 0, 0.95, obs_null)
        false_alarm += bool(null["dAP_separated"].drop(index=0).any())
        alt = pd.DataFrame(index=range(configs))
        report._add_deltas(alt, col, 0, 0.95, obs_alt)
        rows = alt.drop(index=0)
        covered += bool(((rows["dAP_low"] <= truth[1:]) & (truth[1:] <= rows["dAP_high"])).all())
    slack = 3 * math.sqrt(0.05 * 0.95 / sims)
    assert false_alarm / sims <= 0.05 + slack
    assert covered / sims >= 0.95 - slack


def test_a_row_whose_runs_differ_in_a_config_key_is_flagged_by_that_key(runs, store):
    changed = runs.copy()
    index = changed.index[(changed["state"] == "finished") & (changed["seed"] == 1)
                          & ~changed["iou_balanced_sampling"] & ~changed["balanced_feature_pyramid"]][0]
    changed.at[index, "config"] = {**changed.at[index, "config"], "schedule.lr": 0.5}
    warnings = report.study_table(changed, store["study"]).attrs["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("row 'no components' mixes")
    assert "schedule.lr (0.5, null)" in warnings[0] and "seed" not in warnings[0]


def test_failed_pruned_and_running_are_listed_never_averaged(store, runs, table):
    listing = report.unfinished_trials(runs)
    assert sorted(listing["state"]) == ["failed", "pruned", "running"]
    failed = listing[listing["state"] == "failed"].iloc[0]
    assert failed["reason"] == OOM and "seed=1" in failed["label"]
    text = report.render_markdown_table(runs, store["study"])
    assert "Not in the table (never averaged)" in text and "CUDA out of memory" in text
    assert "pruned" in text and "running" in text
    # none of their first-epoch values (90, 95, 97) reached a mean
    assert table["AP_mean"].max() < 40


def test_reference_numbers_side_by_side(table):
    a, c, b, d = range(4)
    assert table.at[a, "paper_label"] == "baseline" and table.at[b, "paper_label"].startswith("+ IoU")
    assert table.at[a, "paper_AP"] == pytest.approx(35.9) and table.at[b, "paper_AP"] == pytest.approx(36.8)
    assert table.at[b, "paper_dAP"] == pytest.approx(0.9)  # the paper's own change: 36.8 - 35.9
    assert math.isnan(table.at[c, "paper_AP"]) and table.at[d, "paper_label"] == ""
    comparison = report.reference_comparison(table)
    assert comparison["row"].tolist() == ["no components", "IoU-sampling"]
    assert comparison.loc[1, "AP ours"] == "34.0 ± 1.0 (3)" and comparison.loc[1, "AP paper"] == "36.8"
    assert "paper AP" in report.to_markdown(table)


def test_baseline_falls_back_to_the_first_row_and_says_so(runs):
    # A sweep without an all-off row (every row has the sampler on): the first row is the baseline.
    subset = runs[[p[IOU] for p in runs["params"]]]
    table = report.ablation_table(subset, [IOU, BFP], order=[B, D])
    assert table["label"].tolist() == ["IoU-sampling", "IoU-sampling + BFP"]
    assert bool(table.at[0, "baseline"]) and "first row" in table.attrs["baseline_note"]
    # B (seeds 0-2) and D (seed 0): 4 runs, 4 parameters, no residual df. The paired delta is
    # D's seed-0 run minus B's seed-0 run, 36 - 33 = 3 (the unpaired difference of means is 2).
    assert table.at[1, "dAP"] == pytest.approx(3.0) and table.at[1, "dAP_note"] == report.NO_CI
    text = report.to_markdown(table)
    assert f"+3.0 ({report.NO_CI})" in text and "no difference is claimed" in text


def test_the_driver_can_pass_mlflow_search_runs_rows(store, runs):
    raw = trial_runs(store["uri"], "toy-ablation")
    assert report.render_markdown_table(raw, store["study"]) == \
        report.render_markdown_table(runs, store["study"])


# ------------------------------------------------------------------------------------------
# Markdown, CSV and LaTeX agree.
# ------------------------------------------------------------------------------------------
def markdown_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return split[0], split[2:]  # headers, rows (the second line is the alignment rule)


def latex_rows(text):
    lines = text.splitlines()
    body = lines[lines.index("\\midrule") + 1:lines.index("\\bottomrule")]
    header = lines[lines.index("\\toprule") + 1]
    cells = lambda line: [c.strip() for c in line.rstrip().removesuffix("\\\\").split(" & ")]
    return cells(header), [cells(line) for line in body]


def test_markdown_csv_and_latex_show_the_same_numbers(table):
    md_head, md = markdown_rows(report.to_markdown(table))
    tex_head, tex = latex_rows(report.to_latex(table))
    frame = list(csv.DictReader(io.StringIO(report.to_csv(table))))
    assert len(md) == len(tex) == len(frame) == 4 and len(md_head) == len(tex_head)

    def number(text):
        return float(text) if text not in ("", "nan") else math.nan

    for i, row in enumerate(frame):
        md_row, tex_row = dict(zip(md_head, md[i])), dict(zip(tex_head, tex[i]))
        for flag, title in report.COMPONENT_TITLES.items():
            on = row[flag] == "True"
            assert md_row[title] == ("✓" if on else "") and tex_row[title] == ("\\checkmark" if on else "")
        for col in report.DEFAULT_COLUMNS:
            mean, std, n = number(row[f"{col.key}_mean"]), number(row[f"{col.key}_std"]), int(row[f"{col.key}_n"])
            expected = (f"{mean:.{col.digits}f} ± {std:.{col.digits}f} ({n})" if n > 1
                        else f"{mean:.{col.digits}f} (1)" if n == 1 else "-")
            assert md_row[col.title] == expected, (i, col.key)
            assert tex_row[col.latex].replace(" $\\pm$ ", " ± ") == expected, (i, col.key)
        d, low, high = number(row["dAP"]), number(row["dAP_low"]), number(row["dAP_high"])
        if row["dAP_note"] == "baseline":
            expected = "baseline"
        elif math.isnan(low):
            expected = f"{d:+.1f} ({report.NO_CI})"
        else:
            expected = f"{d:+.1f} [{low:+.1f}, {high:+.1f}]"
        md_delta, tex_delta = md_row["ΔAP"], tex_row["$\\Delta$AP"]
        not_separated = row["dAP_separated"] == "False"
        assert md_delta == expected + (" †" if not_separated else "")
        assert tex_delta == expected + ("$^\\dagger$" if not_separated else "")
        if row["paper_AP"]:
            assert md_row["paper AP"] == tex_row["paper AP"] == f"{float(row['paper_AP']):.1f}"
    # the markdown states what the marks mean
    text = report.to_markdown(table)
    assert "† not separated from zero by Holm's test over the 3 comparisons" in text
    assert "+3.0 [+1.1, +4.9]" in text and "+1.0 [" in text


def test_latex_is_booktabs_and_escaped(table, runs):
    tex = report.to_latex(table)
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\begin{tabular}{ccc" in tex
    assert "95\\%" in tex  # the legend's percent sign is escaped
    # a swept value with LaTeX specials is escaped in its column
    sweep = report.ablation_table(runs, [IOU, "detector.arch"])
    assert sweep["detector.arch"].tolist() == ["faster_rcnn", "faster_rcnn"]
    assert "faster\\_rcnn" in report.to_latex(sweep) and "faster_rcnn" in report.to_markdown(sweep)
    assert report._latex_escape("num_bins & 50%") == "num\\_bins \\& 50\\%"


# ------------------------------------------------------------------------------------------
# Searches and plots.
# ------------------------------------------------------------------------------------------
def test_search_lists_the_best_trials(store):
    runs = report.load_study_runs(store["uri"], "toy-search")
    table = report.study_table(runs, store["search_study"])
    assert table["AP_mean"].tolist() == pytest.approx([37.2, 36.7, 36.5])  # the pruned 99 is not in
    assert table[ALPHA].tolist() == pytest.approx([0.5, 0.2, 0.3])
    text = report.to_markdown(table)
    assert "| trial" in text and "ΔAP" not in text and "alpha" in text


def png_ok(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n" and fh.seek(0, 2) > 1024


def test_plots_are_written(store, runs, table, tmp_path):
    histories = report.metric_histories(store["uri"], runs["run_id"])
    assert len(histories) == 2 * 10 + 2  # two epochs per finished trial, one per failed or pruned
    groups = {label: ids.split(";") for label, ids in zip(table["label"], table["run_ids"])}
    curves = plots.plot_curves(histories, groups, str(tmp_path / "curves.png"))
    bars = plots.plot_ablation_bars(table, str(tmp_path / "bars.png"))
    assert png_ok(curves) and png_ok(bars)
    assert plots.plot_curves(histories.iloc[0:0], groups, str(tmp_path / "none.png")) is None

    ostudy, why = plots.load_optuna_study("toy-search", str(store["search_work"]))
    assert why == ""
    written, notes = plots.plot_search(ostudy, str(tmp_path), params=[ALPHA, GAMMA])
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["optuna_contour_alpha_gamma.png", "optuna_history.png",
                     "optuna_importance.png"], notes
    assert all(png_ok(p) for p in written)
    missing, why = plots.load_optuna_study("toy-search", str(tmp_path / "elsewhere"))
    assert missing is None and "no Optuna journal" in why


def test_search_plots_skip_what_one_trial_cannot_show(tmp_path):
    import optuna

    ostudy = optuna.create_study(direction="maximize")
    ostudy.enqueue_trial({ALPHA: 0.5, GAMMA: 1.5})
    ostudy.optimize(lambda t: t.suggest_float(ALPHA, 0.1, 1) + t.suggest_float(GAMMA, 0.5, 2),
                    n_trials=1)
    written, notes = plots.plot_search(ostudy, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["optuna_history.png"]
    assert any(n.startswith("parameter importances: skipped") for n in notes)
    assert any(n.startswith("alpha-gamma contour: skipped") for n in notes)


# ------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------
def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_writes_the_report(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(store["files"]["ablation"]), "--work-dir", str(store["work"]),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ΔAP" in printed and "did not finish" in printed
    for name in ("report.md", "table.csv", "table.tex", "trials.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("curves_bbox_mAP.png", "ap_bars.png"):
        assert png_ok(out / name), name
    md = (out / "report.md").read_text()
    assert "# toy-ablation: ablation report" in md and store["uri"] in md
    assert "libra report " in md and "--work-dir" in md  # how to make it again
    assert "libra run " in md  # how the runs were made (the parent run's command)
    assert "versions: python" in md
    assert "CUDA out of memory" in md and "## Against the paper" in md
    assert "![ap_bars.png](ap_bars.png)" in md
    assert report.to_markdown(report.study_table(report.load_study_runs(
        store["uri"], "toy-ablation"), store["study"])) in md
    trials = list(csv.DictReader(io.StringIO((out / "trials.csv").read_text())))
    assert len(trials) == len(TRIALS) and {"run_id", "bbox_mAP", "state"} <= set(trials[0])


def test_cli_by_study_name_uses_the_recorded_study(store, tmp_path, capsys):
    out = tmp_path / "by-name"
    assert main(["report", "--study", "toy-ablation", "--tracking-uri", store["uri"],
                 "--out", str(out)]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    assert "## Against the paper" in md  # the reference came from the parent's study.yaml
    assert (out / "table.csv").read_text() == report.to_csv(report.study_table(
        report.load_study_runs(store["uri"], "toy-ablation"), store["study"]))


def test_cli_search_report_has_optuna_plots(store, tmp_path, capsys):
    out = tmp_path / "search"
    assert main(["report", str(store["files"]["search"]), "--tracking-uri", store["uri"],
                 "--out", str(out)]) == 0  # the work dir comes from the parent run's tag
    capsys.readouterr()
    for name in ("optuna_history.png", "optuna_importance.png", "optuna_contour_alpha_gamma.png",
                 "curves_bbox_mAP.png"):
        assert png_ok(out / name), name
    assert "pruned" in (out / "report.md").read_text()


def test_cli_without_runs_fails_in_one_line(store, tmp_path, capsys):
    empty = tmp_path / "empty"
    assert main(["report", str(store["files"]["ablation"]), "--work-dir", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "no runs of study 'toy-ablation'" in line and "libra run" in line
    assert not empty.exists()


def test_cli_unreachable_server_fails_fast_in_one_line(store, tmp_path, capsys):
    started = time.monotonic()
    assert main(["report", str(store["files"]["ablation"]), "--tracking-uri", "http://127.0.0.1:9",
                 "--out", str(tmp_path / "o")]) == 2
    assert time.monotonic() - started < 15
    assert "cannot reach MLflow tracking server at http://127.0.0.1:9" in one_error_line(capsys)


def test_cli_needs_a_study(capsys):
    assert main(["report"]) == 2
    assert "give a study file" in one_error_line(capsys)


def test_cli_writes_effects_from_every_finished_run_with_seed_as_a_block(store, tmp_path, capsys):
    """effects.csv: the grid's main effects and interaction from the real MLflow store, equal to
    the same model fitted by statsmodels (predicted over the full grid x seeds, then the
    marginal means' difference); the paper's one-at-a-time delta sits beside the main effect."""
    import pandas as pd
    import statsmodels.formula.api as smf

    out = tmp_path / "effects"
    assert main(["report", str(store["files"]["ablation"]), "--work-dir", str(store["work"]),
                 "--out", str(out)]) == 0
    assert "residual SD" in capsys.readouterr().out  # the effects are printed too
    table = pd.read_csv(out / "effects.csv").set_index("key")
    assert list(table["kind"]) == ["main", "main", "interaction"]
    assert "## Effects (effects.csv)" in (out / "report.md").read_text()

    done = [(cfg, seed, final) for cfg, seed, final, state in TRIALS if state == "finished"]
    frame = pd.DataFrame({"iou": [str(c[IOU]) for c, _, _ in done], "bfp": [str(c[BFP]) for c, _, _ in done],
                          "seed": [str(s) for _, s, _ in done], "y": [100 * f for _, _, f in done]})
    fit = smf.ols("y ~ seed + iou * bfp", frame).fit()
    grid = pd.DataFrame([{"iou": i, "bfp": b, "seed": s} for i in ("False", "True")
                         for b in ("False", "True") for s in ("0", "1", "2")])
    grid["y"] = fit.predict(grid)
    means = grid.groupby("iou")["y"].mean()
    assert table.at[IOU, "estimate"] == pytest.approx(means["True"] - means["False"], abs=1e-9)
    means = grid.groupby("bfp")["y"].mean()
    assert table.at[BFP, "estimate"] == pytest.approx(means["True"] - means["False"], abs=1e-9)
    assert int(table.at[IOU, "df"]) == int(fit.df_resid) == 10 - 6  # 10 runs; rank: mean, 2 seeds, 2 mains, 1 interaction
    assert table.at[IOU, "paper"] == pytest.approx(0.9, abs=1e-9)  # (0.368 - 0.359) x 100
    assert 0.0 <= table.at[IOU, "p"] <= table.at[IOU, "p_holm"] <= 1.0


def test_evaluation_noise_sets_the_bootstrap_sd_beside_the_seed_sd():
    import pandas as pd

    runs = pd.DataFrame({"state": ["finished", "finished", "failed", "finished"],
                         "bbox_mAP_boot_sd": [0.006, 0.008, 0.5, math.nan]})
    noise = report.evaluation_noise(runs)
    # root mean square of 0.6 and 0.8 AP points; the failed run and the NaN are left out
    assert noise["eval_sd"] == pytest.approx(math.sqrt((0.36 + 0.64) / 2)) and noise["eval_sd_runs"] == 2
    assert report.evaluation_noise(runs.drop(columns=["bbox_mAP_boot_sd"])) == {}
    lines = report.noise_lines({"sigma": 2.0, **noise})
    assert "evaluation SD 0.707 AP points" in lines[0] and "seed-to-seed noise dominates" in lines[1]
    assert "as large as the seeds'" in report.noise_lines({"sigma": 0.5, **noise})[1]
    assert "both matter" in report.noise_lines({"sigma": 1.2, **noise})[1]
    assert "not measured" in report.noise_lines({"sigma": 1.0})[0]


def test_the_report_says_whether_the_runs_were_reproducible():
    cpu = report.reproducibility_line([{"schedule.device": "auto", "resources.gpus_per_worker": 0}])
    assert cpu.startswith("reproducibility: CPU runs") and "bit-identical" in cpu
    gpu = report.reproducibility_line([{"schedule.device": "auto", "resources.gpus_per_worker": 1}])
    assert "not bit-identical" in gpu and "roi_align" in gpu and "removes what torch can" in gpu
    strict = report.reproducibility_line([{"schedule.device": "cuda", "schedule.deterministic": True}])
    assert "schedule.deterministic was on" in strict
