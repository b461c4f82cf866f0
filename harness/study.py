"""The driver: runs a study's trials on Ray, bounded, retried and resumable; the only writer to
MLflow and Optuna.

One loop for grids, searches and benches (a bench study's one trial measures, harness.bench,
instead of training): a source hands out (trial plan, Optuna trial) pairs while
there is room; each trial is launched on Ray (harness.trial); the driver drains the epochs'
metrics from the mailbox actor into MLflow and the Optuna trial (which may prune), and records
each trial's end: finished, pruned, or failed after `max_retries` more attempts.

Resume: trial identity is `TrialPlan.key`. A trial whose MLflow run is finished is never trained
again; any other is relaunched with the same run id and the same `<work dir>/trials/<key>`
folder, where `fit` picks up its last checkpoint. Optuna trials left RUNNING by a dead driver
are failed as interrupted (and a search's are queued again) before anything new is asked.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, Optional, Sequence, TextIO

from detectors.components import components
from detectors.config import ConfigError
from harness import search, stores
from harness.errors import UserError
from harness.progress import Progress
from harness.spec import Study, TrialPlan, render_value, short_names
from harness.tracking import Tracker, TrialRecord, trial_runs

# "0": Ray's one-machine mode, every server on loopback (see _connect_ray).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
POLL_S = 0.5  # how often the driver drains epoch metrics and answers prune questions


@dataclasses.dataclass
class RunOptions:
    work_dir: str
    address: Optional[str] = None  # Ray cluster; None: RAY_ADDRESS, else a new local cluster
    tracking_uri: Optional[str] = None
    optuna_storage: Optional[str] = None
    max_retries: Optional[int] = None  # None: the study's max_retries
    argv: Sequence[str] = ()
    stream: Optional[TextIO] = None  # None: sys.stdout at the time of the run
    verbose: bool = False  # Ray's own log on the terminal (hidden by default)


def default_work_dir(study: Study) -> str:
    return stores.default_work_dir(study.name)


# ------------------------------------------------------------------------------------------
# Resources.
# ------------------------------------------------------------------------------------------
def plan_concurrency(study: Study, nodes: Sequence[dict[str, float]], where: str) -> int:
    """How many trials run at once on a cluster whose alive nodes have `nodes` resources.

    Raises UserError when one trial can never be placed (a worker larger than every node, or
    a trial larger than the whole cluster).
    """
    res = study.spec.resources
    need = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker:
        need["GPU"] = float(res.gpus_per_worker)
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in need}
    have = ", ".join(f"{totals[n]:g} {n}s" for n in need)
    if not any(all(node.get(n, 0.0) >= amount for n, amount in need.items()) for node in nodes):
        wanted = " + ".join(f"{amount:g} {n}" for n, amount in need.items())
        raise UserError(f"{study.path}: resources: each worker needs {wanted}, which no node of "
                        f"{where} has (it has {have} in all); lower resources.cpus_per_worker / "
                        "gpus_per_worker or join a bigger cluster with --address")
    slots = min(math.floor(totals[n] / (amount * res.workers)) for n, amount in need.items())
    if slots < 1:
        raise UserError(f"{study.path}: resources: a trial needs {res.workers} worker(s) x "
                        f"{' + '.join(f'{a:g} {n}' for n, a in need.items())} but {where} has "
                        f"{have}; lower resources.workers or join a bigger cluster with --address")
    return min(slots, res.concurrency or slots)


def _connect_ray(address: Optional[str], verbose: bool = False) -> tuple[bool, str]:
    """Start or join Ray; returns (whether this call started it, a description)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        # Embedded mode is a one-machine cluster. Ray then resolves even an explicit
        # 127.0.0.1 node address to the primary interface and its servers listen on every
        # interface; in its one-machine mode (the default on macOS and Windows, chosen by
        # this variable, read when Ray is imported) every server binds loopback instead.
        os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
    elif address and "ray" not in sys.modules:
        # preflight.check_ray_address has seen a gRPC server there, so a GCS that keeps
        # refusing is refusing us (a wrong token): Ray's 20 tries (a second or two each) would
        # keep the user waiting half a minute. Read when Ray is imported; a user's value wins.
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "5")
    import ray

    if ray.is_initialized():
        return False, "the Ray instance this process already runs"
    common = dict(include_dashboard=False, log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        import detectors
        import harness

        with tempfile.TemporaryFile(mode="w+b") as log:
            try:
                # Ray's C++ client logs each failed handshake to the terminal (fd 2, below
                # Python's sys.stderr): kept in `log` unless --verbose, and read for the cause.
                with contextlib.nullcontext() if verbose else _fd2_to(log):
                    # Ship this checkout's code, so the cluster runs what the driver validated.
                    ray.init(address=address, runtime_env={"py_modules": [detectors, harness]},
                             **common)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as err:
                log.seek(0)
                said = log.read().decode(errors="replace")
                if isinstance(err, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in said:
                    raise UserError(f"--address {address}: the Ray cluster refused this driver's "
                                    "token; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                                    "cluster's token, from `ray get-auth-token` on the head "
                                    "(docs/cluster.md)") from None
                raise UserError(f"cannot join the Ray cluster at {address}: "
                                f"{' '.join(str(err).split())[:200]}; check --address / RAY_ADDRESS "
                                "or drop it to run locally") from None
        return True, f"Ray cluster at {address}"
    # A local cluster uses Ray's default token authentication; its notice about it is noise here.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", object_store_memory=256 * 1024 ** 2, **common)
    return True, "a local Ray cluster"


@contextlib.contextmanager
def _fd2_to(sink: Any) -> Any:
    """Point file descriptor 2 (what C++ libraries write to) at `sink` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _this_node() -> Any:
    """Pin to the driver's node: the mailbox must outlive any other node of the cluster (a
    mailbox placed on a node that dies would take every running trial's reports with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _quiet() -> None:
    for name in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------
# Where trials come from.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Running:
    plan: TrialPlan
    otrial: Any  # optuna.Trial
    run_id: str
    logged: set[int]
    started: float
    attempt: int = 1
    ref: Any = None
    stop: bool = False  # the pruner asked it to stop
    nodes: list[str] = dataclasses.field(default_factory=list)  # Ray node id of each attempt


class _GridSource:
    """A grid's trials in file order; finished ones (per MLflow) are skipped."""

    def __init__(self, driver: "_Driver"):
        self.driver = driver
        self.plans = driver.study.trials()
        self.total = len(self.plans)
        completed = search.completed_keys(driver.ostudy)
        self.pending: collections.deque[TrialPlan] = collections.deque()
        self.already = 0
        for plan in self.plans:
            record = driver.records.get(plan.key)
            if record is not None and record.state == "finished":
                self.already += 1
                if plan.key not in completed:  # the driver died between MLflow and Optuna
                    otrial = self._ask(plan)
                    search.tell_complete(driver.ostudy, otrial, record.metrics.get(driver.metric))
            else:
                self.pending.append(plan)

    def _ask(self, plan: TrialPlan) -> Any:
        otrial = self.driver.ostudy.ask()
        search.pin(otrial, {**plan.params, "schedule.seed": plan.seed})
        otrial.set_user_attr(search.KEY_ATTR, plan.key)
        return otrial

    def next(self) -> Optional[tuple[TrialPlan, Any]]:
        if not self.pending:
            return None
        plan = self.pending.popleft()
        return plan, self._ask(plan)

    def keys(self) -> list[str]:
        return [p.key for p in self.plans]


class _SearchSource:
    """Optuna proposes; a proposal already measured (same key) is answered from MLflow."""

    def __init__(self, driver: "_Driver"):
        self.driver = driver
        self.total = driver.study.spec.search.num_trials
        self.already = min(search.counted_trials(driver.ostudy), self.total)
        self.seed = driver.study.seeds[0]

    def next(self) -> Optional[tuple[TrialPlan, Any]]:
        driver = self.driver
        while True:
            in_flight = len(driver.by_key) + sum(len(v) for v in driver.parked.values())
            if search.counted_trials(driver.ostudy) + in_flight >= self.total:
                return None
            otrial = driver.ostudy.ask()
            params = search.suggest(otrial, driver.study)
            try:
                plan = driver.study.make_trial(params, self.seed)
            except ConfigError as err:  # a combination the config rejects: a failed proposal
                search.tell_failed(driver.ostudy, otrial, str(err))
                driver.counts["failed"] += 1
                driver.failures.append((str(params), str(err)))
                driver.progress.failed_trial(str(params), str(err), ran=False)
                continue
            otrial.set_user_attr(search.KEY_ATTR, plan.key)
            record = driver.records.get(plan.key)
            if plan.key in driver.by_key:  # the same configuration is training right now
                driver.parked[plan.key].append(otrial)
                continue
            if record is not None and record.state in ("finished", "pruned"):
                driver.answer_from_record(plan, otrial, record)
                continue
            return plan, otrial

    def keys(self) -> list[str]:
        keys = []
        for frozen in self.driver.ostudy.get_trials(deepcopy=False):
            key = frozen.user_attrs.get(search.KEY_ATTR)
            if key is not None and key not in keys:
                keys.append(key)
        return keys


# ------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------
class _Driver:
    def __init__(self, study: Study, opts: RunOptions, work_dir: str, tracker: Tracker,
                 ostudy: Any, concurrency: int):
        self.study = study
        self.opts = opts
        self.work_dir = work_dir
        self.tracker = tracker
        self.ostudy = ostudy
        self.concurrency = concurrency
        self.metric = study.metric
        self.max_retries = study.spec.max_retries if opts.max_retries is None else opts.max_retries
        self.prunable = (study.spec.search is not None and study.spec.search.pruner.name != "none")
        self.records: dict[str, TrialRecord] = tracker.existing_trials()
        self.by_key: dict[str, _Running] = {}
        self.refs: dict[Any, _Running] = {}
        self.parked: dict[str, list[Any]] = collections.defaultdict(list)
        self.counts = {"finished": 0, "failed": 0, "pruned": 0}
        self.failures: list[tuple[str, str]] = []  # this invocation's, incl. proposals never run
        self.rounds = study.seed_rounds  # kept: each round's study has a plain list of seeds
        self.round_log: list[str] = []  # seed rounds' decisions (libra.rounds on the parent run)
        self.done_before = 0  # trials finished by earlier invocations, set when the run starts
        self.mailbox = None
        self.progress: Progress = None  # type: ignore[assignment]
        self.out = opts.stream or sys.stdout

    # The loop ------------------------------------------------------------------------------
    def run(self) -> int:
        import ray

        from harness.trial import Mailbox

        self.mailbox = Mailbox.options(scheduling_strategy=_this_node()).remote()
        self.tracker.start_parent(self.work_dir, self.opts.argv, describe(self.study, self.opts))
        source = _SearchSource(self) if self.study.kind == "search" else _GridSource(self)
        self.progress = Progress(source.total, self.metric, self.study.direction,
                                 stream=self.out)
        self.progress.skipped(source.already, "already done in an earlier run (not trained again)")
        # Counted once, here: a later round's source also counts the earlier rounds' trials,
        # which this invocation trained itself.
        self.done_before = source.already
        try:
            self._loop(source)
            while (seeds := self._next_round(source)) is not None:
                self.study = self.study.with_seeds(seeds)
                source = _GridSource(self)
                self.progress.close()
                best, best_label = self.progress.best, self.progress.best_label
                self.progress = Progress(source.total, self.metric, self.study.direction,
                                         stream=self.out)
                self.progress.best, self.progress.best_label = best, best_label
                self.progress.skipped(source.already, "already done (earlier rounds or runs)")
                self._loop(source)
        except KeyboardInterrupt:
            self._interrupt()
            self.progress.close()
            self.tracker.end_parent("KILLED", self._parent_counts(source), self.progress.best)
            raise
        finally:
            ray.kill(self.mailbox)
        self.progress.close()
        status = "FAILED" if self.counts["failed"] else "FINISHED"
        self.tracker.end_parent(status, self._parent_counts(source), self.progress.best)
        self._report(source)
        return 1 if self.counts["failed"] else 0

    def _loop(self, source: Any) -> None:
        import ray

        while True:
            while len(self.by_key) < self.concurrency:
                nxt = source.next()
                if nxt is None:
                    break
                self._launch(*nxt)
            if not self.refs:
                return
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=POLL_S)
            self._pump()
            for ref in ready:
                self._collect(ref)

    def _launch(self, plan: TrialPlan, otrial: Any) -> None:
        record = self.records.get(plan.key)
        run_id = self.tracker.open_trial(plan, record, otrial.number)
        logged = self.tracker.logged_epochs(run_id) if record is not None else {}
        for epoch, metrics in sorted(logged.items()):  # the pruner sees the earlier epochs too
            value = metrics.get(self.metric)
            if value is not None and math.isfinite(value):
                otrial.report(value, epoch)
        running = _Running(plan, otrial, run_id, set(logged), time.monotonic())
        if record is not None:  # the nodes of an earlier invocation's attempts
            earlier = self.tracker.client.get_run(run_id).data.tags.get("libra.node_ids", "")
            running.nodes = [n for n in earlier.split(",") if n]
        self.by_key[plan.key] = running
        self.progress.started(plan.label, 1)
        self._start_attempt(running)

    def _start_attempt(self, running: _Running) -> None:
        from harness.trial import launch

        res = self.study.spec.resources
        payload = {
            "trial_key": running.plan.key, "attempt": running.attempt,
            "config": running.plan.config.to_dict(),
            "out_dir": os.path.join(self.work_dir, "trials", running.plan.key),
            "num_threads": res.cpus_per_worker, "workers": res.workers,
            "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
            "ray_storage": os.path.join(self.work_dir, "ray"), "mailbox": self.mailbox,
            "prunable": self.prunable,
            "bench": self.study.spec.bench.model_dump() if self.study.spec.bench else None,
        }
        running.ref = launch(payload)
        self.refs[running.ref] = running

    def _pump(self) -> None:
        """Epoch metrics -> MLflow and Optuna; answer the workers that wait for a verdict."""
        import ray

        for key, attempt, node_id, host in ray.get(self.mailbox.drain_placed.remote()):
            running = self.by_key.get(key)
            if running is not None and running.attempt == attempt:
                running.nodes = self.tracker.placed(running.run_id, node_id, host, running.nodes)
        for key, attempt, metrics in ray.get(self.mailbox.drain.remote()):
            running = self.by_key.get(key)
            if running is None:
                continue
            epoch = int(metrics["epoch"])
            if epoch not in running.logged:
                running.logged.add(epoch)
                self.tracker.log_epoch(running.run_id, metrics)
                value = metrics.get(self.metric)
                if value is not None and math.isfinite(value):
                    running.otrial.report(value, epoch)
                self.progress.epoch(running.plan.label, metrics, running.plan.config.schedule.epochs)
            if self.prunable:
                running.stop = running.stop or running.otrial.should_prune()
                self.mailbox.answer.remote(key, attempt, epoch, running.stop)

    def _collect(self, ref: Any) -> None:
        import ray

        from harness.trial import failure_reason

        running = self.refs.pop(ref)
        try:
            outcome = ray.get(ref)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # the trial's own error, or its worker died
            reason = failure_reason(err)
            if running.attempt <= self.max_retries:
                running.attempt += 1
                self.progress.retrying(running.plan.label, running.attempt - 1, reason)
                self._start_attempt(running)
            else:
                self._fail(running, reason)
            return
        if outcome["status"] == "pruned":
            self._prune(running)
        else:
            self._finish(running, outcome["result"])

    # Trial ends ----------------------------------------------------------------------------
    def _finish(self, running: _Running, result: dict) -> None:
        for metrics in result.get("history") or []:  # epochs whose message was lost (resume)
            if int(metrics["epoch"]) not in running.logged:
                running.logged.add(int(metrics["epoch"]))
                self.tracker.log_epoch(running.run_id, metrics)
        final = result.get("final") or {}
        self.tracker.finish_trial(running.run_id, result, time.monotonic() - running.started,
                                  running.attempt)
        value = final.get(self.metric)
        search.tell_complete(self.ostudy, running.otrial, value)
        if "markdown" in result:  # a bench trial's figures, as `libra bench` prints them
            print(f"\n{result['markdown']}", file=self.out)
        record = TrialRecord(running.run_id, "finished", dict(final))
        self._done(running, record, "finished", value)

    def _prune(self, running: _Running) -> None:
        self.tracker.end_trial(running.run_id, "pruned", attempts=running.attempt)
        search.tell_pruned(self.ostudy, running.otrial)
        self._done(running, TrialRecord(running.run_id, "pruned", {}), "pruned", None)

    def _fail(self, running: _Running, reason: str) -> None:
        self.tracker.end_trial(running.run_id, "failed", attempts=running.attempt, reason=reason)
        search.tell_failed(self.ostudy, running.otrial, reason)
        self.records[running.plan.key] = TrialRecord(running.run_id, "failed", {})
        del self.by_key[running.plan.key]
        self.counts["failed"] += 1
        self.failures.append((running.plan.label, reason))
        self.progress.failed_trial(running.plan.label, reason)
        for otrial in self.parked.pop(running.plan.key, []):
            search.tell_failed(self.ostudy, otrial, f"same configuration as a failed trial: {reason}")
            self.counts["failed"] += 1
            self.progress.failed_trial(f"{running.plan.label} (a duplicate)", reason, ran=False)

    def _done(self, running: _Running, record: TrialRecord, state: str,
              value: Optional[float]) -> None:
        self.records[running.plan.key] = record
        del self.by_key[running.plan.key]
        self.counts[state] += 1
        self.progress.finished(running.plan.label, value, state)
        for otrial in self.parked.pop(running.plan.key, []):
            self.answer_from_record(running.plan, otrial, record)

    def answer_from_record(self, plan: TrialPlan, otrial: Any, record: TrialRecord) -> None:
        """Tell Optuna a result MLflow already holds for this configuration (no training)."""
        if record.state == "finished":
            value = record.metrics.get(self.metric)
            search.tell_complete(self.ostudy, otrial, value)
            self.counts["finished"] += 1
            self.progress.finished(f"{plan.label} (measured before)", value, ran=False)
        else:
            search.tell_pruned(self.ostudy, otrial)
            self.counts["pruned"] += 1
            self.progress.finished(f"{plan.label} (pruned before)", None, "pruned", ran=False)

    def _interrupt(self) -> None:
        import ray

        requeue = self.study.kind == "search"
        for running in self.by_key.values():
            self.tracker.end_trial(running.run_id, "interrupted", attempts=running.attempt)
            search.mark_interrupted(self.ostudy, running.otrial,
                                    running.otrial.params if requeue else {})
            if running.ref is not None:
                ray.cancel(running.ref, force=True)
        for otrials in self.parked.values():
            for otrial in otrials:
                search.mark_interrupted(self.ostudy, otrial, otrial.params if requeue else {})
        self.progress.interrupted(len(self.by_key))

    # Seed rounds ---------------------------------------------------------------------------
    def _next_round(self, source: Any) -> Optional[list[int]]:
        """With `seeds: {initial, max, until_half_width}`: the seeds of the next round (one more
        per configuration), or None when every main effect's 95% half-width meets the target,
        the cap is reached, or a trial failed (a failing grid must be fixed, not grown). The
        decision is printed and tagged on the parent run (libra.rounds), so a resumed study
        walks the same rounds: finished trials are skipped, the effects are read back."""
        from harness.planner import widest_half_width
        from harness.report import study_effects, tidy_runs

        rounds = self.rounds
        if rounds is None or self.counts["failed"]:
            return None
        seeds = self.study.seeds
        frame = tidy_runs(trial_runs(self.tracker.uri, self.tracker.experiment_name, source.keys()))
        effects = study_effects(frame, self.study)
        main = effects[effects["kind"] == "main"] if effects is not None and len(effects) else None
        widest = (float(widest_half_width(main["ci_low"], main["ci_high"])) if main is not None
                  else math.nan)  # NaN: no interval yet
        target = rounds.until_half_width
        shown = "no interval yet" if not math.isfinite(widest) else f"{widest:.2f} AP"
        line = (f"round {len(seeds) - rounds.initial + 1}: seeds {seeds[0]}-{seeds[-1]}, widest "
                f"main-effect 95% half-width {shown} (target {target:g})")
        if widest <= target:
            decision, nxt = "resolved", None
        elif len(seeds) >= rounds.max:
            decision, nxt = f"stopping at the cap of {rounds.max} seeds, not resolved", None
        else:
            nxt = rounds.seeds(len(seeds) + 1)
            decision = f"adding seed {nxt[-1]} to every configuration"
        print(f"{line}: {decision}", file=self.out)
        self.round_log.append(f"{line}: {decision}")
        self.tracker.set_tags(self.tracker.parent_id,
                              {"libra.rounds": "\n".join(self.round_log),
                               "libra.seeds": ",".join(str(x) for x in (nxt or seeds))})
        return nxt

    # The end -------------------------------------------------------------------------------
    def _parent_counts(self, source: Any) -> dict[str, int]:
        return {"total": source.total, **self.counts}

    def _report(self, source: Any) -> None:
        from harness import mlflow_view
        from harness.report import render_markdown_table, tidy_runs

        out = self.out
        frame = trial_runs(self.tracker.uri, self.tracker.experiment_name, source.keys())
        done = self.done_before + sum(self.counts.values())
        print(f"\n{self.study.name}: {done}/{source.total} trials done: "
              f"{self.done_before} from earlier runs, {self.counts['finished']} finished now, "
              f"{self.counts['pruned']} pruned, {self.counts['failed']} failed", file=out)
        for label, reason in self.failures:
            print(f"  failed: {label}: {reason}", file=out)
        if self.progress.best is not None:
            print(f"  best {self.metric}: {self.progress.best:.4f} ({self.progress.best_label})",
                  file=out)
        print("", file=out)
        # The same table `libra report` writes; failed and pruned trials are listed under it.
        if self.study.kind != "bench":  # a bench's results were printed when it finished
            table = render_markdown_table(frame, self.study, rounds=self.rounds)
            print(table, file=out)
            # The parent run says which trial is best and keeps the closing table (mlflow_view).
            client, parent = self.tracker.client, self.tracker.parent_id
            mlflow_view.log_summary(client, parent, table)
            mlflow_view.mark_best(client, parent, tidy_runs(frame), self.metric,
                                  self.study.direction)
        print(f"\nMLflow: {self.tracker.uri} (experiment {self.tracker.experiment_name!r})\n"
              + mlflow_view.browse_hint(self.tracker.uri, self.tracker.experiment_id), file=out)
        if self.counts["failed"]:
            print(f"{self.counts['failed']} trial(s) failed; fix the cause and re-run the same "
                  "command to retry them (finished trials are kept)", file=out)


# ------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------
def run_study(study: Study, opts: RunOptions) -> int:
    """Run (or resume) a study; returns 0 when every trial finished or was pruned, else 1."""
    _quiet()
    work_dir = os.path.abspath(opts.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    tracker = Tracker(study, work_dir, opts.tracking_uri, stream=opts.stream)
    where_stored = stores.study_stores(study, work_dir=work_dir, optuna_storage=opts.optuna_storage)
    storage_url = where_stored.optuna_storage
    ostudy = search.open_study(study, work_dir, storage_url, stream=opts.stream)
    recovered = search.recover_interrupted(ostudy, requeue=study.kind == "search")
    started, where = _connect_ray(opts.address, opts.verbose)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        concurrency = plan_concurrency(study, _alive_nodes(), where)
        out = opts.stream or sys.stdout
        res = study.spec.resources
        print(f"libra run: {study.name} ({study.kind}), {res.describe()} per trial, "
              f"up to {concurrency} at once on {where}", file=out)
        print(f"  work dir  {work_dir}", file=out)
        print(f"  MLflow    {tracker.uri} (experiment {tracker.experiment_name!r})", file=out)
        print(f"  Optuna    {where_stored.optuna_where} "
              f"(study {study.name!r})", file=out)
        if recovered:
            print(f"  resuming: {len(recovered)} trial(s) a stopped run left unfinished", file=out)
        if study.spec.proposals is not None:  # the paper's protocol: proposals first, once
            from harness import proposals_stage

            study = tracker.study = proposals_stage.run_stage(study, work_dir, tracker, out)
        if threading_main():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        driver = _Driver(study, opts, work_dir, tracker, ostudy, concurrency)
        return driver.run()
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous_term)
        if started:
            import ray

            ray.shutdown()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def describe(study: Study, opts: RunOptions) -> str:
    """The --dry-run text: the trials and their resources; touches no store and starts nothing."""
    import pandas as pd

    res = study.spec.resources
    cpus = os.cpu_count() or 1
    local = max(1, cpus // res.cpus_per_trial) if res.gpus_per_worker == 0 else None
    concurrency = res.concurrency if local is None else min(res.concurrency or local, local)
    lines = [f"study {study.name} ({study.kind}) from {study.path}"]
    if study.spec.description:
        lines.append(f"  {study.spec.description}")
    lines.append(f"resources: {res.describe()} per trial = {res.cpus_per_trial} CPU"
                 + (f" + {res.gpus_per_trial:g} GPU" if res.gpus_per_worker else "")
                 + f"; concurrency {res.concurrency or 'as many as fit'}"
                 + (f" (here: {concurrency} on {cpus} CPUs)" if local is not None else ""))
    lines.append(f"retries: {study.spec.max_retries if opts.max_retries is None else opts.max_retries}"
                 f" per trial; work dir {os.path.abspath(opts.work_dir)}")
    if study.spec.proposals is not None:
        from harness import proposals_stage

        proposals_stage.check_stage(study)
        folder = proposals_stage.stage_dir(study, opts.work_dir)
        ready = os.path.isfile(os.path.join(folder, "manifest.json"))
        lines.append(f"proposals: {'reused from' if ready else 'produced first into'} {folder} "
                     f"(RPN of {proposals_stage.stage_checkpoint(study)})")
        study = proposals_stage.with_proposals(study, folder)  # the trial keys the run will use
    if study.kind == "bench":
        bench = study.spec.bench
        plan = study.bench_trial()
        cfg = plan.config
        lines.append(f"1 trial [{plan.key}]: the component-cost benchmark ({', '.join(bench.what)}) "
                     f"of {cfg.detector.arch} {cfg.detector.backbone}, device {cfg.schedule.device}, "
                     f"{bench.warmup} warm-up + {bench.iters} timed rounds, batch "
                     f"{bench.batch or cfg.schedule.batch_size}"
                     + (f", image {bench.image_size[0]}x{bench.image_size[1]}" if bench.image_size else "")
                     + (", AMP" if bench.amp else "") + f", memory {bench.memory}, seed {plan.seed}")
    elif study.kind == "grid":
        trials = study.trials()
        rounds = study.seed_rounds
        if rounds is not None:
            lines.append(f"seeds in rounds: {rounds.initial} to start ({trials[0].seed}-"
                         f"{trials[-1].seed}), then one more per configuration per round until "
                         f"every main effect's 95% half-width <= {rounds.until_half_width:g} AP, "
                         f"at most {rounds.max} seeds ({len(study.grid_points()) * rounds.max} "
                         "trials); the first round:")
        lines.append(f"{len(trials)} trials:")
        short = short_names(study.varied_keys)
        switches = {c.key: c.title for c in components()}
        titles = {k: switches.get(k, short[k]) for k in study.varied_keys}
        table = pd.DataFrame([{"#": i, "trial_key": t.key,
                               **{titles[k]: render_value(t.params[k]) if k in t.params else "-"
                                  for k in study.varied_keys},
                               "seed": t.seed, "epochs": t.config.schedule.epochs}
                              for i, t in enumerate(trials)])
        lines.append(table.to_markdown(index=False))
    else:
        spec = study.spec.search
        lines.append(f"{spec.num_trials} trials proposed by {spec.sampler.name}, pruner "
                     f"{spec.pruner.name}, {spec.direction} {spec.metric} (seed {study.seeds[0]})")
        table = pd.DataFrame([{"key": k, **d.model_dump(exclude_none=True)}
                              for k, d in spec.space.items()])
        lines.append(table.to_markdown(index=False))
        for i, params in enumerate(spec.first_trials):
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            lines.append(f"first trial {i}: {shown}")
    return "\n".join(lines)

