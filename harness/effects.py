"""A grid's runs -> factorial effects with intervals: main effects, two-way interactions and
configuration deltas, from one linear model with seed as a block.

What is estimated (all in the metric's shown units, AP points for bbox_mAP x 100):

- **Main effect** of a factor A, for each non-baseline level a_j: the mean of the metric over
  the grid's configurations with A = a_j minus the mean over those with A = a_0 (the baseline
  level: the first value the grid lists, `false` for a component flag), each mean taken with
  equal weight over every combination of the other factors' levels and over the seeds. For a
  two-level factor this is the textbook factorial effect (Box, Hunter & Hunter): the difference
  between the two levels averaged over the others, i.e. twice the coefficient of a +/-1
  effect-coded column. It is *not* the paper's one-at-a-time delta (turn A on with everything
  else off), which is a configuration delta below.
- **Two-way interaction** A x B, for each pair of non-baseline levels (a_j, b_k): how much A's
  effect changes when B goes from b_0 to b_k, i.e. the difference of differences
  [m(a_j, b_k) - m(a_0, b_k)] - [m(a_j, b_0) - m(a_0, b_0)], the means m over the remaining
  factors and the seeds (for two-level factors: 4x the +/-1 interaction coefficient).
- **Configuration delta**: one configuration minus the baseline configuration, paired by seed
  (the seed block), with the variance pooled over every configuration.

The model is ordinary least squares (what statsmodels' OLS computes; here vectorised so one
call fits many simulated studies) on a sum-coded design (patsy),

    y = mu + seed block + sum_A alpha_A + sum_{A<B} (alpha beta)_AB + e,   e ~ N(0, sigma^2)

with one row per finished run. Seeds enter as a block only when some seed was run in more than
one configuration; three-way and higher interactions, and seed x configuration interactions, are
left in the residual, whose variance (pooled over all runs, df = runs - rank of the design) gives
every standard error, t interval and p-value. An estimate is a contrast L beta of the fitted
model's marginal means over the full grid (computed through the model's own design matrix, so
any coding gives the same answer); on a complete balanced grid it equals the same contrast of
the cell means. p-values are two-sided t tests of zero; Holm's step-down adjustment controls the
family-wise error over all effects of one table (main effects and interactions together).

When the design cannot estimate something, the row says so and carries no number: a contrast
outside the row space of the runs' design (an incomplete grid), or zero residual df (every
configuration run once and nothing left to estimate the noise from); with zero residual df and
interactions in the model, the interactions are dropped (pooled into the residual) and the note
says so.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from harness.spec import render_value

CONFIDENCE = 0.95

# Notes a row can carry instead of (or beside) its numbers.
NOT_ESTIMABLE = "not estimable from these runs (incomplete grid)"
NO_RESIDUAL_DF = "no residual df: no interval (every configuration once; add seeds)"
NO_SPREAD = "zero residual variance: no interval"
INTERACTIONS_POOLED = ("two-way interactions not estimated: the runs leave no residual df for "
                       "them, so the main effects' error includes them")

EFFECT_COLUMNS = ["term", "key", "label", "level", "kind", "estimate", "se", "ci_low", "ci_high",
                  "df", "p", "p_holm", "separated", "note"]


@dataclass(frozen=True)
class Contrast:
    """One effect: its name, and its weight per reference-grid row (the rows of
    `EffectsDesign.grid`, which `weights` averages into marginal means)."""

    term: str  # "ibs", "ibs x bfp", "num_bins=5"
    key: str  # the dotted key(s): "detector.a.enabled" or "detector.a.enabled x detector.b.enabled"
    label: str  # the table's short label(s)
    level: str  # "true", "5", "true x true"
    kind: str  # "main", "interaction" or "delta"
    weights: np.ndarray  # [grid rows] weights of the reference grid's predicted means


@dataclass
class EffectsDesign:
    """The model matrix of a set of runs, and the contrasts that name each effect.

    Built once per set of runs (`build_design`); `estimate(y)` fits it to one or many outcome
    vectors, so a simulation reuses exactly the code a report runs.
    """

    factors: list[str]  # dotted keys, in the grid's order
    levels: dict[str, list[str]]  # key -> rendered levels, baseline first
    frame: Any  # pandas: one row per run: the factor columns (categorical), "seed"
    rhs: str  # the patsy right-hand side
    X: np.ndarray  # [runs, params] the runs' design matrix
    grid: Any  # pandas: the reference grid (every factor level x every seed)
    contrasts: list[Contrast]
    L: np.ndarray  # [effects, params] = weights @ design matrix of the grid
    estimable: np.ndarray  # [effects] bool: L lies in the row space of X
    df_resid: int
    blocked: bool  # the seed is in the model as a block
    notes: list[str] = field(default_factory=list)

    def estimate(self, y, confidence: float = CONFIDENCE):
        """Fit the model to `y` ([runs] values, or [runs, sims] for many studies at once) and
        return per effect: estimate, se, ci_low, ci_high, p, p_holm (arrays [effects] or
        [effects, sims]) and sigma ([] or [sims]: the residual SD) as a dict of numpy arrays.
        Non-estimable effects, and every interval when df_resid = 0, are NaN."""
        from scipy import stats

        Y = np.asarray(y, dtype=float)
        single = Y.ndim == 1
        Y = Y[:, None] if single else Y
        k, sims = self.L.shape[0], Y.shape[1]
        est = np.full((k, sims), np.nan)
        se = np.full((k, sims), np.nan)
        sigma = np.full(sims, np.nan)
        # The least squares statsmodels' OLS computes (pseudo-inverse, so a rank-deficient,
        # incomplete grid still fits and only its estimable contrasts are read), for all
        # columns of Y at once; tests check it against statsmodels' OLS(...).fit().t_test.
        pinv = np.linalg.pinv(self.X)  # [params, runs]
        beta = pinv @ Y  # [params, sims]
        rows = np.flatnonzero(self.estimable)
        if len(rows):
            est[rows] = self.L[rows] @ beta
        if self.df_resid > 0:
            ssr = ((Y - self.X @ beta) ** 2).sum(axis=0)
            # Where the model fits exactly (every seed moves each configuration alike) rounding
            # still leaves residuals of ~1e-15 of the data, which would give a spurious interval
            # of that width and a random p: a residual norm under 1e-10 of the data's is zero.
            ssr = np.where(ssr <= 1e-20 * (Y ** 2).sum(axis=0), 0.0, ssr)
            sigma = np.sqrt(np.clip(ssr, 0.0, None) / self.df_resid)
            if len(rows):
                unit = self.L[rows] @ pinv  # [effects, runs]: Var(L beta) = sigma^2 |unit|^2
                se[rows] = np.sqrt((unit ** 2).sum(axis=1))[:, None] * sigma[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = est / se
        ok = np.isfinite(t) & (se > 0)
        if self.df_resid > 0:
            q = float(stats.t.ppf((1.0 + confidence) / 2.0, self.df_resid))
            p = np.where(ok, 2.0 * stats.t.sf(np.abs(np.where(ok, t, 0.0)), self.df_resid), np.nan)
        else:
            q, p = math.nan, np.full_like(est, np.nan)
        low = np.where(ok, est - q * se, np.nan)
        high = np.where(ok, est + q * se, np.nan)
        p_holm = holm(p)
        out = {"estimate": est, "se": se, "ci_low": low, "ci_high": high, "p": p,
               "p_holm": p_holm, "sigma": sigma}
        if single:
            out = {name: value[..., 0] for name, value in out.items()}
        return out

    def unit_se(self) -> np.ndarray:
        """[effects] each estimable effect's standard error per unit of residual SD (sigma = 1)
        for the runs at hand: sqrt(diag(L (X'X)^+ L'))."""
        unit = self.L @ np.linalg.pinv(self.X)
        out = np.sqrt((unit ** 2).sum(axis=1))
        return np.where(self.estimable, out, np.nan)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values of each column of `p` ([tests] or [tests, sims]):
    sorted ascending, p_(i) * (m - i + 1) (i from 1), made monotone by a running maximum,
    capped at 1. NaN stays NaN and is not counted in the family (m = the finite ones).

    Vectorised by hand because statsmodels' multipletests (the reference the tests compare
    against) takes ~0.1 s a call here, too slow for a thousand simulated studies.
    """
    p = np.asarray(p, dtype=float)
    single = p.ndim == 1
    P = p[:, None] if single else p
    out = np.full_like(P, np.nan)
    finite = np.isfinite(P)
    m = finite.sum(axis=0)  # [sims]
    order = np.argsort(np.where(finite, P, np.inf), axis=0, kind="stable")
    ranked = np.take_along_axis(P, order, axis=0)  # NaN last
    factor = m[None, :] - np.arange(P.shape[0])[:, None]  # m - i + 1 with i from 1
    scaled = np.where(np.isfinite(ranked), np.minimum(ranked * factor, 1.0), -np.inf)
    adjusted = np.maximum.accumulate(scaled, axis=0)
    adjusted = np.where(np.isfinite(ranked), adjusted, np.nan)
    np.put_along_axis(out, order, adjusted, axis=0)
    return out[:, 0] if single else out


# ------------------------------------------------------------------------------------------
# Building the design.
# ------------------------------------------------------------------------------------------
def build_design(values: Sequence[Mapping[str, Any]], seeds: Sequence[Any], factors: Sequence[str],
                 levels: Optional[Mapping[str, Sequence[Any]]] = None, *,
                 interactions: bool = True, labels: Optional[Mapping[str, str]] = None,
                 kind: str = "factorial") -> EffectsDesign:
    """The design of a set of runs.

    values: per run, the factor settings (dotted key -> value); seeds: per run, its seed;
    factors: the dotted keys to model, in order; levels: key -> its levels in order, the
    baseline first (default: the values seen, in order of first appearance, `false` first);
    labels: key -> short label for the tables. kind "factorial" names main effects and two-way
    interactions; kind "delta" expects one factor (the configuration) and names each level's
    difference to the baseline level.

    Factors with a single level (present in the runs) are left out with a note.
    """
    import pandas as pd

    labels = dict(labels or {})
    notes: list[str] = []
    rendered = [{k: render_value(v.get(k)) for k in factors} for v in values]
    lv: dict[str, list[str]] = {}
    for key in factors:
        seen = list(dict.fromkeys(r[key] for r in rendered))
        if levels and key in levels:
            order = [render_value(v) for v in levels[key]]
            order += [s for s in seen if s not in order]
        else:
            order = sorted(seen, key=lambda s: s != "false")  # stable: false first
        lv[key] = order
    used = [k for k in factors if len({r[k] for r in rendered}) > 1]
    for key in factors:
        if key not in used:
            notes.append(f"{labels.get(key, key)} has one level in these runs: no effect to estimate")
    names = {key: f"f{i}" for i, key in enumerate(used)}
    seed_text = [render_value(s) for s in seeds]
    seed_levels = list(dict.fromkeys(seed_text))
    frame = pd.DataFrame({names[k]: pd.Categorical([r[k] for r in rendered], categories=lv[k])
                          for k in used})
    frame["seed"] = pd.Categorical(seed_text, categories=seed_levels)
    # A block only helps when a seed recurs across configurations (then it pairs them).
    cells = [tuple(r[k] for k in used) for r in rendered]
    repeated = any(len({c for c, s in zip(cells, seed_text) if s == level}) > 1
                   for level in seed_levels)
    blocked = len(seed_levels) > 1 and repeated

    def rhs_of(with_interactions: bool) -> str:
        terms = [f"C({names[k]}, Sum)" for k in used]
        if with_interactions:
            terms += [f"C({names[a]}, Sum):C({names[b]}, Sum)"
                      for a, b in itertools.combinations(used, 2)]
        if blocked:
            terms.insert(0, "C(seed, Sum)")
        return "1" + "".join(" + " + t for t in terms)

    want_inter = interactions and kind == "factorial" and len(used) > 1
    rhs = rhs_of(want_inter)
    X, info = _matrix(rhs, frame)
    df_resid = len(frame) - int(np.linalg.matrix_rank(X)) if len(frame) else 0
    if want_inter and df_resid <= 0:
        want_inter = False
        notes.append(INTERACTIONS_POOLED)
        rhs = rhs_of(False)
        X, info = _matrix(rhs, frame)
        df_resid = len(frame) - int(np.linalg.matrix_rank(X)) if len(frame) else 0

    # The reference grid: every combination of levels, times every seed (a block averages out).
    combos = list(itertools.product(*[lv[k] for k in used], seed_levels))
    grid = pd.DataFrame({names[k]: pd.Categorical([c[i] for c in combos], categories=lv[k])
                         for i, k in enumerate(used)})
    grid["seed"] = pd.Categorical([c[-1] for c in combos], categories=seed_levels)
    G, _ = _matrix(rhs, grid, info)

    contrasts = _contrasts(grid, used, names, lv, labels, kind, want_inter)
    W = np.array([c.weights for c in contrasts]).reshape(len(contrasts), len(grid))
    L = W @ G
    estimable = _in_row_space(L, X)
    return EffectsDesign(factors=list(factors), levels=lv, frame=frame, rhs=rhs, X=X, grid=grid,
                         contrasts=contrasts, L=L, estimable=estimable, df_resid=df_resid,
                         blocked=blocked, notes=notes)


def _matrix(rhs: str, frame, info=None):
    """patsy's design matrix of `rhs` for `frame` (with `info`, the same columns as before)."""
    import patsy

    if info is None:
        m = patsy.dmatrix(rhs, frame, return_type="matrix")
        return np.asarray(m, dtype=float), m.design_info
    return np.asarray(patsy.build_design_matrices([info], frame)[0], dtype=float), info


def _contrasts(grid, used, names, lv, labels, kind, with_interactions) -> list[Contrast]:
    """Main effects (and interactions) as weights over the reference grid's rows: +1/n on the
    rows of one marginal mean, -1/n on the other's."""
    def mean_of(conditions: Mapping[str, str]) -> np.ndarray:
        mask = np.ones(len(grid), dtype=bool)
        for key, level in conditions.items():
            mask &= (grid[names[key]].astype(str) == level).to_numpy()
        return mask / mask.sum()

    out = []
    for key in used:
        base = lv[key][0]
        for level in lv[key][1:]:
            w = mean_of({key: level}) - mean_of({key: base})
            short = labels.get(key, key)
            term = short if len(lv[key]) == 2 and kind == "factorial" else f"{short}={level}"
            out.append(Contrast(term, key, short, level, "main" if kind == "factorial" else "delta", w))
    if with_interactions:
        for a, b in itertools.combinations(used, 2):
            for la in lv[a][1:]:
                for lb in lv[b][1:]:
                    a0, b0 = lv[a][0], lv[b][0]
                    w = (mean_of({a: la, b: lb}) - mean_of({a: a0, b: lb})
                         - mean_of({a: la, b: b0}) + mean_of({a: a0, b: b0}))
                    sa, sb = labels.get(a, a), labels.get(b, b)
                    ta = sa if len(lv[a]) == 2 else f"{sa}={la}"
                    tb = sb if len(lv[b]) == 2 else f"{sb}={lb}"
                    out.append(Contrast(f"{ta} x {tb}", f"{a} x {b}", f"{sa} x {sb}",
                                        f"{la} x {lb}", "interaction", w))
    return out


def _in_row_space(L: np.ndarray, X: np.ndarray) -> np.ndarray:
    """[rows of L] whether each row is a combination of X's rows (the contrast is estimable)."""
    if not len(L):
        return np.zeros(0, dtype=bool)
    if not len(X):
        return np.zeros(len(L), dtype=bool)
    projected = L @ np.linalg.pinv(X) @ X
    scale = np.maximum(np.abs(L).max(axis=1), 1.0)
    return np.abs(projected - L).max(axis=1) <= 1e-8 * scale


# ------------------------------------------------------------------------------------------
# Runs -> tables.
# ------------------------------------------------------------------------------------------
def finished_values(runs, factors: Sequence[str], metric: str = "bbox_mAP", scale: float = 100.0):
    """(settings per run, seeds, y [runs]) of the finished runs with a finite `metric`, from
    `harness.report.load_study_runs`' frame (params hold the varied keys; config the rest)."""
    values, seeds, y = [], [], []
    if runs is None or not len(runs) or metric not in runs.columns:
        return values, seeds, np.zeros(0)
    for run in runs.to_dict("records"):
        value = run.get(metric)
        if run.get("state") != "finished" or value is None or not math.isfinite(float(value)):
            continue
        params, config = run.get("params") or {}, run.get("config") or {}
        values.append({k: params[k] if k in params else config.get(k) for k in factors})
        seeds.append(run.get("seed"))
        y.append(float(value) * scale)
    return values, seeds, np.asarray(y, dtype=float)


def effects_table(runs, factors: Sequence[str], levels: Optional[Mapping[str, Sequence[Any]]] = None,
                  *, labels: Optional[Mapping[str, str]] = None, metric: str = "bbox_mAP",
                  scale: float = 100.0, confidence: float = CONFIDENCE,
                  reference: Sequence[Any] = ()):
    """Main effects and two-way interactions of a grid's finished runs (see the module
    docstring), one row per effect: term, key (dotted), label (short), level, kind, estimate,
    se, ci_low, ci_high, df, p, p_holm, separated (Holm-adjusted p < 1 - confidence), note;
    with `reference` rows (a study's `reference:`), `paper` (the paper's one-at-a-time delta
    for that main effect, same units) and `paper_outside` (it lies outside our interval).

    attrs: sigma (residual SD), df_resid, n_runs, blocked, notes (what the design could not do),
    confidence, design (the EffectsDesign). Empty frame when no run finished.
    """
    import pandas as pd

    values, seeds, y = finished_values(runs, factors, metric, scale)
    if not len(y):
        table = pd.DataFrame(columns=EFFECT_COLUMNS)
        table.attrs.update({"notes": ["no finished run: nothing to estimate"], "n_runs": 0,
                            "sigma": math.nan, "df_resid": 0, "blocked": False,
                            "confidence": confidence, "design": None})
        return table
    design = build_design(values, seeds, factors, levels, labels=labels)
    table = _rows(design, y, confidence)
    if reference:
        _paper_deltas(table, design, reference, factors, scale)
    return table


def delta_table(values: Sequence[Any], seeds: Sequence[Any], y, baseline: Any,
                confidence: float = CONFIDENCE):
    """Each configuration minus the baseline configuration, paired by seed, variance pooled
    over all runs, Holm over the comparisons. values: per run its configuration id (any
    hashable, e.g. the table's row index); seeds: per run; y: per run (shown units);
    baseline: the baseline's configuration id. One row per non-baseline configuration, in
    order of first appearance, with `level` = its id and EFFECT_COLUMNS' numbers."""
    ids = list(dict.fromkeys(values))
    order = [baseline] + [i for i in ids if i != baseline]
    key = "_configuration"
    design = build_design([{key: v} for v in values], seeds, [key], {key: order},
                          interactions=False, kind="delta")
    return _rows(design, np.asarray(y, dtype=float), confidence)


def _rows(design: EffectsDesign, y: np.ndarray, confidence: float):
    import pandas as pd

    fit = design.estimate(y, confidence)
    alpha = 1.0 - confidence
    rows = []
    for i, c in enumerate(design.contrasts):
        note = ""
        if not design.estimable[i]:
            note = NOT_ESTIMABLE
        elif design.df_resid <= 0:
            note = NO_RESIDUAL_DF
        elif not fit["se"][i] > 0:
            note = NO_SPREAD
        p_holm = fit["p_holm"][i]
        rows.append({"term": c.term, "key": c.key, "label": c.label, "level": c.level,
                     "kind": c.kind, "estimate": fit["estimate"][i], "se": fit["se"][i],
                     "ci_low": fit["ci_low"][i], "ci_high": fit["ci_high"][i],
                     "df": design.df_resid if design.df_resid > 0 else math.nan,
                     "p": fit["p"][i], "p_holm": p_holm,
                     "separated": bool(p_holm < alpha) if math.isfinite(p_holm) else None,
                     "note": note})
    table = pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    table["separated"] = pd.Series(list(table["separated"]), dtype=object)
    table.attrs.update({"sigma": float(fit["sigma"]), "df_resid": design.df_resid,
                        "n_runs": len(y), "blocked": design.blocked, "notes": list(design.notes),
                        "confidence": confidence, "design": design})
    return table


def _paper_deltas(table, design: EffectsDesign, reference: Sequence[Any], factors: Sequence[str],
                  scale: float) -> None:
    """The paper's one-at-a-time delta beside each main effect: the first pair of reference
    rows that differ in this factor only (baseline level -> the effect's level, every other
    grid factor they name equal), on row minus off row. Table 2 adds components one at a time
    (baseline, + sampling, + BFP, + balanced L1), so each step is such a pair."""
    import pandas as pd

    refs = []
    for r in reference:
        if isinstance(r, Mapping):
            match, metrics = dict(r.get("match") or {}), dict(r.get("metrics") or {})
        else:
            match, metrics = dict(r.match), dict(r.metrics)
        if "bbox_mAP" in metrics:
            refs.append(({k: render_value(v) for k, v in match.items()}, float(metrics["bbox_mAP"])))
    others = [k for k in factors if k in design.levels]

    def step(key: str, level: str) -> float:
        base = design.levels[key][0]
        for on, v_on in refs:
            if on.get(key) != level:
                continue
            for off, v_off in refs:
                if off.get(key) == base and all(on.get(k) == off.get(k) for k in others if k != key):
                    return (v_on - v_off) * scale
        return math.nan

    paper, outside = [], []
    for row in table.to_dict("records"):
        value = step(row["key"], row["level"]) if row["kind"] == "main" else math.nan
        paper.append(value)
        lo, hi = row["ci_low"], row["ci_high"]
        outside.append(bool(value < lo or value > hi)
                       if math.isfinite(value) and math.isfinite(lo) else None)
    if any(math.isfinite(v) for v in paper):
        table["paper"] = paper
        table["paper_outside"] = pd.Series(outside, dtype=object)
