"""Where a study's records live: the one rule, used by `libra run`, `libra report`, the tracker,
the Optuna driver and the bench.

Each store is, in order: the command-line flag, else the study file's `tracking:` block, else
a default under the work dir:

    work dir        --work-dir, else ./libra-work/<study name>            (absolute)
    MLflow          --tracking-uri, tracking.uri, else sqlite:////<work dir>/mlflow.db
    experiment      tracking.experiment, else the study's name
    Optuna          --optuna-storage, tracking.optuna_storage (an RDB URL), else the journal
                    file <work dir>/optuna.journal
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

JOURNAL = "optuna.journal"


def default_work_dir(name: str) -> str:
    return os.path.abspath(os.path.join("libra-work", name))


def default_uri(work_dir: str) -> str:
    """The embedded store: an absolute SQLite URI (a relative one breaks when cwd changes)."""
    return "sqlite:///" + os.path.abspath(os.path.join(work_dir, "mlflow.db"))


@dataclass(frozen=True)
class Stores:
    work_dir: str  # absolute
    mlflow_uri: str
    experiment: str
    optuna_storage: Optional[str]  # an RDB URL; None: the journal file under the work dir

    @property
    def optuna_journal(self) -> str:
        return os.path.join(self.work_dir, JOURNAL)

    @property
    def optuna_where(self) -> str:
        """The Optuna store in words: its URL or the journal's path."""
        return self.optuna_storage or self.optuna_journal


def resolve_stores(name: str, tracking: Any = None, *, work_dir: Optional[str] = None,
                   tracking_uri: Optional[str] = None, optuna_storage: Optional[str] = None) -> Stores:
    """The stores of study `name`; `tracking` is its `tracking:` block (harness.spec.Tracking)
    or None when the study file is not at hand; the keyword arguments are the flags."""
    work = os.path.abspath(work_dir) if work_dir else default_work_dir(name)
    return Stores(
        work_dir=work,
        mlflow_uri=tracking_uri or getattr(tracking, "uri", None) or default_uri(work),
        experiment=getattr(tracking, "experiment", None) or name,
        optuna_storage=optuna_storage or getattr(tracking, "optuna_storage", None),
    )


def study_stores(study: Any, **flags: Optional[str]) -> Stores:
    """resolve_stores for a loaded harness.spec.Study."""
    return resolve_stores(study.name, study.spec.tracking, **flags)
