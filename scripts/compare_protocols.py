"""The quick-start both ways: cost per trial and seed-to-seed spread of AP, from two studies' MLflow stores.

    PYTHONPATH=. python scripts/compare_protocols.py \\
        e2e=libra-work/quickstart:quickstart fast=libra-work/quickstart-fast-rcnn:quickstart-fast-rcnn

Each argument is LABEL=WORK_DIR:EXPERIMENT (the work dir's embedded SQLite store). For every
protocol: the finished trials, their median wall time and training s/iter, mean AP, and the
seed-to-seed SD of AP pooled over the configurations that have two or more finished seeds
(AP points; the smaller it is, the fewer seeds a difference of a given size needs). Only
finished trials count, so a study stopped early is compared on what it finished.
"""
from __future__ import annotations

import argparse
import json
import math

from harness.tracking import default_uri, trial_runs


def summarise(work_dir: str, experiment: str) -> dict:
    runs = trial_runs(default_uri(work_dir), experiment)
    runs = runs[runs["tags.libra.trial_state"] == "finished"]
    ap = runs["metrics.bbox_mAP"] * 100
    config = runs["tags.libra.params"].map(lambda p: json.dumps({k: v for k, v in json.loads(p).items()
                                                               if k != "schedule.seed"}, sort_keys=True))
    groups = ap.groupby(config)
    pooled_ss = sum(((g - g.mean()) ** 2).sum() for _, g in groups if len(g) > 1)
    pooled_df = sum(len(g) - 1 for _, g in groups if len(g) > 1)
    return {
        "finished": len(runs),
        "configs_with_2_seeds": sum(1 for _, g in groups if len(g) > 1),
        "median_trial_s": float(runs["metrics.trial_wall_seconds"].median()),
        "median_s_per_iter": float(runs["metrics.mean_sec_per_iter"].median()),
        "mean_AP": float(ap.mean()),
        "seed_sd_AP": math.sqrt(pooled_ss / pooled_df) if pooled_df else float("nan"),
        "seed_df": pooled_df,
        "per_config": {c: [round(v, 2) for v in g.tolist()] for c, g in groups},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="LABEL=WORK_DIR:EXPERIMENT")
    args = parser.parse_args()
    print("| protocol | finished trials | configs with 2+ seeds | median s/trial | median train s/iter "
          "| mean AP | seed SD of AP (df) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    details = {}
    for item in args.studies:
        label, rest = item.split("=", 1)
        work_dir, experiment = rest.rsplit(":", 1)
        s = summarise(work_dir, experiment)
        details[label] = s["per_config"]
        print(f"| {label} | {s['finished']} | {s['configs_with_2_seeds']} | {s['median_trial_s']:.0f} | "
              f"{s['median_s_per_iter']:.3f} | {s['mean_AP']:.2f} | {s['seed_sd_AP']:.2f} ({s['seed_df']}) |")
    for label, per_config in details.items():
        print(f"\n{label}: AP per configuration and seed")
        for config, values in per_config.items():
            print(f"  {config}: {values}")


if __name__ == "__main__":
    main()
