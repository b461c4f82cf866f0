"""Harness cost: a study run end to end (`libra run` in a fresh work dir), its wall time taken
apart from the study's own MLflow records, against the ideal of no harness at all."""
from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from typing import Sequence

from harness.bench.model import Progress, quiet


# One trial as the study's MLflow records show it (seconds; *_at Unix times): opened_at / closed_at
# when the driver created / terminated its run; wall_s its trial_wall_seconds (launch on Ray -> result
# in the driver), fit_s total_train_seconds (fit's epochs: training + evaluation), eval_s total_eval_seconds.
TrialTiming = namedtuple("TrialTiming", "label state opened_at closed_at wall_s fit_s eval_s")


class HarnessCost(namedtuple("HarnessCost", "study num_trials slots wall_s setup_s teardown_s train_s eval_s "
                             "trial_overhead_s trial_overhead_median_s trial_overhead_max_s tracking_s idle_slot_s "
                             "ideal_s wall_over_ideal trials")):
    """Where a study's wall time goes, in slot-seconds (slots x wall time), and the ideal.

    Parts: training and evaluation (fit's epochs); trial overhead (launch -> result minus the
    epochs: Ray scheduling, worker start and imports, set-up, checkpoints, the result);
    tracking at trial boundaries (the driver's MLflow work while the slot waits); study set-up
    (process start to the parent run) and teardown, which hold every slot; idle slots. The
    ideal is training + evaluation divided by the slots; wall_over_ideal's target is <= 1.15.
    """

    def breakdown(self) -> list[tuple[str, float]]:
        """(part, slot-seconds); the parts add up to slots x wall_s."""
        return [("training", self.train_s), ("evaluation", self.eval_s),
                ("trial overhead (Ray task, worker start, set-up, checkpoints, result)", self.trial_overhead_s),
                ("tracking at trial boundaries (driver, MLflow)", self.tracking_s),
                ("study set-up (imports, MLflow/Optuna stores, Ray start) x slots", self.setup_s * self.slots),
                ("study teardown (summary, Ray shutdown) x slots", self.teardown_s * self.slots),
                ("idle slots (gaps, tail)", self.idle_slot_s)]


def harness_cost(study: str, trials: Sequence[TrialTiming], *, slots: int, process_start: float,
                 process_end: float, study_start: float, study_end: float) -> HarnessCost:
    """Take a study's wall time apart (see HarnessCost). Unix seconds: the `libra run` process's
    start and end, and the study's parent run in MLflow."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    wall, setup, teardown = process_end - process_start, study_start - process_start, process_end - study_end
    overheads = [max(0.0, t.wall_s - t.fit_s) for t in trials]
    train, evaluation = sum(t.fit_s - t.eval_s for t in trials), sum(t.eval_s for t in trials)
    tracking = sum(max(0.0, (t.closed_at - t.opened_at) - t.wall_s) for t in trials)
    busy = train + evaluation + sum(overheads) + tracking + slots * (setup + teardown)
    ideal = (train + evaluation) / slots
    return HarnessCost(
        study=study, num_trials=len(trials), slots=slots, wall_s=wall, setup_s=setup, teardown_s=teardown,
        train_s=train, eval_s=evaluation, trial_overhead_s=sum(overheads),
        trial_overhead_median_s=statistics.median(overheads) if overheads else 0.0,
        trial_overhead_max_s=max(overheads, default=0.0), tracking_s=tracking, idle_slot_s=slots * wall - busy,
        ideal_s=ideal, wall_over_ideal=wall / ideal if ideal > 0 else math.inf, trials=tuple(trials))


def run_harness_bench(study_path: str, *, overrides: Sequence[str] = (), progress: Progress = quiet) -> HarnessCost:
    """`libra run STUDY` in a fresh work dir (local Ray, SQLite MLflow, Optuna journal), taken
    apart by `harness_cost` from the study's MLflow runs (read_runs: the parent, then the trials
    oldest first). The synthetic data is generated before the clock starts (a first run pays
    for it once; it is not the harness's cost); RAY_ADDRESS is dropped, so the study starts its
    own local cluster as the quick-start does."""
    from detectors.data.synthetic import ensure_synthetic
    from harness.spec import load_study
    from harness.stores import default_uri, study_stores
    from harness.tracking import read_runs

    study = load_study(study_path, overrides)
    for root, synthetic in {(p.config.data.root, p.config.data.synthetic) for p in study.trials()
                            if p.config.data.kind == "synthetic"} if study.kind == "grid" else ():
        progress(f"[harness] synthetic data ready: {ensure_synthetic(root, synthetic)['train_images']}")
    with tempfile.TemporaryDirectory(prefix="libra-harness-bench-", ignore_cleanup_errors=True) as work_dir:
        uri, experiment = default_uri(work_dir), study_stores(study).experiment
        command = [sys.executable, "-m", "harness.cli", "run", os.path.abspath(study_path), "--work-dir", work_dir,
                   "--tracking-uri", uri] + [a for text in overrides for a in ("--set", text)]
        progress(f"[harness] {' '.join(command[1:])}")
        slots, last, process_start = None, "", time.time()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        for line in proc.stdout:
            last = line.rstrip() or last
            found = re.search(r"up to (\d+) at once", line)  # the driver's first line names its slots
            slots = slots or (int(found.group(1)) if found else None)
            if line.strip():
                progress(f"[harness] {line.rstrip()}")
        rc = proc.wait()
        process_end = time.time()
        if rc != 0:
            raise RuntimeError(f"the study run failed (exit {rc}): {last}")
        if slots is None:
            raise RuntimeError("the study run did not say how many trials it ran at once ('up to N at once')")
        parents = read_runs(uri, experiment, "study")
        if len(parents) != 1:
            raise RuntimeError(f"expected one study run in {uri}, found {len(parents)}")
        trials = [TrialTiming(
            label=str(r.get("tags.libra.label")), state=str(r.get("tags.libra.trial_state")),
            opened_at=r["start_time"].timestamp(), closed_at=r["end_time"].timestamp(),
            wall_s=float(r.get("metrics.trial_wall_seconds", math.nan)),
            fit_s=float(r.get("metrics.total_train_seconds", math.nan)),
            eval_s=float(r.get("metrics.total_eval_seconds", math.nan)),
        ) for r in read_runs(uri, experiment, "trial")]
    return harness_cost(study.name, trials, slots=slots, process_start=process_start, process_end=process_end,
                        study_start=parents[0]["start_time"].timestamp(), study_end=parents[0]["end_time"].timestamp())
