"""Factorial effects and the seeds planner from a report's trials.csv (no MLflow store needed).

    PYTHONPATH=. python scripts/effects_from_trials_csv.py results/quickstart/trials.csv --half-width 1.5

Prints the main effects and two-way interactions of every key in the trials' `params` (AP points,
seed as a block; harness.effects), the smallest effect detectable now, and how many seeds per
configuration would bring every main effect's 95% half-width to --half-width (harness.planner).
"""
from __future__ import annotations

import argparse
import json

import pandas as pd

from harness import effects, planner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trials_csv")
    parser.add_argument("--half-width", type=float, default=1.5, help="target 95%% half-width, AP points")
    args = parser.parse_args()
    trials = pd.read_csv(args.trials_csv)
    trials["params"] = trials["params"].map(json.loads)
    trials["config"] = [{}] * len(trials)
    keys = sorted({k for p in trials["params"] for k in p if k != "schedule.seed"})
    table = planner.plan(effects.effects_table(trials, keys, labels={k: k.split(".")[-2] for k in keys}),
                         args.half_width)
    print(table[["term", "estimate", "ci_low", "ci_high", "p_holm", "detectable"]].to_string(index=False))
    print(f"residual SD {table.attrs['sigma']:.3f} AP points on {table.attrs['df_resid']} df, "
          f"{table.attrs['n_runs']} finished runs")
    seeds = planner.seeds_for_half_width(table.attrs["design"], table.attrs["sigma"], args.half_width)
    print(f"seeds per configuration for every main effect's 95% half-width <= {args.half_width}: {seeds}")


if __name__ == "__main__":
    main()
