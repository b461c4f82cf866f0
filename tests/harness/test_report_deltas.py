"""The report's paired deltas (`report._add_deltas`) on hand-made observations, no MLflow: closed
forms, statsmodels' OLS and multipletests, and every row a delta cannot be given a number for.

The data are test_report.py's (AP points, rows A B C D, A the baseline):
    A 30 31 32 | B 33 34 35 | C 30 32 34 | D 36 (seed 0 only)
where configuration + seed least squares gives sigma^2 = 1/3 on 4 df, B - A = 3, C - A = 1,
D - A = 19/3, and se(B - A) = se(C - A) = sqrt(2/9).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness import report

AP = report.AP_COLUMNS[0]
A, B, C, D = range(4)
OBS = ([(A, s, 30.0 + s) for s in range(3)] + [(B, s, 33.0 + s) for s in range(3)]
       + [(C, s, 30.0 + 2 * s) for s in range(3)] + [(D, 0, 36.0)])


def deltas(observations, rows=4, base=A, confidence=0.95):
    table = pd.DataFrame({"label": [f"r{i}" for i in range(rows)]})
    report._add_deltas(table, AP, base, confidence, observations)
    return table


def ols():
    import statsmodels.api as sm

    cfg, seed, y = zip(*OBS)
    X = pd.DataFrame({"const": 1.0, **{f"cfg{k}": [float(c == k) for c in cfg] for k in (B, C, D)},
                      **{f"seed{k}": [float(s == k) for s in seed] for k in (1, 2)}})
    return sm.OLS(np.array(y), X).fit()


@pytest.mark.parametrize("confidence", [0.95, 0.90])
def test_closed_form_and_statsmodels_at_two_confidence_levels(confidence):
    from statsmodels.stats.multitest import multipletests

    t = deltas(OBS, confidence=confidence)
    se = math.sqrt(2 / 9)
    # Three comparisons: Bonferroni-simultaneous intervals at 1 - (1 - confidence) / 3.
    q = stats.t.ppf(1 - (1 - confidence) / 6, 4)
    for row, d in ((B, 3.0), (C, 1.0)):
        assert t.at[row, "dAP"] == pytest.approx(d, abs=1e-9)
        assert t.at[row, "dAP_se"] == pytest.approx(se, abs=1e-9)
        assert t.at[row, "dAP_df"] == 4
        assert t.at[row, "dAP_p"] == pytest.approx(2 * stats.t.sf(d / se, 4), rel=1e-9)
        assert t.at[row, "dAP_low"] == pytest.approx(d - q * se, abs=1e-9)
        assert t.at[row, "dAP_high"] == pytest.approx(d + q * se, abs=1e-9)
    assert t.at[D, "dAP"] == pytest.approx(19 / 3, abs=1e-9)
    fit = ols()
    names = {B: f"cfg{B}", C: f"cfg{C}", D: f"cfg{D}"}
    holm = multipletests([fit.pvalues[n] for n in names.values()], method="holm")[1]
    ci = fit.conf_int(alpha=(1 - confidence) / 3)
    for (row, name), p_holm in zip(names.items(), holm):
        assert t.at[row, "dAP_se"] == pytest.approx(fit.bse[name], rel=1e-9)
        assert t.at[row, "dAP_p_holm"] == pytest.approx(p_holm, rel=1e-7)
        assert (t.at[row, "dAP_low"], t.at[row, "dAP_high"]) == pytest.approx(tuple(ci.loc[name]), abs=1e-7)
        assert t.at[row, "dAP_separated"] is bool(p_holm < 1 - confidence)
        assert t.at[row, "dAP_note"] == ("" if p_holm < 1 - confidence else "not separated from zero")
    # B is separated, C (p = 0.10) is not at either level: the notes say which.
    assert t.at[B, "dAP_separated"] is True and t.at[C, "dAP_separated"] is False
    assert t.at[C, "dAP_note"] == "not separated from zero"
    # The baseline row: 0, flagged, no interval.
    assert list(t["baseline"]) == [True, False, False, False]
    assert t.at[A, "dAP"] == 0.0 and t.at[A, "dAP_note"] == "baseline"
    assert t.at[A, "dAP_separated"] is None
    for name in ("se", "low", "high", "df", "p", "p_holm"):
        assert math.isnan(t.at[A, f"dAP_{name}"]), name
    assert list(t.columns) == ["label", "baseline", "dAP", "dAP_se", "dAP_low", "dAP_high", "dAP_df",
                               "dAP_p", "dAP_p_holm", "dAP_separated", "dAP_note"]


def test_the_family_is_the_rows_with_a_p_value():
    """A row with no finished trial is not a comparison: with D absent the intervals are
    simultaneous over two rows (t at 1 - 0.05 / 4), and Holm counts two."""
    t = deltas([o for o in OBS if o[0] != D])
    # Without D the model is the balanced 3 x 3 table: the same residuals, sigma^2 = 1/3 on 4 df.
    se, q = math.sqrt(2 / 9), stats.t.ppf(1 - 0.05 / 4, 4)
    assert t.at[B, "dAP_high"] - t.at[B, "dAP"] == pytest.approx(q * se, abs=1e-9)
    p_b, p_c = (2 * stats.t.sf(d / se, 4) for d in (3.0, 1.0))
    assert t.at[B, "dAP_p_holm"] == pytest.approx(2 * p_b, rel=1e-9)  # the smaller p times 2
    assert t.at[C, "dAP_p_holm"] == pytest.approx(max(p_c, 2 * p_b), rel=1e-9)
    assert t.at[D, "dAP_note"] == "no finished trial" and math.isnan(t.at[D, "dAP"])
    assert t.at[D, "dAP_separated"] is None


def test_a_baseline_without_runs_gives_no_delta():
    t = deltas([o for o in OBS if o[0] != A])
    assert math.isnan(t.at[A, "dAP"]) and t.at[A, "dAP_note"] == "baseline"
    for row in (B, C, D):
        assert t.at[row, "dAP_note"] == "no finished trial" and math.isnan(t.at[row, "dAP"])
    # Only the baseline finished: nothing to compare either.
    t = deltas([o for o in OBS if o[0] == A])
    assert t.at[A, "dAP"] == 0.0
    assert [t.at[r, "dAP_note"] for r in (B, C, D)] == ["no finished trial"] * 3


def test_a_row_no_seed_links_to_the_baseline_is_not_comparable():
    # D ran seed 7 only, which no other row ran: its seed block absorbs it, so D - A is not
    # estimable; the other rows keep their numbers.
    obs = [o for o in OBS if o[0] != D] + [(D, 7, 36.0)]
    t = deltas(obs)
    assert t.at[D, "dAP_note"] == "not comparable: no seed links it to the baseline"
    assert math.isnan(t.at[D, "dAP"]) and t.at[D, "dAP_separated"] is None
    assert t.at[B, "dAP"] == pytest.approx(3.0, abs=1e-9)
    # D has no p-value, so the family is B and C: the intervals use t at 1 - 0.05 / 4.
    q = stats.t.ppf(1 - 0.05 / 4, 4)
    assert t.at[B, "dAP_high"] - t.at[B, "dAP"] == pytest.approx(q * math.sqrt(2 / 9), abs=1e-9)


def test_no_residual_df_and_no_spread_keep_the_delta_without_an_interval():
    # One seed: two runs, two parameters, df 0.
    t = deltas([(A, 0, 30.0), (B, 0, 32.5)], rows=2)
    assert t.at[B, "dAP"] == pytest.approx(2.5, abs=1e-12) and t.at[B, "dAP_note"] == report.NO_CI
    assert math.isnan(t.at[B, "dAP_df"]) and math.isnan(t.at[B, "dAP_low"])
    assert t.at[B, "dAP_separated"] is None
    # Two seeds: four runs, three parameters, df 1: an interval with t(1 - 0.05 / 2, 1) = 12.7.
    t = deltas([(A, 0, 30.0), (B, 0, 32.5), (A, 1, 31.0), (B, 1, 33.0)], rows=2)
    assert t.at[B, "dAP"] == pytest.approx(2.25, abs=1e-9) and t.at[B, "dAP_df"] == 1
    # Residuals +-0.125 at every run: sigma^2 = 4 (1/64) / 1, se = sqrt(sigma^2 (1/2 + 1/2)) = 0.25.
    assert t.at[B, "dAP_se"] == pytest.approx(0.25, abs=1e-9)
    assert t.at[B, "dAP_high"] == pytest.approx(2.25 + stats.t.ppf(0.975, 1) * 0.25, abs=1e-9)
    # Every seed moves both rows alike: the residuals are exactly 0, df 2, no interval.
    t = deltas([(A, s, 30.0 + s) for s in range(3)] + [(B, s, 32.0 + s) for s in range(3)], rows=2)
    assert t.at[B, "dAP"] == pytest.approx(2.0, abs=1e-9) and t.at[B, "dAP_note"] == report.NO_SPREAD
    assert t.at[B, "dAP_df"] == 2 and math.isnan(t.at[B, "dAP_se"]) and math.isnan(t.at[B, "dAP_p"])
    assert t.at[B, "dAP_separated"] is None


def test_another_baseline_row():
    """The baseline can be any row: against C, A is -1 and B is +2, same se."""
    t = deltas(OBS, base=C)
    assert list(t["baseline"]) == [False, False, True, False]
    assert t.at[A, "dAP"] == pytest.approx(-1.0, abs=1e-9)
    assert t.at[B, "dAP"] == pytest.approx(2.0, abs=1e-9)
    assert t.at[B, "dAP_se"] == pytest.approx(math.sqrt(2 / 9), abs=1e-9)
    assert t.at[C, "dAP"] == 0.0
