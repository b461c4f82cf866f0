"""The factorial effects and the seeds planner do what the report claims, checked by simulation.

Simulated studies: a 2x2x2 grid (the Table 2 design) x S seeds with known main effects, one known
two-way interaction, a per-seed offset (the block) and Gaussian noise. The same `EffectsDesign`
the report builds fits 1,000 simulated outcome vectors at once, so what is checked is the shipped
code. Every random draw comes from a fixed NumPy seed: the figures are the same on every run.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness import effects, planner

A, B, C = "detector.a.enabled", "detector.b.enabled", "detector.c.enabled"
TRUE_MAIN = {A: 1.0, B: 0.0, C: -0.5}  # AP points: level true minus level false
TRUE_AB = 0.8  # A's effect is 0.8 larger when B is on (a difference of differences)
SIGMA = 1.0
SIMS = 1000


def grid_runs(num_seeds: int):
    """(settings per run, seed per run): every configuration of the 2^3 grid with each seed."""
    values, seeds = [], []
    for combo in itertools.product([False, True], repeat=3):
        for seed in range(num_seeds):
            values.append(dict(zip((A, B, C), combo)))
            seeds.append(seed)
    return values, seeds


def simulate(values, seeds, rng, sims=SIMS, main=TRUE_MAIN, ab=TRUE_AB, sigma=SIGMA):
    """[runs, sims] outcomes: mu + main effects + the A x B interaction + seed block + noise."""
    mean = np.array([30.0 + sum(main[k] for k in main if v[k]) + (ab if v[A] and v[B] else 0.0)
                     for v in values])
    block = rng.normal(0.0, 2.0, size=(max(seeds) + 1, sims))[np.asarray(seeds)]  # a seed's luck
    return mean[:, None] + block + rng.normal(0.0, sigma, size=(len(values), sims))


def true_value(contrast) -> float:
    # Main effects average over the other factors: A's and B's each include half the A x B
    # interaction (B's effect is 0.8 larger when A is on, too).
    if contrast.kind == "main":
        return TRUE_MAIN[contrast.key] + (TRUE_AB / 2 if contrast.key in (A, B) else 0.0)
    return TRUE_AB if contrast.key == f"{A} x {B}" else 0.0


def test_estimates_are_unbiased_and_intervals_cover_at_95_percent():
    values, seeds = grid_runs(2)
    design = effects.build_design(values, seeds, [A, B, C])
    assert design.blocked and design.df_resid == 16 - 1 - 1 - 3 - 3  # mu, seed, mains, 2-ways
    fit = design.estimate(simulate(values, seeds, np.random.default_rng(0)))
    for i, contrast in enumerate(design.contrasts):
        truth = true_value(contrast)
        est = fit["estimate"][i]
        # Unbiased: the mean of 1,000 estimates within 4 of its standard errors of the truth.
        assert abs(est.mean() - truth) < 4 * est.std() / math.sqrt(SIMS), contrast.term
        covered = ((fit["ci_low"][i] <= truth) & (truth <= fit["ci_high"][i])).mean()
        assert 0.93 <= covered <= 0.97, (contrast.term, covered)


def test_one_fit_matches_statsmodels_ols_and_the_cell_means():
    import statsmodels.formula.api as smf

    values, seeds = grid_runs(3)
    y = simulate(values, seeds, np.random.default_rng(1), sims=1)[:, 0]
    table = effects._rows(effects.build_design(values, seeds, [A, B, C]), y, 0.95)
    frame = pd.DataFrame({"a": [v[A] for v in values], "b": [v[B] for v in values],
                          "c": [v[C] for v in values], "seed": seeds, "y": y}).astype(
        {"a": int, "b": int, "c": int})
    # The same model in statsmodels with +/-1 coding: a main effect is twice its coefficient.
    for col in "abc":
        frame[col] = 2 * frame[col] - 1
    frame["seed"] = frame["seed"].astype(str)  # a string column is a categorical block in patsy
    ols = smf.ols("y ~ seed + a + b + c + a:b + a:c + b:c", frame).fit()
    main = table[table["kind"] == "main"].set_index("key")
    for key, col in ((A, "a"), (B, "b"), (C, "c")):
        assert main.at[key, "estimate"] == pytest.approx(2 * ols.params[col], abs=1e-10)
        assert main.at[key, "se"] == pytest.approx(2 * ols.bse[col], abs=1e-10)
        assert main.at[key, "p"] == pytest.approx(ols.pvalues[col], abs=1e-10)
        # On a complete balanced grid it is the difference of the two levels' plain means.
        on = np.mean([yi for v, yi in zip(values, y) if v[key]])
        off = np.mean([yi for v, yi in zip(values, y) if not v[key]])
        assert main.at[key, "estimate"] == pytest.approx(on - off, abs=1e-10)
    inter = table[table["kind"] == "interaction"].set_index("key")
    assert inter.at[f"{A} x {B}", "estimate"] == pytest.approx(4 * ols.params["a:b"], abs=1e-10)
    assert int(table["df"].iloc[0]) == int(ols.df_resid)


def test_holm_keeps_the_family_wise_error_at_5_percent_when_nothing_is_real():
    values, seeds = grid_runs(2)
    design = effects.build_design(values, seeds, [A, B, C])
    sims = 4000
    null = simulate(values, seeds, np.random.default_rng(2), sims=sims,
                    main={A: 0.0, B: 0.0, C: 0.0}, ab=0.0)
    fit = design.estimate(null)
    any_raw = (fit["p"] < 0.05).any(axis=0).mean()
    any_holm = (fit["p_holm"] < 0.05).any(axis=0).mean()
    assert any_raw > 0.15  # six tests unadjusted: about 1 - 0.95^6 = 26% of studies
    # Holm's bound is 5%; for six nearly independent tests its exact FWER is about
    # 1 - (1 - 0.05 / 6)^6 = 4.9%. 4,000 simulated studies estimate it to a binomial SD of 0.34
    # points, so the check allows two SDs above the bound (an unadjusted family fails it by 20).
    assert any_holm <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / sims), any_holm


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(3).uniform(0, 0.2, size=(7, 20))
    p[2, 5] = np.nan
    ours = effects.holm(p)
    for j in range(p.shape[1]):
        finite = np.isfinite(p[:, j])
        expected = multipletests(p[finite, j], method="holm")[1]
        np.testing.assert_allclose(ours[finite, j], expected, rtol=0, atol=1e-12)
    assert np.isnan(ours[2, 5])


def test_the_planners_seed_count_reaches_its_power_in_simulation():
    values, seeds = grid_runs(2)
    design = effects.build_design(values, seeds, [A, B, C])
    target = 1.0
    needed = planner.seeds_needed(design, SIGMA, target)
    main_c = next(i for i, c in enumerate(design.contrasts) if c.key == C)
    r = needed[main_c]
    assert r is not None and r >= 2
    # At r seeds a true effect of `target` is found at least 80% of the time; at r - 1 (when the
    # planner did not stop at its floor of 2) less often than 80% (the count is the smallest).
    def detected(num_seeds):
        v, s = grid_runs(num_seeds)
        d = effects.build_design(v, s, [A, B, C])
        y = simulate(v, s, np.random.default_rng(4), main={A: 0.0, B: 0.0, C: target}, ab=0.0)
        fit = d.estimate(y)
        i = next(k for k, c in enumerate(d.contrasts) if c.key == C)
        return (fit["p"][i] < planner.ALPHA).mean()

    assert detected(r) >= 0.8 - 0.025  # 1,000 simulated studies: binomial SD 0.013
    if r > 2:
        assert detected(r - 1) < 0.8 + 0.025
    # The power formula itself agrees with that simulation.
    unit, df = planner.design_at(design, r)
    assert planner.power(target, SIGMA * unit[main_c], df) == pytest.approx(detected(r), abs=0.04)


def test_design_at_scaling_equals_the_design_built_at_that_many_seeds():
    values, seeds = grid_runs(2)
    design = effects.build_design(values, seeds, [A, B, C])
    for r in (3, 5):
        unit, df = planner.design_at(design, r)
        built = planner.complete_design(design, r)
        np.testing.assert_allclose(unit, built.unit_se(), rtol=1e-10)
        assert df == built.df_resid


def test_an_incomplete_grid_and_a_single_run_per_cell_say_what_they_cannot_estimate():
    values, seeds = grid_runs(1)
    # One run per configuration: 8 runs, 7 parameters (mean, 3 mains, 3 two-ways): one df left,
    # the three-way interaction's. With two factors (4 runs, 4 parameters) none would be left,
    # so the interaction is pooled into the residual and the note says so.
    table = effects._rows(effects.build_design(values, seeds, [A, B, C]),
                          np.arange(8, dtype=float) ** 2, 0.95)
    assert table.attrs["df_resid"] == 1 and not table.attrs["blocked"]
    two = [{A: v[A], B: v[B]} for v in values if not v[C]]
    table = effects._rows(effects.build_design(two, [0] * 4, [A, B]), np.array([0., 1., 3., 7.]), 0.95)
    assert effects.INTERACTIONS_POOLED in table.attrs["notes"]
    assert set(table["kind"]) == {"main"} and table.attrs["df_resid"] == 1
    # Drop every run with A on and B on: the A x B interaction is no longer estimable.
    values, seeds = grid_runs(2)
    kept = [i for i, v in enumerate(values) if not (v[A] and v[B])]
    design = effects.build_design([values[i] for i in kept], [seeds[i] for i in kept], [A, B, C])
    y = np.random.default_rng(5).normal(size=len(kept))
    table = effects._rows(design, y, 0.95).set_index("term")
    assert table.at[f"{A} x {B}", "note"] == effects.NOT_ESTIMABLE
    assert math.isnan(table.at[f"{A} x {B}", "estimate"])


def test_delta_table_pairs_by_seed():
    # Two configurations, three seeds; the seed offsets are large and shared, the true delta
    # is exactly 1.5 with tiny noise, so pairing by seed recovers it with a small interval.
    rng = np.random.default_rng(6)
    offsets = np.array([0.0, 10.0, -7.0])
    ids, seeds, y = [], [], []
    for config, shift in (("base", 0.0), ("x", 1.5)):
        for s in range(3):
            ids.append(config)
            seeds.append(s)
            y.append(20.0 + offsets[s] + shift + rng.normal(0, 0.01))
    table = effects.delta_table(ids, seeds, y, "base")
    row = table.iloc[0]
    assert row["level"] == "x" and row["estimate"] == pytest.approx(1.5, abs=0.05)
    assert row["ci_high"] - row["ci_low"] < 0.2  # unpaired, the seeds' spread (SD 8.5) would swamp it
    assert bool(row["separated"])


def test_power_is_finite_where_scipys_noncentral_t_gives_nan():
    """The planner's power at small df and large noncentrality (nct.sf returns NaN at nc = 80,
    df = 1): equal to nct where nct is finite, 1 in the limit, and the detectable effect of a
    1-df design (a 2 x 2 grid with one seed) is found instead of failing."""
    from scipy import stats

    for df, nc in ((1, 5.0), (1, 20.0), (2, 10.0), (8, 5.0)):
        q = stats.t.ppf(0.975, df)
        assert planner.power(nc, 1.0, df) == pytest.approx(
            stats.nct.sf(q, df, nc) + stats.nct.cdf(-q, df, nc), rel=1e-9)
    assert planner.power(80.0, 1.0, 1) == pytest.approx(1.0, abs=1e-8)
    assert planner.power(40.0, 1.0, 8) == 1.0
    d = planner.detectable_effect(0.1, 1)
    assert planner.power(d, 0.1, 1) == pytest.approx(0.8, abs=1e-6)
    assert 1.0 < d < 4.0  # t(0.975, 1) = 12.7: about 20 standard errors at df 1


# ------------------------------------------------------------------------------------------
# effects_table on a report-shaped frame of runs (no MLflow): what it reads, and the paper column.
def report_runs():
    """A 2 x 2 grid (A in params, B only in the config) x seeds 0, 1, AP as MLflow stores it,
    plus runs that must be left out: failed, running, a NaN metric."""
    # A failed run first: what is left out must not end the reading.
    rows = [{"state": "failed", "bbox_mAP": 0.9, "seed": 0, "params": {A: False}, "config": {B: False}}]
    for a, b, seed, ap in ((False, False, 0, 0.300), (False, False, 1, 0.310),
                           (True, False, 0, 0.330), (True, False, 1, 0.345),
                           (False, True, 0, 0.290), (False, True, 1, 0.305),
                           (True, True, 0, 0.350), (True, True, 1, 0.360)):
        rows.append({"state": "finished", "bbox_mAP": ap, "seed": seed,
                     "params": {A: a}, "config": {A: not a, B: b}})  # params win over config
    rows += [{"state": "failed", "bbox_mAP": 0.9, "seed": 0, "params": {A: True}, "config": {B: True}},
             {"state": "running", "bbox_mAP": 0.9, "seed": 1, "params": {A: True}, "config": {B: True}},
             {"state": "finished", "bbox_mAP": math.nan, "seed": 1, "params": {A: True},
              "config": {B: True}}]
    return pd.DataFrame(rows)


def test_effects_table_reads_finished_runs_in_shown_units_with_the_papers_step():
    from types import SimpleNamespace

    reference = [{"match": {A: False, B: False}, "metrics": {"bbox_mAP": 0.30}},
                 {"match": {A: True, B: False}, "metrics": {"bbox_mAP": 0.34}},
                 {"match": {A: True, B: True}, "metrics": {"bbox_mAP_50": 0.5}},  # no AP: ignored
                 SimpleNamespace(match={A: False, B: True}, metrics={"bbox_mAP": 0.10})]
    table = effects.effects_table(report_runs(), [A, B], labels={A: "a", B: "b"}, reference=reference)
    assert table.attrs["n_runs"] == 8 and table.attrs["blocked"]
    rows = table.set_index("term")
    # Balanced 2 x 2 x 2 seeds: the main effect is the difference of the two levels' means, x 100.
    assert rows.at["a", "estimate"] == pytest.approx((33.0 + 34.5 + 35 + 36 - 30 - 31 - 29 - 30.5) / 4)
    assert rows.at["b", "estimate"] == pytest.approx((29 + 30.5 + 35 + 36 - 30 - 31 - 33 - 34.5) / 4)
    assert rows.at["a x b", "estimate"] == pytest.approx((35.5 - 29.75) - (33.75 - 30.5))
    assert rows.at["a", "key"] == A and rows.at["a", "label"] == "a" and rows.at["a", "level"] == "true"
    # The paper's one-at-a-time step for a: (0.34 - 0.30) x 100, only baseline -> a with b equal.
    # For b the only pair is the attribute-style row (0.10) against the baseline: -20, far outside.
    assert rows.at["a", "paper"] == pytest.approx(4.0)
    assert rows.at["b", "paper"] == pytest.approx(-20.0)
    assert rows.at["b", "paper_outside"] is True
    assert rows.at["a", "paper_outside"] is bool(not rows.at["a", "ci_low"] <= 4.0 <= rows.at["a", "ci_high"])
    assert math.isnan(rows.at["a x b", "paper"]) and rows.at["a x b", "paper_outside"] is None
    # Scale 1 (the metric's own units): estimates a hundredth, the paper's step too.
    small = effects.effects_table(report_runs(), [A, B], scale=1.0, reference=reference).set_index("key")
    assert small.at[A, "estimate"] == pytest.approx(rows.at["a", "estimate"] / 100)
    assert small.at[A, "paper"] == pytest.approx(0.04)
    # The first baseline row that differs only in this factor, not the first baseline row: for
    # b, (a on, b off) comes first but differs in a too; (a off, b off) is the pair.
    reordered = [reference[1], reference[0], reference[3]]
    rows2 = effects.effects_table(report_runs(), [A, B], labels={A: "a", B: "b"},
                                  reference=reordered).set_index("term")
    assert rows2.at["b", "paper"] == pytest.approx(-20.0)
    # One factor (no interaction rows): the outside flag is still a plain bool.
    one = effects.effects_table(report_runs(), [A], reference=reference[:2])
    assert one.at[0, "paper"] == pytest.approx(4.0) and isinstance(one.at[0, "paper_outside"], bool)
    # No reference row names a pair: no paper column at all.
    assert "paper" not in effects.effects_table(report_runs(), [A, B], reference=reference[:1]).columns


def test_effects_table_levels_order_names_the_baseline():
    table = effects.effects_table(report_runs(), [A, B], levels={A: [True, False]}).set_index("key")
    main = table[table["kind"] == "main"]
    assert main.at[A, "level"] == "false"
    assert main.at[A, "estimate"] == pytest.approx(-(33.0 + 34.5 + 35 + 36 - 30 - 31 - 29 - 30.5) / 4)


def test_effects_table_without_runs_or_metric_says_so():
    for runs in (None, pd.DataFrame(), report_runs().drop(columns="bbox_mAP"),
                 report_runs().assign(state="failed")):
        table = effects.effects_table(runs, [A, B])
        assert list(table.columns) == effects.EFFECT_COLUMNS and len(table) == 0
        assert table.attrs["n_runs"] == 0 and table.attrs["df_resid"] == 0
        assert table.attrs["notes"] == ["no finished run: nothing to estimate"]
        assert math.isnan(table.attrs["sigma"]) and table.attrs["design"] is None
    values, seeds, y = effects.finished_values(report_runs(), [A, B], metric="bbox_mAP_50")
    assert values == [] and seeds == [] and len(y) == 0
    assert effects.effects_table(None, [A], confidence=0.9).attrs["confidence"] == 0.9
    assert effects.effects_table(None, [A]).attrs["blocked"] is False


def test_finished_values_defaults_to_bbox_map_in_ap_points():
    values, seeds, y = effects.finished_values(report_runs(), [A, B])
    assert y.dtype == float and list(y) == pytest.approx([30.0, 31.0, 33.0, 34.5, 29.0, 30.5, 35.0, 36.0])
    assert seeds == [0, 1] * 4
    assert values[2] == {A: True, B: False}  # A from params, B from the config


def test_a_factor_with_one_level_is_left_out_with_a_note():
    runs = report_runs()
    runs = runs[runs["config"].map(lambda c: not c[B])]
    table = effects.effects_table(runs, [A, B], labels={B: "b"})
    assert list(table["key"]) == [A]
    assert "b has one level in these runs: no effect to estimate" in table.attrs["notes"]
    assert table.at[0, "estimate"] == pytest.approx((33.0 + 34.5 - 30 - 31) / 2)


def test_an_exact_fit_has_no_spread_not_a_rounding_interval():
    """Configurations that every seed moves alike (two settings that train the same model)
    fit exactly; rounding leaves ~1e-15 residuals that must not become an interval."""
    values, seeds = grid_runs(2)
    y = np.array([30.0 + (1.0 if v[A] else 0.0) + 0.5 * s for v, s in zip(values, seeds)])
    table = effects._rows(effects.build_design(values, seeds, [A, B, C]), y, 0.95).set_index("term")
    assert table.at[A, "estimate"] == pytest.approx(1.0, abs=1e-9)
    assert table.at[A, "note"] == effects.NO_SPREAD and table.at[A, "separated"] is None
    assert math.isnan(table.at[A, "p"]) and table.attrs["sigma"] == 0.0
    # The threshold is relative to the data: the same exact fit at a memory-in-MB scale.
    big = effects._rows(effects.build_design(values, seeds, [A, B, C]), 3e4 + 1e3 * y, 0.95)
    assert big.attrs["sigma"] == 0.0 and (big["note"] == effects.NO_SPREAD).all()


def test_rows_at_one_and_zero_residual_df_and_another_confidence():
    # One run per cell of the 2^3 grid: df 1 (the three-way interaction's), every row numbered.
    values, seeds = grid_runs(1)
    y = np.array([0.0, 1.0, 3.0, 7.0, 2.0, 2.5, 6.0, 9.0])
    table = effects._rows(effects.build_design(values, seeds, [A, B, C]), y, 0.95)
    assert (table["df"] == 1).all() and (table["note"] == "").all()
    assert np.isfinite(table["p"]).all() and np.isfinite(table["ci_low"]).all()
    assert table.attrs["confidence"] == 0.95
    # Two factors, one run per cell, no interaction: 4 runs, 3 parameters, df 1; with the
    # interaction forced in there is no df left: numbers without intervals, and the note.
    two = [{A: v[A], B: v[B]} for v in values if not v[C]]
    design = effects.build_design(two, [0] * 4, [A, B], interactions=False)
    assert design.df_resid == 1
    y2 = np.array([0.0, 1.0, 3.0, 7.5])
    fit = design.estimate(y2)
    assert fit["estimate"].shape == (len(design.contrasts),) and np.isfinite(fit["p"]).all()
    design.df_resid = 0  # what a saturated design reports: no residual to estimate sigma from
    table = effects._rows(design, y2, 0.95)
    assert (table["note"] == effects.NO_RESIDUAL_DF).all() and table["df"].isna().all()
    assert table["p"].isna().all() and list(table["separated"]) == [None, None]
    # No factor varies: no rows, but the columns are there.
    none = effects._rows(effects.build_design([{A: True}] * 3, [0, 1, 2], [A]), np.ones(3), 0.95)
    assert len(none) == 0 and list(none.columns) == effects.EFFECT_COLUMNS


def test_separated_uses_the_tables_confidence():
    rng = np.random.default_rng(12)
    values, seeds = grid_runs(2)
    # Find data where some effect's Holm p lies between 0.05 and 0.10.
    design = effects.build_design(values, seeds, [A, B, C])
    for _ in range(200):
        y = rng.normal(0.0, 1.0, size=len(values)) + 0.6 * np.array([v[A] for v in values])
        fit = design.estimate(y)
        hit = np.flatnonzero((fit["p_holm"] > 0.05) & (fit["p_holm"] < 0.10))
        if len(hit):
            break
    i = int(hit[0])
    at95, at90 = effects._rows(design, y, 0.95), effects._rows(design, y, 0.90)
    assert at95.at[i, "separated"] is False and at90.at[i, "separated"] is True
    assert at90.attrs["confidence"] == 0.90
    q = stats.t.ppf(0.95, design.df_resid)
    assert at90.at[i, "ci_high"] - at90.at[i, "estimate"] == pytest.approx(q * at90.at[i, "se"], rel=1e-9)
    # separated is a column of plain bools (None where no p), not numpy's.
    assert all(v is True or v is False for v in at90["separated"])
    assert at90.at[i, "note"] == "" and at90.at[i, "se"] < 1.0


def test_default_levels_are_first_seen_with_false_first():
    K = "detector.iou_balanced_sampling.num_bins"
    values = [{A: True, K: 5}, {A: False, K: 3}, {A: True, K: 3}, {A: False, K: 5}] * 2
    design = effects.build_design(values, [0, 0, 0, 0, 1, 1, 1, 1], [A, K, C])
    assert design.levels[A] == ["false", "true"]  # seen second, still the baseline
    assert design.levels[K] == ["5", "3"]  # first seen is the baseline
    assert [(c.term, c.level) for c in design.contrasts][:2] == [(A, "true"), (K, "3")]
    # C was never set: one level (null), named by its key when no label is given.
    assert design.notes == [f"{C} has one level in these runs: no effect to estimate"]


def test_a_factor_with_more_levels_names_each_level_in_its_terms():
    K = "detector.k"
    values = [{A: a, K: k} for a in (False, True) for k in (3, 5, 7)]
    design = effects.build_design(values * 2, [0] * 6 + [1] * 6, [A, K], labels={A: "a"})
    # A two-level factor's term is its label; a three-level one names the level, in the
    # interactions too; label and level of an interaction name both factors.
    assert [(c.term, c.label, c.level) for c in design.contrasts] == [
        ("a", "a", "true"), (f"{K}=5", K, "5"), (f"{K}=7", K, "7"),
        (f"a x {K}=5", f"a x {K}", "true x 5"), (f"a x {K}=7", f"a x {K}", "true x 7")]
    # A delta design names every level, even with two configurations.
    delta = effects.delta_table(["x", "y"] * 2, [0, 0, 1, 1], [1.0, 2.0, 1.5, 2.5], "x")
    assert list(delta["term"]) == ["_configuration=y"] and list(delta["kind"]) == ["delta"]


def test_holm_of_one_family_closed_form_and_cap():
    # [0.01, 0.04, 0.03]: sorted 0.01 x 3, 0.03 x 2, 0.04 x 1 -> 0.03, 0.06, then max(0.06, 0.04).
    np.testing.assert_allclose(effects.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06], atol=1e-15)
    assert effects.holm(np.array([0.01, 0.04, 0.03])).shape == (3,)
    np.testing.assert_array_equal(effects.holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1


def test_estimates_are_float_arrays_with_nan_where_nothing_is_estimated():
    values, seeds = grid_runs(2)
    kept = [i for i, v in enumerate(values) if not (v[A] and v[B])]
    design = effects.build_design([values[i] for i in kept], [seeds[i] for i in kept], [A, B, C])
    fit = design.estimate(np.random.default_rng(5).normal(size=len(kept)))
    saturated = effects.build_design([{A: False}, {A: True}], [0, 0], [A])
    assert saturated.df_resid == 0
    for out in (fit, saturated.estimate([1.0, 2.0])):
        for name in ("estimate", "se", "ci_low", "ci_high", "p", "p_holm"):
            assert out[name].dtype == float, name
    assert np.isnan(fit["ci_low"]).any() and np.isnan(saturated.estimate([1.0, 2.0])["p"]).all()


def test_an_exact_fit_of_negative_values_has_no_spread():
    # The rounding threshold is on the data's squared norm, whatever their sign (deltas < 0).
    values, seeds = grid_runs(2)
    y = -np.array([30.0 + (1.0 if v[A] else 0.0) + 0.5 * s for v, s in zip(values, seeds)])
    table = effects._rows(effects.build_design(values, seeds, [A, B, C]), y, 0.95)
    assert table.attrs["sigma"] == 0.0 and (table["note"] == effects.NO_SPREAD).all()


def test_seeds_each_in_one_configuration_are_not_a_block():
    # Seeds 0, 1 for one level and 2, 3 for the other pair nothing: a seed block would be
    # confounded with the factor and leave its effect not estimable.
    design = effects.build_design([{A: False}, {A: False}, {A: True}, {A: True}], [0, 1, 2, 3], [A])
    assert not design.blocked and design.estimable.all() and design.df_resid == 2


def test_one_factor_without_residual_df_has_no_interaction_note():
    design = effects.build_design([{A: False}, {A: True}], [0, 0], [A])
    assert design.df_resid == 0 and design.notes == []
    empty = effects.build_design([], [], [A])
    assert empty.df_resid == 0 and empty.contrasts == []
