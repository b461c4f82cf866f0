"""The seeds planner: how small an effect the runs can detect now, and how many seeds per
configuration would resolve a target effect size.

Power is that of each effect's own two-sided t test at level alpha (the test `harness.effects`
reports as p, before Holm's adjustment): with the effect's standard error se and the residual
df, a true effect delta is detected with probability

    power(delta) = P(|T| > t_{1 - alpha/2, df}),   T ~ noncentral t(df, delta / se).

The smallest detectable effect is the delta with power(delta) = 0.8. For r seeds per
configuration the planner builds the complete grid x r seeds design (the same model as the
report: seed block, main effects, two-way interactions) and takes se(r) = sigma * u(r), u the
design's standard error per unit residual SD, df(r) from its rank; sigma is the residual SD of
the runs at hand (a plan is only as good as that estimate: with few residual df it is rough).
On a complete balanced grid every effect is a fixed contrast of cell means, so
u(r) = u(2) * sqrt(2 / r), and the rank grows by one per added seed (its block level):
df(r) = configurations * r - (rank(2) - 2) - r. `design_at` builds only r = 2 and scales;
the tests check the scaling against designs built at other r.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from harness.effects import EffectsDesign, build_design

POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 64


def power(delta: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Probability that a two-sided t test at `alpha` (df residual degrees of freedom) rejects
    zero when the true effect is `delta` and its standard error `se` (same units)."""
    from scipy import stats

    if not (se > 0 and df > 0):
        return math.nan
    q = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    nc = abs(delta) / se
    # P(|T'| > q) for T' noncentral t(df, nc) is P(T'^2 > q^2) with T'^2 noncentral F(1, df,
    # nc^2): the same number, but scipy's nct.sf returns NaN for large nc at small df (nc = 80,
    # df = 1; nc = 40, df = 8) where ncf stays finite.
    if nc == 0:
        # scipy 1.17's ncf.sf returns the right value minus 1 at nc = 0 exactly (-0.95 for 0.05);
        # there the law is the central F.
        return float(stats.f.sf(q * q, 1, df))
    return float(stats.ncf.sf(q * q, 1, df, nc * nc))


def detectable_effect(se: float, df: float, target_power: float = POWER,
                      alpha: float = ALPHA) -> float:
    """The smallest true effect (same units as se) detected with probability `target_power`."""
    from scipy.optimize import brentq

    if not (se > 0 and df > 0) or not math.isfinite(se):
        return math.nan
    high = se
    while power(high, se, df, alpha) < target_power:
        high *= 2.0
    return float(brentq(lambda d: power(d, se, df, alpha) - target_power, 0.0, high, xtol=1e-10))


def complete_design(design: EffectsDesign, num_seeds: int,
                    labels: Optional[Mapping[str, str]] = None) -> EffectsDesign:
    """The same factors and levels as `design`, every configuration run with seeds
    0..num_seeds-1: what a study with `num_seeds` seeds would fit."""
    used = [k for k in design.factors if k in design.levels and len(design.levels[k]) > 1]
    values, seeds = [], []
    for combo in itertools.product(*[design.levels[k] for k in used]):
        for seed in range(num_seeds):
            values.append(dict(zip(used, combo)))
            seeds.append(seed)
    kind = "delta" if any(c.kind == "delta" for c in design.contrasts) else "factorial"
    with_inter = any(c.kind == "interaction" for c in design.contrasts)
    return build_design(values, seeds, used, design.levels, labels=labels,
                        interactions=with_inter, kind=kind)


def design_at(design: EffectsDesign, num_seeds: int) -> tuple[np.ndarray, int]:
    """(u [contrasts], df_resid) of the complete design with `num_seeds` seeds per
    configuration (>= 2), by the scaling in the module docstring."""
    full = complete_design(design, 2)
    configurations = len(full.frame) // 2
    fixed = (len(full.frame) - full.df_resid) - 2  # rank without the seed block's levels
    df = configurations * num_seeds - fixed - num_seeds
    return full.unit_se() * math.sqrt(2.0 / num_seeds), int(df)


def seeds_needed(design: EffectsDesign, sigma: float, target_effect: float,
                 target_power: float = POWER, alpha: float = ALPHA,
                 max_seeds: int = MAX_SEEDS) -> list[Optional[int]]:
    """Per contrast of `design`: the fewest seeds per configuration (>= 2, <= max_seeds) at which
    a true effect of `target_effect` is detected with `target_power`; None beyond max_seeds or
    when sigma is unknown."""
    out: list[Optional[int]] = [None] * len(design.contrasts)
    if not (sigma > 0 and math.isfinite(sigma)) or not target_effect:
        return out
    todo = set(range(len(design.contrasts)))
    for r in range(2, max_seeds + 1):
        unit, df = design_at(design, r)
        for i in sorted(todo):
            if df > 0 and power(target_effect, sigma * unit[i], df, alpha) >= target_power:
                out[i] = r
                todo.discard(i)
        if not todo:
            break
    return out


