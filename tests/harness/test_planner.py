"""The seeds planner's own functions on small grids: closed forms (the normal limit of the
detectable effect), the minimality of every seed count it returns, and what it refuses."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness import effects, planner

A, B, C = "detector.a.enabled", "detector.b.enabled", "detector.c.enabled"


def grid(num_seeds, factors=(A, B, C)):
    values, seeds = [], []
    for combo in itertools.product([False, True], repeat=len(factors)):
        for seed in range(num_seeds):
            values.append(dict(zip(factors, combo)))
            seeds.append(seed)
    return values, seeds


def fitted(num_seeds=2, factors=(A, B, C)):
    values, seeds = grid(num_seeds, factors)
    y = np.random.default_rng(11).normal(30.0, 1.0, size=len(values))
    return effects._rows(effects.build_design(values, seeds, list(factors)), y, 0.95)


def test_detectable_effect_is_the_normal_limit_at_large_df_and_scales_with_se():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)  # 2.8016: two-sided 5%, power 80%
    assert planner.detectable_effect(1.0, 10 ** 6) == pytest.approx(z, rel=1e-4)
    assert planner.detectable_effect(2.5, 10 ** 6) == pytest.approx(2.5 * z, rel=1e-4)
    # Other power and level: z_{0.95} + z_{0.9}.
    z2 = stats.norm.ppf(0.95) + stats.norm.ppf(0.9)
    assert planner.detectable_effect(1.0, 10 ** 6, target_power=0.9, alpha=0.1) == pytest.approx(z2, rel=1e-4)
    for se, df, power, alpha in ((1.0, 3, 0.8, 0.05), (0.3, 5, 0.9, 0.1), (4.0, 2, 0.5, 0.01)):
        d = planner.detectable_effect(se, df, power, alpha)
        assert planner.power(d, se, df, alpha) == pytest.approx(power, abs=1e-9)
        assert d == pytest.approx(se * planner.detectable_effect(1.0, df, power, alpha), rel=1e-8)
    for se, df in ((0.0, 5), (1.0, 0), (math.inf, 5), (math.nan, 5), (-1.0, 5)):
        assert math.isnan(planner.detectable_effect(se, df)), (se, df)


def test_power_at_zero_is_the_level_and_grows_with_the_effect():
    # At delta = 0 exactly the power is the test's level (scipy's ncf.sf gives -0.95 there).
    assert planner.power(0.0, 1.0, 6) == pytest.approx(0.05, abs=1e-9)
    assert planner.power(0.0, 1.0, 6, alpha=0.2) == pytest.approx(0.2, abs=1e-9)
    assert planner.power(-2.0, 1.0, 6) == pytest.approx(planner.power(2.0, 1.0, 6), abs=1e-12)
    assert math.isnan(planner.power(1.0, 0.0, 6)) and math.isnan(planner.power(1.0, 1.0, 0))


def test_seeds_needed_is_the_smallest_count_that_reaches_the_power():
    design = fitted().attrs["design"]
    sigma, target = 1.0, 1.0
    needed = planner.seeds_needed(design, sigma, target)
    kinds = [c.kind for c in design.contrasts]
    assert all(n is not None for n in needed)
    for i, r in enumerate(needed):
        unit, df = planner.design_at(design, r)
        assert planner.power(target, sigma * unit[i], df) >= 0.8
        if r > 2:
            unit, df = planner.design_at(design, r - 1)
            assert planner.power(target, sigma * unit[i], df) < 0.8
    # An interaction's se is twice a main effect's on a 2^3 grid: it needs about 4x the seeds.
    main = needed[kinds.index("main")]
    inter = needed[kinds.index("interaction")]
    assert 3 * main <= inter <= 5 * main
    # A different power / level moves the count the right way.
    assert planner.seeds_needed(design, sigma, target, target_power=0.95)[0] > main
    assert planner.seeds_needed(design, sigma, target, alpha=0.2)[0] < main
    # Beyond max_seeds, no sigma, or no target: None.
    assert planner.seeds_needed(design, sigma, target, max_seeds=main - 1)[0] is None
    assert planner.seeds_needed(design, sigma, target, max_seeds=main)[0] == main
    for s, t in ((math.nan, 1.0), (0.0, 1.0), (math.inf, 1.0), (1.0, 0.0)):
        assert planner.seeds_needed(design, s, t) == [None] * len(design.contrasts)


def test_seeds_for_half_width_is_the_smallest_count_that_reaches_it():
    design = fitted().attrs["design"]
    mains = [i for i, c in enumerate(design.contrasts) if c.kind == "main"]
    r = planner.seeds_for_half_width(design, 1.0, 1.0)
    assert r is not None and r > 2

    def widest(num_seeds, rows, confidence=0.95):
        unit, df = planner.design_at(design, num_seeds)
        return stats.t.ppf((1 + confidence) / 2, df) * max(unit[i] for i in rows)

    assert widest(r, mains) <= 1.0 < widest(r - 1, mains)
    inter = [i for i, c in enumerate(design.contrasts) if c.kind == "interaction"]
    ri = planner.seeds_for_half_width(design, 1.0, 1.0, kinds=("interaction",))
    assert widest(ri, inter) <= 1.0 < widest(ri - 1, inter) and ri > r
    r90 = planner.seeds_for_half_width(design, 1.0, 1.0, confidence=0.9)
    assert widest(r90, mains, 0.9) <= 1.0 < widest(r90 - 1, mains, 0.9) and r90 < r
    assert planner.seeds_for_half_width(design, 2.0, 2.0) == r  # only sigma / half-width counts
    assert planner.seeds_for_half_width(design, 1.0, 100.0) == 2
    assert planner.seeds_for_half_width(design, 1.0, 1.0, max_seeds=r - 1) is None
    assert planner.seeds_for_half_width(design, 1.0, 1.0, max_seeds=r) == r
    assert planner.seeds_for_half_width(design, math.nan, 1.0) is None
    assert planner.seeds_for_half_width(design, 0.0, 1.0) is None
    # Two configurations: at 2 seeds the design has 1 residual df (4 runs, mean, delta, seed),
    # which a wide enough half-width accepts (t(0.975, 1) = 12.7).
    two = effects.delta_table(["x", "y", "x", "y"], [0, 0, 1, 1], [1.0, 2.0, 1.5, 2.0], "x").attrs["design"]
    assert planner.design_at(two, 2)[1] == 1
    assert planner.seeds_for_half_width(two, 1.0, 1000.0, kinds=("delta",)) == 2


def test_seeds_for_half_width_skips_counts_without_residual_df():
    # Two factors, no seed block needed... one seed per cell leaves df 1 with interactions
    # pooled; the planner's own design at r seeds: the first r with df > 0 and a narrow enough t.
    table = fitted(num_seeds=1, factors=(A, B))
    design = table.attrs["design"]
    r = planner.seeds_for_half_width(design, 1.0, 3.0)
    unit, df = planner.design_at(design, r)
    assert df > 0 and stats.t.ppf(0.975, df) * unit[0] <= 3.0


def test_complete_design_keeps_the_factors_levels_kind_and_terms():
    # Baseline true (levels given), interactions pooled (one seed, two factors): the planned
    # design has the same contrasts, the same baseline and no interactions.
    values, seeds = grid(1, (A, B))
    values = [dict(v, **{C: False}) for v in values]  # C has one level: not a factor to plan
    design = effects.build_design(values, seeds, [A, B, C], {A: [True, False]})
    assert effects.INTERACTIONS_POOLED in design.notes
    full = planner.complete_design(design, 3)
    assert [(c.term, c.kind, c.level) for c in full.contrasts] == \
        [(c.term, c.kind, c.level) for c in design.contrasts]
    assert full.levels[A] == ["true", "false"] and full.factors == [A, B]
    assert len(full.frame) == 4 * 3 and full.notes == []
    # A configuration-delta design plans deltas.
    delta = effects.delta_table(["x", "y", "z", "x", "y", "z"], [0, 0, 0, 1, 1, 1],
                                [1.0, 2.0, 3.0, 1.5, 2.5, 2.0], "x").attrs["design"]
    planned = planner.complete_design(delta, 4)
    assert [c.kind for c in planned.contrasts] == ["delta", "delta"]
    assert [c.level for c in planned.contrasts] == ["y", "z"]
    unit, df = planner.design_at(delta, 4)
    np.testing.assert_allclose(unit, planned.unit_se(), rtol=1e-10)
    assert df == planned.df_resid == 3 * 4 - 3 - 3  # 12 runs - (mean + 2 deltas) - 3 seed levels


def test_plan_adds_the_detectable_effect_and_the_seed_count():
    table = fitted()
    planned = planner.plan(table, target_effect=1.0)
    design, sigma, df = table.attrs["design"], table.attrs["sigma"], table.attrs["df_resid"]
    for i, se in enumerate(table["se"]):
        assert planned.at[i, "detectable"] == pytest.approx(planner.detectable_effect(se, df), rel=1e-9)
    expected = planner.seeds_needed(design, sigma, 1.0)
    assert list(planned["seeds_needed"]) == [float(n) for n in expected]
    assert planned.attrs["target_effect"] == 1.0 and planned.attrs["target_power"] == 0.8
    assert planned.attrs["design"] is design and planned.attrs["sigma"] == sigma
    assert "detectable" not in table.columns  # a new frame
    assert planned["seeds_needed"].dtype == float
    # A frame without the effects' attrs: no df, so no detectable effect; no sigma, no count.
    bare = table[["term", "kind", "se"]].copy()
    bare.attrs.clear()
    assert planner.plan(bare)["detectable"].isna().all()
    bare.attrs["design"] = design
    assert planner.plan(bare, target_effect=1.0)["seeds_needed"].isna().all()
    # Another power: both columns follow it.
    p9 = planner.plan(table, target_effect=1.0, target_power=0.9, alpha=0.1)
    assert p9.at[0, "detectable"] == pytest.approx(
        planner.detectable_effect(table.at[0, "se"], df, 0.9, 0.1), rel=1e-9)
    assert list(p9["seeds_needed"]) == [float(n) for n in planner.seeds_needed(design, sigma, 1.0, 0.9, 0.1)]
    # Without a target: no seed count. A seed count beyond MAX_SEEDS is blank (NaN).
    assert "seeds_needed" not in planner.plan(table).columns
    tiny = planner.plan(table, target_effect=1e-3)
    assert tiny["seeds_needed"].isna().all() and tiny["seeds_needed"].dtype == float
    # Rows without an se (not estimable) get no detectable effect; an empty table stays empty.
    values, seeds = grid(2)
    kept = [i for i, v in enumerate(values) if not (v[A] and v[B])]
    partial = effects._rows(effects.build_design([values[i] for i in kept], [seeds[i] for i in kept],
                                                 [A, B, C]), np.arange(len(kept), dtype=float) ** 1.5, 0.95)
    out = planner.plan(partial).set_index("term")
    assert math.isnan(out.at[f"{A} x {B}", "detectable"]) and math.isfinite(out.at[C, "detectable"])
    empty = effects.effects_table(None, [A])
    assert len(planner.plan(empty, target_effect=1.0)) == 0


def test_complete_design_names_the_effects_with_the_given_labels():
    design = fitted(factors=(A, B)).attrs["design"]
    full = planner.complete_design(design, 3, labels={A: "a", B: "b"})
    assert [c.term for c in full.contrasts] == ["a", "b", "a x b"]
    assert [c.label for c in full.contrasts] == ["a", "b", "a x b"]


def test_detectable_effect_below_one_unit():
    # The root search starts at zero: an se of 0.01 at large df detects 0.028 (z_0.975 + z_0.8).
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert planner.detectable_effect(0.01, 10 ** 6) == pytest.approx(0.01 * z, rel=1e-4)


def test_seeds_needed_can_be_two_even_at_one_residual_df():
    # A large target is met at the floor of 2 seeds; a two-configuration delta design has a single
    # residual df at 2 seeds (4 runs: mean, delta, seed), and t at 1 df still resolves 100 sigma.
    design = fitted().attrs["design"]
    assert planner.seeds_needed(design, 1.0, 100.0) == [2] * len(design.contrasts)
    two = effects.delta_table(["x", "y", "x", "y"], [0, 0, 1, 1], [1.0, 2.0, 1.5, 2.0], "x").attrs["design"]
    assert planner.design_at(two, 2)[1] == 1
    assert planner.seeds_needed(two, 1.0, 100.0) == [2]


def test_seeds_needed_refuses_unknown_sigma_or_no_target_at_any_power():
    # A power target below the test's level is met by any se (even an infinite one: power = level),
    # so only the guards keep an unknown sigma or a zero target from answering "2 seeds".
    design = fitted().attrs["design"]
    for sigma, target in ((math.inf, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        assert planner.seeds_needed(design, sigma, target, target_power=0.01) == \
            [None] * len(design.contrasts), (sigma, target)


def test_plan_leaves_a_missing_se_blank():
    # A frame whose se column holds None (an object column, e.g. rows without a fit) gets NaN there.
    table = fitted()
    bare = table[["term", "kind"]].copy()
    bare["se"] = pd.Series([None] + list(table["se"].iloc[1:]), dtype=object)
    bare.attrs["df_resid"] = table.attrs["df_resid"]
    out = planner.plan(bare)
    assert math.isnan(out.at[0, "detectable"])
    assert out.at[1, "detectable"] == pytest.approx(
        planner.detectable_effect(table.at[1, "se"], table.attrs["df_resid"]), rel=1e-12)


# ------------------------------------------------------------------------------------------
# Seeds in rounds: what stopping on narrow intervals does to their coverage.
# ------------------------------------------------------------------------------------------
def _procedure_by_hand(sigma, half_width, sims, rng, initial=2, cap=4):
    """The rounds rule simulated the long way, independently of rounds_coverage: real effects
    (+0.5, -1.0, 0.0) and a seed block effect (SD 2) in the data, the runs in seed-major order,
    a design built from the runs at each round, and the intervals checked against the truth."""
    truth = np.array([0.5, -1.0, 0.0])
    combos = list(itertools.product([False, True], repeat=3))
    shift = np.array(combos, dtype=float) @ truth  # [8] each configuration's true mean - 10
    block = rng.normal(0.0, 2.0, (cap, sims))
    y = 10.0 + shift[None, :, None] + block[:, None, :] + rng.normal(0.0, sigma, (cap, 8, sims))
    covered, running = np.zeros((3, sims), dtype=bool), np.ones(sims, dtype=bool)
    for n in range(initial, cap + 1):
        values = [dict(zip((A, B, C), combo)) for _ in range(n) for combo in combos]
        seeds = [s for s in range(n) for _ in combos]
        design = effects.build_design(values, seeds, [A, B, C])
        main = [i for i, c in enumerate(design.contrasts) if c.kind == "main"]
        fit = design.estimate(y[:n].reshape(n * 8, sims))
        low, high = fit["ci_low"][main], fit["ci_high"][main]
        stop = running & (((high - low) / 2.0).max(axis=0) <= half_width) | (running & (n == cap))
        covered[:, stop] = ((low <= truth[:, None]) & (truth[:, None] <= high))[:, stop]
        running &= ~stop
    return covered.mean()


def test_rounds_coverage_is_nominal_when_the_rule_never_or_always_stops_early():
    design = fitted().attrs["design"]
    # Monte Carlo SE of a coverage near 0.95 at 4000 studies is below 0.004: 3 SE = 0.012.
    never, stops = planner.rounds_coverage(design, 2, 4, 1e-9, [1.0])  # every study to the cap
    assert abs(never[0] - 0.95) < 0.012 and stops.tolist() == [[0.0, 0.0, 1.0]]
    always, stops = planner.rounds_coverage(design, 2, 4, 1e9, [1.0])  # every study at round 1
    assert abs(always[0] - 0.95) < 0.012 and stops.tolist() == [[1.0, 0.0, 0.0]]
    at_90, _ = planner.rounds_coverage(design, 2, 4, 1e9, [1.0], confidence=0.90)
    assert abs(at_90[0] - 0.90) < 0.015  # the intervals are the confidence asked for
    # and only the ratio sigma / half_width matters
    a = planner.rounds_coverage(design, 2, 4, 1.5, [1.9], seed=3)
    b = planner.rounds_coverage(design, 2, 4, 3.0, [3.8], seed=3)
    assert a[0] == pytest.approx(b[0], abs=1e-12) and np.array_equal(a[1], b[1])


def test_the_share_stopping_at_round_one_is_the_chi_square_probability():
    # Round 1 stops when t * s * u <= half_width, s^2 ~ sigma^2 chi2(df) / df: exact odds.
    design = fitted().attrs["design"]
    unit, df = planner.design_at(design, 2)
    u = max(unit[i] for i, c in enumerate(design.contrasts) if c.kind == "main")
    q = stats.t.ppf(0.975, df)
    for sigma in (1.2, 1.9):
        exact = stats.chi2.cdf(df * (1.5 / (q * u * sigma)) ** 2, df)
        _, stops = planner.rounds_coverage(design, 2, 4, 1.5, [sigma], sims=8000)
        assert stops[0].sum() == pytest.approx(1.0)
        assert stops[0, 0] == pytest.approx(exact, abs=0.017)  # 3 SE of a share at 8000 studies


def test_stopping_on_narrow_intervals_lowers_their_coverage_as_the_long_simulation_does():
    design = fitted().attrs["design"]
    # sigma = 1.27 x the target: stopping at rounds 2, 3 and 4 all happen often, the worst case.
    fast = planner.rounds_coverage(design, 2, 4, 1.5, [1.9], sims=8000, seed=1)[0][0]
    slow = _procedure_by_hand(1.9, 1.5, 8000, np.random.default_rng(2))
    assert 0.92 < fast < 0.945  # below the nominal 95% beyond Monte Carlo error (SE < 0.003)
    assert fast == pytest.approx(slow, abs=0.012)  # two independent simulations, SE of the gap < 0.004


def test_widest_half_width_is_nan_until_every_main_effect_has_an_interval():
    # one effect, several, and per simulated study ([effects, sims])
    assert planner.widest_half_width([1.0], [4.0]) == 1.5
    assert planner.widest_half_width([0.0, -1.0], [2.0, 2.0]) == 1.5
    per_study = planner.widest_half_width(np.array([[0.0, 0.0], [1.0, 0.0]]),
                                          np.array([[2.0, 4.0], [2.0, 2.0]]))
    assert per_study.tolist() == [1.0, 2.0]
    # a missing interval (0 residual df: NaN, or None from an object column) or no effect at all
    assert math.isnan(planner.widest_half_width([0.0, math.nan], [2.0, 1.0]))
    assert math.isnan(planner.widest_half_width(pd.Series([0.0, None], dtype=object),
                                                pd.Series([2.0, None], dtype=object)))
    empty = planner.widest_half_width(pd.Series([], dtype=float), pd.Series([], dtype=float))
    assert isinstance(empty, float) and math.isnan(empty)
