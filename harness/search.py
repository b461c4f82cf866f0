"""Optuna: the study's storage, sampler and pruner, and the trial states the driver records.

Every study, grid or search, is an Optuna study named after the study file's `name`: a grid's
trials carry their settings as a user attribute, a search's are proposed by the sampler. Only the driver writes here (ask/tell); trial user attributes:

    libra.trial_key        the trial's key (harness.spec.TrialPlan.key), also in MLflow and the work dir
    libra.params           the settings the trial varies (dotted key -> value); a grid's trials
                           have them only here, a search's also as Optuna parameters
    libra.failure_reason   why a FAIL trial failed (after its retries)
    libra.interrupted      true on a FAIL trial that Ctrl-C cut short; a FAIL without a
                           failure reason was interrupted (by Ctrl-C or a killed driver), and its
                           parameters are enqueued again so the next run resumes it

A journal file keeps no heartbeats, so `recover_interrupted` marks trials left RUNNING by a
driver that died as FAIL (interrupted) and enqueues them again. One driver per study at a time.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import optuna
from optuna.trial import TrialState

from harness.errors import UserError
from harness.preflight import sqlalchemy_url
from harness.spec import Study

KEY_ATTR = "libra.trial_key"
PARAMS_ATTR = "libra.params"
REASON_ATTR = "libra.failure_reason"
INTERRUPTED_ATTR = "libra.interrupted"

optuna.logging.set_verbosity(optuna.logging.WARNING)


CONNECT_TIMEOUT_S = 5  # a database on the cluster's network answers in milliseconds


def engine_kwargs(url: str) -> dict[str, Any]:
    """Connections that notice a restarted server (pre-ping) and a silent one (a timeout)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    elif url.startswith("mysql"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def storage_for(work_dir: str, url: Optional[str] = None, *, source: str = "--optuna-storage",
                stream: Any = None) -> Any:
    """A journal file under the work dir, or the RDB at `url` (e.g. postgresql://... on a
    cluster), whose calls ride out a restart of the database (harness.retry)."""
    if url:
        from harness.retry import redacted, retrying_storage

        try:
            inner = optuna.storages.RDBStorage(sqlalchemy_url(url), engine_kwargs=engine_kwargs(url))
        except Exception as err:  # a bad URL, a missing driver, an unreachable server
            raise UserError(f"{source} {url}: cannot open the Optuna database "
                            f"({' '.join(str(_root(err)).split())[:200]}); check the URL, that the "
                            "server runs and the database exists, or drop --optuna-storage") from None
        return retrying_storage(inner, f"the Optuna database at {redacted(url)}", stream)
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(work_dir, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(work_dir, "optuna.journal")))


def _root(err: BaseException) -> BaseException:
    """The innermost cause (psycopg's "connection refused" rather than SQLAlchemy's wrapping)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    if study.spec.search is None:
        return optuna.samplers.RandomSampler()  # never consulted: a grid suggests nothing
    spec = study.spec.search.sampler
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.name == "grid":
        space = {key: dim.grid_values() for key, dim in study.spec.search.space.items()}
        return optuna.samplers.GridSampler(space, seed=spec.seed)
    try:
        import cmaes  # noqa: F401  (Optuna imports it lazily, after the first trials)
    except ImportError:
        raise UserError("search.sampler cmaes needs the `cmaes` package: pip install cmaes "
                        "(or use tpe / random)") from None
    return optuna.samplers.CmaEsSampler(seed=spec.seed, n_startup_trials=spec.startup_trials)


def make_pruner(study: Study, epochs: int) -> optuna.pruners.BasePruner:
    if study.spec.search is None or study.spec.search.pruner.name == "none":
        return optuna.pruners.NopPruner()
    spec = study.spec.search.pruner
    if spec.name == "median":
        # Steps are 1-based epochs and Optuna skips steps below n_warmup_steps, so +1 leaves
        # the first `warmup_epochs` epochs alone.
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.warmup_epochs + 1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1),
                                          reduction_factor=3)


def open_study(study: Study, work_dir: str, storage_url: Optional[str] = None,
               stream: Any = None) -> optuna.Study:
    """Create or load (resume) the Optuna study; enqueue a search's first trials once."""
    storage = storage_for(work_dir, storage_url, stream=stream)
    epochs = int(study.base.get("schedule", {}).get("epochs", 12))
    ostudy = optuna.create_study(
        storage=storage, study_name=study.name, sampler=make_sampler(study),
        pruner=make_pruner(study, epochs), direction=study.direction, load_if_exists=True,
    )
    if ostudy.direction.name.lower() != study.direction:
        raise UserError(f"the Optuna study {study.name!r} in {storage_url or work_dir} was created "
                        f"to {ostudy.direction.name.lower()}; use another work dir or study name")
    if study.spec.search is not None:
        for params in study.spec.search.first_trials:
            ostudy.enqueue_trial(dict(params), skip_if_exists=True)
    return ostudy