def seeds_for_half_width(design: EffectsDesign, sigma: float, half_width: float,
                         kinds: Sequence[str] = ("main",), confidence: float = 0.95,
                         max_seeds: int = MAX_SEEDS) -> Optional[int]:
    """The fewest seeds per configuration at which every effect of `kinds` has an expected 95%
    half-width t * sigma * u(r) <= half_width; None beyond max_seeds."""
    from scipy import stats

    if not (sigma > 0 and math.isfinite(sigma)):
        return None
    rows = [i for i, c in enumerate(design.contrasts) if c.kind in kinds]
    for r in range(2, max_seeds + 1):
        unit, df = design_at(design, r)
        if df <= 0:
            continue
        q = float(stats.t.ppf((1.0 + confidence) / 2.0, df))
        if all(q * sigma * unit[i] <= half_width for i in rows):
            return r
    return None


def widest_half_width(low, high) -> Any:
    """The seed rounds' statistic: the widest half-width (high - low) / 2 over the main effects'
    intervals. low, high: [effects] or [effects, sims]; returns a float or [sims], NaN where some
    interval is missing (no residual df yet) or there is no effect: never resolved. The driver
    (harness.study) decides each round by it and rounds_coverage simulates the same rule."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if low.shape[0] == 0:
        return np.full(low.shape[1:], np.nan)[()]
    with np.errstate(invalid="ignore"):
        return ((high - low) / 2.0).max(axis=0)[()]


def rounds_coverage(design: EffectsDesign, initial: int, cap: int, half_width: float,
                    sigmas: Sequence[float], *, sims: int = 4000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What seeds in rounds do, simulated: `libra run` (harness.study._Driver._next_round) runs
    `initial` seeds per configuration of `design`'s complete grid, then one more per round until
    every main effect's half-width is <= half_width, or `cap` seeds.

    Returns (coverage [len(sigmas)], stopped [len(sigmas), cap - initial + 1]), per true
    residual SD in `sigmas`: the share of the main effects' final intervals, over `sims`
    studies, that hold the true effect (a mean over the main effects; its Monte Carlo SE is
    under 0.4% at 4000 studies), and the share of studies that stop at each round.

    Stopping when the intervals happen to be narrow (the runs' residual SD came out low)
    lowers their coverage below `confidence`. It depends on the design and sigma / half_width
    only: the intervals move with the data (an effect's true value shifts its estimate alike)
    and a seed's block effect cancels, so the simulation draws pure noise and counts the
    intervals that hold 0. A round's runs are the previous round's plus one seed, as in a study.
    """
    rng = np.random.default_rng(seed)
    stages = {n: complete_design(design, n) for n in range(initial, cap + 1)}
    main = [i for i, c in enumerate(stages[initial].contrasts) if c.kind == "main"]
    configurations = len(stages[initial].frame) // initial  # complete_design: seeds innermost
    out = np.full(len(sigmas), np.nan)
    stopped = np.zeros((len(sigmas), len(stages)))
    for j, sigma in enumerate(sigmas):
        noise = rng.normal(0.0, sigma, (configurations, cap, sims))
        covered = np.zeros((len(main), sims), dtype=bool)
        running = np.ones(sims, dtype=bool)
        for r, (n, stage) in enumerate(stages.items()):
            fit = stage.estimate(noise[:, :n].reshape(configurations * n, sims), confidence)
            low, high = fit["ci_low"][main], fit["ci_high"][main]
            with np.errstate(invalid="ignore"):  # no interval yet (0 df): NaN, never resolved
                stop = running & ((widest_half_width(low, high) <= half_width) | (n == cap))
                covered[:, stop] = ((low <= 0.0) & (high >= 0.0))[:, stop]
            stopped[j, r] = stop.mean()
            running &= ~stop
        out[j] = covered.mean() if main else np.nan
    return out, stopped


def plan(effects, target_effect: Optional[float] = None, target_power: float = POWER,
         alpha: float = ALPHA):
    """`harness.effects.effects_table`'s frame with the planner's columns added:
    `detectable` (the smallest effect detectable now at `target_power`, same units) and, with
    a target, `seeds_needed` (seeds per configuration to detect `target_effect`; blank beyond
    MAX_SEEDS). Returns a new frame; attrs carry target_effect and target_power."""
    table = effects.copy()
    table.attrs.update(effects.attrs)
    design: Optional[EffectsDesign] = effects.attrs.get("design")
    df = effects.attrs.get("df_resid", 0)
    table["detectable"] = [detectable_effect(se, df, target_power, alpha)
                           if isinstance(se, float) and math.isfinite(se) else math.nan
                           for se in effects["se"]] if len(effects) else []
    if target_effect is not None and design is not None and len(effects):
        needed = seeds_needed(design, effects.attrs.get("sigma", math.nan), target_effect,
                              target_power, alpha)
        table["seeds_needed"] = np.array([math.nan if n is None else n for n in needed], dtype=float)
    table.attrs.update({"target_effect": target_effect, "target_power": target_power})
    return table
