"""MLflow: where a study's runs are recorded, and the names a report can rely on.

Only the driver writes (through one MlflowClient); trials stream their metrics to it.

Store (harness/stores.py decides): `--tracking-uri URI` (or the study's `tracking.uri`), else an
embedded SQLite file at `sqlite:////<work dir>/mlflow.db`, with artifacts under `<work dir>/mlartifacts`.
The driver creates the database and the experiment before any trial starts.

Schema (`libra report` and `trial_runs` below read exactly these names):

Experiment: the study's `name` (or `tracking.experiment`).

Parent run, one per invocation of `libra run` (run name `<study>-<UTC timestamp>`):
    tags     libra.role = "study", libra.study, libra.kind = "grid" | "search" | "bench",
             libra.study_file (absolute path), libra.work_dir, libra.command (the argv),
             libra.git_commit, libra.git_dirty = "true" | "false",
             libra.version.{python,torch,torchvision,ray,optuna,mlflow}
    metrics  trials_total, trials_finished, trials_failed, trials_pruned,
             best_<metric> (e.g. best_bbox_mAP), logged when the invocation ends
    artifact study.yaml (the study after --set overrides)
    and what harness/mlflow_view.py adds for the UI: the description (mlflow.note.content),
             params base.*, grid.* / search.*, seeds, kind; plan.md; libra.best_run_id,
             libra.best_run_name, libra.best_config; summary.md; report/ (from libra report)
    status   FINISHED; FAILED when a trial failed; KILLED when interrupted

Child run, one per trial (nested: tag mlflow.parentRunId = the parent that created it; a
resumed trial keeps its run, and so its first parent). Run name: the trial's label.
    params   every dotted key of the trial's full config (detector.*, data.*, schedule.*, as in
             detectors.config.TrainConfig.to_dict) plus resources.workers,
             resources.cpus_per_worker, resources.gpus_per_worker, and short aliases for the
             UI (ibs, bfp, bl1, seed, varied keys' short names). Values are text: strings bare,
             everything else JSON (true, 0.5, null, [8, 11]); read them back with yaml.safe_load.
    tags     libra.role = "trial", libra.study, libra.trial_key, libra.label,
             libra.params (JSON object: the dotted keys this trial varies -> values),
             libra.seed, libra.arch, libra.backbone, libra.config ("-ibs +bfp -bl1": no seed),
             libra.flag.<component> ("true" | "false") for each of detectors.components
             (libra.flag.iou_balanced_sampling, libra.flag.balanced_feature_pyramid, ...),
             libra.trial_state = running | finished | failed | pruned | interrupted,
             libra.failure_reason (failed only), libra.attempts (attempts of the last invocation),
             libra.optuna_trial (the Optuna trial number), libra.git_commit, libra.version.*,
             libra.node_id (the Ray node id of the node that ran the trial's last attempt, rank
             0's for DDP), libra.host (that node's host name and IP), libra.node_ids (every
             attempt's node id, in order, comma-separated: a trial moved off a dead node shows
             both), libra.create_id (a token that makes creating the run safe to retry)
    metrics  per epoch, step = epoch (1-based): every number the engine reports, i.e. loss,
             loss_* (the model's loss terms), lr, sec_per_iter, train_images_per_sec,
             peak_memory_mb, epoch_seconds, and on evaluated epochs eval_seconds,
             eval_images_per_sec, bbox_mAP, bbox_mAP_50, bbox_mAP_75, bbox_mAP_s, bbox_mAP_m,
             bbox_mAP_l, bbox_AR_1, bbox_AR_10, bbox_AR_100 (fractions, not percent; may be NaN).
             Once, at the end of a finished trial (step = last epoch): total_train_seconds,
             total_eval_seconds, mean_sec_per_iter, max_peak_memory_mb, trial_wall_seconds.
    artifacts eval_summary.txt (COCOeval's summary), metrics.json ({"final", "history"}),
             per_class_AP.json ({class name: AP}), config.yaml (the trial's full config)
    status   FINISHED (finished), FAILED (failed), KILLED (pruned or interrupted), RUNNING

A bench study (`bench:` instead of `grid:`/`search:`) has one child run, its one trial: params
as above plus bench.* (the `bench:` options); tags as above (libra.params is {}); metrics once,
at step 0: bench.<variant>.<figure> (harness.bench.bench_metrics), bench.sampler.<figure>,
bench_seconds (the measuring's own time, also its Optuna value), trial_wall_seconds; artifacts bench.md (the results as markdown tables) and config.yaml.

Resume: a trial whose run is tagged finished is not run again; any other run with the same
libra.trial_key is reused (its status set back to RUNNING), so MLflow never holds duplicates.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from harness import mlflow_view, retry
from harness.errors import UserError
from harness.spec import Study, TrialPlan, flatten, render_value
from harness.stores import default_uri, study_stores  # noqa: F401  (default_uri: part of this module's API)

ROLE = "libra.role"
STATE = "libra.trial_state"
KEY = "libra.trial_key"
CREATE_ID = "libra.create_id"
NODE_ID = "libra.node_id"
HOST = "libra.host"

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "pruned": "KILLED", "interrupted": "KILLED"}


def check_reachable(uri: str) -> None:
    """Fail fast, in one line, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach MLflow tracking server at {uri}: {reason}; "
                        "start it or drop --tracking-uri") from None


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """Git commit of the code and library versions, as tags."""
    here = os.path.dirname(os.path.abspath(__file__))
    tags = {"libra.git_commit": "unknown", "libra.git_dirty": "unknown"}
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            tags["libra.git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            tags["libra.git_dirty"] = "true" if dirty.stdout.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        pass
    tags["libra.version.python"] = platform.python_version()
    for dist in ("torch", "torchvision", "ray", "optuna", "mlflow"):
        try:
            tags[f"libra.version.{dist}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            tags[f"libra.version.{dist}"] = "missing"
    return tags


@dataclass
class TrialRecord:
    """What MLflow already holds about a trial (from an earlier invocation)."""

    run_id: str
    state: str  # libra.trial_state
    metrics: dict[str, float]  # latest values


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to the usual handlers.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda received, _frame: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


class _UninterruptedClient:
    """An MlflowClient whose every call completes before a Ctrl-C (or SIGTERM) takes effect,
    and is retried through an outage of the store (harness.retry).

    A KeyboardInterrupt raised inside a SQLAlchemy write leaves that transaction holding the
    SQLite lock, and the driver's own "interrupted" bookkeeping that follows then fails with
    "database is locked". Holding the signal for the length of one call avoids that; the
    pauses between retries are outside the hold, so Ctrl-C still stops a waiting driver.
    """

    def __init__(self, client: Any, waiter: Optional[retry.Waiter] = None):
        self._client = client
        self.waiter = waiter  # None: no retries (a local SQLite file does not go away)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            def attempt(_n: int) -> Any:
                with _signals_held():
                    return attr(*args, **kwargs)

            return attempt(0) if self.waiter is None else self.waiter.call(attempt)

        return call

    def create_run_once(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
        """create_run, retried without ever making two runs: each run carries a fresh
        libra.create_id, and a retry first looks for the run whose reply was lost."""
        token = uuid.uuid4().hex
        tags = {**tags, CREATE_ID: token}

        def attempt(n: int) -> Any:
            with _signals_held():
                if n > 0:
                    found = self._client.search_runs([experiment_id],
                                                     filter_string=f"tags.`{CREATE_ID}` = '{token}'",
                                                     max_results=1)
                    if found:
                        return found[0]
                return self._client.create_run(experiment_id, tags=tags, run_name=run_name)

        return attempt(0) if self.waiter is None else self.waiter.call(attempt)


class Tracker:
    """The driver's MLflow writer for one study invocation."""

    def __init__(self, study: Study, work_dir: str, uri: Optional[str] = None,
                 stream: Optional[Any] = None):
        from mlflow import MlflowClient

        # MLflow logs each schema migration of a new SQLite store at INFO: not news to a user.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.study = study
        stores = study_stores(study, work_dir=work_dir, tracking_uri=uri)
        self.uri, self.experiment_name = stores.mlflow_uri, stores.experiment
        check_reachable(self.uri)
        if self.uri.startswith(("http://", "https://")):
            # MLflow's own retries (7, backoff factor 2) wait about four minutes in silence
            # before the first error; harness.retry waits instead, and says so. A user's own
            # settings of these variables win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
            # MLflow prints "View run ... at: URL" for every run it ends on a server, which
            # interleaves with the progress view; the closing summary names the server.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.makedirs(work_dir, exist_ok=True)
        # A server or a database server can restart under a long study: wait for it. A local
        # SQLite file cannot, and its errors (a bad path, a corrupt file) must fail at once.
        if self.uri.startswith(("http://", "https://")):
            waiter: Optional[retry.Waiter] = retry.Waiter(f"the MLflow server at {self.uri}", stream)
        elif "://" in self.uri and not self.uri.startswith(("sqlite:", "file:")):
            waiter = retry.Waiter(f"the MLflow database {retry.redacted(self.uri)}", stream)
        else:
            waiter = None
        self.client = _UninterruptedClient(MlflowClient(tracking_uri=self.uri), waiter)
        try:
            self.experiment_id = self._experiment(work_dir)
            mlflow_view.dress_experiment(self.client, self.experiment_id, study)
        except Exception as err:  # an unusable database or server: one line, not a traceback
            raise UserError(f"cannot use MLflow tracking store {self.uri}: "
                            f"{' '.join(str(err).split())[:300]}") from None
        self.parent_id: Optional[str] = None

    def _experiment(self, work_dir: str) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = pathlib.Path(work_dir, "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(self.experiment_name, artifact_location=location,
                                             tags={"libra.study": self.study.name})

    # ---------------------------------------------------------------------------------------
    # The parent run.
    # ---------------------------------------------------------------------------------------
    def start_parent(self, work_dir: str, argv: Sequence[str], plan_text: str = "") -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        tags = {ROLE: "study", "libra.study": self.study.name, "libra.kind": self.study.kind,
                "libra.study_file": self.study.path, "libra.work_dir": work_dir,
                "libra.command": " ".join(argv)[:4000], **provenance()}
        run = self.client.create_run_once(self.experiment_id, f"{self.study.name}-{stamp}", tags)
        self.parent_id = run.info.run_id
        self.client.log_text(self.parent_id, yaml.safe_dump(self.study.mapping, sort_keys=False),
                             "study.yaml")
        mlflow_view.dress_parent(self.client, self.parent_id, self.study, plan_text)
        return self.parent_id

    def end_parent(self, status: str, counts: Mapping[str, int], best: Optional[float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(f"trials_{name}", float(value), now, 0) for name, value in counts.items()]
        if best is not None:
            metrics.append(Metric(f"best_{self.study.metric}", float(best), now, 0))
        self.client.log_batch(self.parent_id, metrics=metrics)
        self.client.set_terminated(self.parent_id, status)

    # ---------------------------------------------------------------------------------------
    # Child runs.
    # ---------------------------------------------------------------------------------------
    def existing_trials(self) -> dict[str, TrialRecord]:
        """trial_key -> the latest run recorded for it in this experiment."""
        from mlflow.entities import ViewType

        records: dict[str, TrialRecord] = {}
        page_token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{ROLE}` = 'trial'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=page_token)
            for run in page:
                key = run.data.tags.get(KEY)
                if key is None:
                    continue
                record = TrialRecord(run.info.run_id, run.data.tags.get(STATE, "running"),
                                     dict(run.data.metrics))
                previous = records.get(key)
                if previous is None or previous.state != "finished":
                    records[key] = record
            page_token = page.token
            if not page_token:
                return records

    def open_trial(self, plan: TrialPlan, existing: Optional[TrialRecord],
                   optuna_number: Optional[int] = None) -> str:
        """The trial's run: reuse the one an earlier invocation left, else a new child run."""
        from mlflow.entities import Param

        tags = {STATE: "running", "libra.optuna_trial": optuna_number}
        if existing is not None:
            run_id = existing.run_id
            self.client.update_run(run_id, status="RUNNING")
            run = self.client.get_run(run_id)
            if "libra.failure_reason" in run.data.tags:
                self.client.delete_tag(run_id, "libra.failure_reason")
            self.set_tags(run_id, tags)
            return run_id
        cfg = plan.config
        tags.update({
            ROLE: "trial", "libra.study": self.study.name, KEY: plan.key, "libra.label": plan.label,
            mlflow_view.CONFIG_TAG: mlflow_view.config_label(plan, self.study),
            "libra.params": json.dumps(plan.params, sort_keys=True), "libra.seed": plan.seed,
            "libra.arch": cfg.detector.arch, "libra.backbone": cfg.detector.backbone,
            "mlflow.parentRunId": self.parent_id, **provenance(),
        })
        for name, on in cfg.detector.component_flags.items():
            tags[f"libra.flag.{name}"] = "true" if on else "false"
        run = self.client.create_run_once(self.experiment_id, plan.label[:250],
                                          {k: _tag(v) for k, v in tags.items() if v is not None})
        run_id = run.info.run_id
        res = self.study.spec.resources
        params = flatten(cfg.to_dict())
        params.update({"resources.workers": res.workers,
                       "resources.cpus_per_worker": res.cpus_per_worker,
                       "resources.gpus_per_worker": res.gpus_per_worker})
        params.update(mlflow_view.param_aliases(plan, self.study))  # ibs, bfp, bl1, seed, ...
        if self.study.spec.bench is not None:  # a bench trial also records its `bench:` options
            params.update({f"bench.{k}": v for k, v in self.study.spec.bench.model_dump().items()})
        items = [Param(k, render_value(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])
        self.client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        return run_id

    def placed(self, run_id: str, node_id: str, host: str, earlier: Sequence[str]) -> list[str]:
        """Record where the trial's current attempt runs; returns the node ids so far."""
        nodes = [*earlier, node_id] if not earlier or earlier[-1] != node_id else list(earlier)
        self.set_tags(run_id, {NODE_ID: node_id, HOST: host, "libra.node_ids": ",".join(nodes)})
        return nodes

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _tag(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(run_id, tags=items)

    def logged_epochs(self, run_id: str) -> dict[int, dict[str, float]]:
        """epoch -> the metrics logged at that step (what an earlier invocation recorded)."""
        run = self.client.get_run(run_id)
        out: dict[int, dict[str, float]] = {}
        for name in run.data.metrics:
            for m in self.client.get_metric_history(run_id, name):
                if m.step > 0:
                    out.setdefault(int(m.step), {})[name] = m.value
        return out

    def log_epoch(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics from the engine, at step = epoch."""
        from mlflow.entities import Metric

        epoch = int(metrics["epoch"])
        now = _now_ms()
        items = [Metric(name, float(value), now, epoch) for name, value in metrics.items()
                 if name != "epoch" and _is_number(value)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def finish_trial(self, run_id: str, result: Mapping[str, Any], wall_seconds: float,
                     attempts: int) -> None:
        """Summary metrics, artifacts and the finished state of a trial that trained to the end."""
        from mlflow.entities import Metric

        if "markdown" in result:  # a bench study's trial (harness.bench.trial): figures, not epochs
            return self.finish_bench(run_id, result, wall_seconds, attempts)
        history = list(result.get("history") or [])
        last_epoch = int(history[-1]["epoch"]) if history else 0
        totals = {
            "total_train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history),
            "total_eval_seconds": sum(h.get("eval_seconds", 0.0) for h in history
                                      if _is_number(h.get("eval_seconds"))),
            "trial_wall_seconds": wall_seconds,
        }
        iters = [h["sec_per_iter"] for h in history if _is_number(h.get("sec_per_iter"))]
        if iters:
            totals["mean_sec_per_iter"] = sum(iters) / len(iters)
        peaks = [h["peak_memory_mb"] for h in history if _is_number(h.get("peak_memory_mb"))]
        if peaks:
            totals["max_peak_memory_mb"] = max(peaks)
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, last_epoch)
                                               for k, v in totals.items()])
        self.client.log_text(run_id, str(result.get("eval_summary", "")), "eval_summary.txt")
        self.client.log_dict(run_id, {"final": result.get("final"), "history": history},
                             "metrics.json")
        self.client.log_dict(run_id, dict(result.get("per_class_AP") or {}), "per_class_AP.json")
        self.end_trial(run_id, "finished", attempts=attempts)

    def finish_bench(self, run_id: str, outcome: Mapping[str, Any], wall_seconds: float,
                     attempts: int) -> None:
        """A bench trial's figures (step 0), its markdown tables, and the finished state."""
        from mlflow.entities import Metric

        now = _now_ms()
        figures = {**outcome.get("metrics", {}), **outcome.get("final", {}), "trial_wall_seconds": wall_seconds}
        items = [Metric(k, float(v), now, 0) for k, v in figures.items() if _is_number(v)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])
        self.client.log_text(run_id, str(outcome.get("markdown", "")), "bench.md")
        self.end_trial(run_id, "finished", attempts=attempts)

    def end_trial(self, run_id: str, state: str, *, attempts: Optional[int] = None,
                  reason: Optional[str] = None) -> None:
        """Tag and terminate a trial's run: finished | failed | pruned | interrupted."""
        tags = {STATE: state, "libra.attempts": attempts}
        if reason:
            tags["libra.failure_reason"] = " ".join(reason.split())[:4000]
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, _STATUS[state])


def open_client(tracking_uri: str):
    """An MlflowClient for `tracking_uri`, or None when its SQLite file does not exist (a report
    never creates a store). An unreachable server is a one-line UserError, within seconds."""
    from mlflow import MlflowClient

    check_reachable(tracking_uri)
    if tracking_uri.startswith("sqlite:"):
        path = sqlite_path(tracking_uri)
        if path and not os.path.isfile(path):
            return None
    return MlflowClient(tracking_uri=tracking_uri)


def sqlite_path(tracking_uri: str) -> Optional[str]:
    """The database file of a sqlite:// URI (sqlite:////abs/db -> /abs/db)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(tracking_uri).database
    except Exception:  # not a URL sqlalchemy reads: let MLflow say what is wrong
        return None


def read_runs(tracking_uri: str, experiment_name: str, role: Optional[str] = None) -> list[dict]:
    """The experiment's runs (only those tagged libra.role = `role` if given), oldest first, as
    dicts shaped like mlflow.search_runs' rows: run_id, status, start_time, end_time (UTC
    pandas Timestamps; end_time None while running), params.*, metrics.* (latest values), tags.*.
    Empty when the store or the experiment does not exist (reading never creates a store); a
    store that cannot be read is a one-line UserError. The one reader of MLflow: the report,
    the driver's summary and the bench use it."""
    import pandas as pd
    from mlflow.entities import ViewType

    try:
        client = open_client(tracking_uri)
        if client is None:
            return []
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            return []
        records = []
        page_token = None
        while True:
            page = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`{ROLE}` = '{role}'" if role else "",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                      order_by=["attributes.start_time ASC"], page_token=page_token)
            for run in page:
                record = {"run_id": run.info.run_id, "status": run.info.status,
                          "start_time": pd.Timestamp(run.info.start_time or 0, unit="ms", tz="UTC"),
                          "end_time": (pd.Timestamp(run.info.end_time, unit="ms", tz="UTC")
                                       if run.info.end_time else None)}
                record.update({f"params.{k}": v for k, v in run.data.params.items()})
                record.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
                record.update({f"tags.{k}": v for k, v in run.data.tags.items()})
                records.append(record)
            page_token = page.token
            if not page_token:
                return records
    except UserError:
        raise
    except Exception as err:  # a broken database, a server error: one line
        raise UserError(f"cannot read MLflow tracking store {tracking_uri}: "
                        f"{' '.join(str(err).split())[:300]}") from None


def trial_runs(uri: str, experiment: str, trial_keys: Optional[Iterable[str]] = None):
    """A study's child runs as a pandas DataFrame (read_runs' columns: `params.*` as text,
    `metrics.*` latest values, `tags.*`), optionally only `trial_keys`."""
    import pandas as pd

    frame = pd.DataFrame(read_runs(uri, experiment, "trial"))
    if trial_keys is not None and len(frame):
        frame = frame[frame[f"tags.{KEY}"].isin(set(trial_keys))]
    return frame.reset_index(drop=True)


def _tag(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _now_ms() -> int:
    return int(time.time() * 1000)