def recover_interrupted(ostudy: optuna.Study, requeue: bool = True) -> list[int]:
    """Mark trials left RUNNING by a dead driver as FAIL (interrupted); with `requeue`
    (searches), enqueue their parameters again. A grid re-plans from its file instead.

    Returns the numbers of the trials recovered. Call it before asking for new trials.
    """
    recovered = []
    for frozen in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        mark_interrupted(ostudy, frozen.number, frozen.params if requeue else {})
        recovered.append(frozen.number)
    return recovered


def mark_interrupted(ostudy: optuna.Study, trial: "optuna.Trial | int",
                     params: Mapping[str, Any]) -> None:
    """FAIL a trial that was cut short (not its own fault) and queue its parameters again.

    Such a FAIL carries no libra.failure_reason, which is how `counted_trials` tells it from a
    trial that failed for good.
    """
    if isinstance(trial, optuna.Trial):
        trial.set_user_attr(INTERRUPTED_ATTR, True)
    ostudy.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if params:
        ostudy.enqueue_trial(dict(params))


def counted_trials(ostudy: optuna.Study) -> int:
    """Trials that count towards a search's `num_trials`: complete, pruned or failed for good."""
    count = 0
    for frozen in ostudy.get_trials(deepcopy=False):
        if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED):
            count += 1
        elif frozen.state == TrialState.FAIL and REASON_ATTR in frozen.user_attrs:
            count += 1
    return count


def completed_keys(ostudy: optuna.Study) -> dict[str, float]:
    """trial_key -> value of every COMPLETE trial (a grid's resume check)."""
    out = {}
    for frozen in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = frozen.user_attrs.get(KEY_ATTR)
        if key is not None:
            out[key] = frozen.value
    return out


def pin(trial: optuna.Trial, params: Mapping[str, Any]) -> None:
    """Record a grid trial's settings (dotted key -> value) as the user attribute libra.params.

    Not as Optuna parameters: Optuna requires one categorical choice list per name for the
    study's lifetime, which a grid edited between runs (or a --set) would break.
    """
    trial.set_user_attr(PARAMS_ATTR, dict(params))


def suggest(trial: optuna.Trial, study: Study) -> dict[str, Any]:
    """A search trial's parameters (enqueued ones come back as they were queued)."""
    params = {}
    for key, dim in study.spec.search.space.items():
        try:
            if dim.type == "categorical":
                params[key] = trial.suggest_categorical(key, dim.choices)
            elif dim.type == "int":
                params[key] = trial.suggest_int(key, int(dim.low), int(dim.high),
                                                step=int(dim.step or 1), log=dim.log)
            else:
                params[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
        except ValueError as err:  # Optuna: the stored study knows this name with other choices
            raise UserError(f"{study.path}: search.space.{key}: the Optuna study {study.name!r} "
                            f"was created with a different space ({err}); use a new study name "
                            "(--set name=...) or another --work-dir") from None
    trial.set_user_attr(PARAMS_ATTR, params)
    return params


def tell_complete(ostudy: optuna.Study, trial: optuna.Trial, value: float) -> None:
    if value is None or not math.isfinite(value):
        tell_failed(ostudy, trial, f"the objective is {value}")
        return
    ostudy.tell(trial, value)


def tell_pruned(ostudy: optuna.Study, trial: optuna.Trial) -> None:
    ostudy.tell(trial, state=TrialState.PRUNED)


def tell_failed(ostudy: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(REASON_ATTR, reason[:1000])
    ostudy.tell(trial, state=TrialState.FAIL)
